"""Probe class 8: the dashboard's forms, session cookies and redirects.

The dashboard authenticates with a signed session cookie (api/dashboard/sessions.py): HMAC of
DIGIN_SECRET_KEY over {key prefix, tenant, expiry, nonce}, re-checked against the database on
every request (an active key, of that tenant, a session not logged out). Forms that change
something (cancel, login, logout) carry a CSRF token derived from the visitor's own session.
So:

- a cancel, login or logout form without its session's token (none, empty, garbage, another
  session's, another tenant's, an anonymous visitor's) is a 403, and changes nothing: the job
  stays queued, no session is made, the session stays valid;
- a copy of a session cookie stops working when its session logs out: every page sends it to
  the login (the live polls answer 401);
- `next` (where the login form goes afterwards) stays on the dashboard: other sites, scheme-
  relative and backslash URLs, other schemes and header injection are replaced by /ui/jobs;
- a tampered cookie (payload or signature changed, another tenant or key spliced in, another
  version) or one forged with another secret is no session; one forged with the service's own
  secret is still refused when it is expired, names a key of another tenant or a key that does
  not exist, or a logged-out session (the database check).
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from digin.api.dashboard.sessions import Signer
from tests.adversarial.instance import (
    Instance,
    Tally,
    Tenant,
    brief,
    fresh_address,
    ui_headers,
)

NEXT = re.compile(r'name="next" value="([^"]*)"')
EVIL_NEXT = [
    "https://evil.example/", "http://evil.example/ui/jobs", "//evil.example", "///evil.example",
    "/\\evil.example", "\\\\evil.example", "/ui//evil.example", "/ui/\\evil.example",
    "/ui/..//evil.example", "/ui/jobs//evil.example", "javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>", "http:evil.example", "https:/evil.example",
    "/ui/\r\nSet-Cookie: injected=1", "/ui/jobs\r\nLocation: https://evil.example",
    "/ui/%0d%0aSet-Cookie:%20injected=1", "/ui/\tevil", " //evil.example", "/%2F%2Fevil.example",
    "/ui/%2F%2Fevil.example", "/ui/jobs@evil.example", "https://127.0.0.1:1/ui/jobs",
    "/ui/../../evil", "\x00//evil.example", "/ui/jobs#//evil.example", "%2F%2Fevil.example",
    "/\u3002evil.example", "/ui/\u2215\u2215evil.example",
]  # fmt: skip


def payload(cookie: str) -> dict[str, Any]:
    body = cookie.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def encode(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def flipped(signature: str) -> str:
    return signature[:-2] + ("AB" if signature[-2:] != "AB" else "CD")


def logged_in_cookie(response: httpx.Response) -> bool:
    """Whether the response sets a session cookie of a logged-in key (not an anonymous one)."""
    cookie = response.cookies.get("digin_session")
    return cookie is not None and payload(cookie).get("k") is not None


def job_status(instance: Instance, tenant: Tenant, job_id: str) -> str:
    response = instance.request("GET", f"/v1/jobs/{job_id}", headers=tenant.headers())
    return str(response.json()["status"])


def test_forms_without_their_csrf_token_are_refused(instance: Instance, tally: Tally) -> None:
    probe = tally["8"]
    a, b = instance.tenants["adv-alpha"], instance.tenants["adv-beta"]
    body = {"kind": "guided", "params": {"classes": [1]}}
    job = instance.request("POST", "/v1/jobs", json=body, headers=a.headers()).json()["id"]
    batch_body = {"kind": "guided", "classes": [1, 2]}
    batch = instance.request("POST", "/v1/batches", json=batch_body, headers=a.headers())
    batch_id = batch.json()["id"]
    session, csrf = instance.login(a)
    _, other_a_csrf = instance.login(a)  # A's other session
    _, b_csrf = instance.login(b)
    anonymous, anonymous_csrf = instance.anonymous_form(fresh_address())
    wrong = [None, "", "x", "A" * 43, csrf[:-1], csrf[::-1], csrf.upper(), other_a_csrf, b_csrf,
             anonymous_csrf, csrf + " "]  # fmt: skip
    h = ui_headers(session, a.address)
    attempts: list[Callable[[], str | None]] = []
    for token in wrong:
        data = {} if token is None else {"csrf": token}
        for path in (f"/ui/jobs/{job}/cancel", f"/ui/batches/{batch_id}/cancel", "/ui/logout"):

            def cancel(path: str = path, data: dict = data) -> str | None:
                response = instance.request("POST", path, headers=h, data=data)
                return None if response.status_code == 403 else f"{path} {data}: {brief(response)}"

            attempts.append(cancel)
        # login forms: the right key, but not the form's own token
        for cookie in (None, anonymous, session):
            if cookie == anonymous and token == anonymous_csrf:
                continue  # (that is the anonymous visitor's own form)

            def login(cookie: str | None = cookie, data: dict = data) -> str | None:
                response = instance.request(
                    "POST", "/ui/login", data=data | {"api_key": a.key, "next": "/ui/jobs"},
                    headers=ui_headers(cookie, fresh_address()),
                )  # fmt: skip
                if response.status_code == 403 and not logged_in_cookie(response):
                    return None
                return f"login {data}: {brief(response)}"

            attempts.append(login)
    failures = probe.run(attempts)
    # nothing changed: the job is queued, the batch running, the session valid
    checks = {
        "job": job_status(instance, a, job) == "queued",
        "batch": instance.request("GET", f"/v1/batches/{batch_id}", headers=a.headers()).json()[
            "status"
        ] == "running",
        "session": instance.request("GET", "/ui/jobs", headers=h).status_code == 200,
    }  # fmt: skip
    probe.record(None if all(checks.values()) else f"changed: {checks}")
    # control: with the session's own token the same form cancels
    response = instance.request("POST", f"/ui/jobs/{job}/cancel", headers=h, data={"csrf": csrf})
    assert response.status_code == 303 and job_status(instance, a, job) == "canceled"
    assert not failures, failures[:10]
    assert all(checks.values()), checks


def test_a_copied_cookie_dies_with_its_session(instance: Instance, tally: Tally) -> None:
    probe = tally["8"]
    a = instance.tenants["adv-alpha"]
    job = instance.fixtures["queued"]
    attempts: list[Callable[[], str | None]] = []
    for _ in range(5):
        session, csrf = instance.login(a)
        h = ui_headers(session, a.address)
        response = instance.request("POST", "/ui/logout", headers=h, data={"csrf": csrf})
        assert response.status_code == 303, response.text
        copy = ui_headers(session, fresh_address())  # the cookie, kept by someone else
        for method, path, data in [
            ("GET", "/ui/jobs", None), ("GET", f"/ui/jobs/{job}", None),
            ("GET", "/ui/batches", None),
            ("GET", f"/ui/jobs/{instance.fixtures['done']}/thumbs/grid.png", None),
            ("GET", f"/ui/jobs/live?id={job}", None),
            ("POST", f"/ui/jobs/{job}/cancel", {"csrf": csrf}),
        ]:  # fmt: skip

            def attempt(method: str = method, path: str = path, data: Any = data,
                        copy: dict[str, str] = copy) -> str | None:  # fmt: skip
                response = instance.request(method, path, headers=copy, data=data)
                if path.startswith("/ui/jobs/live"):
                    ok = response.status_code == 401
                else:
                    ok = response.status_code == 303 and response.headers["location"].startswith(
                        "/ui/login"
                    )
                return None if ok else f"{method} {path} after logout: {brief(response)}"

            attempts.append(attempt)
    failures = probe.run(attempts)
    status = job_status(instance, a, job)
    probe.record(None if status == "queued" else f"the job is {status}")
    assert not failures and status == "queued", failures[:10]


def test_next_never_leaves_the_dashboard(instance: Instance, tally: Tally) -> None:
    probe = tally["8"]
    a = instance.tenants["adv-alpha"]
    base = instance.url

    def same_site(location: str) -> bool:
        """Whether a browser following `location` from the login page stays on this site."""
        target = urlsplit(urljoin(base + "/ui/login", location.strip()))
        return f"{target.scheme}://{target.netloc}" == base and not location.lstrip().startswith(
            ("//", "\\", "/\\")
        )

    def stays(location: str) -> bool:  # a Location header: also no line breaks in it
        return same_site(location) and "\r" not in location and "\n" not in location

    attempts: list[Callable[[], str | None]] = []
    for evil in EVIL_NEXT:

        def form(evil: str = evil) -> str | None:
            response = instance.request("GET", "/ui/login", params={"next": evil},
                                        headers={"X-Forwarded-For": fresh_address()})  # fmt: skip
            match = NEXT.search(response.text)
            shown = match.group(1) if match else ""
            ok = response.status_code == 200 and same_site(shown.replace("&amp;", "&"))
            return None if ok else f"form next={evil!r}: {shown!r}"

        def login(evil: str = evil) -> str | None:
            address = fresh_address()
            cookie, csrf = instance.anonymous_form(address)
            response = instance.request(
                "POST", "/ui/login", data={"api_key": a.key, "csrf": csrf, "next": evil},
                headers=ui_headers(cookie, address),
            )  # fmt: skip
            location = response.headers.get("location", "")
            injected = "injected" in str(response.headers.get_list("set-cookie"))
            if response.status_code == 303 and stays(location) and not injected:
                return None
            return f"login next={evil!r}: {response.status_code} {location!r}"

        attempts += [form, login]
    failures = probe.run(attempts)
    assert not failures, failures[:10]


def test_tampered_and_forged_cookies_are_no_session(instance: Instance, tally: Tally) -> None:
    probe = tally["8"]
    a, b = instance.tenants["adv-alpha"], instance.tenants["adv-beta"]
    job = instance.fixtures["queued"]
    a_cookie, _ = instance.login(a)
    b_cookie, _ = instance.login(b)
    version, body, signature = a_cookie.split(".")
    data = payload(a_cookie)
    b_signature = b_cookie.split(".")[2]
    secret = str(instance.values["secret_key"]).encode()
    own = Signer(secret, 3600)
    other = Signer(b"another-secret-of-the-same-length-0123456789", 3600)
    tenant_a, tenant_b = uuid.UUID(a.id), uuid.UUID(b.id)

    def signed(signer: Signer, fields: dict[str, Any]) -> str:
        text = f"v1.{encode(fields)}"
        return f"{text}.{signer._sign(text)}"

    logged_out, logged_out_csrf = instance.login(a)
    instance.request("POST", "/ui/logout", headers=ui_headers(logged_out, a.address),
                     data={"csrf": logged_out_csrf})  # fmt: skip
    far = int(time.time()) + 10**6
    variants = {
        "another tenant in the payload": f"{version}.{encode(data | {'t': tenant_b.hex})}."
        f"{signature}",
        "another key in the payload": f"{version}.{encode(data | {'k': b.prefix})}.{signature}",
        "a later expiry": f"{version}.{encode(data | {'e': far})}.{signature}",
        "another nonce": f"{version}.{encode(data | {'n': 'x'})}.{signature}",
        "B's signature": f"{version}.{body}.{b_signature}",
        "a flipped signature": f"{version}.{body}.{flipped(signature)}",
        "a truncated signature": f"{version}.{body}.{signature[:20]}",
        "no signature": f"{version}.{body}.",
        "padding": f"{version}.{body}.{signature}=",
        "version 2": f"v2.{body}.{signature}",
        "no version": f"{body}.{signature}",
        "extra part": f"{a_cookie}.x",
        "payload not JSON": f"v1.{base64.urlsafe_b64encode(b'not json').decode()}.{signature}",
        "another secret": signed(other, data),
        "another secret, B": signed(other, data | {"t": tenant_b.hex, "k": b.prefix}),
        "own secret, expired": signed(own, data | {"e": int(time.time()) - 5}),
        "own secret, A's key for B": signed(own, data | {"t": tenant_b.hex}),
        "own secret, no such key": signed(own, data | {"k": "00000000"}),
        "own secret, no key": signed(own, data | {"k": None}),
        "own secret, logged out": logged_out,
        "own secret, null tenant": signed(own, data | {"t": None}),
        "garbage": "v1.." + "A" * 50,
    }  # fmt: skip
    attempts: list[Callable[[], str | None]] = []
    for label, cookie in variants.items():
        for method, path in [("GET", "/ui/jobs"), ("GET", f"/ui/jobs/{job}"),
                             ("GET", f"/ui/jobs/live?id={job}"),
                             ("POST", f"/ui/jobs/{job}/cancel")]:  # fmt: skip

            def attempt(label: str = label, cookie: str = cookie, method: str = method,
                        path: str = path) -> str | None:  # fmt: skip
                token = own.read(cookie)
                data = {"csrf": own.csrf(token) if token else "x"} if method == "POST" else None
                headers = ui_headers(cookie, fresh_address())
                response = instance.request(method, path, headers=headers, data=data)
                if path.startswith("/ui/jobs/live"):
                    ok = response.status_code == 401
                else:
                    ok = response.status_code == 303 and response.headers["location"].startswith(
                        "/ui/login"
                    )
                return None if ok else f"{label} {method} {path}: {brief(response)}"

            attempts.append(attempt)
    failures = probe.run(attempts)
    status = job_status(instance, a, job)
    probe.record(None if status == "queued" else f"the job is {status}")
    # control: the untouched cookie is A's session
    page = instance.request("GET", "/ui/jobs", headers=ui_headers(a_cookie, a.address))
    assert page.status_code == 200
    assert not failures and status == "queued", failures[:10]
    assert tenant_a.hex == data["t"]
