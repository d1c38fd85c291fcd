"""Batches (sweeps, docs/architecture.md §9.9): writing a planned batch, its counts and
rates, cancel, lists.

A batch's items are ordinary job rows (`batch_id`, `item_index`, `custom_id`, `group_key`),
written in bulk (`digin.service.repo.submit`, the path of every new job) after the whole batch
was validated (`digin.api.sweeps`), so that a bad item leaves nothing behind. Like every
repository function these flush and never commit; the route commits, then sends the items'
messages in bulk (`digin.service.dispatch.enqueue_many`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, cast, func, select, update
from sqlalchemy.orm import Session

from digin.service.db.models import (
    CANCELED,
    CANCELING,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Batch,
    Job,
    utcnow,
)
from digin.service.repo.jobs import IdempotencyConflict, keyset_page, lock_tenant
from digin.service.repo.submit import (
    INSERT_CHUNK,
    cap_error,
    idempotency_error,
    insert_jobs,
    job_row,
    lock_tenants,
    queued_counts,
    stored_by_key,
)
from digin.service.repo.webhooks import (
    add_deliveries,
    batch_counts,
    batch_status,
    delivery_row,
    event_id,
    finish_batch_if_done,
    job_payload,
    on_job_status,
    wants,
)

QUEUE = "sweep"
RATE_WINDOW = timedelta(minutes=10)  # throughput: items finished in the last ten minutes


@dataclass
class PlannedItem:
    index: int
    custom_id: str
    params: dict[str, Any]  # normalised: what the job stores and runs
    seed: int
    group_key: str | None
    job_id: uuid.UUID | None = None  # set when the row is written


@dataclass
class BatchPlan:
    kind: str
    items: list[PlannedItem]
    spec: dict[str, Any]  # what the batch records about its axes or items
    errors: list[dict[str, str]] = field(default_factory=list)


class BatchIdempotencyConflict(IdempotencyConflict):
    def __init__(self, key: str, batch_id: uuid.UUID) -> None:
        ValueError.__init__(
            self,
            f"Idempotency-Key {key!r} was already used for batch {batch_id} with a different "
            "request; use a new key for a new request",
        )
        self.key, self.job_id = key, batch_id


def create_batch(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    plan: BatchPlan,
    params_template: dict[str, Any],
    priority: int,
    max_attempts: int,
    metadata: dict[str, Any] | None = None,
    webhook: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    max_queued_items: int | None = None,
) -> tuple[Batch, bool]:
    """Insert the batch and one queued job per planned item (`insert_jobs`); returns (batch,
    created). An idempotency key seen before returns that batch (created False) or raises
    BatchIdempotencyConflict; TenantLimitExceeded when the tenant's queued sweep items would
    pass `max_queued_items`. The same pieces as every new job (`digin.service.repo.submit`)."""
    lock_tenants(session, [tenant_id])
    if idempotency_key is not None:
        key = (tenant_id, idempotency_key)
        stored = stored_by_key(session, Batch, [key]).get(key)
        if stored is not None:
            conflict = idempotency_error(
                stored, idempotency_key, request_hash, BatchIdempotencyConflict
            )
            if conflict is not None:
                raise conflict
            return stored, False
    total = len(plan.items)
    if max_queued_items is not None:
        queued = queued_counts(session, [tenant_id])[tenant_id, QUEUE]
        error = cap_error(queued, total, max_queued_items, "max_queued_sweep_items_per_tenant")
        if error is not None:
            raise error
    now = utcnow()
    batch = Batch(
        id=uuid.uuid4(), tenant_id=tenant_id, kind=plan.kind, params_template=params_template,
        spec=plan.spec, total=total, priority=priority, meta=metadata,
        idempotency_key=idempotency_key, request_hash=request_hash, webhook=webhook,
        created_at=now,
    )  # fmt: skip
    session.add(batch)
    session.flush()
    shared = {"kind": plan.kind, "priority": priority, "queue": QUEUE, "batch_id": batch.id,
              "max_attempts": max_attempts,
              # sent right after the commit; the route clears it for what it could not send
              "enqueued_at": now}  # fmt: skip
    rows = []
    for item in plan.items:
        row = job_row(
            {**shared, "params": item.params, "seed": item.seed, "item_index": item.index,
             "custom_id": item.custom_id, "group_key": item.group_key},
            tenant_id=tenant_id, now=now,
        )  # fmt: skip
        item.job_id = row["id"]
        rows.append(row)
    insert_jobs(session, rows)
    return batch, True


def get_batch(session: Session, *, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> Batch | None:
    """The tenant's batch, or None (another tenant's batch too: a 404)."""
    return session.scalars(
        select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
    ).one_or_none()


def list_batches(
    session: Session, *, tenant_id: uuid.UUID, limit: int, cursor: str | None = None
) -> tuple[list[Batch], str | None]:
    """The tenant's batches, newest first, with a keyset cursor as for jobs."""
    stmt = select(Batch).where(Batch.tenant_id == tenant_id)
    return keyset_page(session, stmt, Batch, limit=limit, cursor=cursor)


def clear_unsent(session: Session, *, batch_id: uuid.UUID, from_index: int) -> int:
    """Items from `from_index` on were not sent (the broker failed part-way): clear their
    `enqueued_at`, so that the reaper sends them (one UPDATE). A batch's rows are written with
    the time of their insert as `enqueued_at` because their messages follow right after the
    commit; had the API process died in between, the reaper re-sends them once they are
    `queued_stale_seconds` old rather than after its 60 s grace for unsent jobs."""
    result = session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status == QUEUED, Job.item_index >= from_index)
        .values(enqueued_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def queued_item_ids(session: Session, *, batch_id: uuid.UUID) -> list[uuid.UUID]:
    """Ids of the batch's queued items, in item order (what the route enqueues)."""
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.batch_id == batch_id, Job.status == QUEUED)
            .order_by(Job.item_index)
        )
    )


# --- counts, progress, rates -------------------------------------------------------------------
@dataclass
class BatchStats:
    counts: dict[str, int]
    status: str
    progress: float
    throughput_per_min: float | None
    eta_seconds: float | None


def batch_stats(
    session: Session, batches: Sequence[Batch], *, now: datetime | None = None
) -> dict[uuid.UUID, BatchStats]:
    """Counts per status (one grouped query for all `batches`), progress, and the rate of the
    last ten minutes (of the whole run once the batch finished) with the ETA it gives."""
    now = now or utcnow()
    ids = [b.id for b in batches]
    counts = batch_counts(session, ids)
    since = now - RATE_WINDOW
    rates: dict[uuid.UUID, tuple[int, datetime | None, datetime | None]] = {}
    if ids:
        rows = session.execute(
            select(
                Job.batch_id,
                func.count().filter(Job.finished_at >= since),
                func.min(Job.started_at),
                func.max(Job.finished_at),
            )
            .where(Job.batch_id.in_(ids))
            .group_by(Job.batch_id)
        )
        rates = {b: (int(n), first, last) for b, n, first, last in rows if b is not None}
    out = {}
    for batch in batches:
        c = counts[batch.id]
        finished = sum(c[s] for s in TERMINAL)
        recent, first_start, last_finish = rates.get(batch.id, (0, None, None))
        throughput = None
        if batch.finished_at is not None or finished == batch.total:
            start = first_start or batch.created_at
            end = last_finish or batch.finished_at or now
            minutes = max((end - start).total_seconds(), 1.0) / 60
            throughput = finished / minutes if finished else None
        elif recent:
            start = max(batch.created_at, first_start or batch.created_at, since)
            minutes = max((now - start).total_seconds(), 1.0) / 60
            throughput = recent / minutes
        remaining = batch.total - finished
        eta = None
        if remaining == 0:
            eta = 0.0
        elif throughput:
            eta = remaining / throughput * 60
        out[batch.id] = BatchStats(
            counts=c,
            status=batch_status(batch, c),
            progress=finished / batch.total if batch.total else 1.0,
            throughput_per_min=throughput,
            eta_seconds=eta,
        )
    return out


# --- cancel ------------------------------------------------------------------------------------
def cancel_batch(session: Session, *, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> Batch | None:
    """Cancel what is left: queued items → canceled at once (one UPDATE), running items →
    canceling (their workers stop within one iteration); finished items stay readable. None
    if the tenant has no such batch. Idempotent."""
    batch = get_batch(session, tenant_id=tenant_id, batch_id=batch_id)
    if batch is None:
        return None
    now = utcnow()
    if batch.finished_at is None and batch.canceled_at is None:
        batch.canceled_at = now
        session.flush()
    canceled = list(
        session.execute(
            update(Job)
            .where(Job.batch_id == batch_id, Job.status == QUEUED)
            .values(status=CANCELED, cancel_requested=True, finished_at=now)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )
    session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status == RUNNING)
        .values(status=CANCELING, cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    if canceled and wants(batch.webhook, CANCELED):
        _canceled_events(session, batch, canceled, now)
    finish_batch_if_done(session, batch_id=batch_id)
    session.refresh(batch)
    return batch


def _canceled_events(
    session: Session, batch: Batch, job_ids: list[uuid.UUID], now: datetime
) -> None:
    assert batch.webhook is not None
    for start in range(0, len(job_ids), INSERT_CHUNK):
        chunk = job_ids[start : start + INSERT_CHUNK]
        jobs = session.scalars(
            select(Job).where(Job.id.in_(chunk)).execution_options(populate_existing=True)
        )
        rows = [
            delivery_row(
                tenant_id=job.tenant_id,
                event=CANCELED,
                ident=event_id(job.id, f"batch:{CANCELED}", job.attempts),
                url=batch.webhook["url"],
                data=job_payload(job),
                now=now,
                job_id=job.id,
                batch_id=batch.id,
            )  # fmt: skip
            for job in jobs
        ]
        add_deliveries(session, rows)


# --- the results index -------------------------------------------------------------------------
def iter_items(session: Session, *, batch_id: uuid.UUID, chunk: int = 1000) -> Iterator[list[Any]]:
    """The batch's items in item order, `chunk` at a time (keyset pages on item_index), as
    rows of what the results index shows (no ORM objects; `params_json` is the stored JSON as
    text, passed through without parsing)."""
    columns = (
        Job.id, Job.item_index, Job.custom_id, Job.status, Job.seed, Job.result, Job.error,
        cast(Job.params, Text).label("params_json"),
    )  # fmt: skip
    last = -1
    while True:
        rows = session.execute(
            select(*columns)
            .where(Job.batch_id == batch_id, Job.item_index > last)
            .order_by(Job.item_index)
            .limit(chunk)
        ).all()
        if not rows:
            return
        last = int(rows[-1].item_index)
        yield list(rows)


def item_metrics(job: Any) -> dict[str, Any] | None:
    """The metrics of a succeeded item: the best-iteration metrics of its images (the mean
    over them when it has several), else the numeric top-level figures of its summary."""
    if job.status != SUCCEEDED or not job.result:
        return None
    summary: dict[str, Any] = job.result.get("summary") or {}
    found = [it.get("best") for it in summary.get("items") or [] if isinstance(it, dict)]
    bests: list[dict[str, Any]] = [b for b in found if isinstance(b, dict)]
    if bests:
        names = [k for k, v in bests[0].items() if isinstance(v, int | float)]
        out: dict[str, Any] = {}
        for name in names:
            values = [b[name] for b in bests if isinstance(b.get(name), int | float)]
            out[name] = sum(values) / len(values) if values else None
        out["images"] = len(bests)
        return out
    return {k: v for k, v in summary.items() if isinstance(v, int | float) and k != "seed"}


# --- batched execution: a worker's claim of compatible items -----------------------------------
def claim_group_peers(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    group_key: str,
    limit: int,
    worker: dict[str, Any],
    max_running: int | None = None,
) -> list[Job]:
    """Claim up to `limit` more queued items of the batch with the same group key (same kind,
    models and settings), in item order, exactly as `claim_job` claims one: queued → running,
    attempts + 1 each, in one UPDATE (rows another worker is claiming are skipped). The
    tenant's running cap counts them (the caller already holds one job). Their messages,
    arriving later, find them claimed and do nothing."""
    if limit <= 0:
        return []
    if max_running is not None:
        lock_tenant(session, tenant_id=tenant_id)
        active = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.status.in_((RUNNING, CANCELING)))
        )
        limit = min(limit, max_running - int(active or 0))
        if limit <= 0:
            return []
    candidates = (
        select(Job.id)
        .where(Job.batch_id == batch_id, Job.status == QUEUED, Job.group_key == group_key)
        .order_by(Job.item_index)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(session.scalars(candidates))  # locked (PostgreSQL) until the commit
    if not ids:
        return []
    now = utcnow()
    claimed = list(
        session.scalars(
            update(Job)
            .where(Job.id.in_(ids), Job.status == QUEUED)
            .values(
                status=RUNNING,
                attempts=Job.attempts + 1,
                started_at=now,
                heartbeat_at=now,
                worker=worker,
                progress=None,
            )
            .returning(Job),
            execution_options={"populate_existing": True},
        )
    )
    for job in claimed:
        on_job_status(session, job)  # their `running` events, as claim_job records them
    return sorted(claimed, key=lambda j: j.item_index or 0)
