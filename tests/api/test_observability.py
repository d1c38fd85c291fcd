"""Observability of the API: the broker's queues on /metrics (Redis LLEN/HLEN beside PostgreSQL,
the filesystem broker's files beside SQLite), and a database that is down: /readyz names it
and every route answers a 503 problem (with Retry-After) instead of a 500."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from digin.api.app import create_app
from digin.service.security import generate_api_key
from digin.service.settings import fresh_settings
from tests.api.conftest import AppFactory, Broker
from tests.api.test_app_jobs import GUIDED, assert_problem

Auth = Callable[[str], dict[str, str]]


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of a Prometheus text page."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, flags=re.M)
    assert match, f"no {name}{{{labels}}} in the metrics"
    return float(match.group(1))


def test_broker_queue_depth_counts_waiting_messages(client: TestClient, auth: Auth, broker: Broker):
    headers = auth("acme")
    for _ in range(3):
        assert client.post("/v1/jobs", json=GUIDED, headers=headers).status_code == 202
    sweep = {**GUIDED, "priority": 7}
    assert client.post("/v1/jobs", json=sweep, headers=headers).status_code == 202
    if broker.redis is not None:  # what the broker really holds, in every list of the queue
        waiting = sum(broker.redis.llen(k) for k in broker.redis.keys("interactive*"))
    else:
        waiting = len(broker.job_ids("interactive"))
    assert waiting == 4
    text = client.get("/metrics").text
    assert sample(text, "digin_broker_scrape_ok") == 1
    # every priority level counts (Redis keeps them in separate lists)
    assert sample(text, "digin_broker_queue_depth", 'queue="interactive"') == waiting
    assert sample(text, "digin_broker_queue_depth", 'queue="sweep"') == 0
    if broker.redis is not None:
        assert sample(text, "digin_broker_unacked_messages") == 0
        broker.redis.delete("interactive")  # a message lost in the broker: the row still counts
        text = client.get("/metrics").text
        assert sample(text, "digin_broker_queue_depth", 'queue="interactive"') < waiting
        assert sample(text, "digin_queue_depth", 'queue="interactive"') == 4


def test_broker_down_is_reported_not_raised(make_client: AppFactory, db_url: str):
    if not db_url.startswith("postgresql"):
        return  # the filesystem broker cannot be down
    client = make_client(broker_url="redis://127.0.0.1:1/0")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert sample(response.text, "digin_broker_scrape_ok") == 0
    assert sample(response.text, "digin_jobs_scrape_ok") == 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_database_that_is_down_is_a_503_everywhere(tmp_path: Path):
    settings = fresh_settings(
        data_dir=tmp_path, database_url=f"postgresql://digin@127.0.0.1:{closed_port()}/digin",
        broker_url="filesystem://", auth="on",
    )  # fmt: skip
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        body = assert_problem(client.get("/readyz"), 503)
        assert body["detail"] == "not ready: database unavailable"
        assert body["checks"]["broker"] == body["checks"]["storage"] == "ok"
        _, secret = generate_api_key()  # well formed: the lookup needs the database
        headers = {"Authorization": f"Bearer {secret}"}
        for response in (
            client.get("/v1/jobs", headers=headers),
            client.post("/v1/jobs", json=GUIDED, headers=headers),
        ):
            body = assert_problem(response, 503)
            assert body["type"].endswith("database-unavailable")
            assert response.headers["Retry-After"] == "5"
            assert "127.0.0.1" not in response.text  # no connection details leak
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert sample(metrics.text, "digin_jobs_scrape_ok") == 0
