"""Webhooks: Standard Webhooks signatures, the guard against private targets (at submit and at
send time), events recorded with the state changes, delivery by the sender to a real HTTP
receiver on loopback (a 500 is retried with the same event id), the delivery log."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from digin.service import repo
from digin.service.db import Job, WebhookDelivery, utcnow
from digin.service.repo.webhooks import webhook_secret
from digin.service.settings import fresh_settings
from digin.service.webhooks import UnsafeWebhookUrl, check_url, headers, sign, verify_signature
from digin.worker.webhooks import send_due

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


# --- signatures and the target guard ------------------------------------------------------------
def test_signature_is_hmac_sha256_of_id_timestamp_body():
    import base64
    import hashlib
    import hmac

    body = b'{"a":1}'
    expected = base64.b64encode(
        hmac.new(base64.b64decode(SECRET[6:]), b"evt_1.1700000000." + body, hashlib.sha256).digest()
    ).decode()
    assert sign(SECRET, "evt_1", 1700000000, body) == f"v1,{expected}"
    h = headers(SECRET, "evt_1", body, now=1700000000)
    assert h["webhook-id"] == "evt_1" and h["webhook-timestamp"] == "1700000000"
    kwargs = {
        "webhook_id": "evt_1",
        "webhook_timestamp": "1700000000",
        "webhook_signature": h["webhook-signature"],
        "body": body,
    }
    assert verify_signature(SECRET, **kwargs, now=1700000100)
    assert not verify_signature(SECRET, **kwargs, now=1700000000 + 301)  # too old
    assert not verify_signature(SECRET, **{**kwargs, "body": b'{"a":2}'}, now=1700000000)
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    assert not verify_signature(other, **kwargs, now=1700000000)


def resolver(table: dict[str, list[str]]):
    return lambda host, port: table[host]


@pytest.mark.parametrize(
    ("url", "addresses", "loopback_ok", "error"),
    [
        ("https://hooks.example.com/x", ["93.184.215.14"], False, None),
        ("https://hooks.example.com/x", ["10.0.0.7"], True, "private"),
        ("https://hooks.example.com/x", ["93.184.215.14", "192.168.1.2"], True, "private"),
        ("https://hooks.example.com/x", ["169.254.169.254"], True, "link-local"),
        ("https://hooks.example.com/x", ["fd00::1"], True, "private"),
        ("https://hooks.example.com/x", ["::ffff:10.1.2.3"], True, "private"),
        ("https://hooks.example.com/x", ["127.0.0.1"], False, "loopback"),
        ("https://hooks.example.com/x", ["127.0.0.1"], True, None),
        ("http://hooks.example.com/x", ["93.184.215.14"], True, "https"),
        ("http://hooks.example.com/x", ["127.0.0.1"], True, None),
        ("ftp://hooks.example.com/x", ["93.184.215.14"], True, "scheme"),
        ("https://user:pw@hooks.example.com/x", ["93.184.215.14"], True, "credentials"),
    ],
)
def test_the_target_guard(url: str, addresses: list[str], loopback_ok: bool, error: str | None):
    resolve = resolver({"hooks.example.com": addresses})
    if error is None:
        assert check_url(url, allow_loopback=loopback_ok, resolve=resolve) == addresses
    else:
        with pytest.raises(UnsafeWebhookUrl, match=error):
            check_url(url, allow_loopback=loopback_ok, resolve=resolve)


def test_the_guard_resolves_real_names():
    assert "127.0.0.1" in check_url("http://localhost:9/hook", allow_loopback=True)
    with pytest.raises(UnsafeWebhookUrl, match="loopback"):
        check_url("https://localhost/hook", allow_loopback=False)
    with pytest.raises(UnsafeWebhookUrl, match="does not resolve"):
        check_url("https://no-such-host.invalid/hook", allow_loopback=True)


# --- a real receiver ------------------------------------------------------------------------------
@dataclass
class Receiver:
    url: str
    statuses: list[int] = field(default_factory=list)  # answers, in order; then 204
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["content-length"]))
            state.requests.append(
                {"headers": dict(self.headers.items()), "body": body, "path": self.path}
            )
            status = state.statuses.pop(0) if state.statuses else 204
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def sender_settings(tmp_path: Path) -> Any:
    """The sender of an embedded deployment (loopback targets allowed), fast retries."""
    return fresh_settings(data_dir=tmp_path / "sender", webhook_backoff_seconds=0.5)


def send(sessions, tmp_path: Path, *, at: Any = None) -> Any:
    with httpx.Client(timeout=5) as client:
        return send_due(
            sessions=sessions, settings=sender_settings(tmp_path), client=client, now=at
        )


def verify(request: dict[str, Any], secret: str) -> dict[str, Any]:
    h = {k.lower(): v for k, v in request["headers"].items()}
    assert h["content-type"] == "application/json"
    assert verify_signature(
        secret,
        webhook_id=h["webhook-id"],
        webhook_timestamp=h["webhook-timestamp"],
        webhook_signature=h["webhook-signature"],
        body=request["body"],
    )
    payload = json.loads(request["body"])
    assert payload["id"] == h["webhook-id"]
    return payload


def new_job(session, tenant, webhook: dict[str, Any] | None, **extra: Any) -> Job:
    job, _ = repo.create_job(
        session,
        tenant_id=tenant.id,
        kind="guided",
        params={"classes": [3]},
        seed=0,
        priority=0,
        queue="interactive",
        max_attempts=3,
        **extra,
    )
    job.webhook = webhook
    session.commit()
    return job


# --- events, delivery, retries --------------------------------------------------------------------
def test_job_events_are_signed_delivered_and_a_500_is_retried_with_the_same_id(
    sessions, session, tenant, receiver: Receiver, tmp_path: Path
):
    hook = {"url": receiver.url, "events": ["running", "succeeded"]}
    job = new_job(session, tenant, hook)
    claimed = repo.claim_job(session, job_id=job.id, worker={"host": "w"})
    assert claimed is not None
    session.commit()
    receiver.statuses = [500]  # the receiver fails the first attempt
    report = send(sessions, tmp_path)
    assert report.retrying and not report.delivered
    assert repo.finish_job(
        session,
        job_id=job.id,
        attempt=1,
        result={"summary": {}, "artifacts": [{"name": "grid.png"}]},
    )
    session.commit()
    # not yet due: the retry waits for its backoff; the new event goes at once
    report = send(sessions, tmp_path)
    assert len(report.delivered) == 1
    later = send(sessions, tmp_path, at=utcnow() + timedelta(seconds=5))
    assert len(later.delivered) == 1

    secret = webhook_secret(session, tenant_id=tenant.id)
    payloads = [verify(r, secret) for r in receiver.requests]
    assert [p["type"] for p in payloads] == ["running", "succeeded", "running"]
    assert payloads[0]["id"] == payloads[2]["id"]  # the retry carries the same event id
    first, retry = receiver.requests[0]["headers"], receiver.requests[2]["headers"]
    assert first["webhook-id"] == retry["webhook-id"]
    assert receiver.requests[0]["body"] == receiver.requests[2]["body"]
    assert payloads[1]["data"]["status"] == "succeeded"
    assert payloads[1]["data"]["artifacts"] == ["grid.png"]
    assert payloads[0]["data"]["id"] == str(job.id)
    with sessions() as s:
        rows = {d.event_type: d for d in s.scalars(select(WebhookDelivery))}
    assert rows["running"].status == "delivered" and rows["running"].attempts == 2
    assert [e["status_code"] for e in rows["running"].log] == [500, 204]
    assert rows["succeeded"].attempts == 1


def test_unwanted_events_and_jobs_without_webhooks_record_nothing(sessions, session, tenant):
    job = new_job(session, tenant, None)
    hooked = new_job(session, tenant, {"url": "https://example.com/h", "events": ["failed"]})
    for j in (job, hooked):
        claimed = repo.claim_job(session, job_id=j.id, worker={})
        assert claimed is not None
        repo.finish_job(session, job_id=j.id, attempt=1, result={"summary": {}, "artifacts": []})
    session.commit()
    with sessions() as s:
        assert s.scalars(select(WebhookDelivery)).all() == []


def test_the_sender_refuses_a_private_target_at_send_time(sessions, session, tenant, tmp_path):
    job = new_job(session, tenant, {"url": "http://127.0.0.1:9/h", "events": ["canceled"]})
    repo.request_cancel(session, tenant_id=tenant.id, job_id=job.id)
    session.commit()
    production = fresh_settings(
        data_dir=tmp_path / "p", database_url="postgresql://x@h/db", auth="on"
    )
    assert production.mode == "production"
    with httpx.Client(timeout=5) as client:
        report = send_due(sessions=sessions, settings=production, client=client)
    assert len(report.failed) == 1
    with sessions() as s:
        (row,) = s.scalars(select(WebhookDelivery))
    assert row.status == "failed" and row.attempts == 1 and "loopback" in row.last_error


def test_deliveries_are_given_up_after_their_attempts(
    sessions, session, tenant, tmp_path, receiver
):
    job = new_job(session, tenant, {"url": receiver.url, "events": ["canceled"]})
    repo.request_cancel(session, tenant_id=tenant.id, job_id=job.id)
    session.commit()
    with sessions() as s:
        (row,) = s.scalars(select(WebhookDelivery))
        row.max_attempts = 3
        s.commit()
    receiver.statuses = [503, 500, 502]
    at = utcnow()
    for _ in range(3):
        send(sessions, tmp_path, at=at)
        at += timedelta(hours=2)
    assert send(sessions, tmp_path, at=at).failed == []  # nothing left to send
    with sessions() as s:
        (row,) = s.scalars(select(WebhookDelivery))
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 3, 502)
    assert len({r["headers"]["webhook-id"] for r in receiver.requests}) == 1


# --- through the API ------------------------------------------------------------------------------
def test_api_checks_the_target_and_shows_the_delivery_log(
    make_client, auth, sessions, receiver: Receiver, tmp_path: Path
):
    client: TestClient = make_client()
    headers = auth("acme")
    embedded = client.app.state.services.settings.mode == "embedded"  # type: ignore[attr-defined]
    body = {
        "kind": "guided",
        "params": {"classes": [3]},
        "webhook": {"url": receiver.url, "events": ["canceled"]},
    }
    response = client.post("/v1/jobs", json=body, headers=headers)
    if not embedded:  # production: a loopback target is refused at submit, nothing is written
        assert response.status_code == 422, response.text
        (error,) = response.json()["errors"]
        assert error["field"] == "webhook.url" and "loopback" in error["message"]
        with sessions() as s:
            assert s.scalars(select(Job)).all() == []
        return
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    bad = client.post(
        "/v1/jobs", headers=headers, json={**body, "webhook": {"url": "http://10.1.1.1/h"}}
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "webhook.url"
    wrong = client.post(
        "/v1/jobs",
        headers=headers,
        json={**body, "webhook": {"url": receiver.url, "events": ["batch.completed"]}},
    )
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "webhook.events"

    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
    send(sessions, tmp_path)
    secret = client.get("/v1/webhooks/secret", headers=headers).json()["secret"]
    (payload,) = [verify(r, secret) for r in receiver.requests]
    assert payload["type"] == "canceled" and payload["data"]["id"] == job_id
    log = client.get(f"/v1/jobs/{job_id}/webhooks", headers=headers).json()["data"]
    assert [(d["event_type"], d["status"], d["attempts"]) for d in log] == [
        ("canceled", "delivered", 1)
    ]
    assert log[0]["event_id"] == payload["id"] and log[0]["log"][0]["status_code"] == 204
    assert client.get(f"/v1/jobs/{job_id}/webhooks", headers=auth("other")).status_code == 404
    rotated = client.post("/v1/webhooks/secret/rotate", headers=headers).json()["secret"]
    assert rotated != secret and rotated.startswith("whsec_")


def test_batch_completed_is_sent_once_when_the_last_item_ends(
    make_client, auth, sessions, receiver: Receiver, tmp_path: Path
):
    client: TestClient = make_client()
    if client.app.state.services.settings.mode != "embedded":  # type: ignore[attr-defined]
        pytest.skip("loopback receivers are allowed in embedded mode only")
    headers = auth("acme")
    body = {
        "kind": "guided",
        "classes": [1, 2, 3],
        "webhook": {"url": receiver.url, "events": ["succeeded", "batch.completed"]},
    }
    batch = client.post("/v1/batches", json=body, headers=headers).json()
    with sessions() as s:
        first = s.scalars(select(Job).where(Job.item_index == 0)).one()
        assert repo.claim_job(s, job_id=first.id, worker={}) is not None
        assert repo.finish_job(
            s, job_id=first.id, attempt=1, result={"summary": {}, "artifacts": []}
        )
        s.commit()
    client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers)
    send(sessions, tmp_path)
    secret = client.get("/v1/webhooks/secret", headers=headers).json()["secret"]
    payloads = [verify(r, secret) for r in receiver.requests]
    assert sorted(p["type"] for p in payloads) == ["batch.completed", "succeeded"]
    done = next(p for p in payloads if p["type"] == "batch.completed")
    assert done["data"]["id"] == batch["id"] and done["data"]["status"] == "canceled"
    assert done["data"]["counts"]["succeeded"] == 1 and done["data"]["counts"]["canceled"] == 2
    log = client.get(f"/v1/batches/{batch['id']}/webhooks", headers=headers).json()["data"]
    assert sorted(d["event_type"] for d in log) == ["batch.completed", "succeeded"]
