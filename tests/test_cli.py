"""The `digin` command line (typer's CliRunner, in process)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from digin.cli import app
from digin.core.registry import ModelInfo, parse_spec

runner = CliRunner()


def test_models_json_lists_the_registry():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    specs = {m["spec"] for m in payload["models"]}
    assert {"diffusers:CompVis/stable-diffusion-v1-4", "timm:resnet50.a1_in1k"} <= specs
    first = payload["models"][0]
    assert set(first) == set(ModelInfo.model_fields)
    schemes = {"diffusers", "timm", "open_clip", "digits", "blip", "sam"}
    assert {s["scheme"] for s in payload["schemes"]} == schemes


def test_models_table():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SPEC", "KIND", "RES", "CLASSES", "LOCAL", "SOURCE"]
    assert any(line.startswith("timm:vit_large_patch16_224 ") for line in lines)
    assert "timm:<arch>@<file.safetensors>" in result.stdout


def test_make_tiny_models_prints_loadable_specs(tmp_path):
    pytest.importorskip("digin.core.tiny", reason="digin.core.tiny is not written yet")
    result = runner.invoke(app, ["make-tiny-models", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    specs = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert specs
    for spec in specs.values():
        parse_spec(spec)
