"""The workers' and the reaper's metrics (`worker/metrics.py`) and the job ids on log lines:
a real Celery worker with two pool processes serves the sum of both on
DIGIN_WORKER_METRICS_PORT; the reaper counts what it did."""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import timedelta

import httpx
from prometheus_client import generate_latest
from sqlalchemy import update

from digin.service.db import Job, utcnow
from digin.worker import metrics
from digin.worker.logs import JsonFormatter, clear_job_context, set_job_context
from digin.worker.reaper import reap_once
from tests.reliability.stack import deployment, free_port, wait_until
from tests.worker.helpers import digits_params


def sample(text: str, name: str, labels: str = "") -> float | None:
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, flags=re.M)
    return float(match.group(1)) if match else None


def test_a_worker_serves_the_metrics_of_all_its_processes(servers: dict):
    port = free_port()
    with deployment(**servers) as dep:
        dep.start_worker("metrics", concurrency=2, DIGIN_WORKER_METRICS_PORT=str(port))
        ids = [dep.submit("rel-metrics", digits_params(iterations=1)) for _ in range(4)]
        rows = dep.wait_terminal(ids, timeout=150)
        assert {r.status for r in rows.values()} == {"succeeded"}
        pids = {r.worker["pid"] for r in rows.values()}

        def scraped() -> str | None:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            done = sample(text, "digin_worker_jobs_total", 'kind="guided",outcome="succeeded"')
            return text if done == len(ids) else None  # postrun runs after the row is final

        text = wait_until("the worker's metrics to count every job", scraped, 30, 0.2)
    duration = 'kind="guided",outcome="succeeded"'
    assert sample(text, "digin_job_duration_seconds_count", duration) == len(ids)
    assert sample(text, "digin_job_duration_seconds_sum", duration) > 0
    wait = 'kind="guided",queue="interactive"'
    assert sample(text, "digin_job_queue_wait_seconds_count", wait) == len(ids)
    assert "digin_worker_gpu_memory_bytes{" not in text  # CPU workers report no GPU memory
    print(f"\nworker metrics: {len(ids)} jobs over {len(pids)} pool processes")


def test_reaper_actions_are_counted(servers: dict):
    with deployment(**servers) as dep:
        ids = [dep.submit("rel-reaper", digits_params(iterations=1)) for _ in range(3)]
        stale = utcnow() - timedelta(seconds=60)
        with dep.sessions.begin() as session:  # two runs whose worker died, one on its last try
            session.execute(
                update(Job)
                .where(Job.id.in_(ids[:2]))
                .values(status="running", attempts=1, heartbeat_at=stale, started_at=stale)
            )
            session.execute(update(Job).where(Job.id == ids[1]).values(max_attempts=1))  # fmt: skip
        sent = []
        metrics.enable()
        try:
            reap_once(sessions=dep.sessions, settings=dep.settings,
                      enqueue=lambda **kw: sent.append(kw["job_id"]))  # fmt: skip
            text = generate_latest(metrics.serving_registry()).decode()
        finally:
            metrics.disable()
    assert sent == [ids[0]]
    assert sample(text, "digin_reaper_actions_total", 'action="requeued"') == 1
    assert sample(text, "digin_reaper_actions_total", 'action="failed"') == 1
    assert sample(text, "digin_reaper_actions_total", 'action="enqueued"') == 1
    assert sample(text, "digin_reaper_rounds_total", 'result="ok"') == 1


def test_gpu_memory_is_exposed_per_device_and_stat():
    metrics.enable()
    try:
        metrics.record_gpu_memory({"cuda:0": {"allocated": 1024.0, "peak": 4096.0}})
        text = generate_latest(metrics.serving_registry()).decode()
    finally:
        metrics.disable()
    assert sample(text, "digin_worker_gpu_memory_bytes", 'device="cuda:0",stat="peak"') == 4096
    assert metrics.gpu_memory_stats() is None  # this process never touched CUDA


def test_log_lines_of_a_job_carry_its_ids():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("digin.test.context")
    logger.addHandler(handler)
    try:
        set_job_context(job_id="j-1", batch_id=None)
        logger.warning("inside")
        set_job_context(job_id="j-2", batch_id="b-7")
        logger.warning("batched", extra={"event": "x"})
        clear_job_context()
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x.get("job_id"), x.get("batch_id")) for x in lines] == [
        ("j-1", None), ("j-2", "b-7"), (None, None)]  # fmt: skip
    assert lines[1]["event"] == "x"
