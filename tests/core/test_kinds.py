"""The table of job kinds (digin.core.kinds): one entry per params model, runners,
progress totals."""

from __future__ import annotations

import pytest

from digin.core.jobs import ModelCache
from digin.core.kinds import KINDS, run_job
from digin.core.params import PARAMS_BY_KIND, ParamsError, validate_params

FAST = {"ddim_steps": 2, "iterations": 1, "loss_steps": 1, "num_cutouts": 2}


def test_the_table_names_every_kind_with_its_params_model():
    assert list(KINDS) == list(PARAMS_BY_KIND)
    for name, kind in KINDS.items():
        assert kind.name == name and kind.params is PARAMS_BY_KIND[name]
        assert callable(kind.run) and callable(kind.steps)


def test_an_unknown_kind_is_refused_naming_the_field():
    with pytest.raises(ParamsError) as err:
        run_job("nope", {})
    assert err.value.errors[0]["field"] == "kind"


@pytest.mark.parametrize("preset, runner_batch", [(None, 8), ("reference", 8), (None, 3)])
def test_the_steps_known_in_advance_are_the_steps_the_run_reports(
    tiny_models, preset, runner_batch
):
    guidance = {**FAST, **({"preset": preset} if preset else {})}
    raw = {
        "diffusion": tiny_models["sd"],
        "classifier": tiny_models["classifier"],
        "resolution": 32,
        "classes": [0, 1],
        "images_per_class": 2,
        "guidance": guidance,
    }
    steps = KINDS["guided"].steps(validate_params("guided", raw), runner_batch)
    seen: list[tuple[int, int]] = []
    run_job("guided", raw, cache=ModelCache(), max_batch=runner_batch,
            progress=lambda step, total, info: seen.append((step, total)))  # fmt: skip
    assert {total for _, total in seen} == {steps}
    assert seen[-1][0] == steps
    items, per_run = 4, 1 if preset == "reference" else runner_batch
    assert steps == (FAST["iterations"] + 1) * -(-items // per_run)


def test_analysis_and_counterfactual_kinds_report_their_totals_themselves():
    for name in ("neural_pca", "spurious_score", "pca_component", "counterfactual"):
        assert KINDS[name].steps(object(), 8) is None
