"""Unversioned system routes: liveness, readiness (database, broker, storage), metrics."""

from __future__ import annotations

import os
from collections.abc import Callable

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from digin.api.deps import Services, ServicesDep
from digin.api.problems import ProblemError, problem_responses
from digin.api.schemas import Health, Ready

router = APIRouter(tags=["system"])
BROKER_TIMEOUT_S = 3


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> Health:
    return Health()


def check_database(services: Services) -> None:
    with services.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def check_broker(services: Services) -> None:
    with services.celery.connection_for_write() as conn:
        conn.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2,
            timeout=BROKER_TIMEOUT_S,
        )  # fmt: skip
    if services.settings.broker_url.startswith("filesystem://"):
        options = services.celery.conf.broker_transport_options or {}
        for key in ("data_folder_in", "data_folder_out"):
            folder = str(options.get(key) or "")
            if not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
                raise RuntimeError(f"the filesystem broker's folder {folder!r} is not writable")


def check_storage(services: Services) -> None:
    services.storage.check()


CHECKS: dict[str, Callable[[Services], None]] = {
    "database": check_database,
    "broker": check_broker,
    "storage": check_storage,
}


@router.get(
    "/readyz",
    summary="Readiness: database, broker and storage reachable",
    responses=problem_responses(503),
)
def readyz(services: ServicesDep) -> Ready:
    checks, failing = {}, []
    for name, check in CHECKS.items():
        try:
            check(services)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"[:500]
            failing.append(name)
    if failing:
        raise ProblemError(
            503, "not-ready", f"not ready: {', '.join(failing)} unavailable",
            headers={"Retry-After": "5"}, checks=checks,
        )  # fmt: skip
    return Ready(checks=checks)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text format 0.0.4"}},
)
def metrics(services: ServicesDep) -> Response:
    options = services.celery.conf.broker_transport_options or {}
    services.metrics.watch_broker(services.settings.broker_url, dict(options))
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
