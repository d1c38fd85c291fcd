"""Dependencies of the routes, as `Annotated` aliases (full-stack FastAPI template `deps.py`):
the settings, a database session per request, the storage, the Celery app and the current
tenant (bearer API key, or the `local` tenant when auth is off in embedded mode).

The app's long-lived objects live in one `Services` container on `app.state.services`, made by
`api.app.create_app` from the settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api import repo
from api.db import Tenant
from api.metrics import Metrics
from api.problems import ProblemError
from api.settings import Settings
from api.storage import Storage


@dataclass
class Services:
    """What the routes share: made once per app, closed at shutdown."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    celery: Celery
    metrics: Metrics


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> Settings:
    return services.settings


def get_storage(services: ServicesDep) -> Storage:
    return services.storage


def get_celery(services: ServicesDep) -> Celery:
    return services.celery


def get_metrics(services: ServicesDep) -> Metrics:
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


def get_tenant(
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant:
    """The tenant every query of the request is scoped to."""
    if not settings.auth_enabled:
        local = repo.local_tenant(session)  # created on first use
        session.commit()
        return local
    if credentials is None:
        raise unauthorized(
            "an API key is required: send 'Authorization: Bearer <key>'", invalid=False
        )
    tenant = repo.authenticate(session, secret=credentials.credentials)
    if tenant is None:
        raise unauthorized("the API key is invalid or revoked", invalid=True)
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]
