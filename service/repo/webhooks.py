"""Webhook events and their deliveries (docs/architecture.md §9.10): a transactional outbox.

An event is recorded in the same transaction as the state change that causes it (the job's
compare-and-set, a batch's bulk cancel, a batch's last item ending), as one `webhook_deliveries`
row per target with its payload fixed; a periodic sender outside the API (`digin.worker.webhooks`)
posts due rows and records each attempt. Event ids are derived from what happened (job, event,
attempt), so they are stable: every retry of a delivery carries the same `webhook-id`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from digin.service.db.models import (
    DELIVERED,
    FAILED,
    PENDING,
    SUCCEEDED,
    TERMINAL,
    Batch,
    Job,
    Tenant,
    WebhookDelivery,
    utcnow,
)
from digin.service.repo.tenants import insert_ignore
from digin.service.webhooks import JOB_EVENTS, new_secret

MAX_ATTEMPTS = 8  # attempts per delivery (every delivery row gets this; no setting changes it)
LOG_ENTRIES = 20  # attempts kept in a delivery's log
_NAMESPACE = uuid.UUID("5f0c8a52-51b1-4a0e-9a6b-6f1e0f3c9d11")


def event_id(subject: uuid.UUID, event: str, attempt: int = 0) -> str:
    """Stable id of an event: the same inputs always give the same id."""
    return "evt_" + uuid.uuid5(_NAMESPACE, f"{subject}:{event}:{attempt}").hex


# --- secrets -----------------------------------------------------------------------------------
def webhook_secret(session: Session, *, tenant_id: uuid.UUID, rotate: bool = False) -> str:
    """The tenant's signing secret, created on first use (or replaced with `rotate`)."""
    if rotate:
        secret = new_secret()
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(webhook_secret=secret))
        return secret
    # set only if still empty: two first uses at once agree on one secret
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id, Tenant.webhook_secret.is_(None))
        .values(webhook_secret=new_secret())
    )
    secret = session.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant_id))
    if secret is None:
        raise LookupError(f"no tenant with id {tenant_id}")
    return str(secret)


# --- payloads ----------------------------------------------------------------------------------
def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def job_payload(job: Job) -> dict[str, Any]:
    """The job as the event shows it (a snapshot taken when the event happened)."""
    path = f"/v1/jobs/{job.id}"
    artifacts = None
    if job.status == SUCCEEDED and job.result:
        artifacts = [a.get("name") for a in job.result.get("artifacts") or []]
    return {
        "id": str(job.id),
        "object": "job",
        "kind": job.kind,
        "status": job.status,
        "batch_id": None if job.batch_id is None else str(job.batch_id),
        "custom_id": job.custom_id,
        "item_index": job.item_index,
        "seed": job.seed,
        "attempts": job.attempts,
        "error": job.error,
        "artifacts": artifacts,
        "metadata": job.meta,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "urls": {"self": path, "artifacts": f"{path}/artifacts"},
    }


def _body(event: str, ident: str, data: dict[str, Any], now: datetime) -> str:
    return json.dumps(
        {"id": ident, "type": event, "timestamp": now.isoformat(), "data": data},
        separators=(",", ":"),
        sort_keys=True,
    )


def add_deliveries(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert delivery rows (ignoring an event id already recorded: an event happens once)."""
    if rows:
        session.execute(insert_ignore(session, WebhookDelivery, ["event_id"]), list(rows))


def delivery_row(
    *,
    tenant_id: uuid.UUID,
    event: str,
    ident: str,
    url: str,
    data: dict[str, Any],
    now: datetime,
    job_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "tenant_id": tenant_id,
        "event_id": ident,
        "event_type": event,
        "job_id": job_id,
        "batch_id": batch_id,
        "url": url,
        "payload": _body(event, ident, data, now),
        "status": PENDING,
        "attempts": 0,
        "max_attempts": max_attempts,
        "log": [],
        "created_at": now,
        "next_attempt_at": now,
    }


def wants(webhook: dict[str, Any] | None, event: str) -> bool:
    return bool(webhook) and event in (webhook or {}).get("events", ())


# --- events of jobs and batches ----------------------------------------------------------------
def on_job_status(session: Session, job: Job) -> None:
    """Called after every status change of a job (`digin.service.repo.jobs.compare_and_set`): record
    the job's event for its own webhook and its batch's, and end the batch after its last item."""
    event = job.status if job.status in JOB_EVENTS else None
    batch = session.get(Batch, job.batch_id) if job.batch_id is not None else None
    if event is not None:
        now = utcnow()
        ident = event_id(job.id, event, job.attempts)
        rows = [
            delivery_row(
                tenant_id=job.tenant_id,
                event=event,
                ident=ident,
                url=hook["url"],
                data=job_payload(job),
                now=now,
                job_id=job.id,
                batch_id=job.batch_id,
            )  # fmt: skip
            for hook in (job.webhook, batch.webhook if batch else None)
            if hook is not None and wants(hook, event)
        ]
        if len(rows) == 2:  # job and batch hooks both want it: two targets, two event ids
            rows[1]["event_id"] = event_id(job.id, f"batch:{event}", job.attempts)
        add_deliveries(session, rows)
    if batch is not None and job.status in TERMINAL:
        finish_batch_if_done(session, batch_id=batch.id)


def batch_counts(
    session: Session, batch_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, int]]:
    """Items per status of each batch (every status listed, zeros included)."""
    from digin.service.db.models import STATUSES

    counts = {b: dict.fromkeys(STATUSES, 0) for b in batch_ids}
    if batch_ids:
        rows = session.execute(
            select(Job.batch_id, Job.status, func.count())
            .where(Job.batch_id.in_(list(batch_ids)))
            .group_by(Job.batch_id, Job.status)
        )
        for batch_id, status, n in rows:
            counts[batch_id][status] = int(n)  # type: ignore[index]
    return counts


def finish_batch_if_done(session: Session, *, batch_id: uuid.UUID) -> bool:
    """Set the batch's `finished_at` once none of its items is unfinished, and record its
    `batch.completed` event; True if this call finished it. The batch row is locked first, so
    of two transactions ending the last two items, the second sees the first's commit."""
    batch = session.scalars(
        select(Batch)
        .where(Batch.id == batch_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if batch is None or batch.finished_at is not None:
        return False
    unfinished = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.batch_id == batch_id, Job.status.not_in(TERMINAL))
    )
    if unfinished:
        return False
    now = utcnow()
    batch.finished_at = now
    session.flush()
    if wants(batch.webhook, "batch.completed"):
        assert batch.webhook is not None
        counts = batch_counts(session, [batch.id])[batch.id]
        data = {
            "id": str(batch.id),
            "object": "batch",
            "kind": batch.kind,
            "status": batch_status(batch, counts),
            "total": batch.total,
            "counts": counts,
            "metadata": batch.meta,
            "created_at": _iso(batch.created_at),
            "finished_at": _iso(now),
            "urls": {
                "self": f"/v1/batches/{batch.id}",
                "results": f"/v1/batches/{batch.id}/results",
            },
        }
        ident = event_id(batch.id, "batch.completed")
        add_deliveries(
            session,
            [delivery_row(tenant_id=batch.tenant_id, event="batch.completed", ident=ident,
                          url=batch.webhook["url"], data=data, now=now, batch_id=batch.id)],
        )  # fmt: skip
    return True


def batch_status(batch: Batch, counts: dict[str, int]) -> str:
    """running while any item is unfinished; then canceled (the user canceled it), succeeded
    (every item succeeded) or completed (some failed or were canceled)."""
    finished = sum(counts.get(s, 0) for s in TERMINAL)
    if finished < batch.total:
        return "running"
    if batch.canceled_at is not None:
        return "canceled"
    return "succeeded" if counts.get(SUCCEEDED, 0) == batch.total else "completed"


# --- the delivery log and the sender's side ----------------------------------------------------
def list_deliveries(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
    limit: int = 100,
) -> list[WebhookDelivery]:
    """A job's or a batch's deliveries, oldest first."""
    stmt = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant_id)
    if job_id is not None:
        stmt = stmt.where(WebhookDelivery.job_id == job_id)
    if batch_id is not None:
        stmt = stmt.where(WebhookDelivery.batch_id == batch_id)
    stmt = stmt.order_by(WebhookDelivery.created_at, WebhookDelivery.event_id).limit(limit)
    return list(session.scalars(stmt))


def lease_due(
    session: Session, *, now: datetime, limit: int, lease_seconds: float
) -> list[tuple[WebhookDelivery, str]]:
    """Take up to `limit` due pending deliveries with their tenant's secret, pushing their
    `next_attempt_at` `lease_seconds` ahead so that a second sender skips them meanwhile."""
    stmt = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(session.scalars(stmt))
    if not ids:
        return []
    leased = session.scalars(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id.in_(ids),
            WebhookDelivery.status == PENDING,
            WebhookDelivery.next_attempt_at <= now,
        )
        .values(next_attempt_at=now + timedelta(seconds=lease_seconds))
        .returning(WebhookDelivery),
        execution_options={"populate_existing": True},
    ).all()
    out = []
    for delivery in leased:
        secret = webhook_secret(session, tenant_id=delivery.tenant_id)
        out.append((delivery, secret))
    return out


def record_attempt(
    session: Session,
    *,
    delivery_id: uuid.UUID,
    now: datetime,
    status_code: int | None,
    error: str | None,
    retry_in: float | None,
    duration_ms: float,
) -> str:
    """Write one attempt's outcome: 2xx → delivered; else pending again in `retry_in` seconds,
    or failed when the attempts are used up (or `retry_in` is None: not retryable). Returns
    the new status."""
    delivery = session.get_one(WebhookDelivery, delivery_id, populate_existing=True)
    attempts = delivery.attempts + 1
    ok = status_code is not None and 200 <= status_code < 300
    entry = {"attempt": attempts, "at": now.isoformat(), "status_code": status_code,
             "error": error, "duration_ms": round(duration_ms, 1)}  # fmt: skip
    values: dict[str, Any] = {
        "attempts": attempts,
        "last_status_code": status_code,
        "last_error": None if error is None else error[:1000],
        "log": [*(delivery.log or []), entry][-LOG_ENTRIES:],
    }
    if ok:
        values |= {"status": DELIVERED, "delivered_at": now, "next_attempt_at": None}
    elif retry_in is None or attempts >= delivery.max_attempts:
        values |= {"status": FAILED, "next_attempt_at": None}
    else:
        values |= {"status": PENDING, "next_attempt_at": now + timedelta(seconds=retry_in)}
    session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values)
    )
    return str(values["status"])
