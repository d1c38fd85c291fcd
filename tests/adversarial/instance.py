"""The production-like instance the adversarial probes attack, and the tally of their attempts.

`Instance`: the API as a real process (`python -m digin api`, uvicorn) in production mode over
a fresh PostgreSQL database, a Redis broker (its own database number; it also holds the counts
of refused keys), S3 through moto's server with the real minio client, auth on, a real
DIGIN_SECRET_KEY, a small DIGIN_AUTH_FAILURE_RATE, a wildcard model allow-list with one model
root, and two tenants with their own keys. A Celery worker subprocess runs only while the
fixtures make tenant A's finished job (artifacts, thumbnails and webhook deliveries to probe).

The API process imports `dns_audit/sitecustomize.py` first (that folder leads its PYTHONPATH):
an audit hook (PEP 578) that
appends every host name the process resolves (`socket.getaddrinfo` and friends) to a file, so
that a probe can show a request caused no DNS lookup. It observes only: resolution still goes
to the system's resolver.

Every request names its client address in `X-Forwarded-For`: `digin api` runs uvicorn with
proxy headers, trusted from 127.0.0.1 (uvicorn's FORWARDED_ALLOW_IPS default), so the API
counts refused keys per forwarded address, as it would behind a reverse proxy. Probes that send
bad keys spread them over fresh addresses (and fresh key prefixes) unless they are about the
limit itself, so that only the brute-force probes meet a 429.

`Tally`: per probe class, attempts and passes (an attempt passes when the service refused or
isolated it as it should); written as JSON at the end of the run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx

from tests.reliability.stack import wait_until

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DNS_LOG_ENV = "DIGIN_TEST_DNS_LOG"  # read by dns_audit/sitecustomize.py in the API process
CSRF = re.compile(r'name="csrf" value="([^"]*)"')
PROBLEM = "application/problem+json"
# the instance's settings (what the probes are about)
AUTH_FAILURE_RATE = "5/minute"
MAX_ITEMS_PER_BATCH = 50
MAX_BODY_BYTES = 256 * 1024
PUBLIC_HOOK = "https://93.184.215.14/hooks/digin"  # a public address literal: no lookup
JOB_TIMEOUT_S = 240.0


_addresses = itertools.count(1)
_address_lock = threading.Lock()


def fresh_address() -> str:
    """A client address no request has used before (10.0.0.0/8, in order)."""
    with _address_lock:
        n = next(_addresses)
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


# --- the tally ------------------------------------------------------------------------------------
@dataclass
class ProbeClass:
    """One probe class: what is sent, what the right answer is and why, and the counts."""

    key: str  # "1" … "10"; "2b": the part of class 2 that the service gets wrong today
    name: str
    sent: str
    expected: str
    attempts: int = 0
    passes: int = 0
    known_gap: str | None = None  # why its test is an xfail: what the service gets wrong
    failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, failure: str | None) -> None:
        """One attempt: `failure` None if the service answered as it should, else what it did."""
        with self._lock:
            self.attempts += 1
            if failure is None:
                self.passes += 1
            elif len(self.failures) < 2000:
                self.failures.append(failure)

    def run(self, attempts: Iterable[Callable[[], str | None]], workers: int = 6) -> list[str]:
        """Run the attempts (each returns None when it passed, else what went wrong) on
        `workers` threads; the failures of this run."""
        found: list[str] = []

        def one(attempt: Callable[[], str | None]) -> None:
            try:
                failure = attempt()
            except Exception as exc:  # a transport error is a failed attempt, not a crash
                failure = f"{type(exc).__name__}: {exc}"
            self.record(failure)
            if failure is not None:
                found.append(failure)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, attempts))
        return found

    def as_json(self) -> dict[str, Any]:
        return {
            "class": self.key,
            "name": self.name,
            "sent": self.sent,
            "expected": self.expected,
            "attempts": self.attempts,
            "passes": self.passes,
            "known_gap": self.known_gap,
            "failures": self.failures[:20],
        }


class Tally:
    def __init__(self, classes: Iterable[ProbeClass]) -> None:
        self.classes = {c.key: c for c in classes}
        self.started = time.monotonic()
        self.instance: dict[str, Any] = {}

    def __getitem__(self, key: str) -> ProbeClass:
        return self.classes[key]

    def as_json(self) -> dict[str, Any]:
        return {
            "suite": "tests/adversarial",
            "wall_s": round(time.monotonic() - self.started, 1),
            "machine": machine(),
            "instance": self.instance,
            "classes": [c.as_json() for c in self.classes.values()],
        }

    def table(self) -> str:
        """Attempts and passes per class, as text for the terminal."""
        lines = [f"{'class':<6}{'probe class':<48}{'attempts':>9}{'passes':>9}"]
        for c in self.classes.values():
            gap = "  (xfail: a known gap)" if c.known_gap else ""
            lines.append(f"{c.key:<6}{c.name:<48}{c.attempts:>9}{c.passes:>9}{gap}")
        return "\n".join(lines)

    @property
    def ran(self) -> bool:
        return any(c.attempts for c in self.classes.values())


def machine() -> dict[str, Any]:
    import platform

    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpus": os.cpu_count(),
        "memory_gib": memory,
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
    }


# --- the instance ---------------------------------------------------------------------------------
@dataclass
class Tenant:
    name: str
    id: str
    key: str  # a bearer secret
    address: str  # the client address its ordinary requests come from

    @property
    def prefix(self) -> str:
        return self.key.split("_")[1]

    def headers(self, address: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "X-Forwarded-For": address or self.address}


@dataclass
class Instance:
    url: str
    values: dict[str, Any]  # settings, as fresh_settings() field values
    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    tenants: dict[str, Tenant] = field(default_factory=dict)
    fixtures: dict[str, Any] = field(default_factory=dict)  # ids of what the probes attack
    _sessions: Any = None
    _local: threading.local = field(default_factory=threading.local)
    _clients: list[httpx.Client] = field(default_factory=list)
    _clients_lock: threading.Lock = field(default_factory=threading.Lock)

    # --- processes ------------------------------------------------------------------------------
    @property
    def dns_log(self) -> Path:
        return self.folder / "dns.log"

    def env(self, *, observe_dns: bool = False) -> dict[str, str]:
        """The DIGIN_* variables of the settings (lists as JSON), nothing of the machine's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIGIN_")}
        env.pop("FORWARDED_ALLOW_IPS", None)  # uvicorn's default: trust 127.0.0.1 only
        for name, value in self.values.items():
            text = json.dumps([str(v) for v in value]) if isinstance(value, list) else str(value)
            env[f"DIGIN_{name.upper()}"] = text
        paths = [str(HERE / "dns_audit")] if observe_dns else []
        paths += [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env |= {"PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
        if observe_dns:
            env[DNS_LOG_ENV] = str(self.dns_log)
        return env

    def start_api(self) -> None:
        port = int(self.url.rsplit(":", 1)[1])
        argv = [sys.executable, "-m", "digin", "api", "--host", "127.0.0.1", "--port", str(port)]
        log = (self.folder / "api.log").open("ab")
        self.proc = subprocess.Popen(argv, cwd=self.folder, env=self.env(observe_dns=True),
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip

    def wait_ready(self, timeout: float = 90.0) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the API exited: {self.api_log()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(f"the API at {self.url}", up, timeout, 0.2)

    def api_log(self) -> str:
        return (self.folder / "api.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.close_clients()
        if self._sessions is not None:
            self._sessions.kw["bind"].dispose()

    def rss(self) -> int:
        """Resident memory of the API process, in bytes."""
        import psutil

        assert self.proc is not None
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def lookups(self) -> list[str]:
        """Every host name the API process has resolved so far."""
        if not self.dns_log.exists():
            return []
        return [json.loads(line) for line in self.dns_log.read_text().splitlines() if line]

    # --- the database, keys ---------------------------------------------------------------------
    @property
    def sessions(self) -> Any:
        if self._sessions is None:
            from digin.service.db import make_engine, session_factory

            self._sessions = session_factory(make_engine(self.values["database_url"]))
        return self._sessions

    def new_key(self, tenant: str, *, revoked: bool = False) -> str:
        """A new API key of `tenant` (created if missing), revoked at once if asked."""
        from digin.service import repo

        with self.sessions() as session:
            key, secret = repo.create_api_key(session, tenant_name=tenant)
            session.commit()
            if revoked:
                assert repo.revoke_api_key(session, prefix=key.prefix)
                session.commit()
        return secret

    def add_tenant(self, name: str) -> Tenant:
        from digin.service import repo

        key = self.new_key(name)
        with self.sessions() as session:
            tenant_id = repo.ensure_tenant(session, name=name).id
        tenant = Tenant(name, str(tenant_id), key, fresh_address())
        self.tenants[name] = tenant
        return tenant

    def rows_of(self, tenant_id: str) -> tuple[int, int]:
        """How many jobs and batches the tenant has."""
        from sqlalchemy import func, select

        from digin.service.db import Batch, Job

        owner = uuid.UUID(tenant_id)
        with self.sessions() as session:
            jobs = session.scalar(select(func.count()).where(Job.tenant_id == owner))
            batches = session.scalar(select(func.count()).where(Batch.tenant_id == owner))
        return int(jobs or 0), int(batches or 0)

    # --- HTTP -----------------------------------------------------------------------------------
    def client(self) -> httpx.Client:
        """This thread's client. It keeps no cookies: every request sends exactly the cookies
        its probe names."""
        client = getattr(self._local, "client", None)
        if client is None:
            jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))  # stores nothing
            client = httpx.Client(base_url=self.url, timeout=60, follow_redirects=False,
                                  cookies=jar)  # fmt: skip
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def close_clients(self) -> None:
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client().request(method, path, **kwargs)

    def raw(self, request: bytes, timeout: float = 30) -> bytes:
        """Send `request` as it is over a new connection; the whole answer (the server closes
        the connection: send `Connection: close`)."""
        port = int(self.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(request)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    # --- the dashboard --------------------------------------------------------------------------
    def anonymous_form(self, address: str) -> tuple[str, str]:
        """A fresh login form's (anonymous session cookie, its CSRF token)."""
        response = self.request("GET", "/ui/login", headers={"X-Forwarded-For": address})
        assert response.status_code == 200, response.text[:500]
        match = CSRF.search(response.text)
        assert match is not None
        return response.cookies["digin_session"], match.group(1)

    def login(self, tenant: Tenant, address: str | None = None) -> tuple[str, str]:
        """Log `tenant` in through the form: (its session cookie, the session's CSRF token)."""
        address = address or tenant.address
        cookie, csrf = self.anonymous_form(address)
        response = self.request(
            "POST", "/ui/login", data={"api_key": tenant.key, "csrf": csrf, "next": "/ui/jobs"},
            headers={"X-Forwarded-For": address, "Cookie": f"digin_session={cookie}"},
        )  # fmt: skip
        assert response.status_code == 303, response.text[:500]
        session = response.cookies["digin_session"]
        page = self.request("GET", "/ui/jobs", headers=ui_headers(session, address))
        assert page.status_code == 200, page.text[:500]
        match = CSRF.search(page.text)
        assert match is not None
        return session, match.group(1)


def ui_headers(cookie: str | None, address: str) -> dict[str, str]:
    headers = {"X-Forwarded-For": address}
    if cookie is not None:
        headers["Cookie"] = f"digin_session={cookie}"
    return headers


def is_problem(response: httpx.Response, status: int) -> bool:
    return (
        response.status_code == status
        and response.headers.get("content-type", "").startswith(PROBLEM)
        and response.json().get("status") == status
    )


def fields_of(response: httpx.Response) -> dict[str, str]:
    """{field: message} of a problem's errors."""
    try:
        errors = response.json().get("errors") or []
    except ValueError:
        return {}
    return {e["field"]: e["message"] for e in errors}


def png(seed: int) -> bytes:
    """A small PNG, different for each seed."""
    import io

    from PIL import Image

    image = Image.frombytes("L", (16, 16), bytes((seed * 7 + i) % 256 for i in range(256)))
    out = io.BytesIO()
    image.convert("RGB").save(out, "PNG")
    return out.getvalue()


def brief(response: httpx.Response) -> str:
    return f"{response.status_code} {response.text[:300]!r}"
