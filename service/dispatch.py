"""The Celery app shared by the API (sends) and the workers (consume): docs/architecture.md §9.3.

Torch-free: the API imports this module to enqueue; `worker/` registers the tasks on the same app
under the names below. Celery's own task state is never shown to users and no result backend is
used: the job row is the truth (`digin.service.repo`). Settings that keep long GPU tasks from being
lost or run twice:

- `task_acks_late` + `worker_prefetch_multiplier=1`: a task is acknowledged after it ran, and a
  worker process reserves one task at a time;
- `task_reject_on_worker_lost`: a task whose process died (SIGKILL, OOM killer) goes back to the
  queue; the attempt cap on the job row stops message loops;
- a hard `task_time_limit` below the broker's visibility timeout (Redis redelivers an
  unacknowledged task to a second worker when it passes), checked by `digin.service.settings`;
- `worker_cancel_long_running_tasks_on_connection_loss`: a late-ack task is not run twice after
  a broker connection loss;
- two queues, `interactive` (jobs) and `sweep` (batches), so a sweep cannot starve a user.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu.entity import Exchange, Queue

if TYPE_CHECKING:
    from digin.service.settings import Settings

TASK_RUN_JOB = "digin.run_job"  # args: (job_id: str,)
TASK_REAP = "digin.reap"  # periodic: re-queue stale running jobs, re-send never-dispatched ones
TASK_SEND_WEBHOOKS = "digin.send_webhooks"  # periodic: post due webhook deliveries
QUEUES = ("interactive", "sweep")
SOFT_LIMIT_MARGIN_S = 60  # SoftTimeLimitExceeded this long before the hard kill


def make_celery(settings: Settings, *, name: str = "digin") -> Celery:
    """A Celery app for the broker of `settings`, with the reliability settings above."""
    app = Celery(name, broker=settings.broker_url, set_as_current=False)
    hard = settings.task_time_limit_seconds
    app.conf.update(
        broker_transport_options=settings.broker_transport_options(),
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_time_limit=hard,
        task_soft_time_limit=max(1, hard - SOFT_LIMIT_MARGIN_S),
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_serializer="json",
        accept_content=["json"],
        # each queue its own exchange and routing key: bare Queue(q) makes Celery route every
        # queue through the default one, so a sweep message lands in `interactive` too
        task_queues=[Queue(q, Exchange(q), routing_key=q) for q in QUEUES],  # type: ignore[no-untyped-call]
        task_default_queue="interactive",
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
    )
    return app


def enqueue(
    app: Celery,
    *,
    job_id: str,
    queue: str,
    priority: int = 0,
    countdown: float = 0.0,
    producer: Any = None,
) -> None:
    """Send one job to `queue` (after `countdown` seconds if > 0). Call only after the job row
    is committed (a worker that runs the task first must find the row); then mark the row
    enqueued."""
    if queue not in QUEUES:
        raise ValueError(f"queue must be one of {QUEUES}, got {queue!r}")
    options: dict[str, Any] = {"queue": queue, "routing_key": queue, "priority": priority}
    if countdown > 0:
        options["countdown"] = countdown
    if producer is not None:  # one broker connection for many messages
        options["producer"] = producer
    app.send_task(TASK_RUN_JOB, args=[str(job_id)], **options)


class PartialEnqueue(Exception):
    """Bulk sending stopped part-way: the first `sent` messages reached the broker."""

    def __init__(self, sent: int, cause: BaseException) -> None:
        super().__init__(f"{sent} messages sent, then {type(cause).__name__}: {cause}")
        self.sent = sent


def enqueue_many(
    app: Celery,
    job_ids: Sequence[str],
    *,
    queue: str,
    priority: int = 0,
    chunk: int = 1000,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Send one `digin.run_job` message per job (committed rows only), in order, through one
    producer: the Celery message of each is built by `app.amqp` as `send_task` would, and
    published straight into `queue` (the anonymous exchange), `chunk` messages per Redis
    pipeline (kombu's publish batch; other transports send one by one). Returns the number
    sent; raises PartialEnqueue naming how many went out before an error. `on_chunk(sent)` is
    called after every chunk (mark those rows enqueued)."""
    if queue not in QUEUES:
        raise ValueError(f"queue must be one of {QUEUES}, got {queue!r}")
    from kombu.utils.uuid import uuid as task_uuid

    amqp, sent = app.amqp, 0
    origin = "digin-api"
    try:
        with app.producer_or_acquire() as producer:
            for start in range(0, len(job_ids), chunk):
                part = job_ids[start : start + chunk]
                with producer.batch(max_size=len(part) + 1):
                    for job_id in part:
                        task_id = task_uuid()
                        message = amqp.as_task_v2(
                            task_id, TASK_RUN_JOB, args=[str(job_id)], kwargs={},
                            argsrepr=f"['{job_id}']", kwargsrepr="{}", origin=origin,
                            ignore_result=True,
                        )  # fmt: skip
                        producer.publish(
                            message.body, exchange="", routing_key=queue, priority=priority,
                            headers=message.headers, serializer="json", retry=False,
                            declare=None, **message.properties,
                        )  # fmt: skip
                sent += len(part)
                if on_chunk is not None:
                    on_chunk(sent)
    except Exception as exc:
        raise PartialEnqueue(sent, exc) from exc
    return sent


# kombu's Redis transport keeps a queue's priority levels in lists `queue`, `queue\x06\x163`, …
REDIS_PRIORITY_SEPARATOR = "\x06\x16"
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
REDIS_UNACKED_KEY = "unacked"
BROKER_TIMEOUT_S = 1.0


def redis_queue_keys(queue: str) -> list[str]:
    return [
        queue if p == 0 else f"{queue}{REDIS_PRIORITY_SEPARATOR}{p}" for p in REDIS_PRIORITY_STEPS
    ]


class BrokerReader:
    """Messages waiting per queue and unacknowledged messages, read from the broker on each
    `read()`: one pipelined round trip to Redis, or a listing of the filesystem broker's folder."""

    def __init__(self, broker_url: str, folder: str | None = None) -> None:
        self.broker_url, self.folder = broker_url, folder
        self._redis: Any = None

    def read(self) -> tuple[dict[str, int], int | None]:
        if self.broker_url.startswith("redis"):
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(
                    self.broker_url,
                    socket_timeout=BROKER_TIMEOUT_S,
                    socket_connect_timeout=BROKER_TIMEOUT_S,
                )
            pipe = self._redis.pipeline(transaction=False)
            for queue in QUEUES:
                for key in redis_queue_keys(queue):
                    pipe.llen(key)
            pipe.hlen(REDIS_UNACKED_KEY)
            *lengths, unacked = pipe.execute()
            steps = len(REDIS_PRIORITY_STEPS)
            depths = {q: sum(lengths[i * steps : (i + 1) * steps]) for i, q in enumerate(QUEUES)}
            return depths, int(unacked)
        if self.folder is not None:  # filesystem://: one file per waiting message
            names = os.listdir(self.folder)
            return {q: sum(n.endswith(f".{q}.msg") for n in names) for q in QUEUES}, None
        return {}, None
