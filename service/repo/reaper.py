"""The reaper (docs/architecture.md §9.4) and the job counts behind the Prometheus metrics."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from digin.service.db.models import ACTIVE, CANCELED, CANCELING, FAILED, QUEUED, QUEUES, Job
from digin.service.events import EVENTS_RETENTION_S, prune_events
from digin.service.repo.jobs import compare_and_set, job_error


@dataclass
class Dispatch:
    """A queued job whose message must be (re)sent: enqueue it, then `mark_enqueued`."""

    job_id: uuid.UUID
    queue: str
    priority: int
    sent_before: bool = False  # its message went out more than queued_stale_seconds ago


@dataclass
class ReapReport:
    requeued: list[uuid.UUID] = field(default_factory=list)  # stale attempt, retries left
    failed: list[uuid.UUID] = field(default_factory=list)  # stale on the last attempt
    canceled: list[uuid.UUID] = field(default_factory=list)  # stale while canceling
    to_enqueue: list[Dispatch] = field(default_factory=list)  # queued, message missing or old
    verified: list[uuid.UUID] = field(default_factory=list)  # old, but the broker holds enough


def reap(
    session: Session,
    *,
    now: datetime,
    heartbeat_stale_seconds: float,
    queued_stale_seconds: float,
    unsent_grace_seconds: float = 60,
    limit: int = 1000,
) -> ReapReport:
    """Recover jobs whose worker died or whose message was lost (docs/architecture.md §9.4).

    Running/canceling jobs with no heartbeat for `heartbeat_stale_seconds`: canceling ones
    become canceled; running ones go back to queued while attempts < max_attempts, else fail
    with `worker_lost`. Queued jobs never enqueued (for `unsent_grace_seconds`, covering the
    gap between commit and enqueue) or enqueued more than `queued_stale_seconds` ago are
    listed in `to_enqueue` (re-queued ones included)."""
    report = ReapReport()
    stale = now - timedelta(seconds=heartbeat_stale_seconds)
    is_stale = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale)
    rows = session.execute(
        select(Job.id, Job.status, Job.attempts, Job.max_attempts)
        .where(Job.status.in_(ACTIVE), is_stale)
        .limit(limit)
    ).all()
    for job_id, status, attempt, max_attempts in rows:
        where = [Job.status == status, Job.attempts == attempt, is_stale]
        if status == CANCELING:
            done = compare_and_set(
                session, job_id=job_id, where=where, values={"status": CANCELED, "finished_at": now}
            )
            if done is not None:
                report.canceled.append(job_id)
        elif attempt < max_attempts:
            done = compare_and_set(
                session,
                job_id=job_id,
                where=where,
                values={
                    "status": QUEUED,
                    "enqueued_at": None,
                    "heartbeat_at": None,
                    "worker": None,
                },
            )
            if done is not None:
                report.requeued.append(job_id)
        else:
            error = job_error(
                "worker_lost",
                f"the worker stopped sending heartbeats (none for "
                f"{heartbeat_stale_seconds:g} s) on attempt {attempt} of "
                f"{max_attempts}; not retried further",
            )
            done = compare_and_set(
                session,
                job_id=job_id,
                where=where,
                values={"status": FAILED, "error": error, "finished_at": now},
            )
            if done is not None:
                report.failed.append(job_id)
    unsent = and_(
        Job.enqueued_at.is_(None), Job.created_at < now - timedelta(seconds=unsent_grace_seconds)
    )
    old = Job.enqueued_at < now - timedelta(seconds=queued_stale_seconds)
    unclaimed = session.execute(
        select(Job.id, Job.queue, Job.priority, Job.enqueued_at)
        .where(Job.status == QUEUED, or_(unsent, old))
        .order_by(Job.created_at)
        .limit(limit)
    ).all()
    report.to_enqueue = [Dispatch(i, q, p, sent is not None) for i, q, p, sent in unclaimed]
    prune_events(session, older_than_s=EVENTS_RETENTION_S)  # the live streams' old events
    return report


def restamp_enqueued(session: Session, *, job_ids: list[uuid.UUID], now: datetime) -> None:
    """Queued jobs whose messages are taken to be in the broker still: checked again only
    after another queued_stale_seconds."""
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == QUEUED)
        .values(enqueued_at=now)
        .execution_options(synchronize_session=False)
    )


# --- metrics -----------------------------------------------------------------------------------
def job_counts(session: Session) -> dict[tuple[str, str], int]:
    """Number of jobs per (status, kind), all tenants (Prometheus gauges)."""
    rows = session.execute(
        select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)
    )
    return {(status, kind): int(n) for status, kind, n in rows}


def queue_depths(session: Session) -> dict[str, int]:
    """Queued jobs per queue, every queue listed."""
    rows = session.execute(
        select(Job.queue, func.count()).where(Job.status == QUEUED).group_by(Job.queue)
    )
    return {queue: 0 for queue in QUEUES} | {queue: int(n) for queue, n in rows}
