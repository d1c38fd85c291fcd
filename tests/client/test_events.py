"""The clients' event iterators and waiting by events (digin_client.events), and `digin wait`
following the stream, against a real API (uvicorn on SQLite, no worker); the job's state
changes are made by the repository functions a worker uses."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from digin.cli import app
from digin.service import repo
from digin.service.db import make_engine, session_factory
from digin_client import AsyncClient, Client, Event, Job
from digin_client.events import Parser
from tests.client.conftest import LiveAPI, lite_settings, running
from tests.worker.helpers import digits_params

WORKER = {"host": "test", "pid": 1}


@pytest.fixture(scope="module")
def sessions(lite: LiveAPI) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(lite.settings.database_url)
    yield session_factory(engine)
    engine.dispose()


class Worker:
    """Moves one job along as a worker would."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str) -> None:
        self.sessions, self.job_id, self.attempt = sessions, uuid.UUID(job_id), 0

    def claim(self) -> None:
        with self.sessions() as session:
            job = repo.claim_job(session, job_id=self.job_id, worker=WORKER)
            session.commit()
        assert job is not None
        self.attempt = job.attempts

    def progress(self, step: int) -> None:
        with self.sessions() as session:
            done = {"step": step, "total": 3, "stage": "optimizing"}
            repo.heartbeat(session, job_id=self.job_id, attempt=self.attempt, progress=done)
            session.commit()

    def finish(self) -> None:
        result = {"summary": {"n": 1}, "artifacts": [{"name": "grid.png", "key": "k", "size": 3}]}
        with self.sessions() as session:
            assert repo.finish_job(session, job_id=self.job_id, attempt=self.attempt, result=result)
            session.commit()


def test_the_parser_reads_the_standard_framing():
    parser = Parser()
    raw = b': hi\r\nretry: 5\r\nid: 7\r\nevent: status\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
    events = [e for part in (raw[:9], raw[9:30], raw[30:]) for e in parser.feed(part)]
    assert events == [Event("status", {"a": 1}, 7)]
    assert list(parser.feed(b"data: {}\n\n")) == [Event("message", {}, None)]


def test_the_sync_iterator_follows_a_job_to_its_end(lite: LiveAPI, sessions):
    with Client(lite.url, lite.key(f"ev-{uuid.uuid4().hex[:8]}")) as client:
        job = client.submit("guided", digits_params())
        worker = Worker(sessions, job.id)
        events = client.events(job.id)
        first = next(events)
        assert first.type == "snapshot" and first.data["status"] == "queued"
        worker.claim()
        running_event = next(e for e in events if e.type == "status")
        assert running_event.data["status"] == "running" and running_event.id
        worker.progress(2)
        assert next(events) == Event("progress", {"job_id": job.id, "step": 2, "total": 3,
                                                  "stage": "optimizing"})  # fmt: skip
        worker.finish()
        rest = list(events)  # ends after the last snapshot
        assert [e.type for e in rest] == ["status", "artifacts", "snapshot"]
        assert Job.model_validate(rest[-1].data).result.artifacts[0].name == "grid.png"
        # resuming after the running event gives what came after it
        again = list(client.events(job.id, last_event_id=running_event.id))
        assert [e.type for e in again] == ["status", "artifacts", "snapshot"]


def test_the_async_iterator_gives_the_same_events(lite: LiveAPI, sessions):
    async def follow() -> list[Event]:
        async with AsyncClient(lite.url, lite.key(f"ev-{uuid.uuid4().hex[:8]}")) as client:
            job = await client.submit("guided", digits_params())
            worker = Worker(sessions, job.id)
            seen = []
            async for event in client.events(job.id):
                seen.append(event)
                if event.type == "snapshot" and event.data["status"] == "queued":
                    worker.claim()
                elif event.type == "status" and event.data["status"] == "running":
                    worker.finish()
            return seen

    seen = asyncio.run(follow())
    assert [e.type for e in seen] == ["snapshot", "status", "status", "artifacts", "snapshot"]


def test_wait_follows_the_events_and_sees_progress(lite: LiveAPI, sessions):
    with Client(lite.url, lite.key(f"ev-{uuid.uuid4().hex[:8]}")) as client:
        job = client.submit("guided", digits_params())
        worker = Worker(sessions, job.id)
        seen: list[tuple[str, int | None]] = []

        def on_progress(state: Job) -> None:  # moves the job on as each state arrives
            seen.append((state.status, state.progress.step if state.progress else None))
            if state.status == "queued":
                worker.claim()
            elif state.status == "running" and state.progress is None:
                worker.progress(1)
            elif state.status == "running":
                worker.finish()

        done = client.wait(job.id, on_progress=on_progress, follow=True)
    assert done.status == "succeeded" and done.result is not None  # the last snapshot
    assert seen[:3] == [("queued", None), ("running", None), ("running", 1)]


def test_wait_polls_when_the_stream_is_refused(tmp_path: Path):
    settings = lite_settings(tmp_path, max_streams_per_tenant=1)
    with running(settings) as live:
        key = live.key("acme")
        engine = make_engine(settings.database_url)
        try:
            with Client(live.url, key) as client, Client(live.url, key) as other:
                job = client.submit("guided", digits_params())
                held = other.events(job.id)
                next(held)  # the tenant's one stream is open: a second one gets 429
                worker = Worker(session_factory(engine), job.id)
                worker.claim()
                worker.finish()
                done = client.wait(job.id, follow=True, timeout=60)
                assert done.status == "succeeded"
                held.close()
        finally:
            engine.dispose()


def test_the_cli_waits_by_the_stream(lite: LiveAPI, sessions):
    env = {"DIGIN_URL": lite.url, "DIGIN_API_KEY": lite.key(f"ev-{uuid.uuid4().hex[:8]}")}
    runner = CliRunner()
    submitted = runner.invoke(
        app, ["submit", "guided", "--params", "-", "--json"], env=env,
        input=json.dumps(digits_params()),
    )  # fmt: skip
    job = json.loads(submitted.stdout)
    result = runner.invoke(app, ["wait", job["id"], "--timeout", "0.5", "--json"], env=env)
    assert result.exit_code == 3, result.output  # a queued job: the stream times out
    assert json.loads(result.stdout)["last"]["status"] == "queued"
    worker = Worker(sessions, job["id"])
    worker.claim()
    worker.finish()
    result = runner.invoke(app, ["wait", job["id"], "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["result"]["artifacts"][0]["name"] == "grid.png"
