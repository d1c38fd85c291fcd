"""Jobs end to end on the tiny models: params → items → guidance → artifacts."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from digin.core.jobs import ModelCache
from digin.core.kinds import run_job
from digin.core.output import render_artifacts
from digin.core.params import ParamsError, validate_params

FAST = {"ddim_steps": 3, "iterations": 2, "loss_steps": 2, "num_cutouts": 2, "lr": 0.05}


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


def _params(tiny_models, **extra):
    return {"diffusion": tiny_models["sd"], "resolution": 32, "guidance": FAST, **extra}


def test_guided_job_items_seeds_and_artifacts(tiny_models, cache):
    params = _params(
        tiny_models, classifier=tiny_models["classifier"], classes=[1, "tench"], images_per_class=2
    )
    calls = []
    result = run_job(
        "guided",
        params,
        seed=10,
        cache=cache,
        max_batch=3,
        progress=lambda s, t, info: calls.append((s, t)),
    )
    assert [it.seed for it in result.items] == [10, 11, 12, 13]
    assert [it.class_index for it in result.items] == [1, 1, 0, 0]
    assert result.items[2].prompt == "a photograph of a tench"
    assert calls[-1] == (6, 6)  # two batches of three iterations each
    arts = render_artifacts(result)
    assert {"result.json", "grid.png", "item_000.png", "item_003_start.png"} <= set(arts)
    grid = Image.open(io.BytesIO(arts["grid.png"]))
    assert grid.width >= 3 * 32 and grid.height >= 4 * 32
    summary = json.loads(arts["result.json"])
    assert summary["params"]["guidance"]["num_cutouts"] == 2  # normalised, defaults filled
    assert summary["params"]["guidance"]["guidance_scale"] == 3.0
    item = summary["items"][0]
    assert len(item["metrics"]["p"]) == 3 and len(item["train_loss"]) == 2
    assert 0 <= item["best_iteration"] <= 2
    assert summary["versions"]["torch"]
    assert summary["models"]["classifier"] == tiny_models["classifier"]


def test_disagreement_and_neuron_jobs(tiny_models, cache):
    params = _params(
        tiny_models,
        classifier1=tiny_models["classifier"],
        classifier2=tiny_models["open_clip"],
        classes=[2],
        loss="logits",
        clip_templates="simple",
    )
    result = run_job("disagreement", params, cache=cache)
    assert set(result.guidance.metrics) == {"p1", "p2"}
    params = _params(
        tiny_models,
        classifier=tiny_models["classifier"],
        neurons=[0, 5],
        classes=[3],
        mode="suppress_keep_class",
    )
    result = run_job("neuron", params, cache=cache)
    assert [(it.neuron, it.class_index) for it in result.items] == [(0, 3), (5, 3)]
    assert set(result.guidance.metrics) == {"activation", "p"}
    assert result.items[0].prompt == "a photograph of a " + result.items[0].class_name


def test_bad_params_name_the_field(tiny_models, cache):
    with pytest.raises(ParamsError, match=r"guidance\.iterations: .*less than or equal to 500"):
        validate_params(
            "guided",
            _params(tiny_models, classifier="x", classes=[1], guidance={"iterations": 501}),
        )
    with pytest.raises(ParamsError, match="classes: Field required"):
        validate_params("guided", {"diffusion": "x", "classifier": "y"})
    with pytest.raises(ParamsError, match="kind: must be one of"):
        validate_params("nope", {})
    with pytest.raises(ParamsError, match="needs classes"):
        validate_params(
            "neuron",
            {"diffusion": "x", "classifier": "y", "neurons": [1], "mode": "activate_keep_class"},
        )
    bad_class = _params(tiny_models, classifier=tiny_models["classifier"], classes=["zebra"])
    with pytest.raises(ValueError, match="zebra"):
        run_job("guided", bad_class, cache=cache)
    bad_neuron = _params(tiny_models, classifier=tiny_models["classifier"], neurons=[10**6])
    with pytest.raises(ValueError, match="neurons must be <"):
        run_job("neuron", bad_neuron, cache=cache)
