"""Who looks at the dashboard: the tenant of a valid session cookie (auth on), or the `local`
tenant (auth off, embedded mode). Pages raise `LoginRequired` or `PageNotFound`, which the
handlers installed by `digin.api.dashboard.install` turn into a redirect to the login form and an
HTML 404 page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from digin.api.dashboard.images import ThumbCache
from digin.api.dashboard.sessions import COOKIE, COOKIE_PATH, SessionToken, Signer
from digin.api.deps import SessionDep
from digin.service import repo
from digin.service.db import Tenant
from digin.service.repo.dashboard import session_tenant
from digin.service.settings import Settings


@dataclass
class Dashboard:
    """The dashboard's long-lived parts, made once per app (`app.state.dashboard`)."""

    settings: Settings
    signer: Signer | None  # None: production without DIGIN_SECRET_KEY (no login possible)
    templates: Jinja2Templates
    thumbs: ThumbCache


class LoginRequired(Exception):
    pass


class PageNotFound(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass
class Viewer:
    tenant: Tenant
    token: SessionToken
    csrf: str  # the token forms must send back
    auth: bool  # auth is on (a logout button makes sense)
    new_cookie: str | None = None  # an anonymous session to set (auth off, first visit)

    def apply(self, response: Response, request: Request) -> Response:
        if self.new_cookie is not None:
            set_session_cookie(response, request, self.new_cookie, self.token.expires)
        return response


async def get_dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


DashboardDep = Annotated[Dashboard, Depends(get_dashboard)]


def set_session_cookie(response: Response, request: Request, value: str, expires: int) -> None:
    import time

    response.set_cookie(
        COOKIE, value, max_age=max(0, expires - int(time.time())), path=COOKIE_PATH,
        httponly=True, samesite="strict", secure=request.url.scheme == "https",
    )  # fmt: skip


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


def read_session(request: Request, dashboard: Dashboard) -> SessionToken | None:
    if dashboard.signer is None:
        return None
    return dashboard.signer.read(request.cookies.get(COOKIE))


def resolve_viewer(request: Request, session: Session, dashboard: Dashboard) -> Viewer:
    signer = dashboard.signer
    token = read_session(request, dashboard)
    if not dashboard.settings.auth_enabled:
        if signer is None:  # unreachable: auth off means embedded mode, which has a key file
            raise LoginRequired()
        new_cookie = None
        if token is None:
            new_cookie, token = signer.issue(key_prefix=None, tenant_id=None)
        tenant = repo.local_tenant(session)  # created on first use
        session.commit()
        return Viewer(tenant, token, signer.csrf(token), auth=False, new_cookie=new_cookie)
    if signer is None or token is None or token.key_prefix is None or token.tenant_id is None:
        raise LoginRequired()
    found = session_tenant(
        session, prefix=token.key_prefix, tenant_id=token.tenant_id, nonce=token.nonce
    )
    if found is None:  # the key was revoked since the login, or the session logged out
        raise LoginRequired()
    return Viewer(found, token, signer.csrf(token), auth=True)


def get_viewer(request: Request, session: SessionDep, dashboard: DashboardDep) -> Viewer:
    return resolve_viewer(request, session, dashboard)


ViewerDep = Annotated[Viewer, Depends(get_viewer)]


def login_url(request: Request) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET" or not request.url.path.startswith("/ui/"):
        target = "/ui/jobs"
    return f"/ui/login?next={quote(target, safe='')}"


def safe_next(value: str | None) -> str:
    """Where to go after the login: a dashboard path only (never another site)."""
    if value and value.startswith("/ui/") and "//" not in value and "\\" not in value:
        return value
    return "/ui/jobs"
