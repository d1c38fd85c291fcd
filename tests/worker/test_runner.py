"""The job task in process (`digin.worker.runner.execute_job`) on real PostgreSQL and SQLite, real
local storage and the bundled digits zoo: every path of the task's state machine."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import Job, Tenant, utcnow
from digin.service.settings import fresh_settings
from digin.service.storage import LocalStorage, artifact_key
from digin.worker import runner
from digin.worker.runner import WorkerContext, backoff_seconds, execute_job
from tests.api.helpers import new_job
from tests.worker.helpers import ParamsFactory, artifact_names, decode_png, normalised


class RecordingStorage(LocalStorage):
    """Local storage that records, for every put, the job's row as the API would read it."""

    def __init__(self, root: Path, sessions: sessionmaker[Session]) -> None:
        super().__init__(root)
        self.sessions = sessions
        self.puts: list[tuple[str, str, dict[str, Any] | None]] = []

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        job_id = uuid.UUID(key.split("/")[2])
        with self.sessions() as session:
            job = session.get_one(Job, job_id)
            self.puts.append((key, job.status, job.progress))
        super().put(key, data, content_type)


class Sent(list[dict[str, Any]]):
    """The messages a context sent (an `Enqueue`)."""

    def __call__(
        self, *, job_id: uuid.UUID, queue: str, priority: int, countdown: float = 0.0
    ) -> None:
        self.append(
            {"job_id": job_id, "queue": queue, "priority": priority, "countdown": countdown}
        )


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture
def ctx(sessions: sessionmaker[Session], tmp_path: Path, model_cache: Any, sent: Sent):
    return WorkerContext(
        settings=fresh_settings(data_dir=tmp_path / "data"),
        sessions=sessions,
        storage=RecordingStorage(tmp_path / "artifacts", sessions),
        enqueue=sent,
        device="cpu",
        heartbeat_interval=0.2,
        cache=model_cache,
    )


def submit(session: Session, tenant: Tenant, raw: dict[str, Any], **overrides: Any) -> Job:
    return new_job(session, tenant, params=normalised("guided", raw), seed=7, **overrides)


def reload(sessions: sessionmaker[Session], job: Job) -> Job:
    with sessions() as session:
        return session.get_one(Job, job.id)


def folder(tenant: Tenant, job: Job) -> str:
    return artifact_key(tenant.name, job.id, "x")[:-1]


def hook_progress(monkeypatch: pytest.MonkeyPatch, at_step: int, action: Any) -> list[dict]:
    """Run `action(pulse)` once when the job reports optimisation step `at_step` (in the
    worker's thread, before the heartbeat that the step triggers); returns every update."""
    updates: list[dict] = []
    original = runner.Pulse.update

    def update(self: runner.Pulse, progress: dict[str, Any]) -> None:
        updates.append(progress)
        original(self, progress)
        if progress["stage"] == "optimizing" and progress["step"] == at_step:
            action(self)

    monkeypatch.setattr(runner.Pulse, "update", update)
    return updates


# --- success, duplicates -------------------------------------------------------------------------
def test_job_runs_to_success_and_a_duplicate_delivery_runs_nothing(
    ctx: WorkerContext, sessions, session, tenant, job_params: ParamsFactory
):
    job = submit(session, tenant, job_params(iterations=2))
    assert job.status == "queued"

    assert execute_job(str(job.id), ctx=ctx) == "succeeded"

    done = reload(sessions, job)
    assert (done.status, done.attempts, done.error) == ("succeeded", 1, None)
    assert done.worker is not None and done.worker["device"] == "cpu"
    assert done.started_at <= done.heartbeat_at <= done.finished_at
    assert done.progress == {"step": 4, "total": 4, "stage": "uploading"}
    names = artifact_names(1)
    assert [a["name"] for a in done.result["artifacts"]] == names
    storage: RecordingStorage = ctx.storage  # type: ignore[assignment]
    for entry in done.result["artifacts"]:
        assert entry["key"] == artifact_key(tenant.name, job.id, entry["name"])
        data = storage.get(entry["key"])
        assert entry["size"] == len(data)
        if entry["name"].endswith(".png"):
            assert entry["content_type"] == "image/png"
            decode_png(data)
        else:
            assert entry["content_type"] == "application/json"
            assert json.loads(data)["seed"] == 7
    assert storage.list(folder(tenant, job)) == sorted(a["key"] for a in done.result["artifacts"])
    summary = done.result["summary"]
    assert summary["seed"] == 7 and summary["iterations_done"] == 2 and not summary["stopped"]
    assert summary["items"][0]["class_index"] is not None
    # every artifact was stored while the job was still running: never succeeded without them
    assert [status for _, status, _ in storage.puts] == ["running"] * len(names)
    assert all(progress["stage"] == "uploading" for _, _, progress in storage.puts)

    # the same message again (redelivery, duplicate): nothing runs, nothing changes
    storage.puts.clear()
    assert execute_job(job.id, ctx=ctx) == "skipped"
    again = reload(sessions, job)
    assert (again.attempts, again.finished_at, again.result) == (1, done.finished_at, done.result)
    assert storage.puts == []


def test_a_job_canceled_while_queued_never_runs(ctx, sessions, session, tenant, job_params):
    job = submit(session, tenant, job_params())
    repo.request_cancel(session, tenant_id=tenant.id, job_id=job.id)
    session.commit()
    assert execute_job(job.id, ctx=ctx) == "skipped"
    assert reload(sessions, job).status == "canceled"
    assert ctx.storage.list(folder(tenant, job)) == []


# --- cancel and lost attempts --------------------------------------------------------------------
def test_cancel_during_the_run_stops_within_one_iteration(
    ctx, sessions, session, tenant, job_params, monkeypatch
):
    job = submit(session, tenant, job_params(iterations=50))

    def cancel(pulse: runner.Pulse) -> None:
        with sessions() as other:  # the API, while the job runs
            _, outcome = repo.request_cancel(other, tenant_id=tenant.id, job_id=job.id)
            other.commit()
        assert outcome == "canceling"
        pulse.beat()  # the next heartbeat (the pulse thread's, made deterministic here)

    updates = hook_progress(monkeypatch, at_step=2, action=cancel)
    assert execute_job(job.id, ctx=ctx) == "canceled"

    done = reload(sessions, job)
    assert (done.status, done.result, done.error) == ("canceled", None, None)
    steps = [u["step"] for u in updates if u["stage"] == "optimizing"]
    assert steps == [1, 2]  # the core stopped after the iteration that saw the cancel
    assert done.progress["step"] <= 2 and done.progress["total"] == 51
    assert ctx.storage.list(folder(tenant, job)) == []


def test_cancel_is_seen_by_the_heartbeat_thread(ctx, sessions, session, tenant, job_params):
    """No hook: the pulse thread's own heartbeat brings the cancel to `should_stop`."""
    import threading

    job = submit(session, tenant, job_params(iterations=400))
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(execute_job(job.id, ctx=ctx)))
    thread.start()
    try:
        wait_for(sessions, job, lambda j: (j.progress or {}).get("stage") == "optimizing")
        with sessions() as other:
            assert repo.request_cancel(other, tenant_id=tenant.id, job_id=job.id)[1] == "canceling"
            other.commit()
    finally:
        thread.join(timeout=120)
    assert outcome == ["canceled"]
    done = reload(sessions, job)
    assert done.status == "canceled" and done.progress["step"] < done.progress["total"]


def wait_for(sessions, job: Job, predicate: Any, timeout: float = 120.0) -> Job:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = reload(sessions, job)
        if predicate(current):
            return current
        time.sleep(0.05)
    raise AssertionError(f"job {job.id} did not get there in {timeout} s: {current.status}")


def test_a_stale_attempt_writes_nothing(ctx, sessions, session, tenant, job_params, monkeypatch):
    job = submit(session, tenant, job_params(iterations=50))
    other_worker = {"host": "other", "pid": 2}

    def give_away(pulse: runner.Pulse) -> None:
        with sessions() as other:  # the reaper thinks this worker died; another claims the job
            report = repo.reap(other, now=utcnow() + _seconds(3600), heartbeat_stale_seconds=600,
                               queued_stale_seconds=1800)  # fmt: skip
            assert report.requeued == [job.id]
            assert repo.claim_job(other, job_id=job.id, worker=other_worker).attempts == 2
            other.commit()
        pulse.beat()

    updates = hook_progress(monkeypatch, at_step=1, action=give_away)
    assert execute_job(job.id, ctx=ctx) == "lost"

    now = reload(sessions, job)
    assert (now.status, now.attempts, now.worker) == ("running", 2, other_worker)
    assert now.progress is None and now.result is None and now.error is None
    assert [u["step"] for u in updates if u["stage"] == "optimizing"] == [1]
    assert ctx.storage.list(folder(tenant, job)) == []


def _seconds(n: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=n)


# --- failures ------------------------------------------------------------------------------------
def test_storage_failure_requeues_then_fails_at_the_cap(
    ctx, sessions, session, tenant, job_params, sent, tmp_path
):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the storage root should be")
    ctx.storage = LocalStorage(blocked)
    job = submit(session, tenant, job_params(), max_attempts=3)

    for attempt in (1, 2):
        assert execute_job(job.id, ctx=ctx) == "requeued"
        row = reload(sessions, job)
        assert (row.status, row.attempts, row.result) == ("queued", attempt, None)
        assert row.enqueued_at is not None  # re-sent, with backoff
        assert sent[-1] == {"job_id": job.id, "queue": "interactive", "priority": 0,
                            "countdown": backoff_seconds(attempt)}  # fmt: skip
    assert [m["countdown"] for m in sent] == [5.0, 10.0]

    assert execute_job(job.id, ctx=ctx) == "failed"
    row = reload(sessions, job)
    assert (row.status, row.attempts, row.result) == ("failed", 3, None)
    assert row.error["code"] == "storage_unavailable" and row.error["retryable"] is True
    assert "grid.png" in row.error["message"] or "could not store" in row.error["message"]
    assert len(sent) == 2


def test_storage_failing_midway_leaves_no_artifacts(ctx, sessions, session, tenant, job_params):
    class FailsOnSecondPut(LocalStorage):
        puts = 0

        def put(self, key: str, data: bytes, content_type: str = "") -> None:
            FailsOnSecondPut.puts += 1
            if FailsOnSecondPut.puts == 2:
                raise ConnectionError("storage went away")
            super().put(key, data, content_type)

    ctx.storage = FailsOnSecondPut(ctx.storage.root)
    job = submit(session, tenant, job_params(), max_attempts=1)
    assert execute_job(job.id, ctx=ctx) == "failed"
    row = reload(sessions, job)
    assert row.error["code"] == "storage_unavailable" and row.result is None
    assert ctx.storage.list(folder(tenant, job)) == []  # the first artifact was removed again


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        ({"classes": ["seven"], "guidance": {"iterations": -1}}, "invalid_params", "iterations"),
        ({"classes": ["zebra-that-is-no-class"]}, "invalid_params", "zebra"),
        ({"classifier": "digits:cnn@/nowhere/zoo"}, "model_not_found", "not found"),
    ],
    ids=["bad-value", "unknown-class", "missing-model"],
)
def test_bad_input_fails_without_retry(
    ctx, sessions, session, tenant, job_params, sent, raw, code, message
):
    params = {**job_params(), **raw}
    params["guidance"] = {**job_params()["guidance"], **raw.get("guidance", {})}
    job = new_job(session, tenant, params=params)  # stored as given: the worker validates again
    assert execute_job(job.id, ctx=ctx) == "failed"
    row = reload(sessions, job)
    assert (row.status, row.attempts, row.result) == ("failed", 1, None)
    assert row.error["code"] == code and row.error["retryable"] is False
    assert message in row.error["message"] and "Traceback" not in row.error["message"]
    assert sent == []


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        ("oom", "gpu_oom"),
        (SoftTimeLimitExceeded(), "time_limit"),
        (RuntimeError("something broke"), "internal"),
    ],
)
def test_run_errors_map_to_codes(
    ctx, sessions, session, tenant, job_params, monkeypatch, caplog, exc, code
):
    import torch

    import digin.core.kinds

    if exc == "oom":
        exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise exc

    monkeypatch.setattr(digin.core.kinds, "run_job", broken)
    job = submit(session, tenant, job_params())
    assert execute_job(job.id, ctx=ctx) == "failed"
    row = reload(sessions, job)
    assert row.status == "failed" and row.error["code"] == code
    assert row.error["retryable"] is False and "Traceback" not in row.error["message"]
    if code == "internal":
        assert "something broke" in row.error["message"]
        assert any(getattr(r, "job_id", None) == str(job.id) and r.exc_info for r in caplog.records)


def test_tenant_at_its_running_cap_defers_the_job(ctx, sessions, session, tenant, job_params, sent):
    ctx.settings = fresh_settings(data_dir=ctx.settings.data_dir, max_running_per_tenant=1)
    running = new_job(session, tenant)
    assert repo.claim_job(session, job_id=running.id, worker={"host": "x"}) is not None
    session.commit()
    job = submit(session, tenant, job_params())
    assert execute_job(job.id, ctx=ctx) == "deferred"
    assert reload(sessions, job).status == "queued"
    assert sent == [{"job_id": job.id, "queue": "interactive", "priority": 0, "countdown": 30}]


def test_backoff_grows_and_is_capped():
    assert [backoff_seconds(a) for a in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff_seconds(30) == 300.0


def test_a_spec_outside_the_model_roots_fails_before_anything_is_read(
    ctx, sessions, session, tenant, job_params, tmp_path
):
    """The worker checks the roots again (a job row written by anything but this API, or roots
    changed since): refused as invalid params, never retried, the same text for every path."""
    from dataclasses import replace

    from digin.core.registry import PATH_OUTSIDE_ROOTS

    roots = [str(tmp_path / "models")]
    ctx = replace(ctx, settings=fresh_settings(data_dir=tmp_path / "data", model_roots=roots),
                  cache=None)  # fmt: skip
    (tmp_path / "secret").mkdir()
    for spec in (f"digits:cnn@{tmp_path / 'secret'}", f"digits:cnn@{tmp_path / 'none'}"):
        job = new_job(session, tenant, params={**job_params(), "classifier": spec})
        assert execute_job(job.id, ctx=ctx) == "failed"
        row = reload(sessions, job)
        assert (row.error["code"], row.attempts) == ("invalid_params", 1)
        assert row.error["message"] == f"model {spec!r} {PATH_OUTSIDE_ROOTS}"
