"""Prometheus metrics of the workers and the reaper, served on `DIGIN_WORKER_METRICS_PORT`.

The API's `/metrics` shows what the database and the broker hold (jobs by status and kind,
queue depths); these are what only the processes that run jobs see:

- `digin_worker_jobs_total{kind, outcome}`: task runs by what they ended in (`succeeded`,
  `failed`, `requeued`, `canceled`, `lost`, `skipped`, `deferred`, `error`);
- `digin_job_duration_seconds{kind, outcome}`: the run of one attempt (claim → end);
- `digin_job_queue_wait_seconds{kind, queue}`: from the (latest) enqueue of a job to its claim;
- `digin_worker_gpu_memory_bytes{device, stat, pid}`: `allocated`, `reserved`, `peak` (during
  the last job) and `total`, of each live worker process that used CUDA;
- `digin_reaper_actions_total{action}` (`requeued`, `failed`, `canceled`, `enqueued`) and
  `digin_reaper_rounds_total{result}`.

A Celery worker is a main process and `-c N` forked children that run the jobs. With a port set,
`digin worker` switches prometheus_client to its multiprocess mode before the children fork: each
child writes its samples to files in a folder of its worker, and the main process serves their
sum (gauges per live pid). `digin reaper` is one process and serves its own registry. Without a
port, nothing is recorded or served. Nothing here imports torch: GPU memory is read only in a
process that already has.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

log = logging.getLogger("digin.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600)
REAPER_ACTIONS = ("requeued", "failed", "canceled", "enqueued", "verified")

_enabled = False
_registry = CollectorRegistry()  # the samples of this process (served as is when single-process)


class JobMetrics(NamedTuple):
    jobs: Counter
    duration: Histogram
    queue_wait: Histogram
    gpu_memory: Gauge
    reaper_actions: Counter
    reaper_rounds: Counter


@cache
def _metrics() -> JobMetrics:
    """The metric objects, made on first use in the process that records (a forked child makes
    them after the multiprocess mode was chosen)."""
    return JobMetrics(
        jobs=Counter(
            "digin_worker_jobs", "Job task runs by outcome", ["kind", "outcome"],
            registry=_registry,
        ),
        duration=Histogram(
            "digin_job_duration_seconds", "Run time of one job attempt, claim to end",
            ["kind", "outcome"], buckets=DURATION_BUCKETS, registry=_registry,
        ),
        queue_wait=Histogram(
            "digin_job_queue_wait_seconds", "Time from a job's latest enqueue to its claim",
            ["kind", "queue"], buckets=WAIT_BUCKETS, registry=_registry,
        ),
        gpu_memory=Gauge(
            "digin_worker_gpu_memory_bytes",
            "CUDA memory of a worker process: allocated, reserved, peak (last job), total",
            ["device", "stat"], registry=_registry, multiprocess_mode="liveall",
        ),
        reaper_actions=Counter(
            "digin_reaper_actions", "Jobs the reaper changed or re-sent", ["action"],
            registry=_registry,
        ),
        reaper_rounds=Counter(
            "digin_reaper_rounds", "Reaper rounds by result", ["result"], registry=_registry
        ),
    )  # fmt: skip


def enabled() -> bool:
    return _enabled


def enable(*, multiprocess_dir: str | None = None) -> None:
    """Record from now on. With `multiprocess_dir`, in prometheus_client's multiprocess mode
    (call it in the parent before it forks, and before any metric of this module is made)."""
    global _enabled
    if multiprocess_dir is not None:
        os.environ[MULTIPROC_ENV] = multiprocess_dir
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # re-chosen
        _metrics.cache_clear()
    _enabled = True


def disable() -> None:
    """Stop recording (tests)."""
    global _enabled
    _enabled = False


def serving_registry() -> CollectorRegistry:
    """What the metrics server shows: the sum over the multiprocess folder, or this process."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return _registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    return registry


def serve(port: int, *, host: str = "0.0.0.0") -> Any:
    """Serve `/metrics` on `port` from a daemon thread; returns the server."""
    server, _thread = start_http_server(port, addr=host, registry=serving_registry())
    log.info(f"metrics on http://{host}:{port}/metrics", extra={"event": "metrics_serving"})
    return server


def start_worker_metrics(port: int) -> str:
    """`digin worker`: a fresh multiprocess folder for this worker, the mode switched on, the
    server started. Returns the folder (removed at exit by `stop_worker_metrics`)."""
    folder = tempfile.mkdtemp(prefix="digin-metrics-")
    enable(multiprocess_dir=folder)
    serve(port)
    return folder


def stop_worker_metrics(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def process_exited(pid: int) -> None:
    """A worker child ended: its live gauges (GPU memory) go with it."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# --- recording ---------------------------------------------------------------------------------
def record_job(
    *,
    kind: str,
    outcome: str,
    seconds: float,
    queue: str | None = None,
    queue_wait_seconds: float | None = None,
) -> None:
    """One run of the job task."""
    if not _enabled:
        return
    m = _metrics()
    m.jobs.labels(kind, outcome).inc()
    if outcome not in ("skipped", "deferred"):  # only claimed runs did work
        m.duration.labels(kind, outcome).observe(max(0.0, seconds))
    if queue is not None and queue_wait_seconds is not None:
        m.queue_wait.labels(kind, queue).observe(max(0.0, queue_wait_seconds))


def record_reap(changes: Mapping[str, Iterable[uuid.UUID]], *, ok: bool = True) -> None:
    """One reaper round: how many jobs it re-queued, failed, canceled and re-sent."""
    if not _enabled:
        return
    m = _metrics()
    m.reaper_rounds.labels("ok" if ok else "error").inc()
    for action in REAPER_ACTIONS:
        n = len(list(changes.get(action, ())))
        counter = m.reaper_actions.labels(action)
        if n:
            counter.inc(n)


def gpu_memory_stats() -> dict[str, dict[str, float]] | None:
    """CUDA memory of this process per device, if it uses CUDA; peaks are reset (the next
    reading covers the next job). Never imports torch nor initialises CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    stats = {}
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        stats[str(device)] = {
            "allocated": float(torch.cuda.memory_allocated(device)),
            "reserved": float(torch.cuda.memory_reserved(device)),
            "peak": float(torch.cuda.max_memory_allocated(device)),
            "total": float(torch.cuda.get_device_properties(device).total_memory),
        }
        torch.cuda.reset_peak_memory_stats(device)
    return stats


def record_gpu_memory(stats: Mapping[str, Mapping[str, float]] | None) -> None:
    if not _enabled or not stats:
        return
    gauge = _metrics().gpu_memory
    for device, numbers in stats.items():
        for stat, value in numbers.items():
            gauge.labels(device, stat).set(value)


class Timer:
    """Monotonic seconds since it was made."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.start
