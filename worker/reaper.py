"""The reaper (docs/architecture.md §9.4): recover jobs whose worker died or whose message was lost.

`reap_once` runs `digin.service.repo.reap` with the settings' thresholds, commits, then sends a
message for every queued job that needs one (re-queued jobs at once: their old message is gone with
their worker) and marks it enqueued. Several reapers may run: every change is a compare-and-set, and
a message sent twice runs once (the claim). It runs as the Celery beat task `digin.reap`, as the
`digin reaper` command, and as a thread of `digin serve`.

Jobs that wait long in a deep queue (a big sweep) would otherwise get a duplicate message every
`queued_stale_seconds`: with `broker_depths` (the broker's message counts per queue), a queue
whose broker holds at least as many messages as it has queued jobs is taken to have lost none,
and its old jobs are re-stamped instead of re-sent (checked again a period later; once the queue
drains below its job count, what is still queued is re-sent). Never-sent jobs are always sent.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import ACTIVE, QUEUED, Job, session_scope, utcnow
from digin.service.dispatch import BrokerReader
from digin.service.repo.jobs import compare_and_set
from digin.worker import metrics
from digin.worker.audits import reap_audits
from digin.worker.execution import Enqueue, pid_namespace

if TYPE_CHECKING:
    from digin.service.settings import Settings

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
    broker_depths: Callable[[], dict[str, int]] | None = None,
) -> repo.ReapReport:
    """One round of the reaper; returns what it changed, sent and `verified` (see above)."""
    now = now or utcnow()
    _expire_dead_local_workers(sessions)
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
    if broker_depths is not None and any(d.sent_before for d in report.to_enqueue):
        _skip_messages_the_broker_holds(report, sessions, broker_depths, now)
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
        "verified": report.verified,
    }
    for event, ids in changes.items():
        for job_id in ids:
            log.info(f"reaper: {event}", extra={"job_id": str(job_id), "event": f"reap_{event}"})
    if any(changes.values()):
        counts = {event: len(ids) for event, ids in changes.items()}
        log.info(f"reaper round: {counts}", extra={"event": "reap", **counts})
    metrics.record_reap(changes)
    try:  # audits whose last item ended without writing their report job
        reap_audits(sessions=sessions, enqueue=enqueue, max_attempts=settings.max_attempts)
    except Exception:
        log.exception("reaper: audits round failed", extra={"event": "reap_error"})
    return report


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _expire_dead_local_workers(sessions: sessionmaker[Session]) -> list[uuid.UUID]:
    """Running jobs whose worker process ran on this host, in this PID namespace, and is gone
    (`digin serve` stopped mid-job, a worker killed on this machine) lose their heartbeat now,
    so this round recovers them instead of after `heartbeat_stale_seconds`. A reused pid only
    delays that."""
    here = {"host": socket.gethostname(), "pidns": pid_namespace()}
    if here["pidns"] is None:
        return []
    with session_scope(sessions) as session:
        rows = session.execute(
            select(Job.id, Job.status, Job.attempts, Job.worker).where(
                Job.status.in_(ACTIVE), Job.heartbeat_at.is_not(None)
            )
        ).all()
        dead = []
        for job_id, status, attempt, worker in rows:
            worker = worker or {}
            pid = worker.get("pid")
            local = all(worker.get(k) == v for k, v in here.items())
            if local and isinstance(pid, int) and not _pid_alive(pid):
                where = [Job.status == status, Job.attempts == attempt]
                if compare_and_set(
                    session, job_id=job_id, where=where, values={"heartbeat_at": None}
                ):
                    dead.append(job_id)
    for job_id in dead:
        log.info(
            "reaper: the job's worker process is gone",
            extra={"job_id": str(job_id), "event": "reap_dead_worker"},
        )
    return dead


def _skip_messages_the_broker_holds(
    report: repo.ReapReport,
    sessions: sessionmaker[Session],
    broker_depths: Callable[[], dict[str, int]],
    now: datetime,
) -> None:
    try:
        depths = broker_depths()
    except Exception as exc:  # unknown: re-send as before
        log.warning("reaper: cannot read the broker's queues (%s); re-sending old jobs", exc)
        return
    with session_scope(sessions) as session:
        queued = repo.queue_depths(session)
        full = {q for q, n in queued.items() if q in depths and depths[q] >= n}
        verified = [d.job_id for d in report.to_enqueue if d.sent_before and d.queue in full]
        if verified:
            repo.restamp_enqueued(session, job_ids=verified, now=now)
    report.verified = verified
    report.to_enqueue = [d for d in report.to_enqueue if not (d.sent_before and d.queue in full)]


def broker_depths_reader(settings: Settings) -> Callable[[], dict[str, int]] | None:
    """Messages waiting per queue in the settings' broker (Redis or the filesystem broker),
    or None where they cannot be counted."""
    url = settings.broker_url
    folder = settings.broker_transport_options().get("data_folder_in")
    if not (url.startswith("redis") or (url.startswith("filesystem") and folder)):
        return None
    reader = BrokerReader(url, str(folder) if folder else None)
    return lambda: reader.read()[0]


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
    depths = broker_depths_reader(settings)
    log.info(f"reaper started (every {interval:g} s)", extra={"event": "reaper_started"})
    while not stop.is_set():
        try:
            report = reap_once(
                sessions=sessions, settings=settings, enqueue=enqueue, broker_depths=depths
            )
            if on_round is not None:
                on_round(report)
        except Exception:
            log.exception("reaper round failed", extra={"event": "reap_error"})
            metrics.record_reap({}, ok=False)
        stop.wait(interval)
    log.info("reaper stopped", extra={"event": "reaper_stopped"})
