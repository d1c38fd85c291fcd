"""One job in a worker process: claim → load → optimise → upload → finish (docs/architecture.md §8).

`execute_job` is the whole task; the Celery task in `digin.worker.tasks` only supplies the process's
`WorkerContext`. The job row is the truth, and every write is guarded by this worker's attempt
number (`digin.service.repo`), so a duplicate or late delivery, or a stale worker, changes nothing:

    claim (queued → running; anything else → "skipped", nothing runs)
      ├─ cancel requested ─────────────────────────→ canceled   (at the next DDIM step)
      ├─ attempt lost (the reaper gave the job away) → nothing written
      ├─ bad params / unknown model / out of memory / time limit / bug → failed {code, message}
      ├─ storage or database unavailable ──→ queued again with backoff (failed after the cap)
      └─ artifacts uploaded under deterministic keys, then → succeeded {summary, artifacts}
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import QUEUED, Job, Tenant, session_scope
from digin.service.storage import ArtifactNotFound
from digin.worker.audits import REPORT_KIND, bind_params, compute_report, finish
from digin.worker.execution import (
    ClaimedJob,
    Enqueue,
    JobFailure,
    Outcome,
    WorkerContext,
    backoff_seconds,
    classify,
    json_safe,
    log_fields,
    pid_namespace,
    settle_failure,
    stopped,
    upload,
    write,
)
from digin.worker.memory import release_memory

log = logging.getLogger("digin.worker")

__all__ = [
    "ClaimedJob",
    "Enqueue",
    "JobFailure",
    "Outcome",
    "Pulse",
    "WorkerContext",
    "backoff_seconds",
    "execute_job",
    "image_resolver",
    "pid_namespace",
]


# --- heartbeats --------------------------------------------------------------------------------
class Pulse:
    """The heartbeat of one attempt: a thread writes the latest progress and `heartbeat_at`
    every `interval` seconds (also while models load or an iteration takes long), and at once
    when the stage changes. `should_stop()` is the core's StopFn: True once a heartbeat
    answered 'cancel' (stop, then mark canceled) or 'lost' (stop and write nothing)."""

    def __init__(
        self, sessions: sessionmaker[Session], *, job_id: uuid.UUID, attempt: int, interval: float
    ) -> None:
        self.sessions, self.job_id, self.attempt = sessions, job_id, attempt
        self.interval = interval
        self.outcome: repo.HeartbeatOutcome = "continue"
        self._progress: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"pulse-{self.job_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.beat()
            except MemoryError:  # the job took the process's memory: beat again next time
                log.warning("heartbeat: out of memory", extra={"job_id": str(self.job_id)})

    def update(self, progress: dict[str, Any], *, now: bool = False) -> None:
        """Record progress ({step, total, stage}); written at once if the stage changed (or
        `now`), else by the next beat of the thread."""
        changed = self._progress is None or self._progress.get("stage") != progress.get("stage")
        self._progress = progress
        if changed or now:
            self.beat()

    def beat(self) -> repo.HeartbeatOutcome:
        with self._lock:
            if self.outcome == "lost":
                return self.outcome
            try:
                with session_scope(self.sessions) as session:
                    outcome = repo.heartbeat(
                        session, job_id=self.job_id, attempt=self.attempt, progress=self._progress
                    )
            except SQLAlchemyError as exc:  # the database is away: keep working, retry later
                fields = {"job_id": str(self.job_id), "event": "heartbeat_error"}
                log.warning(f"heartbeat failed: {exc}", extra=fields)
                return self.outcome
            if outcome != self.outcome:
                log.info(
                    f"heartbeat: {outcome}",
                    extra={"job_id": str(self.job_id), "event": f"heartbeat_{outcome}"},
                )
            if self.outcome == "continue" or outcome == "lost":  # 'cancel' stays until 'lost'
                self.outcome = outcome
            return self.outcome

    def should_stop(self) -> bool:
        return self.outcome != "continue"


# --- the task ----------------------------------------------------------------------------------
def execute_job(job_id: str | uuid.UUID, *, ctx: WorkerContext) -> Outcome:
    """Run the job `job_id` once, if it can be claimed; returns what happened. Raises only
    when the claim itself cannot reach the database (no row was changed: retry the message)."""
    job = _claim(uuid.UUID(str(job_id)), ctx)
    if not isinstance(job, ClaimedJob):
        return job
    log.info("claimed", extra={**log_fields(job), "event": "claimed", "kind": job.kind})
    if job.group_key is not None and job.batch_id is not None and ctx.settings.batch_max_items > 1:
        from digin.worker.groups import execute_group  # sweep items: one run with compatible peers

        return execute_group(job, ctx)
    pulse = Pulse(ctx.sessions, job_id=job.id, attempt=job.attempt, interval=ctx.heartbeat_interval)
    pulse.update({"step": 0, "total": _total_iterations(job, ctx.max_batch), "stage": "loading"})
    pulse.start()
    try:
        return _run_attempt(job, ctx, pulse)
    except JobFailure as exc:
        failure = exc
    except (Exception, SoftTimeLimitExceeded) as exc:  # classified; no stack trace on the row
        failure = classify(exc, job)
    finally:  # KeyboardInterrupt/SystemExit pass through: the reaper recovers the job
        pulse.stop()
    if failure.code == "resource_limit":  # the run's frames are gone: so are its tensors
        release_memory()
    return settle_failure(job, ctx, failure, pulse)


def _run_attempt(job: ClaimedJob, ctx: WorkerContext, pulse: Pulse) -> Outcome:
    """Compute, upload, finish; or stop early when the heartbeat says cancel or lost."""
    artifacts = None if pulse.should_stop() else _compute(job, ctx, pulse)
    listing = None if artifacts is None else upload(job, ctx, pulse, artifacts)
    pulse.stop()
    if pulse.outcome == "lost" or listing is None:
        return stopped(job, ctx, pulse, uploaded=listing is not None or artifacts is not None)
    result = {"summary": artifacts["__summary__"], "artifacts": listing}  # type: ignore[index]
    # an audit's class job writes its follow-ups with its success (digin.worker.audits)
    done = write(ctx, lambda s: finish(s, job, result, max_attempts=ctx.settings.max_attempts))
    if not done:
        log.warning("attempt lost before finishing", extra={**log_fields(job), "event": "lost"})
        return "lost"
    log.info(
        "succeeded", extra={**log_fields(job), "event": "succeeded", "artifacts": len(listing)}
    )
    return "succeeded"


def _claim(job_id: uuid.UUID, ctx: WorkerContext) -> ClaimedJob | Outcome:
    """Take the queued row (queued → running) and read what the run needs; 'skipped' if it
    was not queued (a duplicate, late or stale delivery: nothing runs), 'deferred' if the
    tenant is at its running cap (the message is sent again later)."""
    worker = ctx.identity()
    with ctx.sessions() as session:
        try:
            row = repo.claim_job(
                session,
                job_id=job_id,
                worker=worker,
                max_running=ctx.settings.max_running_per_tenant,
            )
        except repo.TenantLimitExceeded as exc:
            session.rollback()
            found = session.execute(
                select(Job.queue, Job.priority).where(Job.id == job_id, Job.status == QUEUED)
            ).one_or_none()
            if found is None:
                return "skipped"
            ctx.enqueue(job_id=job_id, queue=found[0], priority=found[1], countdown=exc.retry_after)
            log.info(
                "tenant at its running cap: deferred",
                extra={"job_id": str(job_id), "event": "deferred", "countdown": exc.retry_after},
            )
            return "deferred"
        if row is None:
            session.rollback()
            log.info(
                "not queued (duplicate, late or finished): nothing to do",
                extra={"job_id": str(job_id), "event": "skipped"},
            )
            return "skipped"
        tenant = session.get_one(Tenant, row.tenant_id).name
        job = ClaimedJob.from_row(row, tenant=tenant)
        session.commit()
    return job


def _total_iterations(job: ClaimedJob, max_batch: int) -> int | None:
    """Progress steps of the whole job from the kinds table (`digin.core.kinds.Kind.steps`), if the
    params can be read and the kind knows them before its models load; else None (the run
    reports its total itself)."""
    try:
        from digin.core.params import validate_params

        params: Any = validate_params(job.kind, job.params)
    except ValueError:
        return None
    from digin.core.kinds import KINDS

    return KINDS[job.kind].steps(params, max_batch)


def _compute(job: ClaimedJob, ctx: WorkerContext, pulse: Pulse) -> dict[str, Any] | None:
    """Run the core job; returns the rendered artifacts (name → bytes) plus '__summary__', or
    None if it was stopped (cancel or lost)."""
    from digin.core.context import Stopped
    from digin.core.kinds import run_job
    from digin.core.output import render_artifacts
    from digin.core.params import validate_params

    if job.kind == REPORT_KIND:  # an audit's report (digin.worker.audits), no core run
        return compute_report(job, ctx, pulse.should_stop)
    # an audit's class job reads its audit's images and classes (digin.worker.audits)
    params = bind_params(job, validate_params(job.kind, job.params), ctx.sessions)

    def progress(step: int, total: int, _info: dict[str, Any]) -> None:
        pulse.update({"step": step, "total": total, "stage": "optimizing"})

    try:
        result = run_job(
            job.kind,
            params,
            seed=job.seed,
            device=ctx.resolve_device(),
            cache=ctx.model_cache(),
            max_batch=ctx.max_batch,
            progress=progress,
            should_stop=pulse.should_stop,
            image_resolver=image_resolver(job, ctx),
        )
    except Stopped:  # stopped before the run had anything to show
        return None
    if pulse.should_stop():
        return None
    artifacts: dict[str, Any] = dict(render_artifacts(result))
    artifacts["__summary__"] = json_safe(result.summary())
    return artifacts


def image_resolver(job: ClaimedJob, ctx: WorkerContext) -> Callable[[str], bytes]:
    """Uploaded image id (POST /v1/images, `image_id`/`image_ids` params) → its bytes, for the
    job's own tenant only. An unknown id fails the job (`invalid_params`); storage that does
    not answer re-queues it (`storage_unavailable`)."""

    def resolve(image_id: str) -> bytes:
        try:
            key = uuid.UUID(image_id)
        except ValueError:
            raise ValueError(f"image_id {image_id!r} is not an uploaded image's id") from None
        with ctx.sessions() as session:
            image = repo.get_image(session, tenant_id=job.tenant_id, image_id=key)
            storage_key = None if image is None else image.storage_key
        if storage_key is None:
            raise ValueError(f"image_id {image_id!r}: this tenant has no such uploaded image")
        try:
            return ctx.storage.get(storage_key)
        except ArtifactNotFound:
            raise ValueError(f"image_id {image_id!r}: the image's bytes are gone") from None
        except Exception as exc:
            raise JobFailure(
                "requeue",
                "storage_unavailable",
                f"could not read image {image_id!r}: {type(exc).__name__}: {exc}",
                {"stage": "loading"},
            ) from exc

    return resolve
