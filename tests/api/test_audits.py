"""`/v1/audits` on PostgreSQL + Redis and SQLite + the filesystem broker: validation before
anything is written, the class jobs written and sent as a batch, idempotency keys, caps, cancel,
and the graph's edges in the repository (the report job written exactly once, after the last
item; never for a canceled audit). The whole graph through real workers:
tests/e2e/test_audits.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from digin.service.db import Batch, Job, session_scope, utcnow
from digin.service.db.models import Audit
from digin.service.repo import audits as repo_audits
from digin.worker.audits import complete
from tests.api.conftest import Broker

BODY = {"classifier": "digits:cnn-spurious", "classes": "all", "images": {"digits": "test"}}


@pytest.fixture(autouse=True)
def _delete_audits(engine: Engine) -> Iterator[None]:
    """Audit rows refer to batches and jobs: gone before the engine fixture empties those."""
    yield
    with engine.begin() as conn:
        conn.execute(delete(Audit))


def create(client: TestClient, headers: dict[str, str], body: dict[str, Any], **kw: Any) -> Any:
    return client.post("/v1/audits", json=body, headers=headers, **kw)


def count(sessions: sessionmaker[Session], model: type[Any]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_an_audit_of_all_classes_writes_and_sends_one_class_job_each(
    client: TestClient, auth, broker: Broker, sessions
):
    headers = auth("acme")
    response = create(client, headers, {**BODY, "seed": 7})
    assert response.status_code == 202, response.text
    audit = response.json()
    assert response.headers["Location"] == f"/v1/audits/{audit['id']}"
    assert audit["status"] == "running" and audit["stage"] == "classes"
    assert audit["total_classes"] == 10 and audit["class_counts"]["queued"] == 10
    assert audit["seed"] == 7 and audit["params"]["classifier"] == "digits:cnn-spurious"
    with sessions() as session:
        jobs = list(session.scalars(select(Job).order_by(Job.item_index)))
    assert [j.kind for j in jobs] == ["audit_class"] * 10
    assert [j.params["class"] for j in jobs] == list(range(10))
    assert jobs[7].custom_id == "class=seven" and jobs[7].seed == 14
    assert all(j.queue == "sweep" and j.batch_id == uuid.UUID(audit["id"]) for j in jobs)
    # the steps refer to the audit's images, stored once in the audit's params
    assert jobs[0].params["images"] == {"audit": True} and jobs[0].params["others"] == "all"
    assert audit["params"]["images"]["digits"] == "test"
    assert sorted(broker.job_ids("sweep")) == sorted(str(j.id) for j in jobs)

    got = client.get(f"/v1/audits/{audit['id']}", headers=headers)
    assert got.status_code == 200 and int(got.headers["Retry-After"]) > 0
    classes = got.json()["classes"]
    assert [c["name"] for c in classes][:3] == ["zero", "one", "two"]
    assert all(c["status"] == "queued" and c["row"] is None for c in classes)
    listed = client.get("/v1/audits", headers=headers).json()
    assert [a["id"] for a in listed["data"]] == [audit["id"]]
    assert listed["data"][0]["classes"] is None  # lists leave the classes out
    # the audit's jobs are a batch's items: the batch routes read them too
    batch = client.get(f"/v1/batches/{audit['id']}", headers=headers).json()
    assert batch["total"] == 10 and batch["kind"] == "audit_class"
    # another tenant sees nothing
    assert client.get(f"/v1/audits/{audit['id']}", headers=auth("other")).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**BODY, "classes": [1, "eleven"]}, "classes.1"),
        ({**BODY, "classes": [1, 1]}, "body"),
        ({**BODY, "classifier": "digits:nope"}, "classifier"),
        ({**BODY, "reference": "digits:cnn-spurious"}, "body"),
        ({**BODY, "budget": {"components": 99}}, "budget.components"),
        ({**BODY, "images": {"folder": "/data/x"}}, "images"),
        ({**BODY, "guidance": {"iterations": -1}}, "guidance.iterations"),
        ({**BODY, "colour": "red"}, "colour"),
        ({**BODY, "metadata": {"k": "a\u0000b"}}, "metadata.k"),
        ({**BODY, "priority": 10}, "priority"),
    ],
)
def test_bad_audits_are_refused_naming_the_field_and_nothing_is_written(
    client: TestClient, auth, sessions, body: dict[str, Any], field: str
):
    response = create(client, auth("acme"), body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert field in [e["field"] for e in problem["errors"]], problem
    assert count(sessions, Job) == 0 and count(sessions, Audit) == 0


def test_uploads_of_another_tenant_and_unknown_ids_are_refused(client: TestClient, auth, sessions):
    ids = {"zero": [str(uuid.uuid4()), "not-an-id"], "one": [str(uuid.uuid4())]}
    body = {**BODY, "classes": ["zero", "one"], "images": {"image_ids": ids}}
    response = create(client, auth("acme"), body)
    assert response.status_code == 422, response.text
    fields = {e["field"] for e in response.json()["errors"]}
    assert fields == {
        "images.image_ids.zero.0",
        "images.image_ids.zero.1",
        "images.image_ids.one.0",
    }
    assert count(sessions, Job) == 0


def test_a_class_job_reads_its_audits_images_and_classes_when_it_runs(
    client: TestClient, auth, sessions
):
    """The steps refer to the audit (its params are stored once): the worker binds a class job
    to the audit of its batch before the run; its stored params keep the references."""
    from digin.core.audit_params import step_images, step_others
    from digin.core.params import validate_params
    from digin.worker.audits import bind_params
    from digin.worker.execution import ClaimedJob

    body = {**BODY, "classes": ["zero", 7, "nine"], "images": {"digits": "judge", "per_class": 5}}
    response = create(client, auth("acme"), body)
    assert response.status_code == 202, response.text
    with sessions() as session:
        jobs = list(session.scalars(select(Job).order_by(Job.item_index)))
        claimed = [ClaimedJob.from_row(j, tenant="acme") for j in jobs]
    assert [j.params["others"] for j in jobs] == ["audit"] * 3
    bound = bind_params(claimed[1], validate_params("audit_class", claimed[1].params), sessions)
    assert step_others(bound) == ["zero", "nine"]
    assert (step_images(bound).digits, step_images(bound).per_class) == ("judge", 5)
    assert bound.model_dump(mode="json", by_alias=True) == jobs[1].params  # as stored
    # outside an audit the references name nothing: the job fails naming the field
    alone = ClaimedJob.from_row(jobs[0], tenant="acme")
    alone.batch_id = None
    with pytest.raises(ValueError, match="others: refers to the audit this job is a step of"):
        bind_params(alone, validate_params("audit_class", alone.params), sessions)


def test_a_bad_key_is_a_401_whatever_the_body(client: TestClient):
    bad = {"Authorization": "Bearer dg_00000000_" + "x" * 43}
    assert create(client, bad, {"classes": "nonsense", "x": "\u0000"}).status_code == 401


def test_idempotency_keys_replay_or_conflict(client: TestClient, auth, broker: Broker, sessions):
    headers = {**auth("acme"), "Idempotency-Key": "audit-1"}
    first = create(client, headers, {**BODY, "seed": 1})
    again = create(client, headers, {**BODY, "seed": 1})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = create(client, headers, {**BODY, "seed": 2})
    assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert count(sessions, Audit) == 1 and len(broker.job_ids("sweep")) == 10


def test_caps_refuse_large_audits(make_client, auth, sessions):
    client = make_client(max_items_per_batch=5)
    response = create(client, auth("acme"), BODY)
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "classes"
    assert "at most 5" in response.json()["errors"][0]["message"]
    client = make_client(max_queued_sweep_items_per_tenant=15)
    headers = auth("acme")
    assert create(client, headers, BODY).status_code == 202
    capped = create(client, headers, BODY)
    assert capped.status_code == 429 and int(capped.headers["Retry-After"]) > 0
    assert count(sessions, Audit) == 1


def test_cancel_stops_the_audit_and_no_report_is_written(
    client: TestClient, auth, broker: Broker, sessions
):
    headers = auth("acme")
    audit = create(client, headers, {**BODY, "classes": [3, 7]}).json()
    canceled = client.post(f"/v1/audits/{audit['id']}/cancel", headers=headers)
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    assert canceled.json()["class_counts"]["canceled"] == 2
    audit_id = uuid.UUID(audit["id"])
    assert complete(audit_id, sessions=sessions, enqueue=_no_send, max_attempts=3) == []
    with sessions() as session:
        assert session.get_one(Audit, audit_id).report_job_id is None
        assert repo_audits.audits_awaiting_report(session) == []
    report = client.get(f"/v1/audits/{audit['id']}/report", headers=headers)
    assert report.status_code == 409 and report.json()["type"].endswith("report-not-ready")
    # its event stream: the audit's state, then it closes (the audit has ended)
    events = client.get(f"/v1/audits/{audit['id']}/events", headers=headers)
    assert events.status_code == 200, events.text
    assert events.headers["content-type"].startswith("text/event-stream")
    assert "event: snapshot" in events.text and '"status": "canceled"' in events.text
    assert client.get(f"/v1/audits/{audit['id']}/events", headers=auth("other")).status_code == 404
    assert client.get(f"/v1/audits/{audit['id']}/events").status_code == 401


def _no_send(**_: Any) -> None:
    raise AssertionError("nothing is sent")


def test_the_report_job_is_written_once_after_the_last_item(
    client: TestClient, auth, broker: Broker, sessions
):
    headers = auth("acme")
    audit = create(client, headers, {**BODY, "classes": [3, 7]}).json()
    audit_id = uuid.UUID(audit["id"])
    sent: list[uuid.UUID] = []

    def enqueue(*, job_id: uuid.UUID, queue: str, priority: int, countdown: float = 0) -> None:
        sent.append(job_id)

    with sessions() as session:
        first, second = session.scalars(select(Job.id).order_by(Job.item_index)).all()
    _end(sessions, first)
    assert complete(audit_id, sessions=sessions, enqueue=enqueue, max_attempts=3) == []
    with sessions() as session:
        assert repo_audits.audits_awaiting_report(session) == []
    _end(sessions, second)
    with sessions() as session:  # what the reaper would find, had no worker completed it
        assert repo_audits.audits_awaiting_report(session) == [audit_id]
    complete(audit_id, sessions=sessions, enqueue=enqueue, max_attempts=3)
    complete(audit_id, sessions=sessions, enqueue=enqueue, max_attempts=3)  # a second: nothing
    with sessions() as session:
        report_id = session.get_one(Audit, audit_id).report_job_id
        report = session.get_one(Job, report_id)
        assert report.kind == "audit_report" and report.item_index == 2
        assert report.status == "queued" and report.enqueued_at is not None
        assert session.get_one(Batch, audit_id).total == 3
        assert repo_audits.audits_awaiting_report(session) == []
    assert sent == [report_id]
    got = client.get(f"/v1/audits/{audit['id']}", headers=headers).json()
    assert got["status"] == "running" and got["stage"] == "report"


def _end(sessions: sessionmaker[Session], job_id: uuid.UUID) -> None:
    """A class job that failed (as the reaper fails it): terminal without follow-ups."""
    with session_scope(sessions) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status="failed", finished_at=utcnow())
        )
