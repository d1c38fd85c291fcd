"""The dashboard (docs/architecture.md §9.11): server-rendered HTML pages under `/ui` with a little
JavaScript, no build step. `install(app, settings)` adds its routes, its static files, the
handlers that turn `LoginRequired` / `PageNotFound` into a login redirect and a 404 page, and
the security headers of every `/ui` response (CSP with the `frame-ancestors` allow-list of
DIGIN_FRAME_ANCESTORS).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from digin.api.dashboard.auth import Dashboard, LoginRequired, PageNotFound, login_url
from digin.api.dashboard.images import ThumbCache
from digin.api.dashboard.routes import router
from digin.api.dashboard.sessions import Signer, dashboard_secret
from digin.service.settings import Settings

HERE = Path(__file__).parent
PREFIX = "/ui"


# --- template filters ---------------------------------------------------------------------------
def number(value: Any, digits: int = 4) -> str:
    """A metric as shown: 4 decimals, or 3 significant digits for very large or small values."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "–" if value is None else str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 60:
        return f"{value:.1f} s"
    minutes, s = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def timestamp(value: datetime | None) -> str:
    return "–" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters.update(num=number, pct=percent, secs=seconds, ts=timestamp)
    env.globals["short"] = lambda ident: str(ident)[:8]
    return templates


# --- security headers ---------------------------------------------------------------------------
def content_security_policy(frame_ancestors: list[str]) -> str:
    return "; ".join(
        [
            "default-src 'self'",
            "img-src 'self' data:",
            "style-src 'self'",
            "script-src 'self'",
            "connect-src 'self'",
            "form-action 'self'",
            "base-uri 'none'",
            "object-src 'none'",
            f"frame-ancestors {' '.join(frame_ancestors)}",
        ]
    )


class DashboardHeaders:
    """Adds the CSP (with frame-ancestors), nosniff and referrer policy to `/ui` responses;
    HTML pages are not cached (they show the session's data)."""

    def __init__(self, app: ASGIApp, frame_ancestors: list[str]) -> None:
        self.app = app
        self.csp = content_security_policy(frame_ancestors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = self.csp
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "same-origin"
                if headers.get("content-type", "").startswith("text/html"):
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- installing ---------------------------------------------------------------------------------
async def _login_required(request: Request, exc: Exception) -> Response:
    if request.url.path.endswith("/live"):  # the page script's polls: no redirect
        return JSONResponse({"detail": "log in again"}, status_code=401)
    return RedirectResponse(login_url(request), status_code=303)


async def _page_not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageNotFound)
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard.templates.TemplateResponse(
        request, "error.html",
        {"viewer": None, "title": "Not found", "message": exc.what}, status_code=404,
    )  # fmt: skip


def install(app: FastAPI, settings: Settings) -> None:
    secret = dashboard_secret(settings)
    app.state.dashboard = Dashboard(
        settings=settings,
        signer=None if secret is None else Signer(secret, settings.session_seconds),
        templates=make_templates(),
        thumbs=ThumbCache(),
    )
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(PageNotFound, _page_not_found)
    app.add_middleware(DashboardHeaders, frame_ancestors=settings.frame_ancestors)


__all__ = ["install"]
