"""The shared Celery app (service/dispatch.py) on the real Redis: each queue gets only its
own jobs."""

from __future__ import annotations

import json

import pytest

from digin.service.dispatch import QUEUES, TASK_RUN_JOB, enqueue, make_celery
from digin.service.settings import fresh_settings
from tests.conftest import worker_redis_url

REDIS_URL = worker_redis_url("redis://127.0.0.1:6379/13")


@pytest.fixture
def redis_client():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        pytest.skip(f"Redis at {REDIS_URL} is not reachable: {exc}")
    yield client
    client.flushdb()


def _messages(client, queue: str) -> list[dict]:
    """Every message of `queue`: kombu keeps one Redis list per priority step ('sweep',
    'sweep\\x06\\x163', …)."""
    keys = [k for k in client.keys(f"{queue}*") if k.split(b"\x06")[0] == queue.encode()]
    return [json.loads(raw) for key in sorted(keys) for raw in client.lrange(key, 0, -1)]


def _job_ids(client, queue: str) -> list[str]:
    return [m["headers"]["argsrepr"] for m in _messages(client, queue)]


def test_each_queue_receives_only_its_own_jobs(redis_client, tmp_path):
    settings = fresh_settings(
        data_dir=tmp_path, broker_url=REDIS_URL, auth="on", storage_url=f"file://{tmp_path}/a"
    )
    app = make_celery(settings)
    enqueue(app, job_id="sweep-1", queue="sweep", priority=5)
    enqueue(app, job_id="ui-1", queue="interactive")
    assert _job_ids(redis_client, "sweep") == ["['sweep-1']"]
    assert _job_ids(redis_client, "interactive") == ["['ui-1']"]
    (message,) = _messages(redis_client, "sweep")
    assert message["headers"]["task"] == TASK_RUN_JOB
    assert set(QUEUES) == {"interactive", "sweep"}


def test_countdown_sets_an_eta_and_unknown_queues_are_refused(redis_client, tmp_path):
    settings = fresh_settings(
        data_dir=tmp_path, broker_url=REDIS_URL, auth="on", storage_url=f"file://{tmp_path}/a"
    )
    app = make_celery(settings)
    enqueue(app, job_id="later", queue="interactive", countdown=30)
    (message,) = _messages(redis_client, "interactive")
    assert message["headers"]["eta"] is not None
    with pytest.raises(ValueError, match="queue must be one of"):
        enqueue(app, job_id="x", queue="gpu")
