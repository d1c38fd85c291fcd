"""A production-mode deployment end to end: the HTTP API (TestClient) and a Celery worker
subprocess on PostgreSQL, Redis and S3 (moto + minio): success with visible progress and
downloadable images, a message delivered twice, cancel of a queued and of a running job."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from digin.service import repo
from digin.service.db import TERMINAL
from digin.service.dispatch import enqueue
from digin.service.storage import artifact_key
from tests.e2e.conftest import JOB_TIMEOUT_S, Service, Worker, row, submit, wait_status, wait_until
from tests.worker.helpers import ParamsFactory, artifact_names, decode_png, normalised


@pytest.fixture(scope="module")
def worker(service: Service) -> Worker:
    return service.start_worker()


@pytest.fixture(scope="module")
def client(service: Service) -> Any:
    from fastapi.testclient import TestClient

    from digin.api.app import create_app

    with TestClient(create_app(service.settings)) as client:
        yield client


def api_key(service: Service, tenant: str) -> dict[str, str]:
    with service.sessions() as session:
        _, secret = repo.create_api_key(session, tenant_name=tenant)
        session.commit()
    return {"Authorization": f"Bearer {secret}"}


def test_job_over_http_runs_with_progress_and_downloadable_artifacts(
    service: Service, worker: Worker, client: Any, e2e_params: ParamsFactory
):
    auth = api_key(service, "e2e-http")
    body = {"kind": "guided", "params": e2e_params(iterations=8), "seed": 3}
    created = client.post("/v1/jobs", json=body, headers=auth)
    assert created.status_code == 202, created.text
    location = created.headers["Location"]
    assert created.json()["status"] == "queued"

    seen: list[tuple[str, dict[str, Any] | None]] = []

    def finished() -> dict[str, Any] | None:
        job = client.get(location, headers=auth).json()
        seen.append((job["status"], job["progress"]))
        return job if job["status"] in TERMINAL else None

    job = wait_until("the job to finish", finished, JOB_TIMEOUT_S, 0.05)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and job["error"] is None
    running = [p for status, p in seen if status == "running" and p]
    assert any(p["stage"] == "optimizing" and 0 < p["step"] < p["total"] for p in running), seen
    statuses = [status for status, _ in seen]
    assert statuses.index("running") < statuses.index("succeeded")

    names = artifact_names(1)
    assert [a["name"] for a in job["result"]["artifacts"]] == names
    listing = client.get(f"{location}/artifacts", headers=auth).json()["data"]
    assert [a["name"] for a in listing] == names
    for entry in listing:  # presigned S3 URLs, fetched like a client would
        data = httpx.get(entry["url"], timeout=30).raise_for_status().content
        assert len(data) == entry["size"]
        if entry["name"].endswith(".png"):
            decode_png(data)
    redirect = client.get(f"{location}/artifacts/grid.png", headers=auth, follow_redirects=False)
    assert redirect.status_code == 307
    grid = decode_png(httpx.get(redirect.headers["location"], timeout=30).content)
    assert grid.width >= 3 * 32  # one tile per iteration

    job_id = uuid.UUID(job["id"])
    keys = service.storage.list(artifact_key("e2e-http", job_id, "x")[:-1])
    assert keys == [artifact_key("e2e-http", job_id, n) for n in names]
    assert len(worker.events(job_id, "claimed")) == 1


def test_a_message_delivered_twice_runs_once(
    service: Service, worker: Worker, e2e_params: ParamsFactory
):
    job = submit(service, "e2e-dup", e2e_params(iterations=2), messages=2)
    done = wait_status(service, job.id, TERMINAL)
    assert (done.status, done.attempts) == ("succeeded", 1)
    wait_until("the second message to be skipped", lambda: worker.events(job.id, "skipped"), 60)
    assert len(worker.events(job.id, "claimed")) == 1
    assert row(service, job.id).finished_at == done.finished_at
    keys = service.storage.list(artifact_key("e2e-dup", job.id, "x")[:-1])
    assert keys == sorted(a["key"] for a in done.result["artifacts"])


def test_cancel_of_a_queued_job(service: Service, worker: Worker, e2e_params: ParamsFactory):
    with service.sessions() as session:
        owner = repo.ensure_tenant(session, name="e2e-cancel")
        job, _ = repo.create_job(session, tenant_id=owner.id, kind="guided",
                                 params=normalised("guided", e2e_params()), seed=1, priority=0,
                                 queue="interactive", max_attempts=3)  # fmt: skip
        session.commit()
        assert repo.request_cancel(session, tenant_id=owner.id, job_id=job.id)[1] == "canceled"
        session.commit()
    app = service.celery()
    enqueue(app, job_id=str(job.id), queue="interactive")  # its message arrives anyway
    app.close()
    wait_until("the message to be skipped", lambda: worker.events(job.id, "skipped"), 60)
    after = row(service, job.id)
    assert (after.status, after.attempts, after.result) == ("canceled", 0, None)
    assert service.storage.list(artifact_key("e2e-cancel", job.id, "x")[:-1]) == []


def test_cancel_of_a_running_job(service: Service, worker: Worker, e2e_params: ParamsFactory):
    job = submit(service, "e2e-cancel", e2e_params(iterations=400))
    running = wait_status(service, job.id, ("running", *TERMINAL))
    wait_until(
        "the job to optimise",
        lambda: (row(service, job.id).progress or {}).get("stage") == "optimizing",
        JOB_TIMEOUT_S,
    )
    with service.sessions() as session:
        outcome = repo.request_cancel(session, tenant_id=running.tenant_id, job_id=job.id)
        session.commit()
    assert outcome is not None and outcome[1] == "canceling"
    done = wait_status(service, job.id, TERMINAL)
    assert (done.status, done.result, done.error) == ("canceled", None, None)
    assert done.progress["step"] < done.progress["total"]
    assert len(worker.events(job.id, "canceled")) == 1
    assert service.storage.list(artifact_key("e2e-cancel", job.id, "x")[:-1]) == []
