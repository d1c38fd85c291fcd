"""Live events as server-sent events (docs/architecture.md §8.12): `GET /v1/jobs/{id}/events`
and `GET /v1/batches/{id}/events`.

A stream answers `text/event-stream`: first the current state (`snapshot`), then `status`,
`progress`, `artifacts` and `batch_finished` events as they happen, a `: keepalive` comment when
idle, and a last `snapshot` once the job (or batch) has finished, after which it closes. Stored
events carry `id:`; a client that reconnects with `Last-Event-ID` gets what it missed first. The
same key check and tenant scoping as the GET routes (another tenant's job is a 404), a per-tenant
cap on open streams per API process (429), and the key re-checked at every heartbeat.

`event_stream_response` is the reusable part: anything built of jobs (an audit) passes its
`Feed` (`jobs_feed` for a set of job ids, `batch_feed` for a batch) and gets the same stream;
the dashboard uses it with its session instead of a bearer key.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from digin.api.deps import Caller, CallerDep, Services, ServicesDep, load_tenant
from digin.api.problems import ProblemError, field_problem, problem_responses
from digin.api.routes.batches import find_batch, public
from digin.api.routes.jobs import find_job, root
from digin.api.schemas import JobPublic
from digin.service.db import TERMINAL, Batch, Job, Tenant
from digin.service.events import Feed, Subscription, TooManyStreams, stream_events
from digin.service.events import Scope as EventScope

router = APIRouter(tags=["events"])

MEDIA_TYPE = "text/event-stream"
RETRY_AFTER_S = 5  # a tenant at its stream cap
BATCH_REFRESH_S = 1.0  # a batch stream's snapshot (counts, ETA) at most this often
LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        max_length=32,
        description="resume: the `id:` of the last event received (EventSource sends it)",
    ),
]
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "server-sent events until the job or batch has finished",
        "content": {MEDIA_TYPE: {"schema": {"type": "string"}}},
    },
    **problem_responses(401, 404, 422, 429),
}


# --- feeds ----------------------------------------------------------------------------------------
def job_feed(tenant: Tenant, job_id: uuid.UUID, *, base: str = "") -> Feed:
    """One job: its snapshot is the job as `GET /v1/jobs/{id}` shows it."""

    def snapshot(session: Session) -> dict[str, Any]:
        job = find_job(session, tenant, job_id)
        return JobPublic.from_job(job, base=base).model_dump(mode="json")

    def finished(session: Session) -> bool:
        return session.scalar(select(Job.status).where(Job.id == job_id)) in TERMINAL

    scope = EventScope(tenant.id, job_ids=frozenset({job_id}))
    return Feed(scope, snapshot, finished, base)


def batch_feed(tenant: Tenant, batch_id: uuid.UUID, *, base: str = "") -> Feed:
    """A batch (or anything stored as one, such as an audit): events of all its items; its
    snapshot is the batch as `GET /v1/batches/{id}` shows it; it ends with the batch."""

    def snapshot(session: Session) -> dict[str, Any]:
        (batch,) = public(session, [find_batch(session, tenant, batch_id)], base=base)
        return batch.model_dump(mode="json")

    def finished(session: Session) -> bool:
        ended = session.scalar(select(Batch.finished_at).where(Batch.id == batch_id))
        return ended is not None

    scope = EventScope(tenant.id, batch_ids=frozenset({batch_id}))
    return Feed(scope, snapshot, finished, base, refresh_s=BATCH_REFRESH_S)


def jobs_feed(tenant: Tenant, job_ids: frozenset[uuid.UUID], *, base: str = "") -> Feed:
    """A set of the tenant's jobs: its snapshot lists each job's status and progress; it ends
    when every one of them has finished."""

    def snapshot(session: Session) -> dict[str, Any]:
        rows = session.execute(
            select(Job.id, Job.status, Job.progress)
            .where(Job.tenant_id == tenant.id, Job.id.in_(job_ids))
            .order_by(Job.created_at, Job.id)
        )
        jobs = [{"id": str(i), "status": s, "progress": p} for i, s, p in rows]
        return {"jobs": jobs}

    def finished(session: Session) -> bool:
        unfinished = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant.id, Job.id.in_(job_ids), Job.status.not_in(TERMINAL))
        )
        return not unfinished

    scope = EventScope(tenant.id, job_ids=job_ids)
    return Feed(scope, snapshot, finished, base)


# --- the response ---------------------------------------------------------------------------------
class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that gives its hub subscription back however it ends (also when
    the client left before the first frame)."""

    def __init__(self, sub: Subscription, content: Any) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type=MEDIA_TYPE, headers=headers)
        self.sub = sub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.sub.close()


def parse_last_event_id(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    if not value.strip().isdigit():
        raise field_problem(
            422, "validation", "Last-Event-ID", f"{value[:32]!r} is not an event id this API sent"
        )
    return int(value)


def key_allowed(services: Services, caller: Caller) -> Callable[[], Awaitable[bool]]:
    """Whether the caller's key still passes (a stream's check at every heartbeat, through the
    key cache as the polling path checks it)."""
    caller = dataclasses.replace(caller, keys=services.keys)

    async def allowed() -> bool:
        try:
            await run_in_threadpool(load_tenant, services, caller)
        except ProblemError:
            return False
        return True

    return allowed


def event_stream_response(
    services: Services,
    feed: Feed,
    last_event_id: str | None,
    allowed: Callable[[], Awaitable[bool]],
) -> EventStreamResponse:
    """The stream of `feed`, whose scope the caller's tenant owns (the route checked it);
    `allowed()` is asked at every heartbeat whether the caller may still read it (`key_allowed`
    for a bearer key). A 429 when the tenant has `max_streams_per_tenant` streams open on this
    process. Call it on the event loop (an `async def` route)."""
    resume = parse_last_event_id(last_event_id)
    settings = services.settings
    try:
        sub = services.events.subscribe(feed.scope)
    except TooManyStreams as exc:
        raise ProblemError(
            429, "tenant-limit", f"{exc}; close one first",
            headers={"Retry-After": str(RETRY_AFTER_S)}, limit=exc.limit,
        ) from None  # fmt: skip

    body = stream_events(
        sub, feed, services.sessions, last_event_id=resume,
        heartbeat_s=settings.events_heartbeat_seconds, allowed=allowed,
    )  # fmt: skip
    return EventStreamResponse(sub, body)


async def checked(
    services: Services, caller: Caller, find: Callable[[Session, Tenant], object]
) -> Tenant:
    """The caller's tenant once `find` found what it streams (a 401 or 404 otherwise), in one
    trip to the thread pool."""

    def load() -> Tenant:
        tenant = load_tenant(services, caller)
        with services.sessions() as session:
            find(session, tenant)
        return tenant

    return await run_in_threadpool(load)


@router.get(
    "/v1/jobs/{job_id}/events",
    summary="Follow a job's events (server-sent events)",
    response_class=StreamingResponse,
    responses=STREAM_RESPONSES,
)
async def job_events(
    job_id: uuid.UUID,
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    tenant = await checked(services, caller, lambda s, t: find_job(s, t, job_id))
    feed = job_feed(tenant, job_id, base=root(request))
    return event_stream_response(services, feed, last_event_id, key_allowed(services, caller))


@router.get(
    "/v1/batches/{batch_id}/events",
    summary="Follow a batch's events (server-sent events)",
    response_class=StreamingResponse,
    responses=STREAM_RESPONSES,
)
async def batch_events(
    batch_id: uuid.UUID,
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    tenant = await checked(services, caller, lambda s, t: find_batch(s, t, batch_id))
    feed = batch_feed(tenant, batch_id, base=root(request))
    return event_stream_response(services, feed, last_event_id, key_allowed(services, caller))
