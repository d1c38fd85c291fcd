"""The workers' Celery app: `celery -A digin.worker.app:app worker` (or `digin worker`).

The shared app of `digin.service.dispatch` (same broker, queues and reliability settings as the API
that sends) with the tasks of `digin.worker.tasks` registered, logs as JSON lines, and a beat
schedule for the reaper (`digin worker --beat`, or `celery -A digin.worker.app:app beat`). Importing
this module reads the settings and nothing else: no database, no models, no CUDA.
"""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging

from digin.service.dispatch import TASK_REAP, TASK_SEND_WEBHOOKS, make_celery
from digin.service.settings import get_settings
from digin.worker import signals
from digin.worker.logs import configure_logging
from digin.worker.reaper import reaper_interval
from digin.worker.tasks import register_tasks

settings = get_settings()
app = make_celery(settings)
tasks = register_tasks(app)
signals.connect(app)  # per-job log context and metrics (DIGIN_WORKER_METRICS_PORT)

interval = reaper_interval(settings)
app.conf.beat_schedule = {
    "digin-reap": {
        "task": TASK_REAP,
        "schedule": interval,
        # queued behind a running job on a busy worker: drop rounds that waited too long
        "options": {"expires": interval},
    },
    "digin-send-webhooks": {  # (`digin reaper` and `digin serve` send them too)
        "task": TASK_SEND_WEBHOOKS,
        "schedule": settings.webhook_interval_seconds,
        "options": {"expires": settings.webhook_interval_seconds},
    },
}


@setup_logging.connect  # type: ignore[untyped-decorator]
def _json_logs(loglevel: Any = None, **_: Any) -> None:
    """Celery's own logging setup, replaced by JSON lines (`digin.worker.logs`)."""
    configure_logging(loglevel or "INFO")
