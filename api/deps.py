"""Dependencies of the routes, as `Annotated` aliases (full-stack FastAPI template `deps.py`):
the settings, a database session per request, the storage, the Celery app and the current
tenant (bearer API key, or the `local` tenant when auth is off in embedded mode). Dependencies
that do no I/O are `async def`: FastAPI runs them inline, not through its thread pool.

A route that writes what its JSON body holds takes `WritingTenantDep`: the key is checked first
(a bad key is a 401 whatever the body), then every value of the body is checked storable
(`digin.api.schemas.unstorable`: a 422 naming each field), and only then does FastAPI validate
the body's model and the route resolve anything (model specs, uploads, webhook hosts).

The app's long-lived objects live in one `Services` container on `app.state.services`, made by
`digin.api.app.create_app` from the settings.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from digin.api.metrics import Metrics
from digin.api.problems import ProblemError, fields_problem
from digin.api.schemas import unstorable
from digin.api.submissions import JobWriter
from digin.service import repo
from digin.service.db import Tenant
from digin.service.events import EventHub
from digin.service.keycache import KeyCache
from digin.service.pollread import JobReader
from digin.service.ratelimit import AuthFailureLimiter, Blocked
from digin.service.security import key_prefix
from digin.service.settings import Settings
from digin.service.storage import Storage

INLINE_CHECK_BYTES = 64 * 1024  # bodies up to this size are checked on the event loop


@dataclass
class Services:
    """What the routes share: made once per app, closed at shutdown."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    celery: Celery
    metrics: Metrics
    writer: JobWriter  # POST /v1/jobs: group commit (digin.api.submissions)
    auth_limiter: AuthFailureLimiter  # refused keys per address and key (service/ratelimit.py)
    keys: KeyCache  # successful key checks, for a few seconds (service/keycache.py)
    events: EventHub  # live events of the streams (service/events.py)
    job_reader: JobReader | None = None  # PostgreSQL: the polling path's read (service/pollread.py)


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


async def get_storage(services: ServicesDep) -> Storage:
    return services.storage


async def get_celery(services: ServicesDep) -> Celery:
    return services.celery


async def get_metrics(services: ServicesDep) -> Metrics:
    return services.metrics


def get_session(services: ServicesDep) -> Iterator[Session]:
    """One session per request; routes commit what they write (an uncommitted session is
    rolled back when it closes)."""
    with services.sessions() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SessionDep = Annotated[Session, Depends(get_session)]

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer dg_<prefix>_<secret>` (create one with "
    "`digin keys create --tenant NAME`); not needed when auth is off (embedded mode)",
)


def unauthorized(detail: str, *, invalid: bool) -> ProblemError:
    challenge = 'Bearer realm="digin"' + (', error="invalid_token"' if invalid else "")
    return ProblemError(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})


@dataclass(frozen=True)
class Caller:
    """Who calls: the bearer secret (None when auth is off: the `local` tenant of embedded
    mode), the client's address, the limiter that counts refused keys, and the cache of
    successful key checks."""

    secret: str | None
    address: str | None = None
    limiter: AuthFailureLimiter | None = None
    keys: KeyCache | None = None


LOCAL = Caller(None)


def too_many_failures(blocked: Blocked) -> ProblemError:
    return ProblemError(
        429,
        "too_many_failed_authentications",
        f"too many refused API keys from this {blocked.reason}; retry after "
        f"{blocked.retry_after} s",
        headers={"Retry-After": str(blocked.retry_after)},
    )


def caller_of(
    request: Request, services: Services, secret: str | None, *, cached: bool = False
) -> Caller:
    """Who calls, before any database work: the bearer `secret`, or `LOCAL` when auth is off
    (embedded mode); a missing key is a 401 here. `tenant_of` checks the secret; `cached`: a
    key that passed within DIGIN_KEY_CACHE_SECONDS passes without a check (the polling path)."""
    if not services.settings.auth_enabled:
        return LOCAL
    if secret is None:
        raise unauthorized(
            "an API key is required: send 'Authorization: Bearer <key>'", invalid=False
        )
    address = request.client.host if request.client else None
    return Caller(secret, address, services.auth_limiter, services.keys if cached else None)


async def get_caller(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    return caller_of(request, services, credentials.credentials if credentials else None)


def tenant_of(session: Session, caller: Caller) -> Tenant:
    """The tenant every query of the request is scoped to; a 401 for a bad key, a 429 while
    the caller's address or key has too many refused keys (checked before the key is). For a
    caller with the key cache (the polling path), a key that passed within
    DIGIN_KEY_CACHE_SECONDS is served from it, without the database or the counters
    (service/keycache.py); every other route checks the key on every request."""
    if caller.secret is None:
        local = repo.local_tenant(session)  # created on first use
        session.commit()
        return local
    cached = caller.keys.get(caller.secret) if caller.keys is not None else None
    if cached is not None:
        return cached
    prefix = key_prefix(caller.secret)
    blocked = None if caller.limiter is None else caller.limiter.check(caller.address, prefix)
    if blocked is not None and blocked.reason == "client address":
        raise too_many_failures(blocked)  # this address guessed too often: not even checked
    tenant = repo.authenticate(session, secret=caller.secret)
    if tenant is None:
        if caller.limiter is not None:
            caller.limiter.failed(caller.address, prefix)
        if blocked is not None:  # this key was guessed at too often: 429, not 401
            raise too_many_failures(blocked)
        raise unauthorized("the API key is invalid or revoked", invalid=True)
    if caller.keys is not None and prefix is not None:
        caller.keys.put(caller.secret, prefix, tenant)
    return tenant  # the right secret always passes its key's counter (service/ratelimit.py)


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_tenant(request: Request, session: SessionDep, caller: CallerDep) -> Tenant:
    checked: Tenant | None = getattr(request.state, "tenant", None)  # KeyFirstRoute's
    return checked if checked is not None else tenant_of(session, caller)


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def load_tenant(services: Services, caller: Caller) -> Tenant:
    """`tenant_of` with a session of its own (run in the thread pool)."""
    with services.sessions() as session:
        return tenant_of(session, caller)


async def get_tenant_first(request: Request, services: ServicesDep, caller: CallerDep) -> Tenant:
    """The caller's tenant, checked in one trip to the thread pool with a session of its own
    (before the request's body is validated: see `get_writing_tenant`)."""
    checked: Tenant | None = getattr(request.state, "tenant", None)  # KeyFirstRoute's
    if checked is not None:
        return checked
    return await run_in_threadpool(load_tenant, services, caller)


def bearer_secret(request: Request) -> str | None:
    """The secret of an `Authorization: Bearer <secret>` header (HTTPBearer's reading)."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    return secret.strip() or None if scheme.lower() == "bearer" else None


class KeyFirstRoute(APIRoute):
    """A route with a request body checks the caller's key before the body is read: FastAPI
    reads and parses a body before it runs any dependency, so a request with no key or a bad
    one and a body that does not parse would otherwise be answered 400/422 instead of 401 (and
    make the API parse what anyone sends). The tenant found is kept on `request.state` for the
    route's own tenant dependency, so the key is checked once."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def key_first(request: Request) -> Response:
            services: Services = request.app.state.services
            caller = caller_of(request, services, bearer_secret(request))
            request.state.tenant = await run_in_threadpool(load_tenant, services, caller)
            return await handler(request)

        return key_first


async def get_writing_tenant(
    request: Request, tenant: Annotated[Tenant, Depends(get_tenant_first)]
) -> Tenant:
    """The tenant of a request whose JSON body is written: the key checked first, then the
    body's values (`unstorable`), before FastAPI validates the body's model."""
    raw = await request.body()
    if raw:
        try:
            body = await request.json()  # parsed once per request (FastAPI's body reads it)
        except ValueError:  # not JSON: FastAPI answers it (a 422 naming `body`)
            return tenant
        # a large body (a batch's items) is walked off the event loop
        if len(raw) > INLINE_CHECK_BYTES:
            errors = await run_in_threadpool(unstorable, body)
        else:
            errors = unstorable(body)
        if errors:
            raise fields_problem(422, "validation", errors)
    return tenant


WritingTenantDep = Annotated[Tenant, Depends(get_writing_tenant)]
