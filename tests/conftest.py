"""Shared pytest fixtures. Kept torch-free at import time: the API tests run without torch."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Specs of the tiny random-weight models (digin.core.tiny), written once per test session:
    'sd', 'sdxl' (diffusers folders), 'classifier' (timm@safetensors), 'open_clip' (zero-shot)."""
    from digin.core.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))
