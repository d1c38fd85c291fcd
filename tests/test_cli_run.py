"""`digin run` end to end on the tiny SD and SDXL pipelines, and its errors on bad params."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from digin.cli import app

FAST = {"ddim_steps": 3, "iterations": 2, "loss_steps": 2, "num_cutouts": 2, "lr": 0.05}


def _write(path, params):
    path.write_text(json.dumps(params))
    return path


def test_run_sd_guided(tiny_models, tmp_path):
    params = {
        "diffusion": tiny_models["sd"],
        "classifier": tiny_models["classifier"],
        "classes": ["goldfish"],
        "resolution": 32,
        "guidance": FAST,
    }
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["run", "guided", "--params", str(_write(tmp_path / "p.json", params)),
              "--out", str(out), "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    assert summary["kind"] == "guided" and summary["seed"] == 3
    assert summary["items"][0]["class_name"] == "goldfish"
    assert len(summary["items"][0]["metrics"]["p"]) == FAST["iterations"] + 1
    assert Image.open(out / "item_000.png").size == (32, 32)
    grid = Image.open(out / "grid.png")
    assert grid.width >= 3 * 32  # one tile per iteration


def test_run_sdxl_disagreement(tiny_models, tmp_path):
    params = {
        "diffusion": tiny_models["sdxl"],
        "classifier1": tiny_models["classifier"],
        "classifier2": tiny_models["open_clip"],
        "clip_templates": "simple",
        "classes": [1],
        "loss": "log_conf",
        "resolution": 32,
        "guidance": FAST,
    }
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["run", "disagreement", "--params", str(_write(tmp_path / "p.json", params)),
              "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    assert set(summary["items"][0]["metrics"]) == {"p1", "p2"}
    assert (out / "grid.png").exists()


def test_run_bad_params_names_the_field(tmp_path):
    params = {"diffusion": "x", "classifier": "y", "classes": [1], "guidance": {"lr": -1}}
    result = CliRunner().invoke(
        app, ["run", "guided", "--params", str(_write(tmp_path / "p.json", params)),
              "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "guidance.lr" in result.output and "greater than or equal to 0" in result.output
    assert not (tmp_path / "o").exists()  # nothing half-written
    (tmp_path / "broken.json").write_text("{not json")
    result = CliRunner().invoke(
        app, ["run", "guided", "--params", str(tmp_path / "broken.json"), "--out", "o"]
    )
    assert result.exit_code == 2 and "cannot read" in result.output
