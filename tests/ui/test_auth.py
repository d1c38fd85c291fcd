"""The dashboard with auth on (uvicorn in a thread, SQLite, no worker: jobs stay queued):
login with a pasted API key and logout in Chromium, the session cookie (HttpOnly, SameSite=
Strict, signed, no key in it or in any URL), tenant isolation (another tenant's job is a 404
page, its images too), CSRF on cancel, revoked keys, and frame-ancestors in a real frame."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.client.conftest import LiveAPI, free_port, lite_settings, serve
from tests.ui.conftest import PAGE_TIMEOUT_MS, screenshot

EMBEDDER_PORT = free_port()  # the origin allowed to frame the dashboard


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAPI]:
    folder = tmp_path_factory.mktemp("ui-auth")
    settings = lite_settings(
        folder, secret_key="s" * 40,
        frame_ancestors=["'self'", f"http://localhost:{EMBEDDER_PORT}"],
    )  # fmt: skip
    yield from serve(settings)


def submit(live: LiveAPI, key: str) -> dict[str, Any]:
    body = {"kind": "guided", "params": {"classes": ["seven"], "guidance": {"iterations": 1}}}
    response = httpx.post(f"{live.url}/v1/jobs", json=body,
                          headers={"Authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
    assert response.status_code == 202, response.text
    return response.json()


def login(page: Any, live: LiveAPI, key: str) -> None:
    page.goto(f"{live.url}/ui/jobs")
    assert "/ui/login" in page.url
    page.fill("#api_key", key)
    page.click("#login")
    page.wait_for_url(f"{live.url}/ui/jobs")


def test_login_shows_only_the_tenants_jobs_and_logout_ends_the_session(page, live):
    key_a, key_b = live.key("ui-alpha"), live.key("ui-beta")
    job_a, job_b = submit(live, key_a), submit(live, key_b)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))

    # 1. Not logged in: every page sends the browser to the login form.
    page.goto(f"{live.url}/ui/jobs/{job_a['id']}")
    assert page.url.startswith(f"{live.url}/ui/login?next=")
    page.fill("#api_key", key_a[:-3] + "xyz")  # a wrong key
    page.click("#login")
    assert "not valid" in page.inner_text("#login-error")
    screenshot(page, "login-error")

    # 2. The right key: back to the page asked for, as tenant ui-alpha.
    page.fill("#api_key", key_a)
    page.click("#login")
    page.wait_for_url(f"{live.url}/ui/jobs/{job_a['id']}")
    assert page.inner_text("#tenant") == "ui-alpha"
    assert page.inner_text("#job-id") == job_a["id"]
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "digin_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    secret_part = key_a.split("_", 2)[2]
    assert secret_part not in cookie["value"]
    assert not any(secret_part in url or "api_key" in url for url in urls)

    # 3. The jobs list has the tenant's job only; the other tenant's job is a 404 page.
    page.goto(f"{live.url}/ui/jobs")
    shown = page.eval_on_selector_all("tr.job-row", "rows => rows.map(r => r.dataset.liveJob)")
    assert shown == [job_a["id"]]
    response = page.goto(f"{live.url}/ui/jobs/{job_b['id']}")
    assert response.status == 404 and "no job" in page.inner_text("#error-message")
    screenshot(page, "other-tenant-404")
    response = page.goto(f"{live.url}/ui/jobs/{job_b['id']}/thumbs/item_000.png")
    assert response.status == 404

    # 4. Cancel from the page (the form carries the CSRF token): queued → canceled.
    page.goto(f"{live.url}/ui/jobs/{job_a['id']}")
    page.click("#cancel")
    page.wait_for_url(f"{live.url}/ui/jobs/{job_a['id']}")
    assert page.inner_text("main [data-role=status]") == "canceled"
    api = httpx.get(f"{live.url}/v1/jobs/{job_a['id']}",
                    headers={"Authorization": f"Bearer {key_a}"}, timeout=30).json()  # fmt: skip
    assert api["status"] == "canceled"

    # 5. Logout clears the cookie; the pages ask for the key again.
    page.click("#logout")
    page.wait_for_url(f"{live.url}/ui/login")
    assert not [c for c in page.context.cookies() if c["value"] == cookie["value"]]
    page.goto(f"{live.url}/ui/jobs")
    assert "/ui/login" in page.url


def test_cancel_needs_the_csrf_token_and_a_revoked_key_ends_the_session(live):
    key = live.key("ui-gamma")
    job = submit(live, key)
    with httpx.Client(base_url=live.url, timeout=30) as client:
        form = client.get("/ui/login").text
        csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        response = client.post("/ui/login", data={"api_key": key, "csrf": csrf})
        assert response.status_code == 303 and response.headers["location"] == "/ui/jobs"
        assert client.get("/ui/jobs").status_code == 200
        # a cross-site form would not know the token: 403, the job stays queued
        response = client.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf": "forged"})
        assert response.status_code == 403
        response = client.post(f"/ui/jobs/{job['id']}/cancel", data={})
        assert response.status_code == 403
        assert client.get(f"/ui/jobs/live?id={job['id']}").json()["jobs"][0]["status"] == "queued"
        # a login without the form's token is refused too, and logs nobody in
        with httpx.Client(base_url=live.url, timeout=30) as other:
            assert other.post("/ui/login", data={"api_key": key}).status_code == 403
            assert other.get("/ui/jobs").status_code == 303
        # revoking the key ends the session at the next request
        from digin.service import repo
        from digin.service.db import make_engine, session_factory

        engine = make_engine(live.settings.database_url)
        with session_factory(engine)() as session:
            assert repo.revoke_api_key(session, prefix=key.split("_")[1])
            session.commit()
        engine.dispose()
        response = client.get("/ui/jobs")
        assert response.status_code == 303 and response.headers["location"].startswith("/ui/login")
        assert client.get(f"/ui/jobs/live?id={job['id']}").status_code == 401


def test_logout_ends_the_session_on_the_server_for_copies_of_the_cookie_too(live):
    key = live.key("ui-delta")
    with httpx.Client(base_url=live.url, timeout=30) as client:
        form = client.get("/ui/login").text
        csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        assert client.post("/ui/login", data={"api_key": key, "csrf": csrf}).status_code == 303
        page = client.get("/ui/jobs")
        assert page.status_code == 200
        copied = dict(client.cookies)  # what a stolen or second-tab copy of the cookie holds
        logout_csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        with httpx.Client(base_url=live.url, timeout=30, cookies=copied) as other:
            assert other.get("/ui/jobs").status_code == 200  # the copy works before the logout
            response = client.post("/ui/logout", data={"csrf": logout_csrf})
            assert response.status_code == 303 and response.headers["location"] == "/ui/login"
            response = other.get("/ui/jobs")  # the same cookie, after the logout
            assert response.status_code == 303
            assert response.headers["location"].startswith("/ui/login")


def _blocked(url: str) -> bool:
    """Whether a frame's URL is where Chromium leaves a frame that it refused to show."""
    return url.startswith("chrome-error:") or url == "about:blank"


def test_frame_ancestors_allow_list_in_a_real_frame(browser, live, tmp_path: Path):
    response = httpx.get(f"{live.url}/ui/login", timeout=30)
    csp = response.headers["content-security-policy"]
    assert f"frame-ancestors 'self' http://localhost:{EMBEDDER_PORT}" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors" not in httpx.get(f"{live.url}/healthz").headers.get(
        "content-security-policy", ""
    )

    frame_url = live.url + "/ui/login"
    (tmp_path / "embed.html").write_text(f'<iframe id="f" src="{frame_url}"></iframe>')
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    outcomes = {}
    for name, port in (("allowed", EMBEDDER_PORT), ("refused", free_port())):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(f"http://localhost:{port}/embed.html")
            page.wait_for_load_state("load")
            frame = page.frame_locator("#f")
            if name == "allowed":
                frame.locator("#api_key").wait_for()
                outcomes[name] = "login form"
                screenshot(page, "embedded-allowed")
            else:  # blocked: the frame ends on Chromium's error page (it may get there after
                # the page's load event, so its URL is read until it settles or time is up)
                child = page.frames[1]
                deadline = time.monotonic() + PAGE_TIMEOUT_MS / 1000
                while not _blocked(child.url) and time.monotonic() < deadline:
                    page.wait_for_timeout(50)
                assert child.query_selector("#api_key") is None
                outcomes[name] = "blocked" if _blocked(child.url) else child.url
        finally:
            context.close()
            server.shutdown()
            server.server_close()
    assert outcomes["allowed"] == "login form"
    assert outcomes["refused"] == "blocked"
