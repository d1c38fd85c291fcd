"""What a job attempt needs whether it runs alone (`digin.worker.runner`) or in a batched group of
sweep items (`digin.worker.groups`): the process's `WorkerContext`, the claimed row's values
(`ClaimedJob`), how an attempt fails (`JobFailure`, `classify`, `settle_failure`), how it stops
early (`stopped`), uploads its artifacts (`upload`) and writes its state (`write`).

Both modules import this one, and it imports neither, so there is no cycle between them. The
helpers take the job's heartbeat as a `JobPulse`: `digin.worker.runner.Pulse`, or one job's view of
a `digin.worker.groups.GroupPulse`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import QUEUED, Job, session_scope
from digin.service.storage import Storage, artifact_key
from digin.worker.memory import current_limit_mb, is_memory_exhausted, pool_device

if TYPE_CHECKING:
    from digin.service.settings import Settings

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


class JobPulse(Protocol):
    """One job's heartbeat as the helpers here use it (`digin.worker.runner.Pulse`, or
    `digin.worker.groups.JobBeat`): its latest answer, progress updates, and the stop flag."""

    @property
    def outcome(self) -> repo.HeartbeatOutcome: ...

    def update(self, progress: dict[str, Any], *, now: bool = False) -> None: ...

    def should_stop(self) -> bool: ...


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
    cache: Any = (
        None  # digin.core.jobs.ModelCache, made on first use (models load once per process)
    )

    def resolve_device(self) -> str:
        """Decided in the worker process itself: CUDA is never touched in a parent that forks."""
        if self.device is None:
            self.device = pool_device(self.settings)
        return self.device

    def model_cache(self) -> Any:
        if self.cache is None:
            from digin.core.jobs import ModelCache

            self.cache = ModelCache(
                model_roots=self.settings.model_path_roots,
                max_models=self.settings.model_cache_size,
            )
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

    @classmethod
    def from_row(cls, row: Job, *, tenant: str) -> ClaimedJob:
        """The values of a row just claimed (its `attempts` is this attempt's number)."""
        return cls(
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


def log_fields(job: ClaimedJob) -> dict[str, Any]:
    """The log record fields that name a job's attempt."""
    return {"job_id": str(job.id), "attempt": job.attempt}


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


def stopped(job: ClaimedJob, ctx: WorkerContext, pulse: JobPulse, *, uploaded: bool) -> Outcome:
    """The heartbeat said stop: 'lost' writes nothing (another attempt owns the job and its
    keys); 'cancel' removes what this attempt uploaded, then marks the job canceled."""
    if pulse.outcome == "lost":
        log.warning("attempt lost: writing nothing", extra={**log_fields(job), "event": "lost"})
        return "lost"
    if uploaded:
        _discard_artifacts(job, ctx)
    if write(ctx, lambda s: repo.mark_canceled(s, job_id=job.id, attempt=job.attempt)):
        log.info("canceled", extra={**log_fields(job), "event": "canceled"})
        return "canceled"
    return "lost"


def upload(
    job: ClaimedJob, ctx: WorkerContext, pulse: JobPulse, artifacts: dict[str, Any]
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


def classify(exc: BaseException, job: ClaimedJob) -> JobFailure:
    """Map an exception of the run to failed (with a code) or requeued."""
    from digin.core.params import ParamsError

    text = f"{exc}" or type(exc).__name__
    if isinstance(exc, SoftTimeLimitExceeded):
        return JobFailure("fail", "time_limit", "the job ran past its time limit")
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        _free_gpu_memory()
        return JobFailure("fail", "gpu_oom", f"the GPU ran out of memory: {text}")
    if is_memory_exhausted(exc):  # host memory: the process's limit (digin.worker.memory)
        limit = current_limit_mb()
        where = (
            f"this worker process's memory limit ({limit} MB, DIGIN_WORKER_MEMORY_LIMIT_MB)"
            if limit is not None
            else "the memory of this worker's machine"
        )
        return JobFailure(
            "fail",
            "resource_limit",
            f"the job needs more memory than {where}; give it fewer items per run "
            f"(guidance.max_batch), a smaller resolution or fewer cutouts: {text}",
        )
    if isinstance(exc, ParamsError):
        return JobFailure("fail", "invalid_params", text)
    if isinstance(exc, FileNotFoundError):
        return JobFailure("fail", "model_not_found", text)
    if isinstance(exc, ValueError | NotImplementedError):
        return JobFailure("fail", "invalid_params", text)
    if isinstance(exc, OperationalError | InterfaceError):  # the database went away
        return JobFailure("requeue", "database_unavailable", f"{type(exc).__name__}: {text}")
    log.error("internal error", exc_info=exc, extra={**log_fields(job), "event": "internal_error"})
    return JobFailure("fail", "internal", f"internal error ({type(exc).__name__}): {text}")


def _free_gpu_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def settle_failure(
    job: ClaimedJob, ctx: WorkerContext, failure: JobFailure, pulse: JobPulse
) -> Outcome:
    """Write the failure (fail, or requeue + re-enqueue with backoff) unless the attempt is lost."""
    fields = {**log_fields(job), "code": failure.code}
    if pulse.outcome == "lost":
        log.warning("attempt lost: writing nothing", extra={**fields, "event": "lost"})
        return "lost"
    error = failure.error()
    if failure.action == "fail":
        failed = write(
            ctx, lambda s: repo.fail_job(s, job_id=job.id, attempt=job.attempt, error=error)
        )
        if not failed:
            return "lost"
        log.warning(f"failed: {failure.message}", extra={**fields, "event": "failed"})
        status: str | None = "failed"
    else:
        status = write(
            ctx, lambda s: repo.requeue_job(s, job_id=job.id, attempt=job.attempt, error=error)
        )
    if status == QUEUED:
        countdown = backoff_seconds(job.attempt)
        try:
            ctx.enqueue(job_id=job.id, queue=job.queue, priority=job.priority, countdown=countdown)
            write(ctx, lambda s: repo.mark_enqueued(s, job_id=job.id))
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
            extra={**log_fields(job), "event": "cleanup_error"},
        )


def write(ctx: WorkerContext, change: Callable[[Session], Any]) -> Any:
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


def json_safe(value: Any) -> Any:
    """JSON the databases accept: NaN/inf (a padded trajectory) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    return value
