"""Webhooks (docs/architecture.md §9.10): Standard Webhooks signatures and the guard against
private targets.

A delivery is a POST of a JSON body with three headers (https://www.standardwebhooks.com):

    webhook-id:        the event id (`evt_…`), the same on every retry of the event
    webhook-timestamp: Unix seconds of this attempt
    webhook-signature: v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">

keyed with the tenant's secret `whsec_<base64 key>` (`digin keys webhook-secret --tenant NAME`,
or `GET /v1/webhooks/secret`). Receivers verify with `verify_signature` (or any Standard Webhooks
library) and reject timestamps more than five minutes off.

Targets are checked when a webhook is submitted and again before every attempt (DNS may change
in between): https only, and every address the host resolves to must be public. Embedded mode
(one machine, development) also allows http and loopback addresses, never other private ones.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

JOB_EVENTS = ("running", "succeeded", "failed", "canceled")
BATCH_EVENTS = ("batch.completed",)
EVENTS = (*JOB_EVENTS, *BATCH_EVENTS)
DEFAULT_JOB_EVENTS = ("succeeded", "failed", "canceled")
DEFAULT_BATCH_EVENTS = ("batch.completed",)
SECRET_PREFIX = "whsec_"
TOLERANCE_S = 300  # receivers refuse timestamps further off than this
MAX_URL = 2048

Resolver = Callable[[str, int], Sequence[str]]


class UnsafeWebhookUrl(ValueError):
    """The URL may not receive webhooks; the message says why."""


def new_secret() -> str:
    """A tenant's signing secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with 'whsec_'")
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256>`."""
    message = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, event_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The headers of one delivery attempt (a fresh timestamp and signature, the same id)."""
    timestamp = int(time.time() if now is None else now)
    return {
        "content-type": "application/json",
        "user-agent": "digin-webhooks/1",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, event_id, timestamp, body),
    }


def verify_signature(
    secret: str,
    *,
    webhook_id: str,
    webhook_timestamp: str,
    webhook_signature: str,
    body: bytes,
    now: float | None = None,
    tolerance: int = TOLERANCE_S,
) -> bool:
    """What a receiver does: the timestamp is recent and one of the space-separated `v1,…`
    signatures matches (constant-time)."""
    try:
        timestamp = int(webhook_timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, webhook_id, timestamp, body)
    return any(hmac.compare_digest(expected, s) for s in webhook_signature.split())


# --- the target guard -------------------------------------------------------------------------
def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def check_url(url: str, *, allow_loopback: bool, resolve: Resolver = system_resolver) -> list[str]:
    """The addresses to send to, or UnsafeWebhookUrl: https (http only to loopback when
    `allow_loopback`), no credentials, and every resolved address public (or loopback when
    allowed); private, link-local, multicast, reserved and unspecified addresses are refused."""
    if len(url) > MAX_URL:
        raise UnsafeWebhookUrl(f"the URL is {len(url)} characters; the limit is {MAX_URL}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeWebhookUrl(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http"):
        raise UnsafeWebhookUrl(f"the scheme must be https, got {parts.scheme or 'none'!r}")
    host = parts.hostname
    if not host:
        raise UnsafeWebhookUrl("the URL has no host")
    if parts.username or parts.password:
        raise UnsafeWebhookUrl("credentials in the URL are not allowed")
    try:
        addresses = list(resolve(host, port or (443 if parts.scheme == "https" else 80)))
    except OSError as exc:
        raise UnsafeWebhookUrl(f"the host {host!r} does not resolve: {exc}") from None
    if not addresses:
        raise UnsafeWebhookUrl(f"the host {host!r} does not resolve")
    loopback = []
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address.is_loopback:
            if not allow_loopback:
                raise UnsafeWebhookUrl(
                    f"{host!r} resolves to the loopback address {address}; loopback targets "
                    "are allowed only in embedded mode"
                )
            loopback.append(address)
        elif not address.is_global or address.is_multicast:
            raise UnsafeWebhookUrl(
                f"{host!r} resolves to {address}, a private, link-local or reserved address; "
                "webhooks go to public addresses only"
            )
    if parts.scheme == "http" and len(loopback) != len(addresses):
        raise UnsafeWebhookUrl("the scheme must be https (http is allowed only to loopback)")
    return addresses


def checked_webhook(
    url: str,
    events: Sequence[str] | None,
    *,
    allowed: Sequence[str],
    defaults: Sequence[str],
    allow_loopback: bool,
    resolve: Resolver = system_resolver,
) -> dict[str, object]:
    """The webhook as a job or batch row stores it ({url, events}), or ValueError naming the
    field (`webhook.url`, `webhook.events`) and what is wrong."""
    chosen = list(dict.fromkeys(events)) if events else list(defaults)
    bad = [e for e in chosen if e not in allowed]
    if bad:
        raise ValueError(f"webhook.events: {bad} do not apply here; choose from {list(allowed)}")
    try:
        check_url(url, allow_loopback=allow_loopback, resolve=resolve)
    except UnsafeWebhookUrl as exc:
        raise ValueError(f"webhook.url: {exc}") from None
    return {"url": url, "events": chosen}
