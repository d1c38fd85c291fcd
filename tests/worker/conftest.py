"""Fixtures of the worker tests: the API tests' PostgreSQL and SQLite databases (each test that
takes `sessions` runs on both), local storage, and a model cache shared by the whole session."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import (  # noqa: F401 - fixtures
    _engines,
    _no_digin_environment,
    db_url,
    engine,
    postgresql_url,
    session,
    sessions,
    sqlite_url,
    tenant,
)
from tests.worker.helpers import ParamsFactory, digits_params


@pytest.fixture(scope="session")
def model_cache() -> Any:
    """One `digin.core.jobs.ModelCache` for every in-process job (models load once), torch on one
    thread (the machine is shared)."""
    import torch

    from digin.core.jobs import ModelCache

    torch.set_num_threads(1)
    return ModelCache()


@pytest.fixture(scope="session")
def job_params() -> ParamsFactory:
    return digits_params
