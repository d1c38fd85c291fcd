"""Jobs from the workers' side: atomic claims, attempt guards, terminal states, the reaper."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import Job, Tenant, utcnow
from tests.api.helpers import new_job

STALE = 600
WORKER = {"host": "gpu-1", "gpu": "cpu", "pid": 1}


def claim(session: Session, job: Job) -> Job:
    claimed = repo.claim_job(session, job_id=job.id, worker=WORKER)
    session.commit()
    assert claimed is not None
    return claimed


def later(seconds: float = STALE + 1):
    return utcnow() + timedelta(seconds=seconds)


def test_claim_takes_only_a_queued_job(session: Session, tenant: Tenant):
    job = new_job(session, tenant)
    claimed = claim(session, job)
    assert (claimed.status, claimed.attempts, claimed.worker) == ("running", 1, WORKER)
    assert claimed.started_at is not None and claimed.heartbeat_at == claimed.started_at
    assert repo.claim_job(session, job_id=job.id, worker=WORKER) is None  # duplicate delivery


def test_racing_claims_have_exactly_one_winner(sessions: sessionmaker[Session], tenant: Tenant):
    with sessions() as session:
        jobs = [new_job(session, tenant) for _ in range(8)]
    for job in jobs:
        barrier, wins = threading.Barrier(3), []

        def worker(job_id=job.id, barrier=barrier, wins=wins):
            with sessions() as session:
                barrier.wait()
                claimed = repo.claim_job(session, job_id=job_id, worker=WORKER)
                session.commit()
                wins.append(claimed is not None)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(wins) == [False, False, True]
    with sessions() as session:
        assert {session.get_one(Job, j.id).attempts for j in jobs} == {1}


def test_running_cap_is_checked_at_claim(session: Session, tenant: Tenant):
    first, second = new_job(session, tenant), new_job(session, tenant)
    assert repo.claim_job(session, job_id=first.id, worker=WORKER, max_running=1) is not None
    session.commit()
    with pytest.raises(repo.TenantLimitExceeded, match="max_running_per_tenant=1"):
        repo.claim_job(session, job_id=second.id, worker=WORKER, max_running=1)
    session.rollback()
    assert session.get_one(Job, second.id).status == "queued"


def test_lifecycle_success(session: Session, tenant: Tenant):
    job = claim(session, new_job(session, tenant))
    progress = {"step": 2, "total": 20, "stage": "optimise"}
    assert repo.heartbeat(session, job_id=job.id, attempt=1, progress=progress) == "continue"
    assert repo.finish_job(session, job_id=job.id, attempt=1, result={"flip": True})
    session.commit()
    session.expire_all()
    done = session.get_one(Job, job.id)
    assert (done.status, done.progress, done.result) == ("succeeded", progress, {"flip": True})
    assert done.finished_at is not None


def test_terminal_states_never_change(session: Session, tenant: Tenant):
    job = claim(session, new_job(session, tenant))
    assert repo.fail_job(session, job_id=job.id, attempt=1,
                         error=repo.job_error("gpu_oom", "CUDA out of memory"))  # fmt: skip
    session.commit()
    assert not repo.finish_job(session, job_id=job.id, attempt=1, result={})
    assert not repo.fail_job(session, job_id=job.id, attempt=1, error=repo.job_error("x", "y"))
    assert not repo.mark_canceled(session, job_id=job.id, attempt=1)
    assert repo.heartbeat(session, job_id=job.id, attempt=1) == "lost"
    assert repo.claim_job(session, job_id=job.id, worker=WORKER) is None
    assert (
        repo.requeue_job(session, job_id=job.id, attempt=1, error={"code": "c", "message": "m"})
        is None
    )
    assert not repo.mark_enqueued(session, job_id=job.id)
    assert repo.request_cancel(session, tenant_id=tenant.id, job_id=job.id)[1] == "unchanged"
    report = repo.reap(session, now=later(10**6), heartbeat_stale_seconds=STALE,
                       queued_stale_seconds=STALE)  # fmt: skip
    assert report == repo.ReapReport()
    session.commit()
    session.expire_all()
    failed = session.get_one(Job, job.id)
    assert failed.status == "failed"
    assert failed.error == {"code": "gpu_oom", "message": "CUDA out of memory", "retryable": False}


def test_a_stale_attempt_cannot_write(session: Session, tenant: Tenant):
    job = claim(session, new_job(session, tenant))
    report = repo.reap(session, now=later(), heartbeat_stale_seconds=STALE,
                       queued_stale_seconds=STALE)  # fmt: skip
    assert report.requeued == [job.id] and [d.job_id for d in report.to_enqueue] == [job.id]
    session.commit()
    second = claim(session, job)
    assert second.attempts == 2
    # the first worker wakes up: all its writes are ignored
    assert repo.heartbeat(session, job_id=job.id, attempt=1, progress={"step": 9}) == "lost"
    assert not repo.finish_job(session, job_id=job.id, attempt=1, result={"stale": True})
    assert not repo.fail_job(session, job_id=job.id, attempt=1, error=repo.job_error("a", "b"))
    assert repo.finish_job(session, job_id=job.id, attempt=2, result={"fresh": True})
    session.commit()
    session.expire_all()
    assert session.get_one(Job, job.id).result == {"fresh": True}


def test_requeue_while_attempts_remain(session: Session, tenant: Tenant):
    job = new_job(session, tenant, max_attempts=2)
    error = repo.job_error("storage_unavailable", "S3 down", retryable=True)
    claim(session, job)
    assert repo.requeue_job(session, job_id=job.id, attempt=1, error=error) == "queued"
    claim(session, job)
    assert repo.requeue_job(session, job_id=job.id, attempt=2, error=error) == "failed"
    session.commit()
    assert session.get_one(Job, job.id).error == error


def test_requeue_of_a_canceling_job_cancels_it(session: Session, tenant: Tenant):
    job = claim(session, new_job(session, tenant))
    repo.request_cancel(session, tenant_id=tenant.id, job_id=job.id)
    error = repo.job_error("storage_unavailable", "S3 down", retryable=True)
    assert repo.requeue_job(session, job_id=job.id, attempt=1, error=error) == "canceled"


def test_reaper_fails_the_last_attempt_with_worker_lost(session: Session, tenant: Tenant):
    job = claim(session, new_job(session, tenant, max_attempts=1))
    fresh = claim(session, new_job(session, tenant, max_attempts=1))
    # the first job's worker went silent two stale periods ago
    silent = utcnow() - timedelta(seconds=2 * STALE)
    session.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=silent))
    session.commit()
    report = repo.reap(session, now=utcnow(), heartbeat_stale_seconds=STALE,
                       queued_stale_seconds=STALE)  # fmt: skip
    session.commit()
    assert (report.failed, report.requeued, report.to_enqueue) == ([job.id], [], [])
    session.expire_all()
    lost = session.get_one(Job, job.id)
    assert lost.status == "failed" and lost.error["code"] == "worker_lost"
    assert "attempt 1 of 1" in lost.error["message"]
    assert session.get_one(Job, fresh.id).status == "running"  # its heartbeat is recent


def test_reaper_ends_a_stale_canceling_job(session: Session, tenant: Tenant):
    job = claim(session, new_job(session, tenant))
    repo.request_cancel(session, tenant_id=tenant.id, job_id=job.id)
    session.commit()
    report = repo.reap(session, now=later(), heartbeat_stale_seconds=STALE,
                       queued_stale_seconds=STALE)  # fmt: skip
    session.commit()
    assert report.canceled == [job.id]
    assert session.get_one(Job, job.id).status == "canceled"


def test_reaper_reenqueues_jobs_never_dispatched(session: Session, tenant: Tenant):
    unsent = new_job(session, tenant, queue="sweep", priority=3)
    sent = new_job(session, tenant)
    now = utcnow()
    repo.mark_enqueued(session, job_id=sent.id, now=now)
    session.commit()

    def due(at):
        report = repo.reap(session, now=at, heartbeat_stale_seconds=STALE,
                           queued_stale_seconds=STALE, unsent_grace_seconds=60)  # fmt: skip
        return report.to_enqueue

    assert due(now) == []  # within the grace between commit and enqueue
    assert due(now + timedelta(seconds=61)) == [repo.Dispatch(unsent.id, "sweep", 3)]
    repo.mark_enqueued(session, job_id=unsent.id, now=now + timedelta(seconds=61))
    session.commit()
    assert due(now + timedelta(seconds=62)) == []
    assert {d.job_id for d in due(now + timedelta(seconds=STALE + 62))} == {sent.id, unsent.id}
