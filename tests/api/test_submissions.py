"""The API's job writer (api/submissions.py, service/repo/submit.py): a group of submissions
written in one transaction decides each one exactly as one-by-one writes would, and a row the
database refuses fails only its own submission; on PostgreSQL + Redis and on SQLite + the
filesystem broker."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from digin.api.metrics import Metrics
from digin.api.problems import database_unavailable
from digin.api.submissions import JobWriter
from digin.service import repo
from digin.service.db import Job, session_factory
from digin.service.dispatch import make_celery
from digin.service.repo.submit import Outcome, Submission
from digin.service.settings import fresh_settings
from tests.api.conftest import AppFactory, Broker
from tests.api.helpers import refusing_jobs


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


def tenant_id(sessions: sessionmaker[Session], name: str) -> uuid.UUID:
    with sessions() as session:
        tenant = repo.ensure_tenant(session, name=name)
        session.commit()
        return tenant.id


def seeds(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as session:
        return sorted(session.scalars(select(Job.seed)))


def test_a_group_decides_each_submission_as_one_by_one_writes_would(
    writer: JobWriter, sessions: sessionmaker[Session], broker: Broker
):
    acme, other = tenant_id(sessions, "acme"), tenant_id(sessions, "other")
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
            Submission(other, values(seed=5, max_attempts=0)),  # refused alone
        ],
    )
    created = [o for o in outcomes if o.created]
    assert [o.job.seed for o in created] == [1, 2, 4]
    assert isinstance(outcomes[2].error, repo.TenantLimitExceeded)
    assert outcomes[3].job.id == outcomes[1].job.id and not outcomes[3].created
    assert isinstance(outcomes[4].error, repo.IdempotencyConflict)
    assert {outcomes[5].job.tenant_id, outcomes[0].job.tenant_id} == {other, acme}
    assert isinstance(outcomes[6].error, ValueError) and "max_attempts" in str(outcomes[6].error)
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


def test_a_row_the_database_refuses_fails_alone_and_the_rest_of_the_group_is_written(
    writer: JobWriter, sessions: sessionmaker[Session], engine: Engine, broker: Broker
):
    acme, other = tenant_id(sessions, "acme"), tenant_id(sessions, "other")
    same = {"idempotency_key": "k1", "request_hash": "h1"}
    group = [
        Submission(acme, values(seed=1)),
        Submission(other, values(seed=666)),  # the database refuses this row
        Submission(other, values(seed=2, **same)),
        Submission(other, values(seed=2, **same)),  # replays the one before: decided in order
        Submission(acme, values(seed=3), max_queued=2),
        Submission(acme, values(seed=4), max_queued=2),  # over the cap, as in one group
    ]
    with refusing_jobs(engine, seed=666):
        futures = [running_future() for _ in group]
        writer._write(list(zip(group, futures, strict=True)))
    with pytest.raises(Exception, match="refused by the test trigger"):
        futures[1].result(timeout=0)
    first, keyed, replay, third, capped = [f.result(timeout=0) for f in futures[:1] + futures[2:]]
    assert first.created and keyed.created and third.created
    assert replay.job.id == keyed.job.id and not replay.created
    assert isinstance(capped.error, repo.TenantLimitExceeded)
    assert seeds(sessions) == [1, 2, 3]
    written = [first.job, keyed.job, third.job]
    assert sorted(broker.job_ids()) == sorted(str(job.id) for job in written)
    assert all(job.enqueued_at is not None for job in written)


@pytest.mark.parametrize(
    "poison",
    [
        {"params": {"classes": ["cat\x00"]}},
        {"meta": {"run": "\ud800"}},
        {"params": {"classes": [3], "guidance": {"grad_clip": float("nan")}}},
        {"idempotency_key": "k\x00", "request_hash": "h"},
    ],
    ids=["nul", "surrogate", "nan", "nul-key"],
)
def test_a_value_postgresql_cannot_store_fails_only_its_own_submission(
    writer: JobWriter, sessions: sessionmaker[Session], db_url: str, poison: dict
):
    """What request validation refuses (tests/api/test_poison.py), had it reached the writer."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite stores these values; PostgreSQL refuses them")
    acme, other = tenant_id(sessions, "acme"), tenant_id(sessions, "other")
    group = [Submission(acme, values(seed=1)), Submission(other, values(seed=2) | poison),
             Submission(acme, values(seed=3))]  # fmt: skip
    futures = [running_future() for _ in group]
    writer._write(list(zip(group, futures, strict=True)))
    with pytest.raises(Exception):  # noqa: B017 - the driver's error for this value
        futures[1].result(timeout=0)
    assert futures[0].result(timeout=0).created and futures[2].result(timeout=0).created
    assert seeds(sessions) == [1, 3]


def test_the_database_being_away_fails_the_group_without_retrying_each(tmp_path: Path):
    connects: list[int] = []
    engine = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 2}
    )
    event.listen(engine, "do_connect", lambda *args: connects.append(1))
    settings = fresh_settings(data_dir=tmp_path, broker_url="filesystem://", auth="on")
    sessions = session_factory(engine)
    writer = JobWriter(sessions, make_celery(settings), Metrics(sessions))
    group = [(Submission(uuid.uuid4(), values(seed=i)), running_future()) for i in range(3)]
    writer._write(group)
    for _, future in group:
        with pytest.raises(OperationalError):
            future.result(timeout=0)
    assert len(connects) == 1  # one try for the group, none per submission
    engine.dispose()


def test_concurrent_requests_are_grouped_and_each_answered(
    make_client: AppFactory, sessions: sessionmaker[Session], broker: Broker, auth
):
    client = make_client()
    writer: JobWriter = client.app.state.services.writer
    groups: list[int] = []
    writer.on_group = groups.append
    headers = auth("acme")
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
    acme = tenant_id(sessions, "acme")
    gone = writer.submit_future(Submission(acme, values(seed=1)))
    gone.cancel()  # may race the writer thread: either not written, or written and answered
    kept = writer.submit_future(Submission(acme, values(seed=2)))
    assert kept.result(timeout=30).created
    with sessions() as session:
        seeds = set(session.scalars(select(Job.seed)))
    assert seeds == ({2} if gone.cancelled() else {1, 2})
    broken = writer.submit_future(Submission(acme, {"kind": "guided"}))  # no params
    assert "missing ['params'," in str(broken.result(timeout=30).error)
    lost = writer.submit_future(Submission(uuid.uuid4(), values(seed=4)))  # no such tenant
    with pytest.raises(repo.UnknownTenant):
        lost.result(timeout=30)
    assert writer.submit_future(Submission(acme, values(seed=3))).result(timeout=30).created
    writer.close()


def test_the_queued_cap_counts_jobs_of_the_same_queue_only(
    writer: JobWriter, sessions: sessionmaker[Session]
):
    acme = tenant_id(sessions, "acme")
    sweep, interactive, over = write_group(
        writer,
        [Submission(acme, values(queue="sweep"), max_queued=1),
         Submission(acme, values(), max_queued=1),
         Submission(acme, values(seed=1), max_queued=1)],
    )  # fmt: skip
    assert sweep.created and interactive.created
    assert isinstance(over.error, repo.TenantLimitExceeded)
    with sessions() as session:  # one queued job in each queue: only interactive counts
        repo.create_job(session, tenant_id=acme, max_queued=2, **values(seed=5))
        with pytest.raises(repo.TenantLimitExceeded):
            repo.create_job(session, tenant_id=acme, max_queued=2, **values(seed=6))


def test_the_drivers_own_errors_say_whether_the_database_is_away():
    """COPY raises psycopg's errors as they are: the database away (the group fails, no
    one-by-one retry) or a value it refuses (the group is written one by one)."""
    psycopg = pytest.importorskip("psycopg")
    assert database_unavailable(psycopg.OperationalError("server closed the connection"))
    assert not database_unavailable(psycopg.errors.UntranslatableCharacter("\\u0000"))
    assert not database_unavailable(psycopg.errors.RaiseException("refused"))
