"""Live events of real jobs run by real workers, followed by the client: on the whole service
(PostgreSQL with LISTEN/NOTIFY, Redis, S3 through moto, a Celery worker) a job and a batch, and
in embedded mode (`digin serve`: SQLite, the filesystem broker, its worker child) a job followed
by `digin wait`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from digin.cli import app
from digin_client import Client, Event
from tests.client.conftest import LiveAPI
from tests.e2e.conftest import JOB_TIMEOUT_S, wait_until
from tests.e2e.test_embedded import serve  # noqa: F401 - the `digin serve` fixture
from tests.worker.helpers import artifact_names, digits_params

pytestmark = pytest.mark.slow


def test_a_real_job_and_batch_followed_on_postgresql(full: LiveAPI):
    with Client(full.url, full.key("events")) as client:
        job = client.submit("guided", digits_params(iterations=2), seed=0)
        events: list[Event] = list(client.events(job.id))
        types = [e.type for e in events]
        assert types[0] == "snapshot" and types[-1] == "snapshot", types
        statuses = [e.data["status"] for e in events if e.type == "status"]
        assert statuses == ["running", "succeeded"], events
        assert "progress" in types  # the worker's heartbeats, notified as they move
        (ready,) = [e for e in events if e.type == "artifacts"]
        assert ready.data["count"] == len(artifact_names(1))
        assert events[-1].data["result"] is not None

        batch = client.create_batch(
            "guided", digits_params(iterations=1), classes=["three", "seven"], seeds=[0]
        )
        seen: list[str] = []
        done = client.wait_batch(
            batch.id, timeout=JOB_TIMEOUT_S, follow=True,
            on_progress=lambda b: seen.append(b.status),
        )  # fmt: skip
        assert done.status == "succeeded" and done.counts.succeeded == 2, done
        assert seen[0] == "running" and seen[-1] == "succeeded"


def test_digin_wait_follows_a_job_of_digin_serve(serve, tmp_path: Path):  # noqa: F811
    proc, base, log = serve

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"digin serve exited ({proc.returncode}):\n{log.read_text()}")
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until("the API to answer", healthy, 90, 0.25)
    env = {"DIGIN_URL": base}  # embedded mode: auth off
    runner = CliRunner()
    submitted = runner.invoke(
        app, ["submit", "guided", "--params", "-", "--json"], env=env,
        input=json.dumps(digits_params(iterations=2)),
    )  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    job_id = json.loads(submitted.stdout)["id"]
    with Client(base) as client:
        stream = client.events(job_id)
        first = next(stream)
        waited = runner.invoke(app, ["wait", job_id, "--json"], env=env)
        assert waited.exit_code == 0, (waited.output, log.read_text()[-3000:])
        assert json.loads(waited.stdout)["status"] == "succeeded"
        events = [first, *stream]  # the API's reads of SQLite delivered the same end
    assert events[0].type == "snapshot" and events[-1].type == "snapshot"
    assert events[-1].data["status"] == "succeeded"
    statuses = [e.data["status"] for e in events if e.type == "status"]
    assert not statuses or statuses[-1] == "succeeded"
