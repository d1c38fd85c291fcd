"""Writing new jobs: the one path every job row takes (docs/architecture.md §8.3, §9.9).

Each concern of a new job lives here once, and every writer goes through it:
- `lock_tenants`: the tenant rows locked in id order (two transactions locking several tenants
  never deadlock); the checks below hold until the commit.
- `stored_by_key` and `idempotency_error`: the idempotency lookup (jobs by (tenant, key),
  batches by their own key) in one query, and what a key used before answers.
- `queued_counts` and `cap_error`: the per-tenant cap on queued jobs of a queue.
- `job_row`: a new queued job's columns with their defaults, checked.
- `insert_jobs`: the bulk insert (PostgreSQL's COPY, else multi-row INSERTs).

`submit_jobs` writes a list of submissions (the API's group commit, `digin.api.submissions`)
with a handful of statements for the whole list; the outcome of each is its own (a job, created
or replayed, or the error that refused it), exactly what one-by-one writes in list order would
decide. `create_job` is one submission. `digin.service.repo.batches.create_batch` writes a
batch's items with the same pieces.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import bindparam, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from digin.service.db.models import QUEUED, QUEUES, Batch, Job, utcnow
from digin.service.repo.jobs import (
    RETRY_AFTER_S,
    IdempotencyConflict,
    TenantLimitExceeded,
    lock_tenant,
)

INSERT_CHUNK = 5000  # rows per INSERT statement (the driver splits further as it needs)
QUEUED_CAP = "max_queued_per_tenant"  # the setting that caps a tenant's queued jobs


@dataclass
class Submission:
    """One job to write for a tenant: `values` are its columns (`job_row`), `max_queued` the
    tenant's cap on queued jobs of the same queue (None: no cap)."""

    tenant_id: uuid.UUID
    values: dict[str, Any]
    max_queued: int | None = None


@dataclass
class Outcome:
    """What became of a submission: `job` (and whether it was `created`), or `error`."""

    job: Job | None = None
    created: bool = False
    error: Exception | None = None


# --- the pieces --------------------------------------------------------------------------------
def lock_tenants(session: Session, tenant_ids: Iterable[uuid.UUID]) -> None:
    """Lock each tenant row (`lock_tenant`) in id order; UnknownTenant for one that is not."""
    for tenant_id in sorted(set(tenant_ids)):
        lock_tenant(session, tenant_id=tenant_id)


Keyed = TypeVar("Keyed", Job, Batch)


def stored_by_key(
    session: Session, model: type[Keyed], keys: Collection[tuple[uuid.UUID, str]]
) -> dict[tuple[uuid.UUID, str], Keyed]:
    """The stored jobs or batches (`model`) with these (tenant id, idempotency key) pairs."""
    if not keys:
        return {}
    stmt = select(model).where(tuple_(model.tenant_id, model.idempotency_key).in_(list(keys)))
    return {(row.tenant_id, str(row.idempotency_key)): row for row in session.scalars(stmt)}


def idempotency_error(
    stored: Job | Batch,
    key: str,
    request_hash: str | None,
    conflict: type[IdempotencyConflict] = IdempotencyConflict,
) -> IdempotencyConflict | None:
    """None when `stored` was made by the same request (a replay: answer it again), else the
    `conflict` to raise: the key was used for another request."""
    return None if stored.request_hash == request_hash else conflict(key, stored.id)


def queued_counts(
    session: Session, tenant_ids: Collection[uuid.UUID]
) -> defaultdict[tuple[uuid.UUID, str], int]:
    """Queued jobs per (tenant, queue) of these tenants, in one query (what the caps count)."""
    counts: defaultdict[tuple[uuid.UUID, str], int] = defaultdict(int)
    if tenant_ids:
        stmt = (
            select(Job.tenant_id, Job.queue, func.count())
            .where(Job.tenant_id.in_(list(tenant_ids)), Job.status == QUEUED)
            .group_by(Job.tenant_id, Job.queue)
        )
        counts.update({(t, q): int(n) for t, q, n in session.execute(stmt)})
    return counts


def cap_error(
    queued: int, adding: int, cap: int | None, limit_name: str = QUEUED_CAP
) -> TenantLimitExceeded | None:
    """The error when `adding` more queued jobs to the `queued` ones would pass `cap`."""
    if cap is not None and queued + adding > cap:
        return TenantLimitExceeded(limit_name, cap, RETRY_AFTER_S)
    return None


REQUIRED = ("kind", "params", "seed", "priority", "queue", "max_attempts")
OPTIONAL = ("idempotency_key", "request_hash", "meta", "webhook", "batch_id", "item_index",
            "custom_id", "group_key", "enqueued_at")  # fmt: skip
_UNSET = dict.fromkeys(OPTIONAL)
_COLUMNS = frozenset((*REQUIRED, *OPTIONAL))


def job_row(values: Mapping[str, Any], *, tenant_id: uuid.UUID, now: datetime) -> dict[str, Any]:
    """A new queued job's columns: `values` (every column of REQUIRED, any of OPTIONAL) over
    the defaults of a new job, always with the same keys (as `insert_jobs` streams them).
    ValueError, naming the column, for a missing, unknown or invalid one."""
    if not _COLUMNS.issuperset(values) or any(name not in values for name in REQUIRED):
        missing = [name for name in REQUIRED if name not in values]
        unknown = sorted(set(values) - _COLUMNS)
        raise ValueError(f"job columns: missing {missing}, unknown {unknown}")
    queue, max_attempts = values["queue"], values["max_attempts"]
    key = values.get("idempotency_key")
    if queue not in QUEUES:
        raise ValueError(f"queue: {queue!r} is not one of {list(QUEUES)}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts: {max_attempts} must be at least 1")
    if key is not None and not (0 < len(key) <= 255 and values.get("request_hash")):
        raise ValueError("idempotency_key: 1 to 255 characters, with the request_hash it guards")
    return {"id": uuid.uuid4(), "tenant_id": tenant_id, "status": QUEUED, "attempts": 0,
            "cancel_requested": False, "created_at": now, **_UNSET, **values}  # fmt: skip


def insert_jobs(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert job rows (`job_row`s: all with the same keys) in bulk: PostgreSQL's COPY (one
    stream, JSON serialised once per row), else multi-row INSERTs of INSERT_CHUNK rows."""
    if not rows:
        return
    if session.get_bind().dialect.name != "postgresql":
        for start in range(0, len(rows), INSERT_CHUNK):
            session.execute(insert(Job), rows[start : start + INSERT_CHUNK])
        return
    columns = list(rows[0])  # attribute names (`meta`), written to their columns (`metadata`)
    names = ", ".join(f'"{Job.__mapper__.columns[c].name}"' for c in columns)
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    raw: Any = session.connection().connection.dbapi_connection  # psycopg's Connection
    assert raw is not None
    with raw.cursor() as cursor, cursor.copy(f"COPY jobs ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(
                [dumps(v) if isinstance(v, dict) else v for v in (row[c] for c in columns)]
            )


# --- jobs --------------------------------------------------------------------------------------
def submit_jobs(session: Session, submissions: Sequence[Submission]) -> list[Outcome]:
    """Write `submissions` (flushes; the caller commits): one Outcome per submission, in order.
    Raises for database errors (then nothing of the list may be committed) and UnknownTenant."""
    now = utcnow()
    outcomes = [Outcome() for _ in submissions]
    live: list[tuple[Submission, Outcome, dict[str, Any]]] = []
    for sub, outcome in zip(submissions, outcomes, strict=True):
        try:
            live.append((sub, outcome, job_row(sub.values, tenant_id=sub.tenant_id, now=now)))
        except ValueError as exc:
            outcome.error = exc
    if not live:
        return outcomes
    lock_tenants(session, (sub.tenant_id for sub, _, _ in live))
    # idempotency keys: the stored jobs, then earlier submissions of this same list
    keys = {(row["tenant_id"], row["idempotency_key"]) for _, _, row in live
            if row["idempotency_key"] is not None}  # fmt: skip
    stored = stored_by_key(session, Job, keys)
    # the cap counts the tenant's queued jobs of the same queue (sweep items have their own)
    capped = {sub.tenant_id for sub, _, _ in live if sub.max_queued is not None}
    queued = queued_counts(session, capped)
    rows = []
    for sub, outcome, row in live:
        key = (sub.tenant_id, row["idempotency_key"])
        if key in stored:
            outcome.error = idempotency_error(stored[key], key[1], row["request_hash"])
            outcome.job = None if outcome.error else stored[key]
            continue
        counted = (sub.tenant_id, row["queue"])
        outcome.error = cap_error(queued[counted], 1, sub.max_queued)
        if outcome.error is not None:
            continue
        rows.append(row)
        outcome.job, outcome.created = Job(**row), True
        queued[counted] += 1
        if key[1] is not None:
            stored[key] = outcome.job
    insert_jobs(session, rows)
    return outcomes


def create_job(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    kind: str,
    params: dict[str, Any],
    seed: int,
    priority: int,
    queue: str,
    max_attempts: int,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    metadata: dict[str, Any] | None = None,
    batch_id: uuid.UUID | None = None,
    max_queued: int | None = None,
) -> tuple[Job, bool]:
    """Insert one queued job (`submit_jobs` of one); returns (job, created), the job in the
    session. The same idempotency key with the same request hash returns the existing job
    (created False); with another hash it raises IdempotencyConflict. Raises
    TenantLimitExceeded when the tenant has `max_queued` queued jobs in `queue`, ValueError
    for a bad column, UnknownTenant."""
    values = {"kind": kind, "params": params, "seed": seed, "priority": priority, "queue": queue,
              "max_attempts": max_attempts, "idempotency_key": idempotency_key,
              "request_hash": request_hash, "meta": metadata, "batch_id": batch_id}  # fmt: skip
    (outcome,) = submit_jobs(session, [Submission(tenant_id, values, max_queued)])
    if outcome.error is not None:
        raise outcome.error
    assert outcome.job is not None
    if outcome.created:  # written by COPY or INSERT: load it into the session
        return session.get_one(Job, outcome.job.id), True
    return outcome.job, False


def mark_sent(session: Session, sent: list[tuple[uuid.UUID, datetime]]) -> None:
    """Record when each job's message was sent (`enqueued_at`), in one executemany; a job
    that a worker claimed meanwhile still gets its time (only unset times are written)."""
    if not sent:
        return
    jobs = Job.__table__.c
    stmt = (
        update(Job)
        .where(jobs.id == bindparam("job_id"), jobs.enqueued_at.is_(None))
        .values(enqueued_at=bindparam("sent_at"))
    )
    session.connection().execute(stmt, [{"job_id": i, "sent_at": t} for i, t in sent])
