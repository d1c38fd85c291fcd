"""Shared by the worker and end-to-end tests: job params that run in seconds on a CPU, and
checks of stored artifacts."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DIGITS_DIFFUSION = ROOT / "core" / "zoo" / "digits.safetensors"

ParamsFactory = Callable[..., dict[str, Any]]


def params_factory(request: pytest.FixtureRequest) -> ParamsFactory:
    """`make(iterations=2, **extra)`: raw params of a `guided` job that runs in seconds: the
    bundled digits zoo ({"classes": ["seven"]}) when its diffusion model is there, else the
    tiny random-weight models (tests/conftest.py `tiny_models`)."""
    if DIGITS_DIFFUSION.exists():
        base: dict[str, Any] = {"classes": ["seven"]}
        guidance: dict[str, Any] = {}
    else:
        tiny = request.getfixturevalue("tiny_models")
        base = {"diffusion": tiny["sd"], "classifier": tiny["classifier"], "classes": [1],
                "resolution": 32}  # fmt: skip
        guidance = {"ddim_steps": 2, "loss_steps": 1, "num_cutouts": 1}

    def make(iterations: int = 2, **extra: Any) -> dict[str, Any]:
        return {**base, "guidance": {**guidance, "iterations": iterations}, **extra}

    return make


def normalised(kind: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The params as the API stores them: validated, defaults filled in."""
    from core.params import validate_params

    return validate_params(kind, raw).model_dump(mode="json")


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.width > 0 and image.height > 0
    return image


def artifact_names(n_items: int = 1) -> list[str]:
    items = [f"item_{i:03d}{suffix}.png" for i in range(n_items) for suffix in ("", "_start")]
    return sorted(["grid.png", "result.json", *items])
