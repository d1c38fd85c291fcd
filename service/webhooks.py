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
in between): https only, no control characters or whitespace, and every address the host
resolves to must be public, in whatever encoding (IPv4 inside IPv6, numeric host forms). Embedded
mode (one machine, development) also allows http and loopback addresses, never other private ones.
The check before an attempt (`vet_target`) resolves the host once and the sender connects to one
of the addresses it checked, with TLS and the `Host` header still naming the host: a name that
resolves differently a moment later (DNS rebinding) cannot redirect the request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

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
class UnresolvedHost(UnsafeWebhookUrl):
    """The host name did not resolve (at send time this may pass: the sender retries)."""


@dataclass(frozen=True)
class Target:
    """A vetted webhook target: connect to one of `addresses` (each checked), and speak to
    `host` there (TLS server name and certificate, `Host` header)."""

    scheme: str  # https, or http (only when every address is loopback)
    host: str  # lowercase ASCII (IDNA) name without a trailing dot, or an IP address
    port: int
    request_target: str  # path and query, percent-encoded ASCII ("/" at least)
    addresses: tuple[str, ...]  # in the resolver's order; IPv4-mapped ones as plain IPv4
    literal: bool  # the URL names an IP address rather than a host name

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA), in the system's order of preference."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _nets(*pairs: tuple[str, str]) -> list[tuple[_Net, str]]:
    return [(ipaddress.ip_network(net), why) for net, why in pairs]


# IANA's special-purpose registries and RFC 1918/6598/5737/3849/9637; `is_global` is the backstop
_V4_REFUSED = _nets(
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) private address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "a reserved (IETF protocol assignment) address"),
    ("192.0.2.0/24", "a reserved (documentation) address"),
    ("192.88.99.0/24", "a reserved (6to4 relay) address"),
    ("192.168.0.0/16", "a private address"),
    ("198.18.0.0/15", "a reserved (benchmarking) address"),
    ("198.51.100.0/24", "a reserved (documentation) address"),
    ("203.0.113.0/24", "a reserved (documentation) address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
)
_V6_REFUSED = _nets(
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("::/96", "an IPv4-compatible (deprecated) address"),
    ("::ffff:0:0:0/96", "an IPv4-translated address"),
    ("64:ff9b:1::/48", "a local-use NAT64 (private) address"),
    ("100::/64", "a reserved (discard) address"),
    ("2001::/32", "a Teredo tunnel address"),
    ("2001::/23", "a reserved (IETF protocol assignment) address"),
    ("2001:db8::/32", "a reserved (documentation) address"),
    ("3fff::/20", "a reserved (documentation) address"),
    ("fc00::/7", "a unique-local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local (deprecated, private) address"),
    ("ff00::/8", "a multicast address"),
)
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _v4_problem(address: ipaddress.IPv4Address) -> str | None:
    for net, why in _V4_REFUSED:
        if address in net:
            return why
    return None if address.is_global else "not a public address"


def address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a webhook may not go to `address` (None: it is public). IPv4 carried inside IPv6
    (mapped, 6to4, NAT64) is judged by the IPv4 address; loopback is a problem here too."""
    if isinstance(address, ipaddress.IPv4Address):
        return _v4_problem(address)
    if address.scope_id:
        return "an address with a zone id (link scope)"
    if address.ipv4_mapped is not None:
        return _v4_problem(address.ipv4_mapped)
    embedded = None
    if address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    elif address.sixtofour is not None:
        embedded = address.sixtofour
    if embedded is not None:
        why = _v4_problem(embedded)
        kind = "NAT64" if address in _NAT64 else "6to4"
        return None if why is None else f"a {kind} address embedding {embedded}, {why}"
    for net, why in _V6_REFUSED:
        if address in net:
            return why
    if address not in _GLOBAL_UNICAST:
        return "a reserved address"
    return None if address.is_global else "not a public address"


def _is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_loopback and not (
        isinstance(address, ipaddress.IPv6Address) and address.scope_id
    )


_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
_LOCAL_SUFFIXES = (".localhost", ".local", ".localdomain", ".internal", ".home.arpa")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# what a path or query keeps as it is; everything else (spaces are refused before) is %-encoded
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"


def _refuse_characters(url: str) -> None:
    for index, char in enumerate(url):
        if char.isspace() or unicodedata.category(char)[0] in "CZ":
            raise UnsafeWebhookUrl(
                f"the URL contains {char!r} at position {index}: control characters and "
                "whitespace are not allowed (percent-encode them)"
            )
    if "\\" in url:
        raise UnsafeWebhookUrl("the URL contains a backslash (percent-encode it as %5C)")


def _host(netloc: str, hostname: str, *, allow_loopback: bool) -> tuple[str, bool]:
    """The URL's host, canonical (lowercase ASCII, no trailing dot), and whether it is an IP
    address; refuses zone ids, IPv4 in any form other than four decimal numbers, and names of
    the machine itself or of local networks (unless loopback is allowed)."""
    if "%" in hostname:
        raise UnsafeWebhookUrl("zone ids and percent-encoding are not allowed in the host")
    if "[" in netloc:
        try:
            return str(ipaddress.IPv6Address(hostname)), True
        except ValueError:
            raise UnsafeWebhookUrl(f"{hostname!r} is not an IPv6 address") from None
    try:  # (IDNA also turns the other full stops, such as U+3002, into ".")
        host = hostname.encode("idna").decode("ascii").lower().removesuffix(".")
    except UnicodeError:
        raise UnsafeWebhookUrl(f"{hostname!r} is not a valid host name") from None
    if not host:
        raise UnsafeWebhookUrl("the URL has no host")
    if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        try:  # accepts only a.b.c.d in decimal without leading zeros
            return str(ipaddress.IPv4Address(host)), True
        except ValueError:
            raise UnsafeWebhookUrl(
                f"{hostname!r} is not a host name, and an IPv4 address must be written as four "
                "decimal numbers (a.b.c.d, no leading zeros)"
            ) from None
    if len(host) > 253 or not _NAME.fullmatch(host):
        raise UnsafeWebhookUrl(f"{hostname!r} is not a valid host name")
    if not allow_loopback:
        if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
            raise UnsafeWebhookUrl(
                f"{host!r} names the loopback; loopback targets are allowed only in embedded mode"
            )
        if host.endswith(_LOCAL_SUFFIXES) or "." not in host:
            raise UnsafeWebhookUrl(
                f"{host!r} is a local name; webhooks go to public host names only"
            )
    return host, False


def vet_target(url: str, *, allow_loopback: bool, resolve: Resolver = system_resolver) -> Target:
    """The target to connect to, or UnsafeWebhookUrl (UnresolvedHost when the name does not
    resolve): https (http only when every address is loopback and loopback is allowed), no
    credentials, no control characters or whitespace, and every address the host resolves to
    (resolved here once: the sender connects to these, never resolving again) public, or
    loopback when `allow_loopback`; private, shared, link-local, unique-local, multicast,
    unspecified and reserved addresses are refused in every encoding (IPv4-mapped, -compatible,
    6to4, NAT64, Teredo; IPv4 hosts in decimal, hex, octal or short forms; zone ids)."""
    if len(url) > MAX_URL:
        raise UnsafeWebhookUrl(f"the URL is {len(url)} characters; the limit is {MAX_URL}")
    _refuse_characters(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeWebhookUrl(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http"):
        raise UnsafeWebhookUrl(f"the scheme must be https, got {parts.scheme or 'none'!r}")
    if "@" in parts.netloc:
        raise UnsafeWebhookUrl("credentials in the URL are not allowed")
    if not parts.hostname:
        raise UnsafeWebhookUrl("the URL has no host")
    if port == 0:
        raise UnsafeWebhookUrl("port 0 cannot receive webhooks")
    host, literal = _host(parts.netloc, parts.hostname, allow_loopback=allow_loopback)
    port = port or (443 if parts.scheme == "https" else 80)
    if literal:
        texts: list[str] = [host]
    else:
        try:
            texts = list(dict.fromkeys(resolve(host, port)))
        except (OSError, UnicodeError) as exc:
            raise UnresolvedHost(f"the host {host!r} does not resolve: {exc}") from None
        if not texts:
            raise UnresolvedHost(f"the host {host!r} does not resolve")
    addresses: list[str] = []
    loopback = 0
    for text in texts:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise UnsafeWebhookUrl(f"{host!r} resolves to {text!r}, not an address") from None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # connect over IPv4 to what was checked
        if _is_loopback(address):
            if not allow_loopback:
                raise UnsafeWebhookUrl(
                    f"{host!r} resolves to the loopback address {address}; loopback targets "
                    "are allowed only in embedded mode"
                )
            loopback += 1
        elif (why := address_problem(address)) is not None:
            raise UnsafeWebhookUrl(
                f"{host!r} resolves to {address}, {why}; webhooks go to public addresses only"
            )
        addresses.append(str(address))
    if parts.scheme == "http" and loopback != len(addresses):
        raise UnsafeWebhookUrl("the scheme must be https (http is allowed only to loopback)")
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    query = quote(parts.query, safe=_PATH_SAFE + "?")
    return Target(
        scheme=parts.scheme,
        host=host,
        port=port,
        request_target=path + (f"?{query}" if parts.query else ""),
        addresses=tuple(dict.fromkeys(addresses)),
        literal=literal,
    )


def check_url(url: str, *, allow_loopback: bool, resolve: Resolver = system_resolver) -> list[str]:
    """The vetted addresses of the URL's host, or UnsafeWebhookUrl (see `vet_target`)."""
    return list(vet_target(url, allow_loopback=allow_loopback, resolve=resolve).addresses)


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
