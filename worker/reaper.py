"""The reaper (DESIGN §5.3): recover jobs whose worker died or whose message was lost.

`reap_once` runs `api.repo.reap` with the settings' thresholds, commits, then sends a message for
every queued job that needs one (re-queued jobs at once: their old message is gone with their
worker) and marks it enqueued. Several reapers may run: every change is a compare-and-set, and a
message sent twice runs once (the claim). It runs as the Celery beat task `digin.reap`, as the
`digin reaper` command, and as a thread of `digin serve`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api import repo
from api.db import QUEUED, Job, session_scope, utcnow
from worker import metrics
from worker.runner import Enqueue

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger("digin.reaper")

UNSENT_GRACE_S = 60.0  # a job's row is committed before its message is sent: wait this long


def reaper_interval(settings: Settings) -> float:
    """Seconds between rounds: a quarter of the heartbeat threshold, 1 s to 30 s."""
    return max(1.0, min(30.0, settings.heartbeat_stale_seconds / 4))


def reap_once(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    enqueue: Enqueue,
    now: datetime | None = None,
    unsent_grace_seconds: float = UNSENT_GRACE_S,
) -> repo.ReapReport:
    """One round of the reaper; returns what it changed and sent."""
    now = now or utcnow()
    with session_scope(sessions) as session:
        report = repo.reap(
            session,
            now=now,
            heartbeat_stale_seconds=settings.heartbeat_stale_seconds,
            queued_stale_seconds=settings.queued_stale_seconds,
            unsent_grace_seconds=unsent_grace_seconds,
        )
        listed = {d.job_id for d in report.to_enqueue}
        missing = [job_id for job_id in report.requeued if job_id not in listed]
        if missing:  # re-queued within the grace period of their creation: send them now too
            rows = session.execute(
                select(Job.id, Job.queue, Job.priority).where(
                    Job.id.in_(missing), Job.status == QUEUED
                )
            )
            report.to_enqueue += [repo.Dispatch(i, q, p) for i, q, p in rows]
    # committed: a worker that gets the message finds the job queued
    sent: list[uuid.UUID] = []
    for dispatch in report.to_enqueue:
        try:
            enqueue(job_id=dispatch.job_id, queue=dispatch.queue, priority=dispatch.priority)
        except Exception:
            log.exception(
                "enqueue failed; retried next round",
                extra={"job_id": str(dispatch.job_id), "event": "enqueue_error"},
            )
            continue
        with session_scope(sessions) as session:
            repo.mark_enqueued(session, job_id=dispatch.job_id)
        sent.append(dispatch.job_id)
    changes = {
        "requeued": report.requeued,
        "failed": report.failed,
        "canceled": report.canceled,
        "enqueued": sent,
    }
    for event, ids in changes.items():
        for job_id in ids:
            log.info(f"reaper: {event}", extra={"job_id": str(job_id), "event": f"reap_{event}"})
    if any(changes.values()):
        counts = {event: len(ids) for event, ids in changes.items()}
        log.info(f"reaper round: {counts}", extra={"event": "reap", **counts})
    metrics.record_reap(changes)
    return report


def run_reaper(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    enqueue: Enqueue,
    stop: threading.Event,
    interval: float | None = None,
    on_round: Callable[[repo.ReapReport], None] | None = None,
) -> None:
    """Reap every `interval` seconds until `stop` is set; a failed round is logged and retried."""
    interval = reaper_interval(settings) if interval is None else interval
    log.info(f"reaper started (every {interval:g} s)", extra={"event": "reaper_started"})
    while not stop.is_set():
        try:
            report = reap_once(sessions=sessions, settings=settings, enqueue=enqueue)
            if on_round is not None:
                on_round(report)
        except Exception:
            log.exception("reaper round failed", extra={"event": "reap_error"})
            metrics.record_reap({}, ok=False)
        stop.wait(interval)
    log.info("reaper stopped", extra={"event": "reaper_stopped"})
