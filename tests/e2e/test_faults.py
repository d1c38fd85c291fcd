"""Crash recovery end to end: a worker SIGKILLed in the middle of a job (the machine lost power)
leaves a running row whose heartbeat goes stale; the reaper re-queues and re-sends it, and a
restarted worker finishes it, once, with one set of artifacts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from digin.service.db import TERMINAL
from digin.service.storage import artifact_key
from digin.worker.reaper import run_reaper
from digin.worker.tasks import celery_enqueuer
from tests.e2e.conftest import (
    JOB_TIMEOUT_S,
    Service,
    make_service,
    row,
    submit,
    wait_status,
    wait_until,
)
from tests.worker.helpers import ParamsFactory, artifact_names, decode_png

STALE_S = 10  # the smallest heartbeat threshold the settings allow


@pytest.fixture
def fast_service(
    postgresql_url: str, redis_url: str, s3_endpoint: str, tmp_path: Path
) -> Iterator[Service]:
    service = make_service(postgresql_url, redis_url, s3_endpoint, tmp_path,
                           heartbeat_stale_seconds=STALE_S)  # fmt: skip
    try:
        yield service
    finally:
        service.close()


def test_sigkilled_worker_job_is_reaped_and_finished_by_a_new_worker(
    fast_service: Service, e2e_params: ParamsFactory
):
    service = fast_service
    first = service.start_worker("doomed")
    job = submit(service, "e2e-crash", e2e_params(iterations=20))
    wait_until(
        "the first worker to be optimising",
        lambda: (row(service, job.id).progress or {}).get("stage") == "optimizing",
        JOB_TIMEOUT_S,
    )
    first.kill()  # worker and pool child: no goodbye, no ack, no state change
    crashed = row(service, job.id)
    assert (crashed.status, crashed.attempts) == ("running", 1)

    second = service.start_worker("rescuer")
    stop = threading.Event()
    app = service.celery()
    reaper = threading.Thread(target=run_reaper, kwargs={
        "sessions": service.sessions, "settings": service.settings,
        "enqueue": celery_enqueuer(app), "stop": stop, "interval": 1.0})  # fmt: skip
    reaper.start()
    try:
        done = wait_status(service, job.id, TERMINAL)
    finally:
        stop.set()
        reaper.join(timeout=30)
        app.close()

    assert (done.status, done.attempts, done.error) == ("succeeded", 2, None)
    assert done.worker["pid"] != crashed.worker["pid"]
    assert len(second.events(job.id, "claimed")) == 1
    assert [e["attempt"] for e in second.events(job.id, "succeeded")] == [2]
    # one set of artifacts under the deterministic keys, each a whole image
    keys = service.storage.list(artifact_key("e2e-crash", job.id, "x")[:-1])
    assert keys == [artifact_key("e2e-crash", job.id, n) for n in artifact_names(1)]
    assert [a["key"] for a in done.result["artifacts"]] == keys
    for key in keys:
        if key.endswith(".png"):
            decode_png(service.storage.get(key))
