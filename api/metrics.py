"""Prometheus metrics of the API (`GET /metrics`, docs/architecture.md §9.13).

Per app (its own registry, so several apps in one process do not collide):
- `digin_http_requests_total{method, route, status}` and
  `digin_http_request_duration_seconds{method, route}`, labelled by route *template*
  (`/v1/jobs/{job_id}`), never the raw path;
- `digin_jobs{status, kind}` and `digin_queue_depth{queue}`: read from the job table at scrape
  time (the row is the truth), one grouped count each;
- `digin_broker_queue_depth{queue}` (messages waiting in the broker, every priority level) and
  `digin_broker_unacked_messages` (delivered, not yet acknowledged: running or reserved), read
  from the broker at scrape time: Redis LLEN/HLEN, or the filesystem broker's message files;
- `digin_jobs_created_total{kind}`, `digin_enqueue_failures_total{queue}`,
  `digin_images_uploaded_total`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from digin.core.params import KINDS
from digin.service import repo
from digin.service.db import QUEUES, STATUSES
from digin.service.dispatch import BrokerReader

log = logging.getLogger(__name__)

UNMATCHED = "unmatched"  # requests no route matched (404s, refused bodies)
T = TypeVar("T")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def scrape(name: str, doc: str, read: Callable[[], T], what: str) -> tuple[Metric, T | None]:
    """`read()` for one scrape and the gauge `name` saying whether it worked (1 or 0); a failed
    read is logged and gives None."""
    up = GaugeMetricFamily(name, doc)
    try:
        value: T | None = read()
    except Exception as exc:
        log.warning("metrics: cannot read %s: %s", what, exc)
        value = None
    up.add_metric([], 0 if value is None else 1)
    return up, value


class JobCollector(Collector):
    """Job counts by status and kind, and queue depths, from the database per scrape."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self) -> Iterable[Metric]:
        return []  # nothing is read at registration

    def read(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        with self.sessions() as session:
            return repo.job_counts(session), repo.queue_depths(session)

    def collect(self) -> Iterator[Metric]:
        up, read = scrape(
            "digin_jobs_scrape_ok",
            "1 if the job counts below could be read from the database",
            self.read,
            "job counts",
        )
        yield up
        if read is None:
            return
        counts, depths = read
        jobs = GaugeMetricFamily("digin_jobs", "Jobs by status and kind", labels=["status", "kind"])
        kinds = sorted(set(KINDS) | {kind for _, kind in counts})
        for status in STATUSES:
            for kind in kinds:
                jobs.add_metric([status, kind], counts.get((status, kind), 0))
        yield jobs
        depth = GaugeMetricFamily(
            "digin_queue_depth", "Queued jobs per queue (from the job table)", labels=["queue"]
        )
        for queue in sorted(set(QUEUES) | set(depths)):
            depth.add_metric([queue], depths.get(queue, 0))
        yield depth


class BrokerCollector(BrokerReader, Collector):
    """The broker's queue depths and unacknowledged messages, read per scrape."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        up, read = scrape(
            "digin_broker_scrape_ok", "1 if the broker could be read", self.read, "the broker"
        )
        yield up
        if read is None:
            return
        depths, unacked = read
        depth = GaugeMetricFamily(
            "digin_broker_queue_depth", "Messages waiting in the broker per queue", labels=["queue"]
        )
        for queue, n in sorted(depths.items()):
            depth.add_metric([queue], n)
        yield depth
        if unacked is not None:
            yield GaugeMetricFamily(
                "digin_broker_unacked_messages",
                "Messages delivered to workers and not yet acknowledged (all queues)",
                value=unacked,
            )


class Metrics:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "digin_http_requests", "HTTP requests by route template and status",
            ["method", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "digin_http_request_duration_seconds", "HTTP request latency by route template",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.jobs_created = Counter(
            "digin_jobs_created", "Jobs created by this API process", ["kind"],
            registry=self.registry,
        )  # fmt: skip
        self.enqueue_failures = Counter(
            "digin_enqueue_failures", "Job messages the broker refused (the reaper re-sends them)",
            ["queue"], registry=self.registry,
        )  # fmt: skip
        self.images_uploaded = Counter(
            "digin_images_uploaded", "Start images accepted", registry=self.registry
        )
        self.registry.register(JobCollector(sessions))
        self._broker: BrokerCollector | None = None
        self._lock = threading.Lock()

    def watch_broker(self, broker_url: str, transport_options: dict[str, Any]) -> None:
        """Also report the broker's queues (once; later calls do nothing)."""
        with self._lock:
            if self._broker is not None:
                return
            folder = transport_options.get("data_folder_in")
            self._broker = BrokerCollector(broker_url, str(folder) if folder else None)
            self.registry.register(self._broker)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (pure ASGI)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = scope["method"]
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
            self.metrics.requests.labels(method, template, str(status)).inc()
