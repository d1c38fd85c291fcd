"""Jobs: reading and every state change of the lifecycle (docs/architecture.md §9.1); new jobs
are written by `digin.service.repo.submit`.

How the job lifecycle stays correct with several API processes and workers
(docs/architecture.md §9.1, §8):
- Every state change is one conditional UPDATE (compare-and-set on status, and on the attempt
  number for worker writes), atomic on PostgreSQL and SQLite alike. Terminal states never change.
- A worker's claim makes it the holder of attempt `n`; heartbeat/finish/fail/cancel from any
  other attempt (a stale worker after the reaper re-queued its job) change nothing.
- Checks that must not race (per-tenant caps, idempotency keys, running caps) first lock the
  tenant row with a no-op UPDATE: a row lock on PostgreSQL, the write lock on SQLite.
- Functions flush but never commit: the caller commits, then enqueues (never the reverse).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from digin.service.db.models import (
    ACTIVE,
    CANCELED,
    CANCELING,
    FAILED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    Batch,
    Job,
    Tenant,
    utcnow,
)

MAX_PAGE = 500
RETRY_AFTER_S = 30  # suggested wait when a per-tenant cap is reached


class IdempotencyConflict(ValueError):
    """The idempotency key was used before with a different request body."""

    def __init__(self, key: str, job_id: uuid.UUID) -> None:
        self.key, self.job_id = key, job_id
        super().__init__(
            f"Idempotency-Key {key!r} was already used for job {job_id} with a "
            "different request; use a new key for a new request"
        )


class TenantLimitExceeded(Exception):
    """A per-tenant cap is reached: `limit_name` (the setting), its value, seconds to wait."""

    def __init__(self, limit_name: str, limit: int, retry_after: int) -> None:
        self.limit_name, self.limit, self.retry_after = limit_name, limit, retry_after
        super().__init__(f"{limit_name}={limit} reached for this tenant; retry in {retry_after}s")


class UnknownTenant(LookupError):
    pass


class InvalidCursor(ValueError):
    pass


# --- locking and reading jobs -----------------------------------------------------------------
def lock_tenant(session: Session, *, tenant_id: uuid.UUID) -> None:
    """Serialise the caller's transaction with others of the same tenant until it commits."""
    stmt = update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name)
    stmt = stmt.returning(Tenant.id).execution_options(synchronize_session=False)
    if session.scalar(stmt) is None:
        raise UnknownTenant(f"no tenant with id {tenant_id}")


def count_jobs(session: Session, *, tenant_id: uuid.UUID, statuses: Sequence[str]) -> int:
    stmt = (
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status.in_(statuses))
    )
    return int(session.scalar(stmt) or 0)


def get_job(session: Session, *, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
    """The tenant's job, or None (also for another tenant's job: a 404, never a 403)."""
    return session.scalars(
        select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
    ).one_or_none()


def encode_cursor(row: Job | Batch) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id.hex]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        position = datetime.fromisoformat(created), uuid.UUID(hex=job_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidCursor(f"cursor: {cursor[:40]!r} is not a cursor this API returned") from exc
    if position[0].tzinfo is None:
        raise InvalidCursor(f"cursor: {cursor[:40]!r} is not a cursor this API returned")
    return position


def list_jobs(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    limit: int,
    status: str | Sequence[str] | None = None,
    kind: str | None = None,
    batch_id: uuid.UUID | None = None,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """The tenant's jobs, newest first, `limit` per page; returns (jobs, next_cursor or None).
    The opaque cursor is a keyset position (created_at, id): no duplicates or gaps as jobs are
    added, also among jobs created in the same microsecond."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        statuses = [status] if isinstance(status, str) else list(status)
        unknown = [s for s in statuses if s not in STATUSES]
        if unknown:
            raise ValueError(f"status: {unknown} not among {list(STATUSES)}")
        stmt = stmt.where(Job.status.in_(statuses))
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    if batch_id is not None:
        stmt = stmt.where(Job.batch_id == batch_id)
    return keyset_page(session, stmt, Job, limit=limit, cursor=cursor)


Paged = TypeVar("Paged", Job, Batch)


def keyset_page(
    session: Session,
    stmt: Select[Paged],
    model: type[Paged],
    *,
    limit: int,
    cursor: str | None,
) -> tuple[list[Paged], str | None]:
    """`limit` rows of `stmt` (jobs or batches), newest first, after the keyset position
    `cursor` (created_at, id); returns (rows, the next page's cursor or None on the last)."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit: {limit} must be between 1 and {MAX_PAGE}")
    if cursor is not None:
        created, last_id = decode_cursor(cursor)
        stmt = stmt.where(
            or_(model.created_at < created, and_(model.created_at == created, model.id < last_id))
        )
    stmt = stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    if len(rows) > limit:
        return rows[:limit], encode_cursor(rows[limit - 1])
    return rows, None


# --- state changes -----------------------------------------------------------------------------
def compare_and_set(
    session: Session, *, job_id: uuid.UUID, where: Sequence[Any], values: dict[str, Any]
) -> Job | None:
    """One conditional UPDATE of a job; the updated row, or None if `where` did not hold. A
    status change records its webhook events in the same transaction
    (`digin.service.repo.webhooks`)."""
    stmt = update(Job).where(Job.id == job_id, *where).values(**values).returning(Job)
    job = session.scalars(stmt, execution_options={"populate_existing": True}).one_or_none()
    if job is not None and "status" in values and (job.webhook or job.batch_id):
        from digin.service.repo.webhooks import on_job_status  # it builds on this module

        on_job_status(session, job)
    return job


def _changed(
    session: Session, *, job_id: uuid.UUID, where: Sequence[Any], values: dict[str, Any]
) -> bool:
    """`compare_and_set`: whether it changed the job."""
    return compare_and_set(session, job_id=job_id, where=where, values=values) is not None


CancelOutcome = Literal["canceled", "canceling", "unchanged"]


def request_cancel(
    session: Session, *, tenant_id: uuid.UUID, job_id: uuid.UUID
) -> tuple[Job, CancelOutcome] | None:
    """Cancel a job: queued → canceled at once; running → canceling (the worker stops within
    one iteration); canceling or terminal → unchanged. None if the tenant has no such job."""
    now = utcnow()
    mine = Job.tenant_id == tenant_id
    job = compare_and_set(
        session,
        job_id=job_id,
        where=[mine, Job.status == QUEUED],
        values={"status": CANCELED, "cancel_requested": True, "finished_at": now},
    )
    if job is not None:
        return job, "canceled"
    job = compare_and_set(
        session,
        job_id=job_id,
        where=[mine, Job.status == RUNNING],
        values={"status": CANCELING, "cancel_requested": True},
    )
    if job is not None:
        return job, "canceling"
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    return None if job is None else (job, "unchanged")


def mark_enqueued(session: Session, *, job_id: uuid.UUID, now: datetime | None = None) -> bool:
    """Record that the job's message was sent (after the commit that created it)."""
    values = {"enqueued_at": now or utcnow()}
    return _changed(session, job_id=job_id, where=[Job.status == QUEUED], values=values)


def claim_job(
    session: Session, *, job_id: uuid.UUID, worker: dict[str, Any], max_running: int | None = None
) -> Job | None:
    """Atomically take a queued job (queued → running, attempts + 1): the returned job's
    `attempts` is this worker's attempt number. None if the job is in any other state (a
    duplicate or late delivery: do nothing). With `max_running`, raises TenantLimitExceeded
    when the tenant already runs that many (leave the job queued and retry later)."""
    now = utcnow()
    if max_running is not None:
        tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
        if tenant_id is None:
            return None
        lock_tenant(session, tenant_id=tenant_id)
        if count_jobs(session, tenant_id=tenant_id, statuses=ACTIVE) >= max_running:
            raise TenantLimitExceeded("max_running_per_tenant", max_running, RETRY_AFTER_S)
    return compare_and_set(
        session,
        job_id=job_id,
        where=[Job.status == QUEUED],
        values={
            "status": RUNNING,
            "attempts": Job.attempts + 1,
            "started_at": now,
            "heartbeat_at": now,
            "worker": worker,
            "progress": None,
        },
    )


def _held(attempt: int) -> list[Any]:
    """The job is still held by this worker's attempt."""
    return [Job.status.in_(ACTIVE), Job.attempts == attempt]


HeartbeatOutcome = Literal["continue", "cancel", "lost"]


def heartbeat(
    session: Session, *, job_id: uuid.UUID, attempt: int, progress: dict[str, Any] | None = None
) -> HeartbeatOutcome:
    """Record progress ({step, total, stage}) and liveness. Returns 'continue'; 'cancel' when
    a cancel was requested (stop, then `mark_canceled`); 'lost' when this attempt no longer
    holds the job (the reaper gave it away or it ended: stop and write nothing)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    job = compare_and_set(session, job_id=job_id, where=_held(attempt), values=values)
    if job is None:
        return "lost"
    return "cancel" if job.cancel_requested else "continue"


def finish_job(
    session: Session, *, job_id: uuid.UUID, attempt: int, result: dict[str, Any]
) -> bool:
    """running/canceling → succeeded with `result`; False if the attempt no longer holds it."""
    values = {"status": SUCCEEDED, "result": result, "finished_at": utcnow()}
    return _changed(session, job_id=job_id, where=_held(attempt), values=values)


def job_error(code: str, message: str, *, retryable: bool = False) -> dict[str, Any]:
    """The `error` JSON of a job: {code, message, retryable}."""
    if not code or not message:
        raise ValueError("error: code and message must be non-empty")
    return {"code": code, "message": message, "retryable": retryable}


def fail_job(session: Session, *, job_id: uuid.UUID, attempt: int, error: dict[str, Any]) -> bool:
    """running/canceling → failed with `error` (`job_error(...)`); False if not held."""
    code, message = str(error.get("code") or ""), str(error.get("message") or "")
    error = job_error(code, message, retryable=bool(error.get("retryable")))
    values = {"status": FAILED, "error": error, "finished_at": utcnow()}
    return _changed(session, job_id=job_id, where=_held(attempt), values=values)


def requeue_job(
    session: Session, *, job_id: uuid.UUID, attempt: int, error: dict[str, Any]
) -> str | None:
    """A transient failure: a running job goes back to queued while attempts remain (the
    caller re-enqueues); a canceling one becomes canceled; else it fails with `error`.
    Returns the new status, or None if this attempt no longer holds the job."""
    job = compare_and_set(
        session,
        job_id=job_id,
        where=[Job.status == RUNNING, Job.attempts == attempt, Job.attempts < Job.max_attempts],
        values={"status": QUEUED, "enqueued_at": None, "heartbeat_at": None, "worker": None},
    )
    if job is not None:
        return QUEUED
    if mark_canceled(session, job_id=job_id, attempt=attempt):
        return CANCELED
    return FAILED if fail_job(session, job_id=job_id, attempt=attempt, error=error) else None


def mark_canceled(session: Session, *, job_id: uuid.UUID, attempt: int) -> bool:
    """canceling → canceled, once the worker has stopped; False if not held or not canceling."""
    where = [Job.status == CANCELING, Job.attempts == attempt]
    values = {"status": CANCELED, "finished_at": utcnow()}
    return _changed(session, job_id=job_id, where=where, values=values)
