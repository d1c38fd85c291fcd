"""Live event streams (api/routes/events.py, service/events.py) consumed over real HTTP from a
uvicorn server, on PostgreSQL (LISTEN/NOTIFY) and SQLite (the table read by the API); the job
and batch state changes are made by the repository functions the workers use."""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import Job, Tenant, make_engine, session_factory
from digin.service.db.models import JobEvent
from digin.service.repo import batches as repo_batches
from digin.service.settings import fresh_settings
from tests.api.helpers import new_job
from tests.client.conftest import LiveAPI, serve

WAIT_S = 30  # the longest any step may take before the test fails (never a speed check)
WORKER = {"host": "test", "pid": 1}
SECRET_KEY = "Qx7" + "kP2m9Zr4Lw8Vt1Yb6Nc3Hd5Jf0Gs" * 2  # the dashboard's (no placeholder)


@dataclass
class Stack:
    live: LiveAPI
    sessions: sessionmaker[Session]
    engine: Engine

    def tenant(self, name: str) -> tuple[Tenant, dict[str, str]]:
        with self.sessions() as session:
            _, secret = repo.create_api_key(session, tenant_name=name)
            tenant = repo.get_tenant(session, name=name)
            session.commit()
        assert tenant is not None
        return tenant, {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp(f"events-{request.param}")
    if request.param == "postgresql":
        url = request.getfixturevalue("postgresql_url")
    else:
        from digin.service.db import migrate

        url = f"sqlite:///{folder / 'digin.db'}"
        migrate(url)
    settings = fresh_settings(
        data_dir=folder / "data", database_url=url, auth="on", events_heartbeat_seconds=0.5,
        events_poll_seconds=0.1, max_streams_per_tenant=2, secret_key=SECRET_KEY,
    )  # fmt: skip
    engine = make_engine(url)
    try:
        for live in serve(settings):
            yield Stack(live, session_factory(engine), engine)
    finally:
        engine.dispose()


class Reader:
    """Reads one stream in a thread: each event (as a dict with its `id`, `event`, `data`)
    and each comment goes into `events`; `None` when the server closed the stream."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.status: int | None = None
        self.client = httpx.Client(timeout=httpx.Timeout(WAIT_S))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(url, headers), daemon=True)
        self.thread.start()

    def run(self, url: str, headers: dict[str, str]) -> None:
        try:
            with self.client.stream("GET", url, headers=headers) as response:
                self.status = response.status_code
                self.content_type = response.headers.get("content-type", "")
                fields: dict[str, Any] = {}
                for line in response.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith(":"):
                        self.events.put({"comment": line[1:].strip()})
                    elif line == "":
                        if "event" in fields:
                            fields["data"] = json.loads(fields["data"])
                            self.events.put(fields)
                        fields = {}
                    else:
                        name, _, value = line.partition(":")
                        fields[name] = value.removeprefix(" ")
        except httpx.HTTPError:
            pass
        finally:
            self.events.put(None)

    def next(self, *, comments: bool = False) -> dict[str, Any] | None:
        while True:
            item = self.events.get(timeout=WAIT_S)
            if item is None or comments or "comment" not in item:
                return item

    def until(self, event: str, **data: Any) -> list[dict[str, Any]]:
        """The events up to the first `event` whose data has `data` (included)."""
        seen = []
        while True:
            item = self.next()
            assert item is not None, f"the stream closed before {event} {data}: {seen}"
            seen.append(item)
            if item["event"] == event and all(item["data"].get(k) == v for k, v in data.items()):
                return seen

    def rest(self) -> list[dict[str, Any]]:
        """Every event until the server closes the stream."""
        out = []
        while (item := self.next()) is not None:
            out.append(item)
        return out

    def close(self) -> None:
        self.stop.set()
        self.client.close()
        self.thread.join(timeout=WAIT_S)


def claim(sessions: sessionmaker[Session], job_id: uuid.UUID) -> int:
    with sessions() as session:
        job = repo.claim_job(session, job_id=job_id, worker=WORKER)
        session.commit()
        assert job is not None
        return job.attempts


def progress(sessions: sessionmaker[Session], job_id: uuid.UUID, attempt: int, step: int) -> None:
    with sessions() as session:
        done = {"step": step, "total": 4, "stage": "optimizing"}
        assert repo.heartbeat(session, job_id=job_id, attempt=attempt, progress=done) == "continue"
        session.commit()


def finish(sessions: sessionmaker[Session], job_id: uuid.UUID, attempt: int) -> None:
    result = {"summary": {}, "artifacts": [{"name": "a.png", "key": "k", "size": 1}]}
    with sessions() as session:
        assert repo.finish_job(session, job_id=job_id, attempt=attempt, result=result)
        session.commit()


def a_job(stack: Stack, tenant: Tenant) -> uuid.UUID:
    with stack.sessions() as session:
        return new_job(session, tenant).id


def test_a_job_stream_follows_the_job_and_closes_at_its_end(stack: Stack):
    tenant, headers = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    job_id = a_job(stack, tenant)
    reader = Reader(f"{stack.live.url}/v1/jobs/{job_id}/events", headers)
    try:
        first = reader.next()
        assert reader.status == 200 and reader.content_type.startswith("text/event-stream")
        assert first is not None and first["event"] == "snapshot"
        assert first["data"]["id"] == str(job_id) and first["data"]["status"] == "queued"
        attempt = claim(stack.sessions, job_id)
        running = reader.until("status", status="running")[-1]
        assert running["data"]["job_id"] == str(job_id) and running["data"]["attempts"] == 1
        assert int(running["id"]) > 0
        progress(stack.sessions, job_id, attempt, 2)
        step = reader.until("progress")[-1]
        assert step["data"]["step"] == 2 and "id" not in step
        # an idle stream sends heartbeat comments
        assert reader.next(comments=True) == {"comment": "keepalive"}
        finish(stack.sessions, job_id, attempt)
        rest = reader.rest()  # the server closes the stream after the end
        names = [e["event"] for e in rest]
        assert names[-3:] == ["status", "artifacts", "snapshot"], rest
        assert rest[-3]["data"]["status"] == "succeeded"
        assert rest[-2]["data"] == {
            "job_id": str(job_id), "count": 1, "url": f"/v1/jobs/{job_id}/artifacts",
        }  # fmt: skip
        assert rest[-1]["data"]["status"] == "succeeded"
        assert rest[-1]["data"]["result"]["artifacts"][0]["name"] == "a.png"
    finally:
        reader.close()


def test_a_resumed_stream_sends_what_was_missed_once(stack: Stack):
    tenant, headers = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    job_id = a_job(stack, tenant)
    url = f"{stack.live.url}/v1/jobs/{job_id}/events"
    reader = Reader(url, headers)
    try:
        reader.next()
        attempt = claim(stack.sessions, job_id)
        running = reader.until("status", status="running")[-1]
    finally:
        reader.close()
    with stack.sessions() as session:  # the worker asks for cancel, then stops: two events
        repo.request_cancel(session, tenant_id=tenant.id, job_id=job_id)
        session.commit()
        assert repo.mark_canceled(session, job_id=job_id, attempt=attempt)
        session.commit()
    resumed = Reader(url, headers | {"Last-Event-ID": running["id"]})
    try:
        events = resumed.rest()
    finally:
        resumed.close()
    statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
    assert statuses == ["canceling", "canceled"], events  # not `running` again
    assert all(int(e["id"]) > int(running["id"]) for e in events)
    assert events[-1]["event"] == "snapshot" and events[-1]["data"]["status"] == "canceled"


def test_a_finished_job_answers_its_state_and_closes(stack: Stack):
    tenant, headers = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    job_id = a_job(stack, tenant)
    finish(stack.sessions, job_id, claim(stack.sessions, job_id))
    with httpx.Client(timeout=WAIT_S) as client:
        response = client.get(f"{stack.live.url}/v1/jobs/{job_id}/events", headers=headers)
    assert response.status_code == 200
    frames = [f for f in response.text.split("\n\n") if f.strip()]
    assert frames[0].startswith("retry: ")
    assert len(frames) == 2 and "event: snapshot" in frames[1] and '"succeeded"' in frames[1]
    with stack.sessions() as session:  # the id of the snapshot: the newest stored event
        newest = session.scalar(select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(
            JobEvent.id.desc()).limit(1))  # fmt: skip
    assert frames[1].startswith(f"id: {newest}\n")


def test_streams_are_scoped_to_the_tenant_and_need_a_key(stack: Stack):
    tenant, _ = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    _, other = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    job_id = a_job(stack, tenant)
    with httpx.Client(base_url=stack.live.url, timeout=WAIT_S) as client:
        response = client.get(f"/v1/jobs/{job_id}/events", headers=other)
        assert response.status_code == 404, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert client.get(f"/v1/jobs/{job_id}/events").status_code == 401
        wrong = {"Authorization": "Bearer dg_00000000_" + "x" * 43}
        assert client.get(f"/v1/jobs/{job_id}/events", headers=wrong).status_code == 401
        batch = client.get(f"/v1/batches/{uuid.uuid4()}/events", headers=other)
        assert batch.status_code == 404
        bad = client.get(f"/v1/jobs/{job_id}/events", headers=other | {"Last-Event-ID": "x1"})
        assert bad.status_code in (404, 422)  # the job is not theirs: 404 comes first


def test_a_bad_last_event_id_is_a_422_naming_the_header(stack: Stack):
    tenant, headers = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    job_id = a_job(stack, tenant)
    with httpx.Client(base_url=stack.live.url, timeout=WAIT_S) as client:
        response = client.get(
            f"/v1/jobs/{job_id}/events", headers=headers | {"Last-Event-ID": "abc"}
        )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "Last-Event-ID"


def test_open_streams_are_capped_per_tenant(stack: Stack):
    tenant, headers = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    _, others = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    job_id = a_job(stack, tenant)
    url = f"{stack.live.url}/v1/jobs/{job_id}/events"
    readers = [Reader(url, headers) for _ in range(2)]  # the cap of this server is 2
    try:
        for reader in readers:
            assert reader.next() is not None  # both are open
        with httpx.Client(timeout=WAIT_S) as client:
            refused = client.get(url, headers=headers)
            assert refused.status_code == 429 and refused.headers["Retry-After"]
            other_job = a_job(stack, repo_tenant(stack, others))
            # another tenant is not held by this tenant's cap
            with client.stream(
                "GET", f"{stack.live.url}/v1/jobs/{other_job}/events", headers=others
            ) as response:
                assert response.status_code == 200
    finally:
        for reader in readers:
            reader.close()


def repo_tenant(stack: Stack, headers: dict[str, str]) -> Tenant:
    secret = headers["Authorization"].removeprefix("Bearer ")
    with stack.sessions() as session:
        tenant = repo.authenticate(session, secret=secret)
    assert tenant is not None
    return tenant


def test_a_revoked_key_ends_its_stream(stack: Stack):
    tenant, headers = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    job_id = a_job(stack, tenant)
    reader = Reader(f"{stack.live.url}/v1/jobs/{job_id}/events", headers)
    try:
        assert reader.next() is not None
        prefix = headers["Authorization"].split("_")[1]
        with stack.sessions() as session:
            assert repo.revoke_api_key(session, prefix=prefix)
            session.commit()
        rest = reader.rest()  # the next heartbeats find the key revoked (the cache's TTL at most)
        assert rest[-1]["event"] == "error" and "revoked" in rest[-1]["data"]["detail"]
    finally:
        reader.close()


def test_a_batch_stream_sends_its_items_events_and_ends_with_the_batch(stack: Stack):
    tenant, headers = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    items = [repo_batches.PlannedItem(i, f"c={i}", {"classes": [i]}, i, None) for i in range(3)]
    plan = repo_batches.BatchPlan("guided", items, {"items": 3})
    with stack.sessions() as session:
        batch, _ = repo_batches.create_batch(
            session, tenant_id=tenant.id, plan=plan, params_template={}, priority=0,
            max_attempts=3,
        )  # fmt: skip
        session.commit()
        job_ids = list(
            session.scalars(select(Job.id).where(Job.batch_id == batch.id).order_by(Job.item_index))
        )
    _, other = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=stack.live.url, timeout=WAIT_S) as client:  # not theirs: 404
        assert client.get(f"/v1/batches/{batch.id}/events", headers=other).status_code == 404
    reader = Reader(f"{stack.live.url}/v1/batches/{batch.id}/events", headers)
    try:
        first = reader.next()
        assert first is not None and first["event"] == "snapshot"
        assert first["data"]["total"] == 3 and first["data"]["counts"]["queued"] == 3
        finish(stack.sessions, job_ids[0], claim(stack.sessions, job_ids[0]))
        done = reader.until("status", status="succeeded")[-1]
        assert done["data"]["job_id"] == str(job_ids[0])
        assert done["data"]["batch_id"] == str(batch.id)
        with stack.sessions() as session:  # the rest is canceled: the batch ends
            repo_batches.cancel_batch(session, tenant_id=tenant.id, batch_id=batch.id)
            session.commit()
        rest = reader.rest()
        statuses = [e["data"] for e in rest if e["event"] == "status"]
        canceled = {e["job_id"] for e in statuses if e["status"] == "canceled"}
        assert canceled == {str(j) for j in job_ids[1:]}
        assert [e["event"] for e in rest][-2:] == ["batch_finished", "snapshot"]
        assert rest[-1]["data"]["status"] == "canceled", rest[-1]  # the user canceled it
    finally:
        reader.close()


def test_status_changes_of_every_code_path_are_stored_with_increasing_ids(stack: Stack):
    tenant, _ = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    job_id = a_job(stack, tenant)
    attempt = claim(stack.sessions, job_id)
    with stack.sessions() as session:
        error = repo.job_error("internal", "boom")
        assert repo.requeue_job(session, job_id=job_id, attempt=attempt, error=error) == "queued"
        session.commit()
    attempt = claim(stack.sessions, job_id)
    with stack.sessions() as session:
        assert repo.fail_job(session, job_id=job_id, attempt=attempt, error=error)
        session.commit()
        rows = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
    assert [json.loads(r.data)["status"] for r in rows] == [
        "running",
        "queued",
        "running",
        "failed",
    ]
    assert json.loads(rows[-1].data)["error"] == {
        "code": "internal", "message": "boom", "retryable": False,
    }  # fmt: skip
    assert [json.loads(r.data)["attempts"] for r in rows] == [1, 1, 2, 2]
    assert all(r.tenant_id == tenant.id for r in rows)


def dashboard_cookie(stack: Stack, headers: dict[str, str]) -> str:
    """A dashboard session of the key in `headers`, through the login form."""
    with httpx.Client(base_url=stack.live.url, timeout=WAIT_S) as client:
        form = client.get("/ui/login").text
        csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        secret = headers["Authorization"].removeprefix("Bearer ")
        response = client.post("/ui/login", data={"api_key": secret, "csrf": csrf})
        assert response.status_code == 303, response.text[:300]
        return response.cookies["digin_session"]


def test_the_dashboard_follows_a_job_with_its_session(stack: Stack):
    tenant, headers = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    _, other = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    job_id = a_job(stack, tenant)
    cookie = {"Cookie": f"digin_session={dashboard_cookie(stack, headers)}"}
    reader = Reader(f"{stack.live.url}/ui/jobs/{job_id}/events", cookie)
    try:
        first = reader.next()
        assert first is not None and first["data"]["status"] == "queued"
        finish(stack.sessions, job_id, claim(stack.sessions, job_id))
        rest = reader.rest()
        assert rest[-1]["event"] == "snapshot" and rest[-1]["data"]["status"] == "succeeded"
    finally:
        reader.close()
    with httpx.Client(base_url=stack.live.url, timeout=WAIT_S) as client:
        theirs = {"Cookie": f"digin_session={dashboard_cookie(stack, other)}"}
        assert client.get(f"/ui/jobs/{job_id}/events", headers=theirs).status_code == 404
        anonymous = client.get(f"/ui/jobs/{job_id}/events")
        assert anonymous.status_code in (303, 307) and "/ui/login" in anonymous.headers["location"]
        assert client.get(f"/ui/batches/{uuid.uuid4()}/events", headers=cookie).status_code == 404


def test_the_reaper_prunes_old_stored_events(stack: Stack):
    from datetime import UTC, datetime

    from sqlalchemy import update

    from digin.service.events import EVENTS_RETENTION_S

    tenant, _ = stack.tenant(f"ev-{uuid.uuid4().hex[:8]}")
    old_job, new_job_id = a_job(stack, tenant), a_job(stack, tenant)
    claim(stack.sessions, old_job)
    claim(stack.sessions, new_job_id)
    with stack.sessions() as session:
        session.execute(
            update(JobEvent)
            .where(JobEvent.job_id == old_job)
            .values(at=JobEvent.at - EVENTS_RETENTION_S - 1)
        )
        repo.reap(
            session, now=datetime.now(UTC), heartbeat_stale_seconds=600, queued_stale_seconds=1800
        )
        session.commit()
        left = set(
            session.scalars(
                select(JobEvent.job_id).where(JobEvent.job_id.in_([old_job, new_job_id]))
            )
        )
    assert left == {new_job_id}
