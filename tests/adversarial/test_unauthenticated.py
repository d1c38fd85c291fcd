"""Probe class 2: requests without a valid key, on every route.

The routes come from the API's own OpenAPI document (every operation that declares the bearer
scheme) and from the dashboard's router, so a route added later is probed too; the operations
that declare no scheme must be exactly the documented public ones (liveness, readiness,
metrics). A missing, malformed, unknown or revoked key is a 401 problem with a
`WWW-Authenticate` challenge whatever the body: the key is checked before the body is parsed,
validated or acted on, so a body that names a webhook host causes no DNS lookup (the API process
logs every lookup: `dns_audit/sitecustomize.py`), an invalid or unstorable body is not a 422,
and nothing is written. Keys in the URL or a dashboard session cookie do not authenticate the
REST API. Each attempt comes from a fresh client address, and every key prefix is used fewer
times than DIGIN_AUTH_FAILURE_RATE allows, so that the answers are the 401s themselves rather
than the rate limit's 429 (probe class 3).
"""

from __future__ import annotations

import itertools
import secrets
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from tests.adversarial.instance import (
    Instance,
    Tally,
    Tenant,
    brief,
    fresh_address,
    is_problem,
    png,
    ui_headers,
)

PUBLIC = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}
CANARY = "adv-canary.example"  # a name under it in a body must never be resolved
_canaries = itertools.count()


def canary_hook() -> dict[str, str]:
    return {"url": f"https://probe-{next(_canaries)}.{CANARY}/hook"}


def unknown_key() -> str:
    """A well-formed key with a fresh random prefix: no such key exists."""
    return f"dg_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"


def bad_credentials(instance: Instance) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(label, headers, query) of requests that carry no valid key."""
    a = instance.tenants["adv-alpha"]
    variants: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("no key", {}, {}),
        ("basic scheme", {"Authorization": "Basic YWRtaW46YWRtaW4="}, {}),
        ("scheme only", {"Authorization": "Bearer"}, {}),
        ("malformed", {"Authorization": "Bearer nope"}, {}),
        ("bad prefix", {"Authorization": f"Bearer dg_ZZZZZZZZ_{'A' * 43}"}, {}),
        ("oversized", {"Authorization": "Bearer " + "x" * 6000}, {}),
        ("latin-1 bytes", {"Authorization": b"Bearer dg_\xff\xfe\x80_key"}, {}),
        ("key and junk", {"Authorization": f"Bearer {a.key} extra"}, {}),
        ("unknown key", {"Authorization": f"Bearer {unknown_key()}"}, {}),
        ("revoked key", {"Authorization": f"Bearer {instance.new_key(a.name, revoked=True)}"}, {}),
        ("key in the query", {}, {"api_key": a.key, "access_token": a.key, "key": a.key}),
        ("key as a header", {"X-API-Key": a.key, "Api-Key": a.key}, {}),
    ]
    return variants


def bodies(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, httpx arguments) of the bodies sent with a key-less request to `path`."""
    if path == "/v1/jobs":
        valid = {"kind": "guided", "params": {"classes": [3]}}
        return [
            ("valid, resolves a host", {"json": valid | {"webhook": canary_hook()}}),
            ("invalid", {"json": {"kind": "nope", "seed": -1, "webhook": canary_hook()}}),
            ("unstorable", {"content": '{"kind": "guided\\u0000", "metadata": {"k": NaN}, '
                            f'"webhook": {{"url": "{canary_hook()["url"]}"}}}}',
                            "headers": {"Content-Type": "application/json"}}),
            ("no body", {}),
        ]  # fmt: skip
    if path == "/v1/batches":
        valid = {"kind": "guided", "classes": [1, 2]}
        return [
            ("valid, resolves a host", {"json": valid | {"webhook": canary_hook()}}),
            ("invalid", {"json": {"kind": "guided", "classes": [], "webhook": canary_hook()}}),
            ("unstorable", {"content": '{"kind": "guided", "classes": ["\\ud800"], '
                            f'"webhook": {{"url": "{canary_hook()["url"]}"}}}}',
                            "headers": {"Content-Type": "application/json"}}),
            ("no body", {}),
        ]  # fmt: skip
    if path == "/v1/audits":
        valid = {"classifier": "digits:cnn", "classes": [1, 2], "metadata": {"k": "v"}}
        return [
            ("valid", {"json": valid}),
            ("invalid", {"json": {"classes": [], "budget": {"components": 99}}}),
            ("unstorable", {"content": '{"classes": ["\\u0000"], "metadata": {"k": NaN}}',
                            "headers": {"Content-Type": "application/json"}}),
            ("no body", {}),
        ]  # fmt: skip
    if path == "/v1/images":
        return [("an image", {"files": {"file": ("a.png", png(2), "image/png")}}), ("none", {})]
    return [("", {})]


JSON = {"Content-Type": "application/json"}
UNPARSEABLE = {
    "/v1/jobs": [("not JSON", b"kind=guided", JSON), ("truncated JSON", b'{"kind": "gu', JSON),
                 ("invalid UTF-8", b'{"kind": "\xff"}', JSON)],
    "/v1/batches": [("not JSON", b"[[[", JSON), ("truncated JSON", b'{"classes": [1,', JSON),
                    ("invalid UTF-8", b"\xfe\xff", JSON)],
    "/v1/images": [("multipart without a boundary", b"--x\r\n",
                    {"Content-Type": "multipart/form-data"})],
}  # fmt: skip


def fill(path: str, instance: Instance) -> str:
    f = instance.fixtures
    # an audit's id is its batch's: the key is refused before any lookup either way
    values = {"job_id": f["done"], "batch_id": f["batch"], "audit_id": f["batch"],
              "image_id": f["image_id"], "name": "grid.png", "name:path": "grid.png"}  # fmt: skip
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, path
    return path


def expect_401(instance: Instance, method: str, path: str, headers: dict[str, Any],
               query: dict[str, str], body: dict[str, Any], what: str,
               ) -> Callable[[], str | None]:  # fmt: skip
    def attempt() -> str | None:
        extra = dict(body)
        sent = {"X-Forwarded-For": fresh_address()} | headers | extra.pop("headers", {})
        response = instance.request(method.upper(), path, headers=sent, params=query, **extra)
        challenge = response.headers.get("www-authenticate", "")
        if is_problem(response, 401) and challenge.startswith("Bearer"):
            return None
        return f"{method.upper()} {path} ({what}): {brief(response)}"

    return attempt


def rows(instance: Instance) -> tuple[int, ...]:
    from digin.service.db import ApiKey, Batch, Image, Job, WebhookDelivery

    with instance.sessions() as session:
        return tuple(
            session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Job, Batch, Image, WebhookDelivery)
        ) + (session.scalar(select(func.count()).select_from(ApiKey)) or 0,)


def test_every_protected_operation_refuses_requests_without_a_valid_key(
    instance: Instance, tally: Tally
) -> None:
    probe = tally["2"]
    schema = instance.request("GET", "/openapi.json").json()
    operations = [(method, path, op) for path, item in schema["paths"].items()
                  for method, op in item.items()]  # fmt: skip
    unprotected = {(m, p) for m, p, op in operations if not op.get("security")}
    assert unprotected == PUBLIC, f"operations without the bearer scheme: {unprotected - PUBLIC}"
    protected = [(m, p) for m, p, op in operations if op.get("security")]
    assert len(protected) >= 18, protected
    streams = {
        ("get", f"/v1/{r}/{{{i}}}/events")
        for r, i in (("jobs", "job_id"), ("batches", "batch_id"), ("audits", "audit_id"))
    }
    audits = {("post", "/v1/audits"), ("get", "/v1/audits/{audit_id}/report"),
              ("post", "/v1/audits/{audit_id}/cancel")}  # fmt: skip
    assert streams | audits <= set(protected), (streams | audits) - set(protected)
    a_session, _ = instance.login(instance.tenants["adv-alpha"])
    written = rows(instance)
    keys_before = written[-1]

    attempts: list[Callable[[], str | None]] = []
    for method, template in protected:
        path = fill(template, instance)
        for body_label, body in bodies(template):
            variants = bad_credentials(instance) + [
                ("dashboard cookie", {"Cookie": f"digin_session={a_session}"}, {})
            ]
            for label, headers, query in variants:
                what = f"{label} / {body_label}"
                attempts.append(expect_401(instance, method, path, headers, query, body, what))

    failures = probe.run(attempts)
    looked_up = [name for name in instance.lookups() if CANARY in name]
    probe.record(f"hosts resolved: {looked_up[:5]}" if looked_up else None)
    after = rows(instance)
    probe.record(None if after[:-1] == written[:-1] else f"rows written: {written} -> {after}")
    assert not failures, failures[:10]
    assert not looked_up, looked_up[:10]
    assert after[:-1] == written[:-1] and after[-1] >= keys_before  # (revoked keys were added)
    assert probe.attempts >= 300, probe.attempts


def test_the_dns_observation_sees_lookups(instance: Instance) -> None:
    """Control: the same body with a valid key is validated, and its host looked up (it does
    not resolve here: a 422), so the empty list of lookups above means something."""
    a = instance.tenants["adv-alpha"]
    name = f"control-{uuid.uuid4().hex[:8]}.{CANARY}"
    body = {"kind": "guided", "params": {"classes": [3]}, "webhook": {"url": f"https://{name}/"}}
    response = instance.request("POST", "/v1/jobs", json=body, headers=a.headers())
    assert is_problem(response, 422) and "webhook.url" in response.text, response.text
    assert name in instance.lookups()


def test_every_dashboard_page_sends_visitors_without_a_session_to_the_login(
    instance: Instance, tally: Tally
) -> None:
    from digin.api.dashboard.routes import router

    probe = tally["2"]
    a = instance.tenants["adv-alpha"]
    public = {"/ui", "/ui/", "/ui/login", "/ui/logout"}  # (the login and logout forms: class 8)
    routes = [(method, route.path) for route in router.routes
              for method in sorted(route.methods) if route.path not in public]  # fmt: skip
    assert len(routes) >= 12, routes
    anonymous, _ = instance.anonymous_form(fresh_address())
    # a session of a key revoked after the login
    revoked_key = instance.new_key(a.name)
    holder = Tenant(a.name, a.id, revoked_key, fresh_address())
    revoked_session, _ = instance.login(holder)
    from digin.service import repo

    with instance.sessions() as session:
        assert repo.revoke_api_key(session, prefix=holder.prefix)
        session.commit()
    cookies = {"none": None, "garbage": "x" * 300, "anonymous session": anonymous,
               "revoked key's session": revoked_session, "other name": None}  # fmt: skip
    attempts: list[Callable[[], str | None]] = []
    for (method, template), (label, cookie) in itertools.product(routes, cookies.items()):
        path = fill(template, instance)
        if path.endswith("/live") and "jobs" in path:
            path += f"?id={instance.fixtures['done']}"

        def attempt(method: str = method, path: str = path, cookie: str | None = cookie,
                    label: str = label) -> str | None:  # fmt: skip
            headers = ui_headers(cookie, fresh_address())
            if label == "other name":
                headers["Cookie"] = f"session={a.key}; digin={a.key}"
            data = {"csrf": "x"} if method == "POST" else None
            response = instance.request(method, path, headers=headers, data=data)
            if path.split("?")[0].endswith("/live"):
                ok = response.status_code == 401
            else:
                location = response.headers.get("location", "")
                ok = response.status_code == 303 and location.startswith("/ui/login?next=")
            return None if ok else f"{method} {path} ({label}): {brief(response)}"

        attempts.append(attempt)
    failures = probe.run(attempts)
    assert not failures, failures[:10]


def test_a_body_that_cannot_be_parsed_is_a_401_without_a_valid_key(
    instance: Instance, tally: Tally
) -> None:
    probe = tally["2b"]
    attempts = []
    for path, cases in UNPARSEABLE.items():
        for (body_label, content, content_type), (label, headers, query) in itertools.product(
            cases, bad_credentials(instance)
        ):
            body = {"content": content, "headers": content_type}
            attempts.append(
                expect_401(instance, "post", path, headers, query, body, f"{label} / {body_label}")
            )
    failures = probe.run(attempts)
    assert not failures, failures[:10]
