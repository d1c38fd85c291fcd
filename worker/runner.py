"""One job in a worker process: claim → load → optimise → upload → finish (DESIGN §5.3).

`execute_job` is the whole task; the Celery task in `worker.tasks` only supplies the process's
`WorkerContext`. The job row is the truth, and every write is guarded by this worker's attempt
number (`api.repo`), so a duplicate or late delivery, or a stale worker, changes nothing:

    claim (queued → running; anything else → "skipped", nothing runs)
      ├─ cancel requested ─────────────────────────→ canceled   (within one iteration)
      ├─ attempt lost (the reaper gave the job away) → nothing written
      ├─ bad params / unknown model / OOM / time limit / bug → failed {code, message}
      ├─ storage or database unavailable ──→ queued again with backoff (failed after the cap)
      └─ artifacts uploaded under deterministic keys, then → succeeded {summary, artifacts}
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from api import repo
from api.db import QUEUED, Job, Tenant, session_scope
from api.storage import ArtifactNotFound, Storage, artifact_key

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger("digin.worker")

Outcome = Literal["skipped", "deferred", "succeeded", "failed", "canceled", "requeued", "lost"]
CONTENT_TYPES = {".png": "image/png", ".json": "application/json"}
MAX_MESSAGE = 1000  # characters of an error message stored on the row
MAX_BACKOFF_S = 300.0
WRITE_RETRY_FRACTION = 0.8  # of DIGIN_HEARTBEAT_STALE_SECONDS: how long a write waits for the DB


class Enqueue(Protocol):
    def __call__(
        self, *, job_id: uuid.UUID, queue: str, priority: int, countdown: float = 0.0
    ) -> None: ...


@dataclass
class WorkerContext:
    """What a worker process needs, made once per process (after the fork)."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    enqueue: Enqueue
    device: str | None = None  # None: DIGIN_DEVICE, else cuda if this process sees one, else cpu
    max_batch: int = 8
    heartbeat_interval: float = 1.0  # seconds between heartbeats while a job runs
    cache: Any = None  # core.jobs.ModelCache, made on first use (models load once per process)

    def resolve_device(self) -> str:
        """Decided in the worker process itself: CUDA is never touched in a parent that forks."""
        if self.device is None:
            wanted = self.settings.device  # DIGIN_DEVICE
            if wanted and wanted != "auto":
                self.device = str(wanted)
            else:
                import torch

                self.device = "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def model_cache(self) -> Any:
        if self.cache is None:
            from core.jobs import ModelCache

            self.cache = ModelCache()
        return self.cache

    def identity(self) -> dict[str, Any]:
        device = self.resolve_device()
        gpu = None
        if device.startswith("cuda"):
            import torch

            gpu = torch.cuda.get_device_name(torch.device(device))
        return {"host": socket.gethostname(), "pid": os.getpid(), "pidns": pid_namespace(),
                "device": device, "gpu": gpu}  # fmt: skip


def pid_namespace() -> int | None:
    """This process's PID namespace (Linux), so that a pid is only ever checked inside the
    namespace it belongs to (two containers may share a host name)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


@dataclass
class ClaimedJob:
    """The claimed row's values, read once (the session that claimed it is closed)."""

    id: uuid.UUID
    attempt: int
    max_attempts: int
    kind: str
    params: dict[str, Any]
    seed: int
    queue: str
    priority: int
    tenant: str
    tenant_id: uuid.UUID
    batch_id: uuid.UUID | None = None  # a sweep item's batch
    group_key: str | None = None  # jobs of a batch that may run as one batched optimisation


@dataclass
class JobFailure(Exception):
    """How a job attempt ended badly: `fail` it, or `requeue` it (a transient failure)."""

    action: Literal["fail", "requeue"]
    code: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)

    def error(self) -> dict[str, Any]:
        message = self.message
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        return repo.job_error(self.code, message, retryable=self.action == "requeue")


def backoff_seconds(attempt: int) -> float:
    """Wait before attempt `attempt + 1` after a transient failure: 5 s, 10 s, 20 s, … ≤ 5 min."""
    return float(min(MAX_BACKOFF_S, 5.0 * 2.0 ** max(0, attempt - 1)))


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
            self.beat()

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
    log.info("claimed", extra={**_fields(job), "event": "claimed", "kind": job.kind})
    if job.group_key is not None and job.batch_id is not None and ctx.settings.batch_max_items > 1:
        from worker.groups import execute_group  # sweep items: one run with compatible peers

        return execute_group(job, ctx)
    pulse = Pulse(ctx.sessions, job_id=job.id, attempt=job.attempt, interval=ctx.heartbeat_interval)
    pulse.update({"step": 0, "total": _total_iterations(job, ctx.max_batch), "stage": "loading"})
    pulse.start()
    try:
        return _run_attempt(job, ctx, pulse)
    except JobFailure as failure:
        pulse.stop()
        return _settle_failure(job, ctx, failure, pulse)
    except (Exception, SoftTimeLimitExceeded) as exc:  # classified; no stack trace on the row
        pulse.stop()
        return _settle_failure(job, ctx, _classify(exc, job), pulse)
    finally:  # KeyboardInterrupt/SystemExit pass through: the reaper recovers the job
        pulse.stop()


def _fields(job: ClaimedJob) -> dict[str, Any]:
    return {"job_id": str(job.id), "attempt": job.attempt}


def _run_attempt(job: ClaimedJob, ctx: WorkerContext, pulse: Pulse) -> Outcome:
    """Compute, upload, finish; or stop early when the heartbeat says cancel or lost."""
    artifacts = None if pulse.should_stop() else _compute(job, ctx, pulse)
    listing = None if artifacts is None else _upload(job, ctx, pulse, artifacts)
    pulse.stop()
    if pulse.outcome == "lost" or listing is None:
        return _stopped(job, ctx, pulse, uploaded=listing is not None or artifacts is not None)
    result = {"summary": artifacts["__summary__"], "artifacts": listing}  # type: ignore[index]
    done = _write(
        ctx, lambda s: repo.finish_job(s, job_id=job.id, attempt=job.attempt, result=result)
    )
    if not done:
        log.warning("attempt lost before finishing", extra={**_fields(job), "event": "lost"})
        return "lost"
    log.info("succeeded", extra={**_fields(job), "event": "succeeded", "artifacts": len(listing)})
    return "succeeded"


def _stopped(job: ClaimedJob, ctx: WorkerContext, pulse: Pulse, *, uploaded: bool) -> Outcome:
    """The heartbeat said stop: 'lost' writes nothing (another attempt owns the job and its
    keys); 'cancel' removes what this attempt uploaded, then marks the job canceled."""
    if pulse.outcome == "lost":
        log.warning("attempt lost: writing nothing", extra={**_fields(job), "event": "lost"})
        return "lost"
    if uploaded:
        _discard_artifacts(job, ctx)
    if _write(ctx, lambda s: repo.mark_canceled(s, job_id=job.id, attempt=job.attempt)):
        log.info("canceled", extra={**_fields(job), "event": "canceled"})
        return "canceled"
    return "lost"


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
        job = ClaimedJob(
            id=row.id,
            attempt=row.attempts,
            max_attempts=row.max_attempts,
            kind=row.kind,
            params=dict(row.params),
            seed=int(row.seed),
            queue=row.queue,
            priority=row.priority,
            tenant=tenant,
            tenant_id=row.tenant_id,
            batch_id=row.batch_id,
            group_key=row.group_key,
        )
        session.commit()
    return job


def _total_iterations(job: ClaimedJob, max_batch: int) -> int | None:
    """Progress steps of the whole job ((iterations + 1) per batch of items), if the params
    can be read; the core's progress callback counts the same steps."""
    try:
        from core.params import validate_params

        params: Any = validate_params(job.kind, job.params)
    except ValueError:
        return None
    refs = getattr(params, "neurons", None) or getattr(params, "classes", None)
    guidance = getattr(params, "guidance", None)
    if not refs or guidance is None or not hasattr(params, "images_per_class"):
        return None  # other kinds (analysis, counterfactual) report their own totals
    items = len(refs) * params.images_per_class
    return int((guidance.iterations + 1) * math.ceil(items / max_batch))


def _compute(job: ClaimedJob, ctx: WorkerContext, pulse: Pulse) -> dict[str, Any] | None:
    """Run the core job; returns the rendered artifacts (name → bytes) plus '__summary__', or
    None if it was stopped (cancel or lost)."""
    from core.kinds import run_job
    from core.output import render_artifacts
    from core.params import validate_params

    params = validate_params(job.kind, job.params)

    def progress(step: int, total: int, _info: dict[str, Any]) -> None:
        pulse.update({"step": step, "total": total, "stage": "optimizing"})

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
    if pulse.should_stop():
        return None
    artifacts: dict[str, Any] = dict(render_artifacts(result))
    artifacts["__summary__"] = _json_safe(result.summary())
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


def _upload(
    job: ClaimedJob, ctx: WorkerContext, pulse: Pulse, artifacts: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """Put every artifact under its deterministic key (a retry overwrites, never duplicates);
    the listing of the result, or None if the heartbeat said stop on the way."""
    names = sorted(n for n in artifacts if n != "__summary__")
    listing = []
    for i, name in enumerate(names):
        pulse.update({"step": i, "total": len(names), "stage": "uploading"})
        if pulse.should_stop():
            return None
        data: bytes = artifacts[name]
        key = artifact_key(job.tenant, job.id, name)
        content_type = CONTENT_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")
        try:
            ctx.storage.put(key, data, content_type)
        except Exception as exc:
            raise JobFailure(
                "requeue",
                "storage_unavailable",
                f"could not store artifact {name!r}: {type(exc).__name__}: {exc}",
                {"stage": "uploading"},
            ) from exc
        listing.append({"name": name, "key": key, "content_type": content_type, "size": len(data)})
    pulse.update({"step": len(names), "total": len(names), "stage": "uploading"}, now=True)
    return listing


def _classify(exc: BaseException, job: ClaimedJob) -> JobFailure:
    """Map an exception of the run to failed (with a code) or requeued."""
    from core.params import ParamsError

    text = f"{exc}" or type(exc).__name__
    if isinstance(exc, SoftTimeLimitExceeded):
        return JobFailure("fail", "time_limit", "the job ran past its time limit")
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        _free_gpu_memory()
        return JobFailure("fail", "gpu_oom", f"the GPU ran out of memory: {text}")
    if isinstance(exc, ParamsError):
        return JobFailure("fail", "invalid_params", text)
    if isinstance(exc, FileNotFoundError):
        return JobFailure("fail", "model_not_found", text)
    if isinstance(exc, ValueError | NotImplementedError):
        return JobFailure("fail", "invalid_params", text)
    if isinstance(exc, OperationalError | InterfaceError):  # the database went away
        return JobFailure("requeue", "database_unavailable", f"{type(exc).__name__}: {text}")
    log.error("internal error", exc_info=exc, extra={**_fields(job), "event": "internal_error"})
    return JobFailure("fail", "internal", f"internal error ({type(exc).__name__}): {text}")


def _free_gpu_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def _settle_failure(
    job: ClaimedJob, ctx: WorkerContext, failure: JobFailure, pulse: Pulse
) -> Outcome:
    """Write the failure (fail, or requeue + re-enqueue with backoff) unless the attempt is lost."""
    fields = {**_fields(job), "code": failure.code}
    if pulse.outcome == "lost":
        log.warning("attempt lost: writing nothing", extra={**fields, "event": "lost"})
        return "lost"
    error = failure.error()
    if failure.action == "fail":
        failed = _write(
            ctx, lambda s: repo.fail_job(s, job_id=job.id, attempt=job.attempt, error=error)
        )
        if not failed:
            return "lost"
        log.warning(f"failed: {failure.message}", extra={**fields, "event": "failed"})
        status: str | None = "failed"
    else:
        status = _write(
            ctx, lambda s: repo.requeue_job(s, job_id=job.id, attempt=job.attempt, error=error)
        )
    if status == QUEUED:
        countdown = backoff_seconds(job.attempt)
        try:
            ctx.enqueue(job_id=job.id, queue=job.queue, priority=job.priority, countdown=countdown)
            _write(ctx, lambda s: repo.mark_enqueued(s, job_id=job.id))
        except Exception:  # the broker is away too: the reaper sends it later
            log.exception("re-enqueue failed", extra={**fields, "event": "enqueue_error"})
        log.warning(
            f"requeued: {failure.message}",
            extra={**fields, "event": "requeued", "countdown": countdown},
        )
        return "requeued"
    if status is None:
        return "lost"
    if failure.extra.get("stage") == "uploading":  # a failed or canceled job keeps no artifacts
        _discard_artifacts(job, ctx)
    if status == "canceled":
        log.info("canceled", extra={**fields, "event": "canceled"})
        return "canceled"
    if failure.action == "requeue":
        log.warning(f"failed after {job.attempt} attempts: {failure.message}",
                    extra={**fields, "event": "failed"})  # fmt: skip
    return "failed"


def _discard_artifacts(job: ClaimedJob, ctx: WorkerContext) -> None:
    """Remove the job's artifacts (best effort: the storage may be what failed)."""
    try:
        ctx.storage.delete_prefix(f"{artifact_key(job.tenant, job.id, 'x')[:-1]}")
    except Exception as exc:  # noqa: BLE001
        log.warning(
            f"could not delete partial artifacts: {exc}",
            extra={**_fields(job), "event": "cleanup_error"},
        )


def _write(ctx: WorkerContext, change: Callable[[Session], Any]) -> Any:
    """One state change in its own committed transaction. While the database is unreachable
    the change is retried with backoff, for less than the heartbeat threshold (after that the
    reaper owns the job and the attempt guard would refuse the write anyway); None if it
    never went through (the reaper re-queues the job once its heartbeat is stale)."""
    deadline = time.monotonic() + WRITE_RETRY_FRACTION * ctx.settings.heartbeat_stale_seconds
    delay = 0.25
    while True:
        try:
            with session_scope(ctx.sessions) as session:
                return change(session)
        except (OperationalError, InterfaceError) as exc:  # unreachable: wait for it
            if time.monotonic() + delay > deadline:
                log.exception("database write failed; giving up", extra={"event": "db_error"})
                return None
            log.warning(f"database write failed, retry in {delay:g} s: {exc}",
                        extra={"event": "db_retry"})  # fmt: skip
            time.sleep(delay)
            delay = min(2 * delay, 2.0)
        except SQLAlchemyError:
            log.exception("database write failed", extra={"event": "db_error"})
            return None


def _json_safe(value: Any) -> Any:
    """JSON the databases accept: NaN/inf (a padded trajectory) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _json_safe(value.item())
    return value
