"""The webhook address guard and the sender's connection: every non-public address refused in
every encoding, URLs with control characters refused at submit, the connection pinned to the
address that was checked (DNS rebinding), TLS still verified for the host name, and a round that
goes on past any one delivery's failure. Receivers are real HTTP(S) servers on loopback."""

from __future__ import annotations

import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from digin.service.db import Tenant, WebhookDelivery, utcnow
from digin.service.repo import webhooks as repo_webhooks
from digin.service.settings import Settings, fresh_settings
from digin.service.webhooks import UnsafeWebhookUrl, check_url, vet_target
from digin.worker.webhooks import SendReport, send_due

PUBLIC = "93.184.215.14"


def public_for_every_name(host: str, port: int) -> list[str]:
    """A resolver that answers a public address for any name (as a DNS server may): what the
    URL's host means must not depend on it."""
    return [PUBLIC]


def answering(addresses: Sequence[str]) -> Callable[[str, int], list[str]]:
    return lambda host, port: list(addresses)


# --- addresses in every encoding --------------------------------------------------------------
REFUSED_ADDRESSES = [
    ("::127.0.0.1", "IPv4-compatible"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.1.2.3", "private"),
    ("::ffff:0:127.0.0.1", "IPv4-translated"),
    ("2002:7f00:1::", "6to4 address embedding 127.0.0.1"),
    ("2002:a00:1::1", "6to4 address embedding 10.0.0.1"),
    ("2002:a9fe:a9fe::1", "embedding 169.254.169.254, a link-local"),
    ("64:ff9b::127.0.0.1", "NAT64 address embedding 127.0.0.1"),
    ("64:ff9b::10.0.0.1", "NAT64 address embedding 10.0.0.1"),
    ("64:ff9b::100.64.0.1", "NAT64 address embedding 100.64.0.1"),
    ("64:ff9b:1::a00:1", "local-use NAT64"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("5f00::1", "reserved"),
    ("100::1", "reserved"),
    ("fec0::1", "site-local"),
    ("fd12:3456::1", "unique-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "zone id"),
    ("ff02::1", "multicast"),
    ("::", "unspecified"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("100.64.0.1", "shared"),
    ("192.0.0.8", "IETF protocol assignment"),
    ("192.0.2.1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
]


@pytest.mark.parametrize("allow_loopback", [False, True])
@pytest.mark.parametrize(("address", "why"), REFUSED_ADDRESSES)
def test_every_encoding_of_a_non_public_address_is_refused(
    address: str, why: str, allow_loopback: bool
):
    url, resolve = "https://hooks.example.com/x", answering([PUBLIC, address])
    if allow_loopback and address == "::ffff:127.0.0.1":  # loopback: allowed in embedded mode
        assert check_url(url, allow_loopback=True, resolve=resolve) == [PUBLIC, "127.0.0.1"]
        return
    with pytest.raises(UnsafeWebhookUrl, match=why):
        check_url(url, allow_loopback=allow_loopback, resolve=resolve)


@pytest.mark.parametrize(
    ("address", "connect_to"),
    [
        (PUBLIC, PUBLIC),
        ("::ffff:93.184.215.14", PUBLIC),  # mapped: connect over IPv4 to what was checked
        ("2002:5db8:d70e::1", "2002:5db8:d70e::1"),  # 6to4 of a public IPv4
        ("64:ff9b::5db8:d70e", "64:ff9b::5db8:d70e"),  # NAT64 of a public IPv4
        ("2606:4700::1111", "2606:4700::1111"),
    ],
)
def test_public_addresses_pass_in_their_encodings(address: str, connect_to: str):
    url = "https://hooks.example.com/x"
    assert check_url(url, allow_loopback=False, resolve=answering([address])) == [connect_to]


@pytest.mark.parametrize("allow_loopback", [False, True])
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://2130706433/", "four decimal numbers"),
        ("http://0x7f.1/", "four decimal numbers"),
        ("http://0x7f000001/", "four decimal numbers"),
        ("http://0177.0.0.1/", "four decimal numbers"),
        ("http://127.1/", "four decimal numbers"),
        ("https://1572395790/", "four decimal numbers"),  # a public address, still refused
        ("https://93.184.215.014/", "four decimal numbers"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://[::127.0.0.1]/", "IPv4-compatible"),
        ("https://[64:ff9b::a00:1]/", "NAT64"),
        ("https://[2002:c0a8:101::1]/", "6to4"),
        ("https://[fe80::1%25eth0]/", "zone id"),
        ("https://[::1%25lo]/", "zone id"),
        ("https://10.0.0.1/", "private"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
    ],
)
def test_hosts_are_judged_by_what_they_mean_not_by_what_a_resolver_answers(
    url: str, why: str, allow_loopback: bool
):
    if allow_loopback and why == "loopback":  # allowed in embedded mode, connected to as IPv4
        assert check_url(url, allow_loopback=True, resolve=public_for_every_name) == ["127.0.0.1"]
        return
    with pytest.raises(UnsafeWebhookUrl, match=why):
        check_url(url, allow_loopback=allow_loopback, resolve=public_for_every_name)


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost/h",
        "https://LOCALHOST./h",
        "https://hooks.localhost/h",
        "https://ip6-localhost/h",
        "https://printer.local/h",
        "https://metadata.google.internal/h",
        "https://router.home.arpa/h",
        "https://metadata/h",  # one label: a name of the local network
    ],
)
def test_names_of_the_machine_and_local_networks_are_refused_in_production(url: str):
    with pytest.raises(UnsafeWebhookUrl, match="loopback|local name"):
        check_url(url, allow_loopback=False, resolve=public_for_every_name)


def test_loopback_names_pass_in_embedded_mode_only_to_loopback():
    assert check_url("http://hooks.localhost/h", allow_loopback=True, resolve=answering(
        ["127.0.0.1", "::1"])) == ["127.0.0.1", "::1"]  # fmt: skip
    with pytest.raises(UnsafeWebhookUrl, match="https"):
        check_url("http://hooks.localhost/h", allow_loopback=True, resolve=answering([PUBLIC]))
    with pytest.raises(UnsafeWebhookUrl, match="private"):
        check_url("http://localhost/h", allow_loopback=True, resolve=answering(["10.0.0.1"]))


# --- characters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("allow_loopback", [False, True])
@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/h\r\nX-Injected: 1",
        "https://hooks.example.com/h\nx",
        "https://hooks.example.com/h\rx",
        "https://hooks.example.com/\th",
        "\thttps://hooks.example.com/h",
        "https://hooks.example.com/h ",
        "https://hooks.example.com/a b",
        "https://hooks.example.com/h\x00",
        "https://hooks.example.com/h\x7f",
        "https://hooks.example.com/h\x85",
        "https://hooks.example.com/h\u2028",
        "https://hooks.example.com/h\u00a0",
        "https://hooks.exa\u200bmple.com/h",
        "https://hooks.example.com\r\n.evil.example/h",
    ],
)
def test_control_characters_and_whitespace_are_refused(url: str, allow_loopback: bool):
    with pytest.raises(UnsafeWebhookUrl, match="control characters and whitespace"):
        check_url(url, allow_loopback=allow_loopback, resolve=answering([PUBLIC]))


def test_the_target_names_the_host_as_tls_and_http_will():
    t = vet_target(
        "https://Hooks.Example.COM./p/\u00fc%20x?q=\u00fc&r=%41#fragment",
        allow_loopback=False,
        resolve=answering([PUBLIC, "2606:4700::1111", PUBLIC]),
    )
    assert (t.scheme, t.host, t.port, t.literal) == ("https", "hooks.example.com", 443, False)
    assert t.addresses == (PUBLIC, "2606:4700::1111")
    assert t.request_target == "/p/%C3%BC%20x?q=%C3%BC&r=%41"
    assert t.host_header == "hooks.example.com"
    idn = vet_target("https://b\u00fccher.example:8443", allow_loopback=False, resolve=answering(
        [PUBLIC]))  # fmt: skip
    assert (idn.host, idn.host_header, idn.request_target) == (
        "xn--bcher-kva.example", "xn--bcher-kva.example:8443", "/"
    )  # fmt: skip
    v6 = vet_target("https://[2606:4700:0::1111]:8443/h", allow_loopback=False)
    assert (v6.host, v6.literal, v6.addresses) == ("2606:4700::1111", True, ("2606:4700::1111",))
    assert v6.host_header == "[2606:4700::1111]:8443"


# --- real servers -------------------------------------------------------------------------------
@dataclass
class Server:
    port: int
    requests: list[dict[str, Any]] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)  # SNI of each TLS handshake
    connections: int = 0


@contextmanager
def serve(
    host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
) -> Iterator[Server]:
    """An HTTP/1.1 (keep-alive) receiver answering 204, optionally over TLS."""
    state = Server(port=0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["content-length"]))
            state.requests.append({"host": self.headers["host"], "path": self.path, "body": body})
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    class Counting(ThreadingHTTPServer):
        def get_request(self) -> tuple[socket.socket, Any]:
            state.connections += 1
            return super().get_request()

    if tls is not None:
        tls.sni_callback = lambda _sock, name, _ctx: state.server_names.append(name)
    server = Counting((host, port), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def embedded(tmp_path: Path) -> Settings:
    return fresh_settings(data_dir=tmp_path / "embedded", webhook_backoff_seconds=0.5)


def production(tmp_path: Path) -> Settings:
    settings = fresh_settings(
        data_dir=tmp_path / "production", database_url="postgresql://x@h/db", auth="on"
    )
    assert settings.mode == "production"
    return settings


def add_delivery(
    session: Session, tenant: Tenant, url: str, *, order: int, max_attempts: int = 8
) -> str:
    """A delivery row as the outbox stores it (inserted directly: any URL); due now, sent in
    `order`."""
    ident = f"evt_{uuid.uuid4().hex}"
    at = utcnow() - timedelta(minutes=5) + timedelta(seconds=order)
    row = repo_webhooks.delivery_row(
        tenant_id=tenant.id, event="canceled", ident=ident, url=url, data={"order": order},
        now=at, max_attempts=max_attempts,
    )  # fmt: skip
    repo_webhooks.add_deliveries(session, [row])
    session.commit()
    return ident


def rows(sessions: sessionmaker[Session]) -> dict[str, WebhookDelivery]:
    with sessions() as s:
        return {d.event_id: d for d in s.scalars(select(WebhookDelivery))}


class Rebinding:
    """socket.getaddrinfo as a rebinding DNS server answers one name: `first` on the first
    lookup, `later` on every other; every other name and address as the system answers."""

    def __init__(self, name: str, first: str, later: str) -> None:
        self.name, self.first, self.later = name, first, later
        self.lookups = 0
        self.real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        text = host.decode() if isinstance(host, bytes) else host
        if text == self.name:
            self.lookups += 1
            host = self.first if self.lookups == 1 else self.later
        return self.real(host, port, *args, **kwargs)


# --- DNS rebinding ------------------------------------------------------------------------------
def test_a_name_rebound_to_loopback_after_the_check_is_never_connected_to(
    sessions, session, tenant, tmp_path, monkeypatch
):
    """Production: the name answers a public address when checked and 127.0.0.1 afterwards.
    The request goes to the public address (unreachable here) or nowhere, never to loopback."""
    with serve() as loopback:
        rebind = Rebinding("rebind.example.com", first=PUBLIC, later="127.0.0.1")
        monkeypatch.setattr(socket, "getaddrinfo", rebind)
        ident = add_delivery(
            session, tenant, f"https://rebind.example.com:{loopback.port}/hook", order=0
        )
        with httpx.Client(timeout=2) as client:
            report = send_due(sessions=sessions, settings=production(tmp_path), client=client)
        assert loopback.connections == 0 and loopback.requests == []
    assert rebind.lookups == 1  # resolved once, for the check; connected to what it answered
    assert report.retrying == [ident]
    row = rows(sessions)[ident]
    assert row.status == "pending" and row.attempts == 1 and "Connect" in (row.last_error or "")


def test_the_request_goes_to_the_address_that_was_checked(
    sessions, session, tenant, tmp_path, monkeypatch
):
    """Embedded: the name answers 127.0.0.1 when checked and 127.0.0.2 afterwards; the receiver
    on 127.0.0.1 gets the delivery, with the name in the Host header, and 127.0.0.2 nothing."""
    with ExitStack() as stack:
        for _ in range(20):  # one port free on both addresses
            other = stack.enter_context(serve("127.0.0.2"))
            try:
                checked = stack.enter_context(serve("127.0.0.1", other.port))
                break
            except OSError:
                continue
        else:
            pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")
        rebind = Rebinding("rebind.example.com", first="127.0.0.1", later="127.0.0.2")
        monkeypatch.setattr(socket, "getaddrinfo", rebind)
        ident = add_delivery(
            session, tenant, f"http://rebind.example.com:{checked.port}/hook?x=1", order=0
        )
        with httpx.Client(timeout=5) as client:
            report = send_due(sessions=sessions, settings=embedded(tmp_path), client=client)
    assert other.connections == 0 and other.requests == []
    assert report.delivered == [ident] and rebind.lookups == 1
    (request,) = checked.requests
    assert request["host"] == f"rebind.example.com:{checked.port}"
    assert request["path"] == "/hook?x=1"


# --- TLS to the checked address -----------------------------------------------------------------
def certificates(tmp_path: Path, names: list[str]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A test CA and a server certificate for `names`: (server context, client context)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "digin webhook test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "server.pem").write_bytes(
        leaf.public_bytes(pem)
        + key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "server.pem")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    return server, client


def test_tls_goes_to_the_checked_address_and_verifies_the_host_name(
    sessions, session, tenant, tmp_path
):
    """The sender connects to the checked 127.0.0.1 (the names exist only in the test's
    resolver) and still sends each name as SNI, checks the certificate against it and names it
    in the Host header; a name the certificate does not cover fails its TLS handshake (that
    delivery is retried, the others are delivered), and no connection serves two names."""
    server_tls, client_tls = certificates(tmp_path, ["hooks.example.test", "alt.example.test"])
    resolve = answering(["127.0.0.1"])
    with serve(tls=server_tls) as receiver:
        port = receiver.port
        hooks = add_delivery(session, tenant, f"https://hooks.example.test:{port}/a", order=0)
        wrong = add_delivery(session, tenant, f"https://wrong.example.test:{port}/b", order=1)
        alt = add_delivery(session, tenant, f"https://alt.example.test:{port}/c", order=2)
        again = add_delivery(session, tenant, f"https://hooks.example.test:{port}/d", order=3)
        with httpx.Client(timeout=5, verify=client_tls) as client:
            report = send_due(
                sessions=sessions, settings=embedded(tmp_path), client=client, resolve=resolve
            )
    assert report.delivered == [hooks, alt, again] and report.retrying == [wrong]
    assert [(r["host"], r["path"]) for r in receiver.requests] == [
        (f"hooks.example.test:{port}", "/a"),
        (f"alt.example.test:{port}", "/c"),
        (f"hooks.example.test:{port}", "/d"),
    ]
    assert receiver.server_names == [
        "hooks.example.test", "wrong.example.test", "alt.example.test", "hooks.example.test"
    ]  # fmt: skip
    error = rows(sessions)[wrong].last_error or ""
    assert "ConnectError" in error and "certificate" in error.lower()


# --- one bad delivery does not stop a round -----------------------------------------------------
def test_a_round_goes_on_past_any_bad_delivery(
    sessions: sessionmaker[Session], session: Session, tenant: Tenant, tmp_path: Path
):
    """Stored rows the sender cannot send (a URL with CR/LF written before it was refused, a
    resolver that raises, a name that does not resolve) are each that delivery's attempt: the
    good deliveries after them go in the same round."""

    def resolve(host: str, port: int) -> list[str]:
        if host.startswith("explodes"):
            raise RuntimeError("the resolver broke")
        if host == "127.0.0.1":
            return [host]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with serve() as receiver:
        base = f"http://127.0.0.1:{receiver.port}"
        crlf = add_delivery(session, tenant, f"{base}/ho\r\nok", order=0)
        explodes = add_delivery(session, tenant, "https://explodes.example.com/h", order=1)
        first = add_delivery(session, tenant, f"{base}/one", order=2)
        unresolved = add_delivery(session, tenant, "https://no-such-host.example.com/h", order=3)
        last_try = add_delivery(
            session, tenant, "https://explodes-again.example.com/h", order=4, max_attempts=1
        )
        second = add_delivery(session, tenant, f"{base}/two", order=5)
        with httpx.Client(timeout=5) as client:
            report: SendReport = send_due(
                sessions=sessions, settings=embedded(tmp_path), client=client, resolve=resolve
            )
    assert report.delivered == [first, second]
    assert [r["path"] for r in receiver.requests] == ["/one", "/two"]
    assert report.failed == [crlf, last_try] and report.retrying == [explodes, unresolved]
    stored = rows(sessions)
    assert stored[crlf].status == "failed" and stored[crlf].attempts == 1
    assert "control characters" in (stored[crlf].last_error or "")
    assert stored[explodes].status == "pending" and stored[explodes].attempts == 1
    assert "RuntimeError: the resolver broke" in (stored[explodes].last_error or "")
    assert stored[unresolved].status == "pending" and "does not resolve" in (
        stored[unresolved].last_error or ""
    )
    assert stored[last_try].status == "failed" and stored[last_try].attempts == 1


# --- through the API ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url", ["https://93.184.215.14/h\r\nX-Injected: 1", "https://93.184.215.14/a b"]
)
def test_the_api_refuses_urls_with_control_characters(make_client, auth, sessions, url: str):
    client: TestClient = make_client()
    headers = auth("acme")
    job = {"kind": "guided", "params": {"classes": [3]}, "webhook": {"url": url}}
    batch = {"kind": "guided", "classes": [1, 2], "webhook": {"url": url}}
    for path, body in (("/v1/jobs", job), ("/v1/batches", batch)):
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 422, response.text
        (error,) = response.json()["errors"]
        assert error["field"] == "webhook.url"
        assert "control characters and whitespace" in error["message"]
    with sessions() as s:
        assert s.scalars(select(WebhookDelivery)).all() == []
