"""The API's job writer (api/submissions.py, service/repo/submit.py): a group of submissions
written in one transaction decides each one exactly as one-by-one writes would, on PostgreSQL +
Redis and on SQLite + the filesystem broker."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from digin.api.metrics import Metrics
from digin.api.submissions import JobWriter
from digin.service import repo
from digin.service.db import Job
from digin.service.dispatch import make_celery
from digin.service.repo.submit import LOCAL, Outcome, Submission, Unauthenticated
from digin.service.settings import fresh_settings
from tests.api.conftest import AppFactory, Broker


def values(**overrides) -> dict:
    base = {"kind": "guided", "params": {"classes": [3]}, "seed": 0, "priority": 0,
            "queue": "interactive", "max_attempts": 3}  # fmt: skip
    return base | overrides


@pytest.fixture
def writer(sessions: sessionmaker[Session], broker: Broker, tmp_path: Path) -> JobWriter:
    settings = fresh_settings(data_dir=tmp_path / "data", broker_url=broker.url, auth="on")
    return JobWriter(sessions, make_celery(settings), Metrics(sessions))


def write_group(writer: JobWriter, submissions: list[Submission]) -> list[Outcome]:
    """Write `submissions` as ONE group (what the writer thread does with what is waiting)."""
    group = [(s, running_future()) for s in submissions]
    writer._write(group)
    return [f.result(timeout=0) for _, f in group]


def running_future() -> Future:
    future: Future = Future()
    assert future.set_running_or_notify_cancel()
    return future


def key_of(sessions: sessionmaker[Session], tenant: str) -> str:
    with sessions() as session:
        _, secret = repo.create_api_key(session, tenant_name=tenant)
        session.commit()
    return secret


def test_a_group_decides_each_submission_as_one_by_one_writes_would(
    writer: JobWriter, sessions: sessionmaker[Session], broker: Broker
):
    acme, other = key_of(sessions, "acme"), key_of(sessions, "other")
    revoked = key_of(sessions, "acme")
    with sessions() as session:
        repo.revoke_api_key(session, prefix=revoked.split("_")[1])
        session.commit()
    same = {"idempotency_key": "k1", "request_hash": "h1"}
    outcomes = write_group(
        writer,
        [
            Submission(acme, values(seed=1), max_queued=2),
            Submission(acme, values(seed=2, **same), max_queued=2),
            Submission(acme, values(seed=3), max_queued=2),  # over the cap of 2
            Submission(acme, values(seed=2, **same), max_queued=2),  # replay: same job
            Submission(acme, values(idempotency_key="k1", request_hash="h2"), max_queued=2),
            Submission(other, values(seed=4), max_queued=2),
            Submission(revoked, values(seed=5), max_queued=2),
            Submission("dg_00000000_" + "x" * 43, values(seed=6)),
        ],
    )
    created = [o for o in outcomes if o.created]
    assert [o.job.seed for o in created] == [1, 2, 4]
    assert isinstance(outcomes[2].error, repo.TenantLimitExceeded)
    assert outcomes[3].job.id == outcomes[1].job.id and not outcomes[3].created
    assert isinstance(outcomes[4].error, repo.IdempotencyConflict)
    assert {outcomes[5].tenant.name, outcomes[0].tenant.name} == {"other", "acme"}
    assert isinstance(outcomes[6].error, Unauthenticated)
    assert isinstance(outcomes[7].error, Unauthenticated)
    with sessions() as session:
        rows = session.scalars(select(Job).order_by(Job.seed)).all()
        assert [j.seed for j in rows] == [1, 2, 4]
        assert all(j.enqueued_at is not None and j.enqueued_at >= j.created_at for j in rows)
    assert sorted(broker.job_ids()) == sorted(str(o.job.id) for o in created)
    # a later group sees what the first wrote: the replay and the cap hold across groups
    (again, capped) = write_group(
        writer,
        [Submission(acme, values(seed=2, **same), max_queued=2),
         Submission(acme, values(seed=9), max_queued=2)],
    )  # fmt: skip
    assert again.job.id == outcomes[1].job.id and not again.created
    assert isinstance(capped.error, repo.TenantLimitExceeded)


def test_a_database_error_fails_the_whole_group_and_writes_nothing(
    writer: JobWriter, sessions: sessionmaker[Session], broker: Broker
):
    acme = key_of(sessions, "acme")
    group = [(Submission(acme, values(seed=1)), running_future()),
             (Submission(acme, values(seed=2, status="bogus")), running_future())]  # fmt: skip
    writer._write(group)
    for _, future in group:
        with pytest.raises(Exception, match="(?i)constraint|check"):
            future.result(timeout=0)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert broker.job_ids() == []


def test_the_local_tenant_when_auth_is_off(writer: JobWriter, sessions: sessionmaker[Session]):
    (outcome,) = write_group(writer, [Submission(LOCAL, values())])
    assert outcome.created and outcome.tenant.name == repo.LOCAL_TENANT


def test_concurrent_requests_are_grouped_and_each_answered(
    make_client: AppFactory, sessions: sessionmaker[Session], broker: Broker
):
    client = make_client()
    writer: JobWriter = client.app.state.services.writer
    groups: list[int] = []
    writer.on_group = groups.append
    headers = {"Authorization": f"Bearer {key_of(sessions, 'acme')}"}
    answers: list = []

    def post(i: int) -> None:
        body = {"kind": "guided", "params": {"classes": [3]}, "seed": i}
        answers.append(client.post("/v1/jobs", json=body, headers=headers))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in answers) == [202] * 24
    assert sorted(r.json()["seed"] for r in answers) == list(range(24))
    assert all(r.json()["enqueued_at"] is not None for r in answers)
    assert sum(groups) == 24
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 24
    assert sorted(broker.job_ids()) == sorted(r.json()["id"] for r in answers)


def test_a_request_canceled_before_its_turn_is_not_written_and_the_writer_goes_on(
    writer: JobWriter, sessions: sessionmaker[Session]
):
    acme = key_of(sessions, "acme")
    gone = writer.submit_future(Submission(acme, values(seed=1)))
    gone.cancel()  # may race the writer thread: either not written, or written and answered
    kept = writer.submit_future(Submission(acme, values(seed=2)))
    assert kept.result(timeout=30).created
    with sessions() as session:
        seeds = set(session.scalars(select(Job.seed)))
    assert seeds == ({2} if gone.cancelled() else {1, 2})
    broken = writer.submit_future(Submission(acme, {"kind": "guided"}))  # no params: KeyError
    with pytest.raises(Exception):  # noqa: B017 - whatever the writer raised reaches the request
        broken.result(timeout=30)
    assert writer.submit_future(Submission(acme, values(seed=3))).result(timeout=30).created
    writer.close()


def test_the_queued_cap_counts_jobs_of_the_same_queue_only(
    writer: JobWriter, sessions: sessionmaker[Session]
):
    acme = key_of(sessions, "acme")
    sweep, interactive, over = write_group(
        writer,
        [Submission(acme, values(queue="sweep"), max_queued=1),
         Submission(acme, values(), max_queued=1),
         Submission(acme, values(seed=1), max_queued=1)],
    )  # fmt: skip
    assert sweep.created and interactive.created
    assert isinstance(over.error, repo.TenantLimitExceeded)
    with sessions() as session:  # one queued job in each queue: only interactive counts
        tenant = repo.get_tenant(session, name="acme")
        repo.create_job(session, tenant_id=tenant.id, max_queued=2, **values(seed=5))
        with pytest.raises(repo.TenantLimitExceeded):
            repo.create_job(session, tenant_id=tenant.id, max_queued=2, **values(seed=6))
