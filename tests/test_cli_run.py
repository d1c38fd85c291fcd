"""`digin run` end to end on the tiny SD and SDXL pipelines, and its errors on bad params."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from digin.cli import app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
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
        app,
        [
            "run",
            "guided",
            "--params",
            str(_write(tmp_path / "p.json", params)),
            "--out",
            str(out),
            "--seed",
            "3",
        ],
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
        app,
        [
            "run",
            "disagreement",
            "--params",
            str(_write(tmp_path / "p.json", params)),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    assert set(summary["items"][0]["metrics"]) == {"p1", "p2"}
    assert (out / "grid.png").exists()


def test_run_bad_params_names_the_field(tmp_path):
    params = {"diffusion": "x", "classifier": "y", "classes": [1], "guidance": {"lr": -1}}
    result = CliRunner().invoke(
        app,
        [
            "run",
            "guided",
            "--params",
            str(_write(tmp_path / "p.json", params)),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert "guidance.lr" in result.output and "greater than or equal to 0" in result.output
    assert not (tmp_path / "o").exists()  # nothing half-written
    (tmp_path / "broken.json").write_text("{not json")
    result = CliRunner().invoke(
        app, ["run", "guided", "--params", str(tmp_path / "broken.json"), "--out", "o"]
    )
    assert result.exit_code == 2 and "cannot read" in result.output


def test_run_digits_example_offline_with_zoo_defaults(tmp_path):
    """The README's demo: the digits example runs on the bundled zoo with no model download."""
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["run", "guided", "--params", str(EXAMPLES / "guided_digits.json"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    assert summary["models"] == {"diffusion": "digits", "classifier": "digits:cnn"}
    assert [it["class_name"] for it in summary["items"]][:3] == ["zero", "one", "two"]
    assert Image.open(out / "item_007.png").size == (16, 16)


def test_run_without_params_names_the_missing_field(tmp_path):
    result = CliRunner().invoke(app, ["run", "guided", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "classes: Field required" in result.output


def test_run_fills_in_the_zoo_models_settings_and_prompt(tmp_path):
    params = {"classes": ["7"], "guidance": {"iterations": 1}}
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["run", "guided", "--params", str(_write(tmp_path / "p.json", params)), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    assert summary["params"]["diffusion"] == "digits"
    assert summary["params"]["prompt"] == "a handwritten digit {class}"
    assert summary["params"]["guidance"]["ddim_steps"] == 5  # the zoo's, not SD's 20
    assert summary["items"][0]["prompt"] == "a handwritten digit seven"


def test_run_neural_pca_then_pca_component_then_spurious_score(tmp_path):
    """The analysis kinds through `digin run`: a PCA, a visualisation from its result file,
    and a spurious score, each with its figures."""
    params = json.loads((EXAMPLES / "neural_pca_digits.json").read_text())
    params["visualization"] |= {"components": 2, "images_per_class": 1}
    params["visualization"]["guidance"]["iterations"] = 1
    out = tmp_path / "pca"
    result = CliRunner().invoke(
        app,
        [
            "run",
            "neural_pca",
            "--params",
            str(_write(tmp_path / "p.json", params)),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    assert summary["class_name"] == "seven" and len(summary["pca"]["components"]) == 64
    assert len(summary["jobs"]["visualization"]["items"]) == 2
    assert Image.open(out / "top_images.png").width > 8 * 16
    assert (out / "visualizations.png").exists() and (out / "visualization_item_001.png").exists()

    params = {"pca": str(out / "result.json"), "components": [1], "guidance": {"iterations": 1}}
    result = CliRunner().invoke(
        app,
        [
            "run",
            "pca_component",
            "--params",
            str(_write(tmp_path / "c.json", params)),
            "--out",
            str(tmp_path / "component"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "component" / "result.json").read_text())
    assert summary["items"][0]["component"] == 1 and "alpha" in summary["items"][0]["best"]
    assert summary["models"]["classifier"] == "digits:cnn-spurious"

    out = tmp_path / "spurious"
    result = CliRunner().invoke(
        app,
        [
            "run",
            "spurious_score",
            "--params",
            str(EXAMPLES / "spurious_score_digits.json"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    assert 0 <= summary["mean_auc"] <= 1 and summary["classes"][0]["roc"]["fpr"][0] == 0
    assert Image.open(out / "roc.png").mode == "RGB"


def test_run_analysis_errors_name_the_field(tmp_path):
    params = {"class": 7, "images": {"image_ids": ["abc"]}}
    result = CliRunner().invoke(
        app,
        [
            "run",
            "neural_pca",
            "--params",
            str(_write(tmp_path / "p.json", params)),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "images.image_ids" in result.output
    assert not (tmp_path / "o").exists()
    params = {"classes": [7], "spurious": {"digits": "test", "patch": {"rate": 2}}}
    result = CliRunner().invoke(
        app,
        [
            "run",
            "spurious_score",
            "--params",
            str(_write(tmp_path / "s.json", params)),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "spurious.patch.rate" in result.output
