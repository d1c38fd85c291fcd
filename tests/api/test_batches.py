"""`/v1/batches` on PostgreSQL + Redis and SQLite + the filesystem broker: expansion of the
axes, validation of every item before anything is written, bulk insert and enqueue, counts,
cancel, cursors, and the results index (JSON lines and CSV)."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import Batch, Job, WebhookDelivery, utcnow
from tests.api.conftest import Broker

DIGITS = ["digits:cnn", "digits:mlp"]


def count(sessions: sessionmaker[Session], model: type[Any]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def create(client: TestClient, headers: dict[str, str], body: dict[str, Any], **kw: Any) -> Any:
    return client.post("/v1/batches", json=body, headers=headers, **kw)


def test_axes_expand_into_queued_jobs_sent_to_the_sweep_queue(
    client: TestClient, auth, broker: Broker, sessions
):
    headers = auth("acme")
    body = {
        "kind": "guided",
        "params_template": {"guidance": {"iterations": 1}},
        "classes": "all",
        "classifiers": DIGITS,
        "seeds": [0, 1],
    }
    response = create(client, headers, body)
    assert response.status_code == 202, response.text
    batch = response.json()
    assert response.headers["Location"] == f"/v1/batches/{batch['id']}"
    assert int(response.headers["Retry-After"]) > 0
    assert batch["status"] == "running" and batch["total"] == 40
    assert batch["counts"] == {
        "queued": 40,
        "running": 0,
        "canceling": 0,
        "succeeded": 0,
        "failed": 0,
        "canceled": 0,
    }
    assert batch["progress"] == 0 and batch["throughput_per_min"] is None
    assert batch["priority"] == 5
    assert set(batch["urls"]) == {"self", "results", "jobs", "cancel"}

    jobs = client.get(f"/v1/jobs?batch_id={batch['id']}&limit=100", headers=headers).json()
    assert len(jobs["data"]) == 40
    by_index = {j["item_index"]: j for j in jobs["data"]}
    first = by_index[0]
    assert first["custom_id"] == "c=0|m=digits:cnn|s=0" and first["queue"] == "sweep"
    assert first["params"]["classes"] == [0] and first["params"]["classifier"] == "digits:cnn"
    assert first["params"]["guidance"]["iterations"] == 1  # the template, normalised
    assert by_index[39]["custom_id"] == "c=9|m=digits:mlp|s=1"
    assert len({j["custom_id"] for j in jobs["data"]}) == 40
    # one message per item in the sweep queue, none in interactive; all marked enqueued
    assert sorted(broker.job_ids("sweep")) == sorted(j["id"] for j in jobs["data"])
    assert broker.job_ids("interactive") == []
    assert all(j["enqueued_at"] is not None for j in jobs["data"])
    # compatible items (same classifier) share a group key, the other classifier's do not
    with sessions() as session:
        keys = dict(session.execute(select(Job.item_index, Job.group_key)).all())
    assert keys[0] == keys[19] and keys[0] != keys[20]


def test_a_bad_item_is_named_and_nothing_is_written(
    client: TestClient, auth, broker: Broker, sessions
):
    headers = auth("acme")
    items = [{"custom_id": f"item-{i}", "params": {"classes": [i % 10]}} for i in range(30)]
    items[17]["params"]["guidance"] = {"iterations": 100000}
    items[21]["params"]["classes"] = ["eleven"]
    response = create(client, headers, {"kind": "guided", "items": items})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    fields = [e["field"] for e in problem["errors"]]
    assert fields == ["items[17].params.guidance.iterations", "items[21].params.classes.0"]
    assert "less than or equal to 500" in problem["errors"][0]["message"]
    assert "unknown class name 'eleven'" in problem["errors"][1]["message"]
    assert "nothing was created" in problem["detail"]
    assert count(sessions, Batch) == 0 and count(sessions, Job) == 0
    assert broker.job_ids("sweep") == []


def test_axis_errors_name_the_axis(client: TestClient, auth):
    headers = auth("acme")
    cases = [
        ({"classes": [1, 2, 12], "classifiers": DIGITS}, "classes[2]", "out of range"),
        (
            {"classes": [1], "classifiers": ["digits:cnn", "digits:nope"]},
            "classifiers[1]",
            "unknown digits classifier",
        ),
        (
            {"classes": [1], "params_template": {"resolution": 7}},
            "params_template.resolution",
            "greater than or equal to 32",
        ),
        ({"classes": [1, 1]}, "classes", "classes[1] repeats classes[0]"),
        ({"classes": [1], "items": [{"custom_id": "a"}]}, "body", "not both"),
        ({"classes": "all", "classifiers": ["timm:resnet18"]}, "classes", "'all' needs"),
        ({"classes": {"start": 5, "stop": 5}}, "classes.ClassRange.stop", "greater than start"),
    ]
    for extra, field, text in cases:
        response = create(client, headers, {"kind": "guided", **extra})
        assert response.status_code == 422, (extra, response.text)
        errors = response.json()["errors"]
        assert any(e["field"] == field and text in e["message"] for e in errors), (extra, errors)


def test_disagreement_takes_classifier_pairs(client: TestClient, auth):
    headers = auth("acme")
    body = {
        "kind": "disagreement",
        "classes": {"start": 3, "stop": 5},
        "classifier_pairs": [["digits:cnn-spurious", "digits:cnn"]],
    }
    response = create(client, headers, body)
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    jobs = client.get(f"/v1/jobs?batch_id={batch_id}", headers=headers).json()["data"]
    ids = sorted(j["custom_id"] for j in jobs)
    assert len(ids) == 2 and ids[0].startswith("c=3|m=digits:cnn-spurious,digits:cnn|s=")
    wrong = create(
        client, headers, {"kind": "disagreement", "classes": [1], "classifiers": ["digits:cnn"]}
    )
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "classifiers"


def test_idempotency_key_replays_the_batch(client: TestClient, auth, sessions):
    headers = {**auth("acme"), "Idempotency-Key": "sweep-1"}
    body = {"kind": "guided", "classes": [1, 2]}
    first = create(client, headers, body)
    again = create(client, headers, body)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert count(sessions, Job) == 2
    other = create(client, headers, {**body, "classes": [3]})
    assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"


def test_cancel_cancels_queued_items_and_keeps_finished_ones(client: TestClient, auth, sessions):
    headers = auth("acme")
    batch = create(client, headers, {"kind": "guided", "classes": [0, 1, 2, 3]}).json()
    with sessions() as session:  # a worker finished item 0 and is running item 1
        jobs = {j.item_index: j for j in session.scalars(select(Job))}
        worker = {"host": "test"}
        done = repo.claim_job(session, job_id=jobs[0].id, worker=worker)
        assert done is not None
        result = {"summary": {"items": [{"best": {"clean_loss": 0.5, "p": 0.9}}]}, "artifacts": []}
        assert repo.finish_job(session, job_id=done.id, attempt=1, result=result)
        assert repo.claim_job(session, job_id=jobs[1].id, worker=worker) is not None
        session.commit()
    response = client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers)
    assert response.status_code == 200
    canceled = response.json()
    assert canceled["counts"] == {
        "queued": 0,
        "running": 0,
        "canceling": 1,
        "succeeded": 1,
        "failed": 0,
        "canceled": 2,
    }
    assert canceled["status"] == "running"  # item 1 is still stopping
    with sessions() as session:
        assert repo.mark_canceled(session, job_id=jobs[1].id, attempt=1)
        session.commit()
    final = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert final["status"] == "canceled" and final["progress"] == 1.0
    assert final["finished_at"] is not None and final["eta_seconds"] == 0
    assert final["throughput_per_min"] > 0
    lines = results(client, headers, batch["id"])
    assert [line["status"] for line in lines] == ["succeeded", "canceled", "canceled", "canceled"]
    assert lines[0]["metrics"] == {"clean_loss": 0.5, "p": 0.9, "images": 1}
    assert lines[1]["metrics"] is None
    again = client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers)
    assert again.json()["counts"] == final["counts"]


def results(client: TestClient, headers: dict[str, str], batch_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/batches/{batch_id}/results", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def test_results_index_streams_every_item_in_order_as_jsonl_and_csv(client: TestClient, auth):
    headers = auth("acme")
    batch = create(
        client, headers, {"kind": "guided", "classes": {"start": 0, "stop": 10}, "seeds": [4, 5]}
    ).json()
    lines = results(client, headers, batch["id"])
    assert [line["index"] for line in lines] == list(range(20))
    assert set(lines[0]) == {
        "index",
        "custom_id",
        "job_id",
        "status",
        "params",
        "seed",
        "metrics",
        "artifacts",
        "error",
    }
    assert lines[1]["seed"] == 5 and lines[1]["status"] == "queued"
    assert lines[1]["metrics"] is None and lines[1]["artifacts"] == []
    for how in ({"params": {"format": "csv"}}, {"headers": {"Accept": "text/csv"}}):
        extra_headers = {**headers, **how.get("headers", {})}
        response = client.get(
            f"/v1/batches/{batch['id']}/results", params=how.get("params"), headers=extra_headers
        )
        assert response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert [int(r["index"]) for r in rows] == list(range(20))
        assert json.loads(rows[3]["params"])["classes"] == [1]
        assert rows[3]["custom_id"] == lines[3]["custom_id"]


def test_list_pages_with_cursors_and_tenants_are_apart(client: TestClient, auth):
    acme, other = auth("acme"), auth("other")
    ids = [create(client, acme, {"kind": "guided", "classes": [i]}).json()["id"] for i in range(3)]
    first = client.get("/v1/batches?limit=2", headers=acme).json()
    assert [b["id"] for b in first["data"]] == ids[::-1][:2]
    second = client.get(f"/v1/batches?limit=2&cursor={first['next_cursor']}", headers=acme)
    assert [b["id"] for b in second.json()["data"]] == [ids[0]]
    assert second.json()["next_cursor"] is None
    assert client.get("/v1/batches", headers=other).json()["data"] == []
    for path in (f"/v1/batches/{ids[0]}", f"/v1/batches/{ids[0]}/results"):
        assert client.get(path, headers=other).status_code == 404
    assert client.post(f"/v1/batches/{ids[0]}/cancel", headers=other).status_code == 404
    bad = client.get("/v1/batches?cursor=nonsense", headers=acme)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "cursor"


def test_batch_size_and_queued_caps(make_client, auth):
    client = make_client(max_items_per_batch=15, max_queued_sweep_items_per_tenant=15)
    headers = auth("acme")
    too_big = create(client, headers, {"kind": "guided", "classes": "all", "seeds": [0, 1]})
    assert too_big.status_code == 422
    assert "more than 15 items" in too_big.json()["errors"][0]["message"]
    assert create(client, headers, {"kind": "guided", "classes": "all"}).status_code == 202
    capped = create(client, headers, {"kind": "guided", "classes": "all", "seeds": [3]})
    assert capped.status_code == 429 and int(capped.headers["Retry-After"]) > 0
    assert capped.json()["limit"] == 15


def test_a_broker_that_is_down_leaves_the_items_queued_for_the_reaper(make_client, auth, sessions):
    client = make_client(broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    response = create(client, auth("acme"), {"kind": "guided", "classes": [1, 2, 3]})
    assert response.status_code == 202, response.text
    with sessions() as session:
        jobs = list(session.scalars(select(Job)))
        assert len(jobs) == 3 and {j.status for j in jobs} == {"queued"}
        assert all(j.enqueued_at is None for j in jobs)  # unsent: the reaper sends them
        report = repo.reap(
            session,
            now=utcnow() + timedelta(seconds=120),
            heartbeat_stale_seconds=600,
            queued_stale_seconds=1800,
        )
    assert sorted(d.job_id for d in report.to_enqueue) == sorted(j.id for j in jobs)
    assert {d.queue for d in report.to_enqueue} == {"sweep"}
    metrics = client.get("/metrics").text
    assert 'digin_enqueue_failures_total{queue="sweep"} 3.0' in metrics


def test_the_reaper_treats_batch_items_like_any_job(client: TestClient, auth, sessions):
    """A stale item on its last attempt fails with worker_lost, a stale one with attempts left
    goes back to the sweep queue, and the batch ends (with its batch.completed event) when its
    last item does."""
    headers = auth("acme")
    body = {
        "kind": "guided",
        "classes": [1, 2],
        # a public address (an IP: nothing to resolve offline); never sent in this test
        "webhook": {"url": "https://93.184.215.14/x", "events": ["batch.completed"]},
    }
    response = create(client, headers, body)
    assert response.status_code == 202, response.text
    batch = response.json()
    with sessions() as session:
        jobs = {j.item_index: j for j in session.scalars(select(Job))}
        for job in jobs.values():
            assert repo.claim_job(session, job_id=job.id, worker={}) is not None
        session.execute(update(Job).where(Job.item_index == 0).values(max_attempts=1))
        session.commit()
        report = repo.reap(
            session,
            now=utcnow() + timedelta(hours=1),
            heartbeat_stale_seconds=600,
            queued_stale_seconds=1800,
        )
        session.commit()
    assert report.failed == [jobs[0].id] and report.requeued == [jobs[1].id]
    assert [d.queue for d in report.to_enqueue] == ["sweep"]
    state = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert state["status"] == "running" and state["counts"]["failed"] == 1
    with sessions() as session:
        assert repo.request_cancel(session, tenant_id=jobs[1].tenant_id, job_id=jobs[1].id)
        session.commit()
    final = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert final["status"] == "completed" and final["finished_at"] is not None
    line = results(client, headers, batch["id"])[0]
    assert line["error"]["code"] == "worker_lost"
    with sessions() as session:
        events = [d.event_type for d in session.scalars(select(WebhookDelivery))]
    assert events == ["batch.completed"]
