"""An audit whose worker is SIGKILLed during a class job (PostgreSQL, Redis, S3; the smallest
heartbeat threshold): the reaper re-queues the job, another worker runs it (attempt 2), and the
audit's graph goes on to its report. A module of its own: no other module's workers may share
its database and broker while it runs."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from digin.service.db import Job
from digin.service.db.models import Audit
from tests.e2e.conftest import Service, make_service, wait_until
from tests.e2e.test_audits import AUDIT_TIMEOUT_S, BODY, api_key, worker_logs

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
        for worker in service.workers:
            worker.stop()
        with service.sessions.begin() as session:
            session.execute(delete(Audit))
        service.close()


def test_a_class_job_whose_worker_died_is_retried_and_the_audit_completes(fast_service: Service):
    from fastapi.testclient import TestClient

    from digin.api.app import create_app
    from digin.worker.reaper import run_reaper
    from digin.worker.tasks import celery_enqueuer

    service = fast_service
    doomed = service.start_worker("doomed")
    auth = api_key(service, "e2e-audit-crash")
    # more images per class than above: a class job lasts long enough to be killed in it
    body = {**BODY, "classes": [3, 7], "images": {"digits": "train", "per_class": 200}}
    with TestClient(create_app(service.settings)) as client:
        created = client.post("/v1/audits", json=body, headers=auth)
        assert created.status_code == 202, created.text
        location = created.headers["Location"]

        def running_class() -> str | None:
            classes = client.get(location, headers=auth).json()["classes"]
            return next((c["job_id"] for c in classes if c["status"] == "running"), None)

        job_id = wait_until("a class job to run", running_class, AUDIT_TIMEOUT_S, 0.05)
        doomed.kill()  # worker and pool child: no goodbye, no ack, no state change
        with service.sessions() as session:
            crashed = session.get_one(Job, uuid.UUID(job_id))
        assert (crashed.status, crashed.attempts) == ("running", 1)
        assert doomed.events(job_id, "claimed"), "the killed worker was running it"
        service.start_worker("rescuer")
        stop, app = threading.Event(), service.celery()
        reaper = threading.Thread(target=run_reaper, kwargs={
            "sessions": service.sessions, "settings": service.settings,
            "enqueue": celery_enqueuer(app), "stop": stop, "interval": 1.0})  # fmt: skip
        reaper.start()
        try:

            def finished() -> dict[str, Any] | None:
                audit = client.get(location, headers=auth).json()
                return audit if audit["status"] != "running" else None

            audit = wait_until("the audit to finish", finished, AUDIT_TIMEOUT_S, 0.5)
        finally:
            stop.set()
            reaper.join(timeout=30)
            app.close()
        assert audit["status"] == "succeeded", (audit, worker_logs(service))
        assert audit["class_counts"]["succeeded"] == 2
        with service.sessions() as session:
            retried = session.get_one(Job, uuid.UUID(job_id))
        assert (retried.status, retried.attempts) == ("succeeded", 2)
        report = client.get(f"{location}/report", headers=auth, follow_redirects=False)
        assert report.status_code == 307
