"""The FastAPI application of the job service (docs/architecture.md §9.2): `create_app(settings)`.

The app owns its engine, session factory, storage client and Celery app (a producer only: the
workers live in `worker/`), made from the settings here and closed at shutdown. Middleware, from
the outside in: request metrics, then the body-size limit; errors of every kind are problem+json
(`digin.api.problems`). Embedded mode without auth serves only on a loopback address.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NamedTuple

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from digin.api import dashboard
from digin.api.dashboard import audits as dashboard_audits
from digin.api.deps import Services
from digin.api.images import FIELD as IMAGE_FIELD
from digin.api.metrics import Metrics, MetricsMiddleware
from digin.api.problems import (
    PROBLEM_MEDIA_TYPE,
    Problem,
    install_problem_handlers,
    problem_response,
)
from digin.api.routes import ROUTERS, audits
from digin.api.submissions import JobWriter
from digin.service.db import make_engine, session_factory
from digin.service.dispatch import make_celery
from digin.service.events import EventHub
from digin.service.keycache import KeyCache
from digin.service.pollread import JobReader
from digin.service.ratelimit import AuthFailureLimiter
from digin.service.settings import Settings, get_settings
from digin.service.storage import LocalStorage, storage_from_settings

log = logging.getLogger(__name__)

IMAGES_PATH = "/v1/images"
MULTIPART_SLACK = 64 * 1024  # room for the multipart framing around an image of the limit


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(settings: Settings) -> None:
    """Auth off (embedded mode) means anyone who can connect acts as the `local` tenant: only
    a loopback address is allowed then."""
    if not settings.auth_enabled and not is_loopback(settings.host):
        raise ValueError(
            f"DIGIN_HOST={settings.host!r} with DIGIN_AUTH=off would serve every job without "
            "authentication to the network: bind to a loopback address (127.0.0.1, ::1, "
            "localhost), or set DIGIN_AUTH=on and create API keys with `digin keys create`"
        )


def _app_version() -> str:
    try:
        return version("digin")
    except PackageNotFoundError:
        return "0.0.0"


def _operation_id(route: APIRoute) -> str:
    """`jobs-create_job`: readable names for generated clients."""
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for `settings` (default: `get_settings()`, the environment)."""
    settings = settings or get_settings()
    check_binding(settings)
    pool = {"pool_size": settings.db_pool_size, "max_overflow": 0}  # no connection churn
    sqlite = settings.database_url.startswith("sqlite")
    engine = make_engine(settings.database_url, **({} if sqlite else pool))
    sessions = session_factory(engine)
    storage = storage_from_settings(settings)
    if isinstance(storage, LocalStorage):
        storage.ensure_bucket()  # the artifact folder (S3 buckets are made by deployment)
    celery = make_celery(settings, name="digin-api")
    metrics = Metrics(sessions)
    keys = KeyCache(settings.key_cache_seconds)
    services = Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        storage=storage,
        celery=celery,
        metrics=metrics,
        writer=JobWriter(sessions, celery, metrics),
        auth_limiter=AuthFailureLimiter(
            settings.rate_limit_storage_uri, settings.auth_failure_rate
        ),
        keys=keys,
        events=EventHub(
            sessions,
            settings.database_url,
            max_streams_per_tenant=settings.max_streams_per_tenant,
            poll_interval=settings.events_poll_seconds,
            on_key_revoked=keys.revoke,
        ),
        job_reader=None if sqlite else JobReader(settings.database_url),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services.events.postgresql:
            services.events.ensure_started()  # also tells the key cache of revoked keys
        yield
        await services.events.close()
        if services.job_reader is not None:
            await services.job_reader.close()
        services.writer.close()
        services.celery.close()
        services.engine.dispose()

    app = FastAPI(
        title="DiG-IN",
        version=_app_version(),
        summary="Diffusion guidance for investigating image classifiers, as a job service",
        description="Submit explanation jobs, poll them, fetch their images. Errors are "
        "`application/problem+json` (RFC 9457). Auth: `Authorization: Bearer <API key>` "
        "(not needed in embedded mode).",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        generate_unique_id_function=_operation_id,
    )
    app.state.services = services
    install_problem_handlers(app)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)  # outermost: sees all
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(audits.router)  # /v1/audits (docs/architecture.md §9.14)
    dashboard.install(app, settings)  # /ui: the HTML pages (docs/architecture.md §9.11)
    app.include_router(dashboard_audits.router)  # /ui/audits (§9.14)
    app.openapi = lambda: problem_openapi(app)  # type: ignore[method-assign]
    return app


# --- the request body limit ---------------------------------------------------------------------
class BodyTooLarge(Exception):
    pass


class BodyLimit(NamedTuple):
    enforced: int  # bytes of request body allowed
    field: str  # what the problem names
    setting: str  # the setting behind it, for the message
    value: int  # the setting's value


class BodyLimitMiddleware:
    """413 for a body over its limit: refused at once from `Content-Length`, else counted
    while it streams in (the 413 goes out as soon as the limit is crossed and whatever the
    app would have answered is dropped). Uploads to /v1/images are held to the image limit
    (plus multipart framing; the route checks the file itself); everything else to
    `max_body_bytes`. No route sees a body over its limit, so nothing is written."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.body = BodyLimit(
            settings.max_body_bytes, "body", "max_body_bytes", settings.max_body_bytes
        )
        image = settings.max_image_bytes
        self.image = BodyLimit(image + MULTIPART_SLACK, IMAGE_FIELD, "max_image_bytes", image)

    def limit(self, scope: Scope) -> BodyLimit:
        if scope["path"].rstrip("/") == IMAGES_PATH and self.image.enforced < self.body.enforced:
            return self.image
        return self.body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope)
        length = _content_length(scope)
        if length is not None and length > limit.enforced:
            await refuse(scope, receive, send, limit, f"the request body is {length} bytes")
            return
        received, refused, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.enforced:
                    if not started and not refused:
                        refused = True
                        text = f"the request body is over {limit.enforced} bytes"
                        await refuse(scope, receive, send, limit, text)
                    raise BodyTooLarge(f"request body over {limit.enforced} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 was sent; drop the app's answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise


async def refuse(scope: Scope, receive: Receive, send: Send, limit: BodyLimit, what: str) -> None:
    setting = f"{limit.setting}={limit.value} (DIGIN_{limit.setting.upper()})"
    message = f"{what}; the limit is {setting}"
    response = problem_response(
        Request(scope, receive), 413, "content-too-large", f"{limit.field}: {message}",
        errors=[{"field": limit.field, "message": message}], headers={"Connection": "close"},
        limit=limit.value,
    )  # fmt: skip
    await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# --- OpenAPI: every error response is the problem schema -----------------------------------------
def problem_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(problem.pop("$defs", {}))
    components["Problem"] = problem
    content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                if str(status)[0] in "45":
                    response["content"] = content
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema
