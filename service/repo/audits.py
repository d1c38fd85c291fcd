"""Audits (docs/architecture.md §9.14): a classifier audited across its classes as a graph of
ordinary jobs on the batch machinery.

An audit is a batch (same id) with an `audits` row beside it. Its items, in item order:
one `audit_class` job per class (items 0 to `classes` - 1, written with the audit), then the
follow-ups each class's result asks for (`add_items`, written by the worker in the transaction
that finishes that class, so the batch is never seen finished between a class and its
follow-ups), and last one `audit_report` job (`add_report`, written once no other item is
unfinished). Cancel, retries, the reaper and the results index are the batch's. Like every
repository function these flush and never commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from digin.service.db.models import ACTIVE, SUCCEEDED, TERMINAL, Audit, Batch, Job, utcnow
from digin.service.repo.batches import (
    QUEUE,
    BatchIdempotencyConflict,
    BatchPlan,
    cancel_batch,
    create_batch,
    get_batch,
)
from digin.service.repo.jobs import keyset_page
from digin.service.repo.submit import insert_jobs, job_row

REPORT_KIND = "audit_report"  # the last item: builds the report from the others' results
CLASS_KIND = "audit_class"


class AuditIdempotencyConflict(BatchIdempotencyConflict):
    """The Idempotency-Key was used for another request (an audit or a batch)."""


def create_audit(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    plan: BatchPlan,
    params: dict[str, Any],
    seed: int,
    priority: int,
    max_attempts: int,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    max_queued_items: int | None = None,
) -> tuple[Audit, bool]:
    """Write the audit's batch with one queued `audit_class` job per planned class (the batch
    path: tenant lock, idempotency key, the cap on queued sweep items, bulk insert) and the
    audit row; returns (audit, created). A key seen before returns that audit (created False)
    or raises AuditIdempotencyConflict (also when the key names a batch that is no audit)."""
    try:
        batch, created = create_batch(
            session, tenant_id=tenant_id, plan=plan, params_template=params, priority=priority,
            max_attempts=max_attempts, metadata=metadata, idempotency_key=idempotency_key,
            request_hash=request_hash, max_queued_items=max_queued_items,
        )  # fmt: skip
    except BatchIdempotencyConflict as exc:
        raise AuditIdempotencyConflict(exc.key, exc.job_id) from None
    if not created:
        audit = session.get(Audit, batch.id)
        if audit is None:
            assert idempotency_key is not None
            raise AuditIdempotencyConflict(idempotency_key, batch.id)
        return audit, False
    audit = Audit(
        id=batch.id, tenant_id=tenant_id, params=params, classes=len(plan.items), seed=seed,
        created_at=batch.created_at,
    )  # fmt: skip
    session.add(audit)
    session.flush()
    return audit, True


def get_audit(session: Session, *, tenant_id: uuid.UUID, audit_id: uuid.UUID) -> Audit | None:
    """The tenant's audit, or None (another tenant's audit too: a 404)."""
    return session.scalars(
        select(Audit).where(Audit.id == audit_id, Audit.tenant_id == tenant_id)
    ).one_or_none()


def list_audits(
    session: Session, *, tenant_id: uuid.UUID, limit: int, cursor: str | None = None
) -> tuple[list[Audit], str | None]:
    """The tenant's audits, newest first, with a keyset cursor (over their batches, which
    share their ids and creation times)."""
    stmt = select(Batch).join(Audit, Audit.id == Batch.id).where(Batch.tenant_id == tenant_id)
    batches, next_cursor = keyset_page(session, stmt, Batch, limit=limit, cursor=cursor)
    audits = {
        a.id: a for a in session.scalars(select(Audit).where(Audit.id.in_([b.id for b in batches])))
    }
    return [audits[b.id] for b in batches], next_cursor


# --- what GET shows while it runs -------------------------------------------------------------
@dataclass
class ClassJob:
    """What an audit's page reads of one class job: its state, and of a succeeded one the
    parts of its summary the table ranks (not the PCA block) and its artifact names."""

    id: uuid.UUID
    item_index: int
    custom_id: str | None
    kind: str
    params: dict[str, Any]
    status: str
    error: dict[str, Any] | None
    summary: dict[str, Any] | None
    artifacts: list[str]


TABLE_FIELDS = ("class_index", "class_name", "num_images", "num_other_images", "components")


@dataclass
class AuditState:
    """An audit's state read in a few queries: its batch, the class jobs in class order, the
    follow-ups' counts per status, and the report job."""

    batch: Batch
    class_jobs: list[ClassJob]
    follow_ups: dict[str, int]
    report: Job | None
    status: str  # running | succeeded | failed | canceled
    stage: str  # classes | follow_ups | report | canceling | done


def class_jobs(session: Session, audit: Audit) -> list[ClassJob]:
    """The audit's class jobs in class order, reading only the parts of each summary that the
    table needs (a class's PCA block is the bulk of its result and stays in the database)."""
    summary = Job.result["summary"]
    parts = [summary[name] for name in TABLE_FIELDS]
    rows = session.execute(
        select(Job.id, Job.item_index, Job.custom_id, Job.kind, Job.params, Job.status,
               Job.error, Job.result["artifacts"], *parts)
        .where(Job.batch_id == audit.id, Job.item_index < audit.classes)
        .order_by(Job.item_index)
    ).all()  # fmt: skip
    out = []
    for row in rows:
        ident, index, custom_id, kind, params, status, error, artifacts, *values = row
        done = status == SUCCEEDED and values[0] is not None
        out.append(
            ClassJob(
                ident, int(index), custom_id, kind, params, status, error,
                dict(zip(TABLE_FIELDS, values, strict=True)) if done else None,
                [str(a["name"]) for a in artifacts or [] if a.get("name")] if done else [],
            )
        )  # fmt: skip
    return out


def audit_state(session: Session, audit: Audit) -> AuditState:
    batch = session.get_one(Batch, audit.id)
    jobs = class_jobs(session, audit)
    counts = dict.fromkeys(("queued", "running", "canceling", "succeeded", "failed", "canceled"), 0)
    rows = session.execute(
        select(Job.status, func.count())
        .where(Job.batch_id == audit.id, Job.item_index >= audit.classes, Job.kind != REPORT_KIND)
        .group_by(Job.status)
    )
    counts.update({status: int(n) for status, n in rows})
    report = session.get(Job, audit.report_job_id) if audit.report_job_id else None
    status, stage = _status(batch, jobs, counts, report)
    return AuditState(batch, jobs, counts, report, status, stage)


def _status(
    batch: Batch, class_jobs: Sequence[ClassJob], follow_ups: dict[str, int], report: Job | None
) -> tuple[str, str]:
    """(status, stage): canceled once the user canceled it and nothing runs any more;
    succeeded or failed as its report job ended; else running, at its current stage."""
    active = any(j.status not in TERMINAL for j in class_jobs)
    active_follow_ups = sum(n for s, n in follow_ups.items() if s not in TERMINAL)
    if report is not None and report.status in TERMINAL:
        if report.status == "succeeded":
            return "succeeded", "done"
        return ("canceled" if batch.canceled_at else "failed"), "done"
    if batch.canceled_at is not None:
        running = active or active_follow_ups or report is not None
        return ("running", "canceling") if running else ("canceled", "done")
    if active:
        return "running", "classes"
    if active_follow_ups:
        return "running", "follow_ups"
    return "running", "report"


# --- the graph: follow-ups and the report ------------------------------------------------------
@dataclass
class NewItem:
    kind: str
    params: dict[str, Any]  # normalised
    seed: int
    custom_id: str
    group_key: str | None = None


def lock_batch(session: Session, batch_id: uuid.UUID) -> Batch | None:
    """The batch row, locked until the commit (writers of its items go one at a time)."""
    return session.scalars(
        select(Batch)
        .where(Batch.id == batch_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def held(session: Session, *, job_id: uuid.UUID, attempt: int) -> bool:
    """Lock the job row if this attempt still holds it (running or canceling, same attempt)."""
    found = session.scalar(
        select(Job.id)
        .where(Job.id == job_id, Job.status.in_(ACTIVE), Job.attempts == attempt)
        .with_for_update()
    )
    return found is not None


def add_items(
    session: Session, *, audit: Audit, items: Sequence[NewItem], max_attempts: int
) -> list[uuid.UUID]:
    """Append `items` to the audit's batch as queued jobs (item indices after the last, the
    batch's total raised with them); none if the audit was canceled. Returns the new job ids,
    to send after the commit."""
    batch = lock_batch(session, audit.id)
    if batch is None or batch.canceled_at is not None or not items:
        return []
    now = utcnow()
    rows = [
        job_row(
            {
                "kind": item.kind,
                "params": item.params,
                "seed": item.seed,
                "priority": batch.priority,
                "queue": QUEUE,
                "max_attempts": max_attempts,
                "batch_id": batch.id,
                "item_index": batch.total + i,
                "custom_id": item.custom_id,
                "group_key": item.group_key,
            },
            tenant_id=batch.tenant_id,
            now=now,
        )  # fmt: skip
        for i, item in enumerate(items)
    ]
    insert_jobs(session, rows)
    batch.total += len(rows)
    batch.finished_at = None  # it has unfinished items again
    session.flush()
    return [row["id"] for row in rows]


def add_report(session: Session, *, audit_id: uuid.UUID, max_attempts: int) -> uuid.UUID | None:
    """Write the audit's report job once no other item of its batch is unfinished (with the
    batch row locked, so of two transactions ending the last two items, the second sees the
    first's commit); its id, to send after the commit, or None: not yet, canceled, or written
    before."""
    batch = lock_batch(session, audit_id)
    audit = session.get(Audit, audit_id, populate_existing=True)
    if batch is None or audit is None or batch.canceled_at is not None:
        return None
    if audit.report_job_id is not None:
        return None
    unfinished = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.batch_id == audit_id, Job.status.not_in(TERMINAL))
    )
    if unfinished:
        return None
    report = NewItem(REPORT_KIND, {"audit": str(audit_id)}, audit.seed, "report")
    (job_id,) = add_items(session, audit=audit, items=[report], max_attempts=max_attempts)
    audit.report_job_id = job_id
    session.flush()
    return job_id


def audits_awaiting_report(session: Session, *, limit: int = 100) -> list[uuid.UUID]:
    """Audits whose items all ended without a report job yet and that were not canceled: what
    the reaper completes when the transaction that ended their last item did not (an item
    canceled through the API, a job the reaper failed, a worker gone before its hook)."""
    unfinished = exists().where(Job.batch_id == Audit.id, Job.status.not_in(TERMINAL))
    stmt = (
        select(Audit.id)
        .join(Batch, Batch.id == Audit.id)
        .where(Audit.report_job_id.is_(None), Batch.canceled_at.is_(None), ~unfinished)
        .order_by(Audit.created_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def cancel_audit(session: Session, *, tenant_id: uuid.UUID, audit_id: uuid.UUID) -> Audit | None:
    """Cancel the audit's batch (queued items canceled at once, running ones asked to stop,
    no follow-ups or report written after); None if the tenant has no such audit."""
    audit = get_audit(session, tenant_id=tenant_id, audit_id=audit_id)
    if audit is None:
        return None
    cancel_batch(session, tenant_id=tenant_id, batch_id=audit_id)
    return audit


def audit_batch(session: Session, audit: Audit) -> Batch:
    batch = get_batch(session, tenant_id=audit.tenant_id, batch_id=audit.id)
    assert batch is not None
    return batch
