"""Jobs from the API's side: create, idempotency, caps, tenant scoping, pages, cancel."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from digin.service import repo
from digin.service.db import Batch, Job, Tenant
from tests.api.helpers import new_job


def new_batch(session: Session, tenant: Tenant) -> uuid.UUID:
    """A batch row for jobs to point at (jobs.batch_id is a foreign key)."""
    batch = Batch(tenant_id=tenant.id, kind="guided", params_template={}, spec={"items": 1},
                  total=1, priority=5)  # fmt: skip
    session.add(batch)
    session.flush()
    return batch.id


def test_create_fills_the_row(session: Session, tenant: Tenant):
    batch = new_batch(session, tenant)
    job = new_job(session, tenant, seed=7, priority=5, queue="sweep", batch_id=batch,
                  metadata={"custom_id": "c3"})  # fmt: skip
    session.expire_all()
    job = session.get_one(Job, job.id)
    assert (job.status, job.attempts, job.max_attempts, job.cancel_requested) == (
        "queued", 0, 3, False)  # fmt: skip
    assert (job.seed, job.priority, job.queue, job.batch_id) == (7, 5, "sweep", batch)
    assert job.params == {"classes": [3]} and job.meta == {"custom_id": "c3"}
    assert job.enqueued_at is job.started_at is job.finished_at is job.result is None


def test_bad_queue_and_attempts_are_refused(session: Session, tenant: Tenant):
    with pytest.raises(ValueError, match="queue: 'gpu'"):
        new_job(session, tenant, queue="gpu")
    with pytest.raises(ValueError, match="max_attempts: 0"):
        new_job(session, tenant, max_attempts=0)
    with pytest.raises(ValueError, match="idempotency_key"):
        new_job(session, tenant, idempotency_key="k")  # no request hash


def test_idempotency_key_replays_or_conflicts(session: Session, tenant: Tenant):
    first = new_job(session, tenant, idempotency_key="k1", request_hash="h1")
    again, created = repo.create_job(
        session, tenant_id=tenant.id, kind="guided", params={}, seed=1, priority=0,
        queue="interactive", max_attempts=3, idempotency_key="k1", request_hash="h1",
    )  # fmt: skip
    assert (again.id, created) == (first.id, False)
    with pytest.raises(repo.IdempotencyConflict, match="'k1' was already used") as info:
        new_job(session, tenant, idempotency_key="k1", request_hash="h2")
    assert info.value.job_id == first.id
    session.rollback()
    other = repo.ensure_tenant(session, name="other")
    assert new_job(session, other, idempotency_key="k1", request_hash="h2").id != first.id


def test_queued_cap_per_tenant(session: Session, tenant: Tenant):
    jobs = [new_job(session, tenant, max_queued=2) for _ in range(2)]
    with pytest.raises(repo.TenantLimitExceeded) as info:
        new_job(session, tenant, max_queued=2)
    assert (info.value.limit_name, info.value.limit) == ("max_queued_per_tenant", 2)
    assert info.value.retry_after > 0
    session.rollback()
    other = repo.ensure_tenant(session, name="other")
    new_job(session, other, max_queued=2)  # another tenant's queue is its own
    repo.request_cancel(session, tenant_id=tenant.id, job_id=jobs[0].id)
    session.commit()
    new_job(session, tenant, max_queued=2)  # a slot is free again
    assert repo.count_jobs(session, tenant_id=tenant.id, statuses=["queued"]) == 2


def test_unknown_tenant(session: Session):
    with pytest.raises(repo.UnknownTenant):
        repo.create_job(session, tenant_id=uuid.uuid4(), kind="guided", params={}, seed=0,
                        priority=0, queue="interactive", max_attempts=1)  # fmt: skip


def test_another_tenants_job_is_invisible(session: Session, tenant: Tenant):
    job = new_job(session, tenant)
    other = repo.ensure_tenant(session, name="other")
    assert repo.get_job(session, tenant_id=tenant.id, job_id=job.id) is not None
    assert repo.get_job(session, tenant_id=other.id, job_id=job.id) is None
    assert repo.list_jobs(session, tenant_id=other.id, limit=10) == ([], None)
    assert repo.request_cancel(session, tenant_id=other.id, job_id=job.id) is None
    session.commit()
    session.expire_all()
    assert session.get_one(Job, job.id).status == "queued"


def test_cursor_pages_have_no_duplicates_or_gaps(session: Session, tenant: Tenant):
    jobs = [new_job(session, tenant, kind="guided" if i % 3 else "neuron") for i in range(9)]
    same = datetime(2020, 5, 1, tzinfo=UTC)  # five jobs created in the same microsecond
    session.execute(update(Job).where(Job.id.in_([j.id for j in jobs[2:7]])).values(
        created_at=same))  # fmt: skip
    session.commit()
    expected = [j.id for j in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]
    seen, cursor = [], None
    while True:
        page, cursor = repo.list_jobs(session, tenant_id=tenant.id, limit=2, cursor=cursor)
        seen += [j.id for j in page]
        if len(seen) == 2:  # a job added while paging is newer: not in the later pages
            new_job(session, tenant)
        if cursor is None:
            break
    assert seen == expected


def test_list_filters(session: Session, tenant: Tenant):
    batch = new_batch(session, tenant)
    neuron = new_job(session, tenant, kind="neuron", batch_id=batch)
    guided = new_job(session, tenant)
    repo.request_cancel(session, tenant_id=tenant.id, job_id=guided.id)
    session.commit()

    def ids(**filters):
        return [j.id for j in repo.list_jobs(session, tenant_id=tenant.id, limit=50, **filters)[0]]

    assert ids(kind="neuron") == [neuron.id] == ids(batch_id=batch) == ids(status="queued")
    assert ids(status=["canceled", "failed"]) == [guided.id]
    with pytest.raises(ValueError, match="status: \\['lost'\\]"):
        ids(status="lost")
    with pytest.raises(ValueError, match="limit: 0 must be between 1 and 500"):
        repo.list_jobs(session, tenant_id=tenant.id, limit=0)
    with pytest.raises(repo.InvalidCursor, match="cursor"):
        repo.list_jobs(session, tenant_id=tenant.id, limit=5, cursor="bm90IGEgY3Vyc29y")


def test_cancel_queued_running_and_terminal(session: Session, tenant: Tenant):
    queued, running = new_job(session, tenant), new_job(session, tenant)
    job, outcome = repo.request_cancel(session, tenant_id=tenant.id, job_id=queued.id)
    assert (job.status, outcome, job.cancel_requested) == ("canceled", "canceled", True)
    assert job.finished_at is not None
    claimed = repo.claim_job(session, job_id=running.id, worker={"host": "w1"})
    session.commit()
    job, outcome = repo.request_cancel(session, tenant_id=tenant.id, job_id=running.id)
    assert (job.status, outcome, job.cancel_requested) == ("canceling", "canceling", True)
    assert repo.request_cancel(session, tenant_id=tenant.id, job_id=running.id)[1] == "unchanged"
    assert repo.heartbeat(session, job_id=running.id, attempt=claimed.attempts) == "cancel"
    assert repo.mark_canceled(session, job_id=running.id, attempt=claimed.attempts)
    session.commit()
    job, outcome = repo.request_cancel(session, tenant_id=tenant.id, job_id=running.id)
    assert (job.status, outcome) == ("canceled", "unchanged")
    assert repo.request_cancel(session, tenant_id=tenant.id, job_id=uuid.uuid4()) is None


def test_counts_for_metrics(session: Session, tenant: Tenant):
    new_job(session, tenant)
    new_job(session, tenant, queue="sweep", kind="neuron")
    done = new_job(session, tenant, queue="sweep", kind="neuron")
    repo.request_cancel(session, tenant_id=tenant.id, job_id=done.id)
    session.commit()
    assert repo.job_counts(session) == {
        ("queued", "guided"): 1, ("queued", "neuron"): 1, ("canceled", "neuron"): 1}  # fmt: skip
    assert repo.queue_depths(session) == {"interactive": 1, "sweep": 1}
