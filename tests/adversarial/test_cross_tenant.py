"""Probe class 1: tenant B's key and dashboard session on tenant A's ids.

Every query is scoped to the caller's tenant, so another tenant's id must be indistinguishable
from one that does not exist: a 404 (never 403, which would confirm the id), none of A's rows in
B's lists whatever the filter or cursor, and nothing of A's changed by B's cancels. Each id is
also sent in the other spellings a UUID path parameter accepts (upper case, 32 hex digits). The
same requests with A's own key are answered (the controls), so the 404s are not vacuous.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from tests.adversarial.instance import Instance, Tally, brief, is_problem, ui_headers

ROW = re.compile(r'data-live-job="([^"]+)"')  # a job's row (or cell) on a dashboard page
LINK = re.compile(r'href="/ui/jobs/([0-9a-f-]{36})')


def spellings(ident: str) -> list[str]:
    value = uuid.UUID(ident)
    return [str(value), str(value).upper(), value.hex]


def a_state(instance: Instance) -> dict[str, Any]:
    """What B must not change: A's jobs, batch, deliveries and webhook secret."""
    a, f = instance.tenants["adv-alpha"], instance.fixtures
    state: dict[str, Any] = {}
    for name in ("done", "queued", "canceled"):
        job = instance.request("GET", f"/v1/jobs/{f[name]}", headers=a.headers()).json()
        hooks = instance.request("GET", f"/v1/jobs/{f[name]}/webhooks", headers=a.headers())
        state[name] = (job["status"], job["cancel_requested"], job["finished_at"],
                       job["attempts"], len(hooks.json()["data"]))  # fmt: skip
    batch = instance.request("GET", f"/v1/batches/{f['batch']}", headers=a.headers()).json()
    state["batch"] = (batch["status"], batch["counts"], batch["finished_at"])
    secret = instance.request("GET", "/v1/webhooks/secret", headers=a.headers()).json()
    state["secret"] = secret["secret"]
    return state


def expect_404(instance: Instance, method: str, path: str, headers: dict[str, str],
               **kwargs: Any) -> Callable[[], str | None]:  # fmt: skip
    def attempt() -> str | None:
        response = instance.request(method, path, headers=headers, **kwargs)
        return None if is_problem(response, 404) else f"{method} {path}: {brief(response)}"

    return attempt


def expect_404_page(instance: Instance, method: str, path: str, headers: dict[str, str],
                    **kwargs: Any) -> Callable[[], str | None]:  # fmt: skip
    def attempt() -> str | None:
        response = instance.request(method, path, headers=headers, **kwargs)
        ok = response.status_code == 404 and "image" not in response.headers.get("content-type", "")
        return None if ok else f"{method} {path}: {brief(response)}"

    return attempt


def no_a_ids(instance: Instance, path: str, headers: dict[str, str], a_ids: set[str],
             params: Any = None) -> Callable[[], str | None]:  # fmt: skip
    def attempt() -> str | None:
        response = instance.request("GET", path, headers=headers, params=params)
        if response.status_code != 200:
            return f"GET {path} {params}: {brief(response)}"
        shown = {str(row["id"]) for row in response.json()["data"]}
        leaked = shown & a_ids
        return f"GET {path} {params}: A's {sorted(leaked)} listed" if leaked else None

    return attempt


def forged_cursor(created_at: str, ident: str) -> str:
    raw = json.dumps([created_at, uuid.UUID(ident).hex]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_tenant_b_never_reaches_tenant_a(instance: Instance, tally: Tally) -> None:
    probe = tally["1"]
    a, b, f = instance.tenants["adv-alpha"], instance.tenants["adv-beta"], instance.fixtures
    jobs = [f["done"], f["queued"], f["canceled"]]
    a_ids = {*jobs, f["batch"]}
    listed = instance.request("GET", "/v1/jobs", headers=a.headers(), params={"limit": 100})
    a_ids |= {row["id"] for row in listed.json()["data"]}  # the batch's items too

    # Controls: A's own key and session reach everything probed below.
    for path in [f"/v1/jobs/{f['done']}", f"/v1/jobs/{f['done']}/artifacts",
                 f"/v1/jobs/{f['done']}/webhooks", f"/v1/batches/{f['batch']}",
                 f"/v1/batches/{f['batch']}/results", f"/v1/images/{f['image_id']}"]:  # fmt: skip
        response = instance.request("GET", path, headers=a.headers())
        assert response.status_code == 200, (path, response.text)
    download = instance.request("GET", f"/v1/jobs/{f['done']}/artifacts/grid.png",
                                headers=a.headers())  # fmt: skip
    assert download.status_code == 307 and "X-Amz-Signature" in download.headers["location"]
    a_session, _ = instance.login(a)
    thumb = instance.request("GET", f"/ui/jobs/{f['done']}/thumbs/grid.png",
                             headers=ui_headers(a_session, a.address))  # fmt: skip
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    hooks = instance.request("GET", f"/v1/jobs/{f['done']}/webhooks", headers=a.headers())
    assert len(hooks.json()["data"]) == 1, hooks.text  # the succeeded event
    page = instance.request("GET", "/v1/jobs", headers=a.headers(), params={"limit": 1})
    a_cursor = page.json()["next_cursor"]
    assert a_cursor, page.text
    before = a_state(instance)

    # B's key on A's ids.
    h = b.headers()
    attempts: list[Callable[[], str | None]] = []
    for job in jobs:
        for spelled in spellings(job):
            for method, path in [
                ("GET", f"/v1/jobs/{spelled}"),
                ("GET", f"/v1/jobs/{spelled}/artifacts"),
                ("GET", f"/v1/jobs/{spelled}/webhooks"),
                ("POST", f"/v1/jobs/{spelled}/cancel"),
                *[("GET", f"/v1/jobs/{spelled}/artifacts/{name}") for name in f["artifacts"]],
            ]:
                attempts.append(expect_404(instance, method, path, h))
    for spelled in spellings(f["batch"]):
        for method, path, extra in [
            ("GET", f"/v1/batches/{spelled}", {}),
            ("GET", f"/v1/batches/{spelled}/results", {}),
            ("GET", f"/v1/batches/{spelled}/results?format=csv", {}),
            ("GET", f"/v1/batches/{spelled}/results", {"Accept": "text/csv"}),
            ("GET", f"/v1/batches/{spelled}/webhooks", {}),
            ("POST", f"/v1/batches/{spelled}/cancel", {}),
        ]:
            attempts.append(expect_404(instance, method, path, h | extra))
    for spelled in spellings(f["image_id"]):
        attempts.append(expect_404(instance, "GET", f"/v1/images/{spelled}", h))
    # lists: filters and cursors never bring A's rows
    created = {row["id"]: row["created_at"] for row in listed.json()["data"]}
    filters: list[Any] = [
        None, {"batch_id": f["batch"]}, {"status": "queued"}, {"status": "succeeded"},
        {"status": "canceled"}, {"kind": "guided"}, {"limit": 200},
        [("status", s) for s in ("queued", "running", "succeeded", "failed", "canceled")],
        {"cursor": a_cursor}, {"cursor": a_cursor, "batch_id": f["batch"]},
        *[{"cursor": forged_cursor(created[j], j)} for j in jobs if j in created],
        *[{"cursor": forged_cursor("9999-12-31T00:00:00+00:00", j)} for j in jobs],
    ]  # fmt: skip
    for params in filters:
        attempts.append(no_a_ids(instance, "/v1/jobs", h, a_ids, params))
    for params in [None, {"limit": 100}, {"cursor": forged_cursor("9999-12-31T00:00:00+00:00",
                                                                  f["batch"])}]:  # fmt: skip
        attempts.append(no_a_ids(instance, "/v1/batches", h, a_ids, params))

    # B's dashboard session on A's ids.
    b_session, b_csrf = instance.login(b)
    ui = ui_headers(b_session, b.address)
    for job in jobs:
        for path in [f"/ui/jobs/{job}", f"/ui/jobs/{job}/row",
                     *[f"/ui/jobs/{job}/artifacts/{n}" for n in f["artifacts"]],
                     *[f"/ui/jobs/{job}/thumbs/{n}" for n in f["artifacts"]]]:  # fmt: skip
            attempts.append(expect_404_page(instance, "GET", path, ui))
        attempts.append(expect_404_page(instance, "POST", f"/ui/jobs/{job}/cancel", ui,
                                        data={"csrf": b_csrf}))  # fmt: skip
    for path in [f"/ui/batches/{f['batch']}", f"/ui/batches/{f['batch']}/live"]:
        attempts.append(expect_404_page(instance, "GET", path, ui))
    attempts.append(expect_404_page(instance, "POST", f"/ui/batches/{f['batch']}/cancel", ui,
                                    data={"csrf": b_csrf}))  # fmt: skip

    def live_poll() -> str | None:
        response = instance.request("GET", "/ui/jobs/live", headers=ui,
                                    params=[("id", j) for j in sorted(a_ids)])  # fmt: skip
        if response.status_code != 200 or response.json()["jobs"]:
            return f"/ui/jobs/live: {brief(response)}"
        return None

    def ui_list(params: dict[str, str]) -> Callable[[], str | None]:
        def attempt() -> str | None:
            response = instance.request("GET", "/ui/jobs", headers=ui, params=params)
            if response.status_code not in (200, 422):  # 422: a filter it does not take
                return f"/ui/jobs {params}: {brief(response)}"
            rows = set(ROW.findall(response.text)) | set(LINK.findall(response.text))
            leaked = rows & a_ids
            return f"/ui/jobs {params}: shows {sorted(leaked)}" if leaked else None

        return attempt

    attempts += [live_poll, ui_list({"batch_id": f["batch"]}), ui_list({"cursor": a_cursor}),
                 ui_list({"status": "succeeded"}), ui_list({})]  # fmt: skip

    def rotate_own_secret() -> str | None:  # B's rotation is B's own: A's secret stays
        response = instance.request("POST", "/v1/webhooks/secret/rotate", headers=h)
        return None if response.status_code == 200 else brief(response)

    attempts.append(rotate_own_secret)

    failures = probe.run(attempts)
    after = a_state(instance)
    probe.record(None if after == before else f"A's state changed: {before} -> {after}")
    assert not failures and after == before, failures[:10]
    assert probe.attempts >= 150


def test_b_sees_its_own(instance: Instance) -> None:
    """The scoping hides A, not everything: B reads its own job with the same routes."""
    b, f = instance.tenants["adv-beta"], instance.fixtures
    response = instance.request("GET", f"/v1/jobs/{f['b_job']}", headers=b.headers())
    assert response.status_code == 200
    listed = instance.request("GET", "/v1/jobs", headers=b.headers())
    assert f["b_job"] in {row["id"] for row in listed.json()["data"]}
    assert isinstance(listed, httpx.Response)
