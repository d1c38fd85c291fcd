"""The Celery tasks (thin adapters): take an id, use the process's context, run
`digin.worker.runner.execute_job` or `digin.worker.reaper.reap_once`.

The context (database engine, storage client, model cache) is made lazily in the process that
runs the task, i.e. in the prefork child after the fork; a process that finds a context made
by another pid (its parent) makes its own. Nothing here touches CUDA or loads models at import.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import InterfaceError, OperationalError

from digin.service.db import make_engine, session_factory
from digin.service.dispatch import TASK_REAP, TASK_RUN_JOB, TASK_SEND_WEBHOOKS, enqueue
from digin.service.settings import Settings, get_settings
from digin.service.storage import storage_from_settings
from digin.worker.audits import advance
from digin.worker.reaper import broker_depths_reader, reap_once
from digin.worker.runner import Enqueue, Outcome, WorkerContext, backoff_seconds, execute_job

log = logging.getLogger("digin.worker")

CLAIM_RETRIES = 10  # database unreachable at claim time: retry the message this often

_context: WorkerContext | None = None
_context_pid: int | None = None


def celery_enqueuer(app: Celery) -> Enqueue:
    """Send run-job messages through `app` (after the row is committed), with a delay if any."""

    def send(*, job_id: uuid.UUID, queue: str, priority: int, countdown: float = 0.0) -> None:
        enqueue(app, job_id=str(job_id), queue=queue, priority=priority, countdown=countdown)

    return send


def make_context(app: Celery, settings: Settings | None = None) -> WorkerContext:
    settings = settings or get_settings()
    return WorkerContext(
        settings=settings,
        sessions=session_factory(make_engine(settings.database_url)),
        storage=storage_from_settings(settings),
        enqueue=celery_enqueuer(app),
        max_batch=settings.max_batch,
    )


def worker_context(app: Celery) -> WorkerContext:
    """This process's context, made on first use (after the fork)."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        _context, _context_pid = make_context(app), os.getpid()
    return _context


def use_context(ctx: WorkerContext | None) -> None:
    """Install a context for this process (tests; None: make one on next use)."""
    global _context, _context_pid
    _context, _context_pid = ctx, (os.getpid() if ctx is not None else None)


def register_tasks(app: Celery) -> dict[str, Task]:
    """Register `digin.run_job`, `digin.reap` and `digin.send_webhooks` on `app` (the shared
    `digin.service.dispatch` app)."""

    @app.task(name=TASK_RUN_JOB, bind=True, shared=False)  # type: ignore[untyped-decorator]
    def run_job(self: Task, job_id: str) -> Outcome:
        try:
            ctx = worker_context(app)
            outcome = execute_job(job_id, ctx=ctx)
            if outcome not in ("skipped", "deferred"):  # an audit's next jobs (its report)
                advance(job_id, sessions=ctx.sessions, enqueue=ctx.enqueue,
                        max_attempts=ctx.settings.max_attempts)  # fmt: skip
            return outcome
        except (OperationalError, InterfaceError) as exc:  # no row was changed: try again later
            retries = int(self.request.retries or 0)
            fields = {"job_id": str(job_id), "event": "claim_retry"}
            if retries >= CLAIM_RETRIES:
                log.error("database unreachable at claim: giving up (the reaper re-sends it)",
                          extra=fields)  # fmt: skip
                raise
            countdown = backoff_seconds(retries + 1)
            log.warning(
                f"database unreachable at claim: retry {retries + 1}/{CLAIM_RETRIES} "
                f"in {countdown:g} s",
                extra=fields,
            )
            raise self.retry(exc=exc, countdown=countdown, max_retries=CLAIM_RETRIES) from exc

    @app.task(name=TASK_REAP, shared=False)  # type: ignore[untyped-decorator]
    def reap() -> dict[str, Any]:
        ctx = worker_context(app)
        report = reap_once(
            sessions=ctx.sessions,
            settings=ctx.settings,
            enqueue=ctx.enqueue,
            broker_depths=broker_depths_reader(ctx.settings),
        )
        return {
            "requeued": [str(i) for i in report.requeued],
            "failed": [str(i) for i in report.failed],
            "canceled": [str(i) for i in report.canceled],
            "enqueued": [str(d.job_id) for d in report.to_enqueue],
            "verified": [str(i) for i in report.verified],
        }

    @app.task(name=TASK_SEND_WEBHOOKS, shared=False)  # type: ignore[untyped-decorator]
    def send_webhooks() -> dict[str, Any]:
        from digin.worker.webhooks import make_client, send_due

        ctx = worker_context(app)
        with make_client(ctx.settings) as client:
            report = send_due(sessions=ctx.sessions, settings=ctx.settings, client=client)
        return {"delivered": report.delivered, "retrying": report.retrying,
                "failed": report.failed}  # fmt: skip

    return {TASK_RUN_JOB: run_job, TASK_REAP: reap, TASK_SEND_WEBHOOKS: send_webhooks}
