"""The webhook sender (docs/architecture.md §9.10): posts due deliveries, outside the API's
request path.

Runs as a thread of `digin serve` and `digin reaper`, and as the Celery beat task
`digin.send_webhooks`. Each round leases up to `batch` due deliveries (so that several senders
never post the same one at once), checks the target again (`vet_target`: the host is resolved
once and every address must still be public; loopback only in embedded mode), signs the stored
body with the tenant's secret and a fresh timestamp (the `webhook-id` stays the event id), posts
it to one of the checked addresses (never resolving the name again; TLS verifies the
certificate for the host name, sent as SNI and in the `Host` header), and records the attempt: a
2xx is delivered; anything else is retried after DIGIN_WEBHOOK_BACKOFF_SECONDS × 2^(attempt-1)
(at most an hour) until the delivery's attempts are used up; an unsafe target fails at once.
One delivery's failure, whatever it is, is that delivery's attempt: the round goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import httpx
from sqlalchemy.orm import Session, sessionmaker

from digin.service.db import session_scope, utcnow
from digin.service.repo import webhooks as repo_webhooks
from digin.service.webhooks import (
    Resolver,
    Target,
    UnresolvedHost,
    UnsafeWebhookUrl,
    headers,
    system_resolver,
    vet_target,
)

if TYPE_CHECKING:
    from digin.service.settings import Settings

log = logging.getLogger("digin.webhooks")

MAX_BACKOFF_S = 3600.0
LEASE_MARGIN_S = 30.0  # a leased delivery is skipped by other senders this long past the timeout


def backoff(settings: Settings, attempt: int) -> float:
    """Seconds before attempt `attempt + 1`: base × 2^(attempt-1), at most an hour."""
    return float(min(MAX_BACKOFF_S, settings.webhook_backoff_seconds * 2 ** max(0, attempt - 1)))


@dataclass
class SendReport:
    delivered: list[str] = field(default_factory=list)  # event ids
    retrying: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def send_due(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    client: httpx.Client,
    now: datetime | None = None,
    batch: int = 50,
    resolve: Resolver = system_resolver,
) -> SendReport:
    """One round: post every due delivery (up to `batch`) once."""
    report = SendReport()
    now = now or utcnow()
    lease = settings.webhook_timeout_seconds + LEASE_MARGIN_S
    with session_scope(sessions) as session:
        leased = repo_webhooks.lease_due(session, now=now, limit=batch, lease_seconds=lease)
        work = [(d.id, d.event_id, d.url, d.payload, d.attempts, secret) for d, secret in leased]
    allow_loopback = settings.mode == "embedded"
    for delivery_id, ident, url, payload, attempts, secret in work:
        status_code: int | None = None
        error: str | None = None
        retry_in: float | None = backoff(settings, attempts + 1)
        started = time.perf_counter()
        try:
            target = vet_target(url, allow_loopback=allow_loopback, resolve=resolve)
            body = payload.encode()
            response = post(
                client, target, body, headers(secret, ident, body),
                budget=settings.webhook_timeout_seconds,
            )  # fmt: skip
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}: {response.text[:200]}"
        except UnresolvedHost as exc:
            error = f"{exc}"  # retried: DNS may answer next time
        except UnsafeWebhookUrl as exc:
            error, retry_in = f"refused: {exc}", None  # not retried: the target is unsafe
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # anything else is this delivery's failed attempt, not the round's
            log.exception("webhook attempt raised", extra={"event_id": ident})
            error = f"{type(exc).__name__}: {exc}"
        duration_ms = (time.perf_counter() - started) * 1000
        with session_scope(sessions) as session:
            status = repo_webhooks.record_attempt(
                session, delivery_id=delivery_id, now=utcnow(), status_code=status_code,
                error=error, retry_in=retry_in, duration_ms=duration_ms,
            )  # fmt: skip
        if status == "delivered":
            report.delivered.append(ident)
        elif status == "failed":
            report.failed.append(ident)
        else:
            report.retrying.append(ident)
        fields = {"event_id": ident, "event": f"webhook_{status}", "status_code": status_code}
        if status == "delivered":
            log.info("webhook delivered", extra=fields)
        else:
            log.warning(f"webhook {status}: {error}", extra=fields)
    return report


def post(
    client: httpx.Client, target: Target, body: bytes, signed: dict[str, str], *, budget: float
) -> httpx.Response:
    """POST `body` to the vetted target: to its first address that accepts a connection (the
    next one is tried only after a failed connect, while less than `budget` seconds have
    passed), by IP, so the name is not resolved again; the `Host` header and, over https, the
    TLS server name and certificate check name the target's host. Each request asks for
    `connection: close`, so no connection is reused: not by a request for another host on the
    same address (whose certificate it never checked), nor after the name has moved. No
    redirects."""
    extensions = {} if target.literal or target.scheme != "https" else {"sni_hostname": target.host}
    sent = {**signed, "host": target.host_header, "connection": "close"}
    started = time.monotonic()
    failure: httpx.TransportError | None = None
    for address in target.addresses:
        if failure is not None and time.monotonic() - started >= budget:
            break
        url = httpx.URL(
            scheme=target.scheme, host=address, port=target.port,
            raw_path=target.request_target.encode("ascii"),
        )  # fmt: skip
        try:
            return client.post(
                url, content=body, headers=sent, extensions=extensions, follow_redirects=False
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent there
            failure = exc
    assert failure is not None  # a target has at least one address
    raise failure


def make_client(settings: Settings) -> httpx.Client:
    """No redirects (a redirect could point anywhere), no proxies from the environment."""
    return httpx.Client(
        timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False
    )


def run_sender(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    stop: threading.Event,
    interval: float | None = None,
) -> None:
    """Send due deliveries every `interval` seconds until `stop` is set."""
    interval = settings.webhook_interval_seconds if interval is None else interval
    log.info(f"webhook sender started (every {interval:g} s)", extra={"event": "sender_started"})
    with make_client(settings) as client:
        while not stop.is_set():
            try:
                report = send_due(sessions=sessions, settings=settings, client=client)
                busy = len(report.delivered) + len(report.retrying) + len(report.failed)
            except Exception:
                log.exception("webhook round failed", extra={"event": "sender_error"})
                busy = 0
            if not busy:
                stop.wait(interval)
    log.info("webhook sender stopped", extra={"event": "sender_stopped"})
