"""Celery signal handlers of the workers: per-job log context and metrics (`digin.worker.metrics`).

- worker start (main process, before the pool forks): with `DIGIN_WORKER_METRICS_PORT` set,
  the multiprocess metrics folder and the `/metrics` server; removed at worker shutdown;
- a pool process starts: its memory limit (`digin.worker.memory`; CPU workers by default);
- before a `digin.run_job` task: read the job's kind, queue, batch and enqueue time (one small
  query; nothing if the database is away) and tag the process's log lines with the job and
  batch ids;
- after it: count the run by outcome, observe its duration and queue wait, read the GPU memory;
- a pool child that exits takes its live gauges with it.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery
from celery.signals import (
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from digin.service.db import Job, utcnow
from digin.service.dispatch import TASK_RUN_JOB
from digin.service.settings import get_settings
from digin.worker import metrics
from digin.worker.logs import clear_job_context, set_job_context
from digin.worker.memory import limit_this_process, pool_device

log = logging.getLogger("digin.worker")


@dataclass
class _Running:
    timer: metrics.Timer
    kind: str = "unknown"
    queue: str | None = None
    waited: float | None = None  # seconds from the latest enqueue to this delivery


_running: dict[str, _Running] = {}  # task id → what prerun saw
_metrics_folder: str | None = None
_worker: list[Any] = []  # the worker (WorkController) whose pool this process belongs to


def connect(app: Celery) -> None:
    """Connect the handlers for the workers of `app` (the shared `digin.worker.app`)."""
    from digin.worker.tasks import worker_context

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        global _metrics_folder
        _worker[:] = [sender]  # its concurrency is resolved by the time the pool forks
        port = get_settings().worker_metrics_port
        if port is not None and _metrics_folder is None:
            _metrics_folder = metrics.start_worker_metrics(port)

    def on_worker_shutdown(**_: Any) -> None:
        global _metrics_folder
        if _metrics_folder is not None:
            metrics.stop_worker_metrics(_metrics_folder)
            _metrics_folder = None

    def on_prerun(task_id: str, task: Any, args: Any = (), **_: Any) -> None:
        if getattr(task, "name", None) != TASK_RUN_JOB or not args:
            return
        running = _Running(metrics.Timer())
        _running[task_id] = running
        job_id, batch_id = str(args[0]), None
        try:
            with worker_context(app).sessions() as session:
                found = session.execute(
                    select(Job.kind, Job.queue, Job.batch_id, Job.enqueued_at).where(
                        Job.id == uuid.UUID(job_id)
                    )
                ).one_or_none()
        except (SQLAlchemyError, ValueError):
            found = None
        if found is not None:
            running.kind, running.queue, batch_id, enqueued_at = found
            if isinstance(enqueued_at, datetime):
                running.waited = (utcnow() - enqueued_at).total_seconds()
        set_job_context(job_id=job_id, batch_id=batch_id)

    def on_postrun(
        task_id: str, task: Any, retval: Any = None, state: str | None = None, **_: Any
    ) -> None:
        running = _running.pop(task_id, None)
        if running is None:
            return
        try:
            if state == "SUCCESS" and isinstance(retval, str):
                outcome = retval
            else:
                outcome = "claim_retry" if state == "RETRY" else "error"
            claimed = outcome not in ("skipped", "deferred", "claim_retry", "error")
            metrics.record_job(
                kind=running.kind,
                outcome=outcome,
                seconds=running.timer.seconds(),
                queue=running.queue if claimed else None,
                queue_wait_seconds=running.waited if claimed else None,
            )
            metrics.record_gpu_memory(metrics.gpu_memory_stats())
        finally:
            clear_job_context()

    def on_process_init(**_: Any) -> None:
        """A pool process starts: limit its memory (a CPU worker's by default)."""
        concurrency = getattr(_worker[0], "concurrency", None) if _worker else None
        processes = concurrency if isinstance(concurrency, int) else (os.cpu_count() or 1)
        settings = get_settings()
        limit_this_process(settings, device=pool_device(settings), processes=processes)

    def on_process_shutdown(pid: int | None = None, **_: Any) -> None:
        metrics.process_exited(pid or os.getpid())

    # weak=False: the handlers are closures, kept alive by the signals
    worker_init.connect(on_worker_init, weak=False)
    worker_shutdown.connect(on_worker_shutdown, weak=False)
    task_prerun.connect(on_prerun, weak=False)
    task_postrun.connect(on_postrun, weak=False)
    worker_process_init.connect(on_process_init, weak=False)
    worker_process_shutdown.connect(on_process_shutdown, weak=False)
