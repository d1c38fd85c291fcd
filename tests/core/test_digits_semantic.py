"""Semantic tests on the shipped digits zoo: explanations whose right answer we know.

Each runs an example params file (`examples/*_digits.json`, the zoo's guidance settings of
`digin.core.digits.settings.DIGITS_GUIDANCE`) through `digin.core.kinds.run_job` and judges the
result with a plain function of the images: the independent judge classifier, or the patch detector.
The planted class, patch and patch unit are read from the model card of the zoo in use
($DIGIN_ZOO_DIR or the shipped one), so a zoo trained with another class is judged the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from digin.core.classes import resolve_class
from digin.core.config import GuidanceConfig
from digin.core.digits.data import CLASS_NAMES, load_images, make_splits
from digin.core.digits.evaluate import patch_unit
from digin.core.digits.semantic import judge_agreement, patch_rates
from digin.core.digits.settings import CLASS_PROMPT, DIGITS_GUIDANCE, PLAIN_PROMPT
from digin.core.digits.zoo import card_patch, card_patch_plan, read_card
from digin.core.jobs import ModelCache
from digin.core.kinds import run_job
from digin.core.registry import ZOO_DIR
from tests.core.precision import DEVICE, with_precision

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KINDS = ("guided", "disagreement", "neuron")


def example(kind: str) -> dict:
    return json.loads((EXAMPLES / f"{kind}_digits.json").read_text())


@pytest.fixture(scope="module")
def cache():
    return ModelCache()  # specs 'digits…' load the shipped zoo (core/zoo)


@pytest.fixture(scope="module")
def spurious_card():
    return read_card("cnn-spurious")  # the zoo in use


@pytest.fixture(scope="module")
def planted(spurious_card):
    """The class the zoo's cnn-spurious was trained to tie to the patch (its model card)."""
    k = card_patch_plan(spurious_card)["correlated_class"]
    assert isinstance(k, int) and 0 <= k < len(CLASS_NAMES), k
    return k


@pytest.mark.parametrize("kind", KINDS)
def test_examples_use_the_zoo_guidance_settings(kind):
    params = example(kind)
    assert params["diffusion"] == "digits"
    assert GuidanceConfig(**params["guidance"]) == DIGITS_GUIDANCE
    assert params["prompt"] in (CLASS_PROMPT, PLAIN_PROMPT)


def test_examples_name_the_shipped_correlated_class_and_patch_unit():
    shipped = read_card("cnn-spurious", ZOO_DIR)  # the examples are written for the shipped zoo
    (ref,) = example("disagreement")["classes"]
    assert resolve_class(ref, CLASS_NAMES) == card_patch_plan(shipped)["correlated_class"]
    assert example("neuron")["neurons"] == [shipped["metrics"]["patch_unit"]]


def test_the_card_names_the_patch_unit_of_its_classifier(cache, spurious_card, planted):
    x, y = load_images()
    test = make_splits(y).test
    clf = cache.classifier("digits:cnn-spurious", "cpu", "openai")
    unit, _ = patch_unit(clf, x[test], y[test], card_patch(spurious_card), planted)
    assert unit == spurious_card["metrics"]["patch_unit"]


def test_guided_cnn_towards_each_class_convinces_the_judge(cache):
    params = example("guided")
    assert params["classifier"] == "digits:cnn" and len(params["classes"]) == 10
    result = run_job("guided", with_precision(params), cache=cache, max_batch=32, device=DEVICE)
    judge = cache.classifier("digits:judge", "cpu", "openai")
    agreement, _ = judge_agreement(result, judge)
    assert agreement >= 0.90


def test_disagreement_spurious_vs_clean_draws_the_patch(cache, spurious_card, planted):
    params = example("disagreement") | {"classes": [planted]}
    assert (params["classifier1"], params["classifier2"]) == ("digits:cnn-spurious", "digits:cnn")
    result = run_job(
        "disagreement", with_precision(params), cache=cache, max_batch=32, device=DEVICE
    )
    guided, unguided = patch_rates(result, card_patch(spurious_card))
    assert guided >= 0.80
    assert guided >= unguided + 0.4  # far above the rate of the unguided samples


def test_neuron_of_the_patch_unit_draws_the_patch(cache, spurious_card):
    params = example("neuron") | {"neurons": [spurious_card["metrics"]["patch_unit"]]}
    assert params["classifier"] == "digits:cnn-spurious" and params["mode"] == "activate"
    result = run_job("neuron", with_precision(params), cache=cache, max_batch=32, device=DEVICE)
    guided, unguided = patch_rates(result, card_patch(spurious_card))
    assert guided >= 0.80
    assert guided >= unguided + 0.4
