"""Shared by the worker and end-to-end tests: job params that run in seconds on a CPU, and
checks of stored artifacts."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

ParamsFactory = Callable[..., dict[str, Any]]


def digits_params(iterations: int = 2, **extra: Any) -> dict[str, Any]:
    """Raw params of a `guided` job on the bundled digits zoo (the default models) that runs
    in about a second on a CPU."""
    return {"classes": ["seven"], "guidance": {"iterations": iterations}, **extra}


def normalised(kind: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The params as the API stores them: validated, defaults filled in."""
    from digin.core.params import validate_params

    return validate_params(kind, raw).model_dump(mode="json")


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.width > 0 and image.height > 0
    return image


def artifact_names(n_items: int = 1) -> list[str]:
    items = [f"item_{i:03d}{suffix}.png" for i in range(n_items) for suffix in ("", "_start")]
    return sorted(["grid.png", "result.json", *items])
