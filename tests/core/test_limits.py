"""What an accepted job may ask of a worker (docs/architecture.md §9.7): resolution bounds that
follow the diffusion model's family and native side, a cost estimate for every kind, bounded
caches of what clients send, and hub ids that never read a local folder of the same name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from digin.core.limits import COST_BY_KIND, LRU, cost_error, estimate_cost
from digin.core.params import PARAMS_BY_KIND, ParamsError, validate_params
from digin.core.registry import (
    GENERAL_MAX_RESOLUTION,
    local_paths,
    max_resolution,
    native_resolution,
    weights_source,
)
from digin.service.settings import DEFAULT_MAX_JOB_COST

ROOT = Path(__file__).resolve().parents[2]
SD15 = "diffusers:stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "diffusers:stabilityai/stable-diffusion-xl-base-1.0"
PCA = {"classifier": "digits:cnn", "class_index": 3, "mean": [0.0] * 4,
       "components": [[1.0, 0, 0, 0], [0, 1.0, 0, 0]]}  # fmt: skip


# --- resolution bounds ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "native", "bound"),
    [
        ("digits", 16, 64),  # the zoo's pixel-space model: 4x
        ("digits@/srv/another-zoo", 16, 64),  # any zoo folder: the same 16 px model
        (SD15, 512, 1024),  # latent diffusion: 2x
        ("diffusers:CompVis/stable-diffusion-v1-4", 512, 1024),
        ("diffusers:stabilityai/stable-diffusion-2-1-base", 512, 1024),
        (SDXL, 1024, 2048),
        ("diffusers:/models/my-sd", None, GENERAL_MAX_RESOLUTION),  # a local folder: unknown
        ("diffusers:someone/their-sd", None, GENERAL_MAX_RESOLUTION),  # an uncurated hub id
        ("digits:cnn", None, GENERAL_MAX_RESOLUTION),  # a classifier: no diffusion bound
        ("nosuch:spec", None, GENERAL_MAX_RESOLUTION),  # malformed: other checks report it
    ],
)
def test_the_resolution_bound_follows_the_models_family_and_native_side(spec, native, bound):
    assert native_resolution(spec) == native
    assert max_resolution(spec).side == bound


def _with_diffusion(kind: str, spec: str, resolution: int) -> tuple[dict[str, Any], str]:
    """Params of `kind` on diffusion model `spec` at `resolution`, and the field it is in."""
    common = {"diffusion": spec, "resolution": resolution}
    if kind == "neural_pca":
        return {"class": 3, "visualization": common}, "visualization.resolution"
    raw = {
        "guided": {"classes": [3]},
        "disagreement": {"classes": [3]},
        "neuron": {"neurons": [1]},
        "pca_component": {"pca": PCA},
        "counterfactual": {"image": "digits:test/0", "targets": [1]},
        "misclassified": {},
    }[kind]
    return {**raw, **common}, "resolution"


@pytest.mark.parametrize(
    "kind", [k for k in PARAMS_BY_KIND if k not in ("spurious_score", "audit_class")]
)
@pytest.mark.parametrize(("spec", "bound"), [("digits", 64), (SD15, 1024), (SDXL, 2048)])
def test_a_resolution_above_the_bound_is_refused_naming_the_model_and_the_bound(kind, spec, bound):
    raw, field = _with_diffusion(kind, spec, bound)
    validate_params(kind, raw)  # the bound itself is allowed
    if bound == GENERAL_MAX_RESOLUTION:
        return  # above it, the params' own limit answers (tests/api/test_app_jobs.py)
    raw, field = _with_diffusion(kind, spec, bound + 16)
    with pytest.raises(ParamsError) as caught:
        validate_params(kind, raw)
    (error,) = caught.value.errors
    assert error["field"] == field
    assert repr(spec) in error["message"] and f"above {bound}," in error["message"]


def test_a_model_of_unknown_native_side_gets_the_general_bound(tiny_models):
    raw = {"diffusion": tiny_models["sd"], "classes": [1], "resolution": GENERAL_MAX_RESOLUTION}
    assert validate_params("guided", raw).resolution == GENERAL_MAX_RESOLUTION


def test_digin_run_refuses_a_resolution_above_the_bound_before_anything_runs(tmp_path):
    from digin.cli import app

    params = tmp_path / "p.json"
    params.write_text(json.dumps({"classes": [3], "resolution": 2048}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "guided", "--params", str(params), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "resolution" in result.output and "'digits'" in result.output
    assert "above 64" in result.output
    assert not out.exists()


# --- cost estimates ------------------------------------------------------------------------------
FAST = {"iterations": 7, "ddim_steps": 9, "loss_steps": 1}
# kind → (raw params, the estimate worked out by hand)
ESTIMATES: dict[str, tuple[dict[str, Any], int]] = {
    "guided": ({"classes": [1, 2, 3], "images_per_class": 4, "guidance": FAST},
               12 * 8 * 9 * 16**2),
    "disagreement": ({"classes": [1, 2], "images_per_class": 2, "resolution": 32,
                      "guidance": FAST}, 4 * 8 * 9 * 32**2),
    "neuron": ({"neurons": [1, 2, 3], "diffusion": SD15, "guidance": FAST},
               3 * 8 * 9 * 512**2),  # SD 1.5's native side
    "pca_component": ({"pca": PCA, "components": [0, 1], "images_per_class": 3,
                       "guidance": FAST}, 6 * 8 * 9 * 16**2),
    "neural_pca": ({"class": 3, "images": {"digits": "train", "limit": 100},
                    "visualization": {"components": 2, "images_per_class": 4, "guidance": FAST}},
                   100 * 16**2 + 8 * 8 * 9 * 16**2),
    "spurious_score": ({"classes": [1, 2], "class_images": {"image_ids": ["a", "b", "c"]},
                        "spurious": {"digits": "test", "limit": 50}}, 2 * 53 * 16**2),
    "counterfactual": ({"image": "digits:test/0", "targets": "others",
                        "guidance": {**FAST, "checkpointing": False},
                        "counterfactual": {"null_text_steps": 4, "p2p_fractions": [0.3, 0.5]}},
                       9 * (8 + 4) * 9 * 16**2 + 1 * (4 + 5) * 9 * 16**2),
    "misclassified": ({"images": {"image_ids": ["a", "b", "c"]}, "labels": [1, 2, 3],
                       "max_images": 2, "guidance": {**FAST, "checkpointing": False},
                       "counterfactual": {"null_text_steps": 4, "p2p_fractions": [0.5]}},
                      3 * 16**2 + 2 * ((8 + 2) * 9 * 16**2 + (4 + 5) * 9 * 16**2)),
    "audit_class": ({"class": 7}, 100 * 10 * 16**2),  # 100 images of each of the 10 classes
}  # fmt: skip


def test_every_kind_of_the_kinds_table_has_an_estimate():
    from digin.core.kinds import KINDS

    assert set(COST_BY_KIND) == set(PARAMS_BY_KIND) == set(KINDS) == set(ESTIMATES)


@pytest.mark.parametrize("kind", sorted(ESTIMATES))
def test_the_estimate_of_each_kind(kind):
    raw, expected = ESTIMATES[kind]
    params = validate_params(kind, raw)
    cost = estimate_cost(kind, params)
    assert cost.value == expected, cost.describe()
    # the stored form (normalised JSON) gives the same
    assert estimate_cost(kind, params.model_dump(mode="json")).value == expected
    assert cost_error(kind, params, expected) is None  # at the cap: accepted
    assert cost_error(kind, params, None) is None  # no cap
    error = cost_error(kind, params, expected - 1)
    assert error is not None and error["field"] == "params"
    assert "DIGIN_MAX_JOB_COST" in error["message"]
    assert f"{expected:.3g}" in error["message"] and f"{expected - 1:.3g}" in error["message"]


def test_unknown_models_are_estimated_at_the_largest_supported_size(tiny_models):
    raw = {"diffusion": tiny_models["sd"], "classifier": tiny_models["classifier"],
           "classes": [1], "guidance": FAST}  # fmt: skip
    assert estimate_cost("guided", validate_params("guided", raw)).value == 8 * 9 * 1024**2
    raw = {"classifier": "timm:resnet18", "classes": [1], "spurious": {"folder": "/data/x"},
           "class_images": {"folder": "/data/y", "limit": 10}}  # fmt: skip
    cost = estimate_cost("spurious_score", validate_params("spurious_score", raw))
    assert cost.value == (10_000 + 10) * 384**2  # a full folder, the largest curated input


def _kind_of_example(path: Path) -> str:
    return next(k for k in sorted(PARAMS_BY_KIND, key=len, reverse=True)
                if path.name.startswith(k))  # fmt: skip


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.json")), ids=lambda p: p.name)
def test_the_default_cap_admits_every_example(path):
    kind = _kind_of_example(path)
    params = validate_params(kind, json.loads(path.read_text()))
    assert cost_error(kind, params, DEFAULT_MAX_JOB_COST) is None


def test_the_default_cap_refuses_the_adversarial_sweep_in_one_job():
    """1000 classes x 64 images x 100 DDIM steps on the 16 px digits model: inside every
    params bound, 1.8e10 pixel-steps."""
    raw = {"classes": list(range(10)) * 100, "images_per_class": 64,
           "guidance": {"ddim_steps": 100}}  # fmt: skip
    error = cost_error("guided", validate_params("guided", raw), DEFAULT_MAX_JOB_COST)
    assert error is not None and "64000 items x 11 passes x 100 DDIM steps" in error["message"]


# --- bounded caches ------------------------------------------------------------------------------
def test_lru_forgets_the_least_recently_used():
    cache: LRU[str, int] = LRU(2)
    cache["a"], cache["b"] = 1, 2
    assert cache.get("a") == 1  # a is now the most recent
    cache["c"] = 3
    assert list(cache) == ["a", "c"] and "b" not in cache
    assert cache.get_or_make("d", lambda: 4) == 4 and list(cache) == ["c", "d"]
    assert cache.get_or_make("d", lambda: 5) == 4  # a hit makes nothing
    with pytest.raises(ValueError, match="at least 1"):
        LRU(0)


def test_the_model_cache_holds_at_most_its_size():
    from digin.core.jobs import ModelCache

    cache = ModelCache(max_models=2)
    cnn = cache.classifier("digits:cnn", "cpu", "openai")
    assert cache.classifier("digits:cnn", "cpu", "openai") is cnn  # cached
    cache.classifier("digits:mlp", "cpu", "openai")
    cache.classifier("digits:judge", "cpu", "openai")
    assert len(cache._models) == 2
    assert cache.classifier("digits:cnn", "cpu", "openai") is not cnn  # dropped, loaded again


def test_zero_shot_text_embeddings_are_bounded(tiny_models, monkeypatch):
    from digin.core import loaders

    monkeypatch.setattr(loaders, "_TEXT_EMBEDDINGS", LRU(2))
    for names in (["a", "b"], ["c", "d"], ["e", "f"]):
        loaders.load_classifier(tiny_models["open_clip"], class_names=names,
                                clip_templates="simple")  # fmt: skip
    assert len(loaders._TEXT_EMBEDDINGS) == 2
    assert [key[2] for key in loaders._TEXT_EMBEDDINGS] == [("c", "d"), ("e", "f")]


# --- hub ids go through the hub ------------------------------------------------------------------
@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline: hub ids resolve to cached snapshots only."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_never_loads_a_local_folder_of_that_name(tiny_models, tmp_path, offline_hub,
                                                          monkeypatch):  # fmt: skip
    from digin.core.loaders import load_diffusion, pipeline_folder

    tiny_sd = Path(tiny_models["sd"].removeprefix("diffusers:"))
    work = tmp_path / "work"
    shutil.copytree(tiny_sd, work / "someone" / "sd")  # ./someone/sd in the working folder
    monkeypatch.chdir(work)
    spec = "diffusers:someone/sd"
    assert weights_source(spec) == "hf-hub:someone/sd" and local_paths(spec) == []
    with pytest.raises(FileNotFoundError):  # not in the hub cache: the local folder is not read
        load_diffusion(spec)

    # the same id, cached from the hub: loaded from the snapshot
    repo = offline_hub / "models--someone--sd"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_sd, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert pipeline_folder("someone/sd") == snapshot
    assert load_diffusion(spec).spec == spec

    # a relative local folder is written as such
    assert pipeline_folder("./someone/sd") == Path("someone/sd")
    with pytest.raises(FileNotFoundError, match="not found"):
        pipeline_folder("./nobody/sd")
