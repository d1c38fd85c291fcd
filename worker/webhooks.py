"""The webhook sender (docs/architecture.md §9.10): posts due deliveries, outside the API's
request path.

Runs as a thread of `digin serve` and `digin reaper`, and as the Celery beat task
`digin.send_webhooks`. Each round leases up to `batch` due deliveries (so that several senders
never post the same one at once), checks the target again (the host is resolved and must still
be public; loopback only in embedded mode), signs the stored body with the tenant's secret and a
fresh timestamp (the `webhook-id` stays the event id), posts it, and records the attempt: a 2xx
is delivered; anything else is retried after DIGIN_WEBHOOK_BACKOFF_SECONDS × 2^(attempt-1)
(at most an hour) until the delivery's attempts are used up; an unsafe target fails at once.
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
from digin.service.webhooks import Resolver, UnsafeWebhookUrl, check_url, headers, system_resolver

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
            check_url(url, allow_loopback=allow_loopback, resolve=resolve)
            body = payload.encode()
            response = client.post(url, content=body, headers=headers(secret, ident, body))
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}: {response.text[:200]}"
        except UnsafeWebhookUrl as exc:
            error, retry_in = f"refused: {exc}", None  # not retried: the target is unsafe
        except httpx.HTTPError as exc:
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
