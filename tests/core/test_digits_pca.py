"""Semantic tests of neural PCA and the spurious score on the shipped digits zoo.

`digits:cnn-spurious` relies on a planted patch for one class (the shipped zoo: a 3x3 patch,
top-left, for seven); `digits:cnn` does not. The planted class and patch are read from the model
card of the zoo in use ($DIGIN_ZOO_DIR or the shipped one), so a zoo trained with another class
is judged the same way. The image sets are built from the bundled digits
(`digin.core.imagesets`), the jobs run the examples
(`examples/{neural_pca,pca_component,spurious_score}_digits.json`, the zoo's guidance settings)
with that class through `digin.core.kinds.run_job`, and the verdicts are plain functions of the
results: correlation with the known patch flags, and the patch detector `patch_present`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from digin.core.config import GuidanceConfig
from digin.core.digits.data import CLASS_NAMES
from digin.core.digits.semantic import patch_rates
from digin.core.digits.settings import DIGITS_GUIDANCE
from digin.core.digits.zoo import card_patch, card_patch_plan, read_card
from digin.core.jobs import ModelCache
from digin.core.kinds import run_job
from digin.core.output import write_outputs
from tests.core.precision import with_precision

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(kind: str) -> dict:
    return json.loads((EXAMPLES / f"{kind}_digits.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The 16x16 models are too small to gain from intra-op threads, and on a shared machine
    two OpenMP threads fighting other processes made the visualisation test ~8x slower
    (223 s vs 27 s measured back to back)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


@pytest.fixture(scope="module")
def card():
    return read_card("cnn-spurious")


@pytest.fixture(scope="module")
def planted(card):
    """The class the zoo's cnn-spurious was trained to tie to the patch (its model card)."""
    k = card_patch_plan(card)["correlated_class"]
    assert isinstance(k, int) and 0 <= k < len(CLASS_NAMES), k
    return k


@pytest.fixture(scope="module")
def pca_result(cache, tmp_path_factory, planted):
    """neural_pca of cnn-spurious for the planted class over its train digits, half of them
    patched (as in its training, where most of them carried the patch); written to disk like
    `digin run`."""
    params = example("neural_pca") | {"class": CLASS_NAMES[planted]}
    params["visualization"]["components"] = 0  # the visualisation is the next test's job
    result = run_job("neural_pca", params, cache=cache)
    out = tmp_path_factory.mktemp("neural_pca")
    write_outputs(result, out)
    return result, out / "result.json"


def test_examples_use_the_zoo_guidance_settings():
    for params in (example("neural_pca")["visualization"], example("pca_component")):
        assert params["diffusion"] == "digits"
        assert GuidanceConfig(**params["guidance"]) == DIGITS_GUIDANCE
    assert example("neural_pca")["classifier"] == "digits:cnn-spurious"


def test_neural_pca_isolates_the_planted_patch(pca_result, planted):
    result, _ = pca_result
    data = result.data
    assert data["class_index"] == planted and data["num_images"] >= 90
    patched = [im["patched"] for im in data["images"]]
    assert 0.4 < sum(patched) / len(patched) < 0.6
    r = data["patch_correlation"]
    best = max(range(3), key=lambda l: abs(r[l]))  # among the top three components
    assert abs(r[best]) >= 0.8
    # its top images are patched digits
    assert all(patched[i] for i in data["top_images"][best])
    # all 64 components kept: the α of every image sum to logit − bias − 1·μ
    assert len(data["pca"]["components"]) == 64
    assert max(abs(im["residual"]) for im in data["images"]) < 1e-3


def test_pca_component_visualisations_draw_the_patch(pca_result, cache, card):
    result, path = pca_result
    r = result.data["patch_correlation"]
    component = max(range(3), key=lambda l: abs(r[l]))
    params = example("pca_component") | {"pca": str(path), "components": [component]}
    job = run_job("pca_component", with_precision(params), seed=0, cache=cache, max_batch=32)
    assert len(job.items) == 10 and {it.component for it in job.items} == {component}
    assert job.models["classifier"] == "digits:cnn-spurious"  # read from the result file
    guided, unguided = patch_rates(job, card_patch(card))
    assert guided >= 0.80
    assert guided >= unguided + 0.4


@pytest.mark.parametrize(("classifier", "low", "high"), [
    ("digits:cnn-spurious", 0.0, 0.7),  # the patch alone triggers the planted class
    ("digits:cnn", 0.9, 1.0),  # patched other digits are not of that class to it
])  # fmt: skip
def test_spurious_score_separates_the_two_classifiers(cache, planted, classifier, low, high):
    name = CLASS_NAMES[planted]
    params = example("spurious_score") | {"classifier": classifier, "classes": [name]}
    result = run_job("spurious_score", params, cache=cache)
    (score,) = result.data["classes"]
    assert score["class_name"] == name
    assert low <= score["auc"] <= high
    assert result.data["mean_auc"] == score["auc"]
    assert score["num_spurious_images"] > 250 and score["num_class_images"] >= 30
