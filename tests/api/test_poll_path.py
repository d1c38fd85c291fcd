"""The polling path `GET /v1/jobs/{id}` (docs/architecture.md §8.12): a key in the key cache
and, on PostgreSQL, the job read on the event loop (service/pollread.py) answer exactly what
the session read answers, keep tenants apart, and stop serving a revoked key."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import Tenant
from tests.api.helpers import new_job
from tests.e2e.conftest import wait_until

WORKER = {"host": "test", "pid": 1, "device": "cpu"}


def a_finished_job(sessions: sessionmaker[Session], tenant: Tenant) -> uuid.UUID:
    """A job with every JSON column set: metadata, worker, progress, result."""
    with sessions() as session:
        job = new_job(session, tenant, metadata={"who": "poll"})
        claimed = repo.claim_job(session, job_id=job.id, worker=WORKER)
        assert claimed is not None
        progress = {"step": 2, "total": 2, "stage": "uploading"}
        repo.heartbeat(session, job_id=job.id, attempt=1, progress=progress)
        result = {"summary": {"loss": 0.5}, "artifacts": [{"name": "g.png", "key": "k", "size": 9}]}
        assert repo.finish_job(session, job_id=job.id, attempt=1, result=result)
        session.commit()
        return job.id


def test_the_cached_read_answers_what_the_full_check_answers(client, auth, sessions, tenant):
    headers = auth(tenant.name)
    job_id = a_finished_job(sessions, tenant)
    services = client.app.state.services
    assert len(services.keys) == 0
    first = client.get(f"/v1/jobs/{job_id}", headers=headers)  # the key checked, then cached
    assert first.status_code == 200, first.text
    assert len(services.keys) == 1
    second = client.get(f"/v1/jobs/{job_id}", headers=headers)  # PostgreSQL: the fast read
    assert second.status_code == 200
    assert second.json() == first.json()
    assert second.headers.get("retry-after") == first.headers.get("retry-after")
    body = second.json()
    assert body["metadata"] == {"who": "poll"} and body["worker"]["host"] == "test"
    assert body["result"]["artifacts"][0]["name"] == "g.png" and body["progress"]["step"] == 2
    assert body["created_at"].endswith("Z") or body["created_at"].endswith("+00:00")


def test_the_cached_read_keeps_tenants_apart(client, auth, sessions, tenant):
    mine = auth(tenant.name)
    theirs = auth("other")
    job_id = a_finished_job(sessions, tenant)
    for _ in range(2):  # the second time from the key cache
        assert client.get(f"/v1/jobs/{job_id}", headers=theirs).status_code == 404
        assert client.get(f"/v1/jobs/{uuid.uuid4()}", headers=mine).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}", headers=mine).status_code == 200


def test_a_revoked_key_leaves_the_cache(client, auth, sessions, tenant, db_url):
    """PostgreSQL: the revocation is notified and the API process forgets the key. SQLite (no
    NOTIFY): the cached key is served until its entry expires (`key_cache_seconds`), then
    refused. Every route but the polling one refuses it from the next request."""
    headers = auth(tenant.name)
    job_id = a_finished_job(sessions, tenant)
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 200
    if db_url.startswith("postgresql"):
        hub = client.app.state.services.events
        wait_until("the event listener", hub.listening.is_set, 30, 0.05)
    with sessions() as session:
        assert repo.revoke_api_key(session, prefix=headers["Authorization"].split("_")[1])
        session.commit()
    assert client.get("/v1/jobs", headers=headers).status_code == 401
    # notified (PostgreSQL) or expired (SQLite), the polling route refuses the key too
    wait_until(
        "the revoked key to be refused",
        lambda: client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 401,
        30, 0.05,
    )  # fmt: skip


def test_the_key_cache_can_be_turned_off(make_client, auth, sessions, tenant):
    client = make_client(key_cache_seconds=0)
    headers = auth(tenant.name)
    job_id = a_finished_job(sessions, tenant)
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 200
    assert len(client.app.state.services.keys) == 0
    with sessions() as session:
        assert repo.revoke_api_key(session, prefix=headers["Authorization"].split("_")[1])
        session.commit()
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 401
