"""`/v1/jobs`: submit, read, list, cancel, and the artifacts of a job (docs/architecture.md §9.2).

Every query is scoped to the caller's tenant; another tenant's job is a 404. A submission is
validated, written and committed before its message is sent (docs/architecture.md §8.3); a
broker that is down leaves the job queued for the reaper to re-send, and the client still gets
its 202.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from datetime import timedelta
from pathlib import PurePosixPath
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import AfterValidator
from sqlalchemy.orm import Session

from digin.api.deps import (
    KeyFirstRoute,
    Services,
    ServicesDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    TenantDep,
    WritingTenantDep,
    bearer_secret,
    caller_of,
    tenant_of,
    unauthorized,
)
from digin.api.problems import ProblemError, field_problem, not_found, problem_responses
from digin.api.routes.webhooks import stored_webhook
from digin.api.schemas import (
    ArtifactList,
    ArtifactPublic,
    JobCreate,
    JobList,
    JobPublic,
    JobStatus,
    artifact_path,
    params_problem,
    storable_text,
)
from digin.core.limits import cost_error
from digin.core.params import KINDS
from digin.service import repo
from digin.service.db import SUCCEEDED, TERMINAL, Job, Tenant, utcnow
from digin.service.repo.jobs import MAX_PAGE
from digin.service.repo.submit import Submission
from digin.service.storage import LocalStorage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=KeyFirstRoute)

QUEUE = "interactive"  # single jobs; sweeps (batches) use "sweep"
POLL_AFTER_S = 2  # Retry-After on jobs that are not finished
DEFAULT_PAGE = 50

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="the same key with the same body returns the same job; with another "
        "body it is a 422",
    ),
    AfterValidator(storable_text),
]

StatusFilter = Annotated[
    list[JobStatus] | None, Query(description="repeat for several: ?status=queued&status=running")
]
KindFilter = Annotated[str | None, Query(json_schema_extra={"enum": list(KINDS)})]
Cursor = Annotated[str | None, Query(max_length=512, description="the previous page's next_cursor")]
T = TypeVar("T")


def root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def found(row: T | None, what: str, ident: object) -> T:
    """`row`, or the 404 problem of the tenant's `what` `ident` when there is none."""
    if row is None:
        raise not_found(what, ident)
    return row


def find_job(session: Session, tenant: Tenant, job_id: uuid.UUID) -> Job:
    return found(repo.get_job(session, tenant_id=tenant.id, job_id=job_id), "job", job_id)


def cursor_problem(exc: Exception) -> ProblemError:
    """The 422 of a `cursor` query parameter that is not a page's next_cursor."""
    return field_problem(422, "validation", "cursor", str(exc).removeprefix("cursor: "))


def link_next_page(request: Request, response: Response, next_cursor: str | None) -> None:
    """`Link: <this URL with cursor=next_cursor>; rel="next"` on a page that has a next one."""
    if next_cursor is not None:
        url = request.url.include_query_params(cursor=next_cursor)
        response.headers["Link"] = f'<{root(request)}{url.path}?{url.query}>; rel="next"'


@router.post(
    "",
    status_code=202,
    summary="Submit a job",
    response_description="accepted: the queued job (`Location` is its URL, `Retry-After` the "
    "polling interval); a replayed Idempotency-Key returns the original job",
    responses=problem_responses(401, 413, 422, 429),
)
async def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    services: ServicesDep,
    tenant: WritingTenantDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    settings = services.settings
    # 1. Validate (the key was checked first, then the body's values: WritingTenantDep):
    #    params normalised, models well-formed and allowed, uploads the tenant's, the webhook's
    #    host public (resolved off the event loop)
    params = body.normalised_params(
        settings.model_allow_list,
        allow_paths=settings.mode == "embedded",
        model_roots=settings.model_path_roots,
    )
    # the job's estimated cost under the deployment's cap (docs/architecture.md §9.7)
    if (too_costly := cost_error(body.kind, params, settings.max_job_cost or None)) is not None:
        raise params_problem([too_costly])
    uploads = uploaded_image_ids(params)
    if uploads:  # images named by id must be this tenant's uploads
        await run_in_threadpool(check_uploads, services, tenant, uploads)
    webhook = None
    if body.webhook is not None:
        webhook = await run_in_threadpool(stored_webhook, body.webhook, settings)
    # 2. Write the row (or find the idempotent original), commit, send its message, with the
    #    other submissions of this moment (digin.api.submissions: one transaction for the group)
    values = {
        "kind": body.kind,
        "params": params,
        "seed": secrets.randbelow(2**31) if body.seed is None else body.seed,
        "priority": body.priority,
        "queue": QUEUE,
        "max_attempts": settings.max_attempts,
        "idempotency_key": idempotency_key,
        "request_hash": body.request_hash(params) if idempotency_key else None,
        "meta": body.metadata,
        "webhook": webhook,
    }
    submission = Submission(tenant.id, values, max_queued=settings.max_queued_per_tenant)
    try:
        outcome = await services.writer.submit(submission)
    except repo.UnknownTenant:  # the tenant went away since its key was checked
        raise unauthorized("the API key is invalid or revoked", invalid=True) from None
    error = outcome.error
    if isinstance(error, repo.IdempotencyConflict):
        raise field_problem(422, "idempotency-key-reused", "Idempotency-Key", str(error))
    if isinstance(error, repo.TenantLimitExceeded):
        raise ProblemError(
            429, "tenant-limit", f"{error}; finish or cancel jobs first",
            headers={"Retry-After": str(error.retry_after)}, limit=error.limit,
        )  # fmt: skip
    if error is not None:
        raise error
    assert outcome.job is not None
    if not outcome.created:
        response.headers["Idempotent-Replayed"] = "true"
    public = JobPublic.from_job(outcome.job, base=root(request))
    response.headers["Location"] = public.urls.self
    response.headers["Retry-After"] = str(POLL_AFTER_S)
    return public


def uploaded_image_ids(params: dict[str, Any], prefix: str = "params") -> list[tuple[str, str]]:
    """(field, id) of every uploaded image the params name (`image_id`, `image_ids`, nested
    image-set blocks included)."""
    found = []
    for name, value in params.items():
        field = f"{prefix}.{name}"
        if isinstance(value, dict):
            found += uploaded_image_ids(value, field)
        elif name == "image_id" and isinstance(value, str):
            found.append((field, value))
        elif name == "image_ids" and isinstance(value, list):
            found += [(f"{field}.{i}", v) for i, v in enumerate(value) if isinstance(v, str)]
    return found


def check_uploads(services: Services, tenant: Tenant, uploads: list[tuple[str, str]]) -> None:
    """A 422 naming each field whose image id is not one of the tenant's uploads."""
    with services.sessions() as session:
        errors = []
        for field, value in uploads:
            try:
                image_id = uuid.UUID(value)
            except ValueError:
                image_id = None
            if (
                image_id is None
                or repo.get_image(session, tenant_id=tenant.id, image_id=image_id) is None
            ):
                errors.append(
                    {
                        "field": field,
                        "message": f"no uploaded image {value!r} (upload it with POST /v1/images)",
                    }
                )
    if errors:
        raise params_problem(errors)


@router.get("", summary="List jobs", responses=problem_responses(401, 422))
def list_jobs(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    status: StatusFilter = None,
    kind: KindFilter = None,
    batch_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> JobList:
    if kind is not None and kind not in KINDS:
        raise field_problem(422, "validation", "kind", f"must be one of {list(KINDS)}")
    try:
        jobs, next_cursor = repo.list_jobs(
            session, tenant_id=tenant.id, limit=limit, status=status, kind=kind,
            batch_id=batch_id, cursor=cursor,
        )  # fmt: skip
    except repo.InvalidCursor as exc:
        raise cursor_problem(exc) from None
    link_next_page(request, response, next_cursor)
    base = root(request)
    return JobList(data=[JobPublic.from_job(j, base=base) for j in jobs], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    summary="Get a job",
    response_model=JobPublic,
    responses=problem_responses(401, 404, 422),
    openapi_extra={"security": [{"ApiKey": []}]},
)
async def get_job(job_id: uuid.UUID, request: Request) -> Response:
    """The polling path: no dependencies to resolve (the services and the key read from the
    request, as `CallerDep` would); a key in the key cache (service/keycache.py) and the job
    read on the event loop on PostgreSQL (service/pollread.py), else the key check and the
    read in one trip to the thread pool; the job serialised once (the response model
    documents it; FastAPI does not re-validate)."""
    services: Services = request.app.state.services
    caller = caller_of(request, services, bearer_secret(request), cached=True)
    known = caller.keys.get(caller.secret) if caller.keys is not None and caller.secret else None
    if known is not None and services.job_reader is not None:  # on the loop, no ORM
        read = await services.job_reader.get(tenant_id=known.id, job_id=job_id)
        job = found(read, "job", job_id)
    else:

        def load() -> Job:
            with services.sessions() as session:
                return find_job(session, tenant_of(session, caller), job_id)

        job = await run_in_threadpool(load)
    public = JobPublic.from_job(job, base=root(request))
    headers = {} if job.status in TERMINAL else {"Retry-After": str(POLL_AFTER_S)}
    return Response(public.model_dump_json(), media_type="application/json", headers=headers)


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a job",
    response_description="the job: a queued job is canceled at once, a running one is "
    "`canceling` until its worker stops (within one optimisation iteration); a finished job "
    "is returned unchanged",
    responses=problem_responses(401, 404, 422),
)
def cancel_job(
    job_id: uuid.UUID, request: Request, session: SessionDep, tenant: TenantDep
) -> JobPublic:
    outcome = found(repo.request_cancel(session, tenant_id=tenant.id, job_id=job_id), "job", job_id)
    session.commit()
    return JobPublic.from_job(outcome[0], base=root(request))


# --- artifacts ----------------------------------------------------------------------------------
def stored_artifacts(job: Job, tenant: Tenant) -> list[dict[str, Any]]:
    """The artifacts the worker recorded for a succeeded job, with their storage keys; only
    keys under the job's own folder are served."""
    if job.status != SUCCEEDED or not job.result:
        return []
    folder = f"{tenant.name}/jobs/{job.id}/"
    entries = []
    for entry in job.result.get("artifacts") or []:
        key = str(entry.get("key") or "")
        if not key.startswith(folder) or not entry.get("name"):
            log.error("job %s: artifact %r is not under %s; not served", job.id, entry, folder)
            continue
        entries.append(entry)
    return entries


@router.get(
    "/{job_id}/artifacts",
    summary="List a job's artifacts with fresh URLs",
    response_description="every read mints new URLs: presigned (S3, valid "
    "DIGIN_URL_EXPIRY_SECONDS) or this API's download route (local storage)",
    responses=problem_responses(401, 404, 422),
)
def list_artifacts(
    job_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> ArtifactList:
    job = find_job(session, tenant, job_id)
    expiry = settings.url_expiry_seconds
    data = []
    for entry in stored_artifacts(job, tenant):
        url = storage.url(entry["key"], expires=expiry)
        data.append(
            ArtifactPublic(
                name=entry["name"],
                content_type=entry.get("content_type") or "application/octet-stream",
                size=entry.get("size"),
                url=url or artifact_path(job.id, entry["name"], base=root(request)),
                expires_at=utcnow() + timedelta(seconds=expiry) if url else None,
            )
        )
    return ArtifactList(job_id=job.id, status=job.status, data=data)


@router.get(
    "/{job_id}/artifacts/{name:path}",
    summary="Download an artifact",
    response_class=Response,
    responses={
        200: {
            "description": "the bytes (local storage, streamed)",
            "content": {"image/png": {}, "application/json": {}},
        },
        307: {"description": "S3: redirect to a short-lived presigned URL"},
        **problem_responses(401, 404),
    },
)
def get_artifact(
    job_id: uuid.UUID,
    name: str,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> Response:
    job = find_job(session, tenant, job_id)
    entry = next((e for e in stored_artifacts(job, tenant) if e["name"] == name), None)
    if entry is None:
        raise ProblemError(404, "not-found", f"job {job_id} has no artifact named {name!r}")
    content_type = entry.get("content_type") or "application/octet-stream"
    url = storage.url(entry["key"], expires=settings.url_expiry_seconds)
    if url is not None:
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    if isinstance(storage, LocalStorage):
        path = storage.path(entry["key"])
        if not path.is_file():
            raise ProblemError(404, "not-found", f"artifact {name!r} of job {job_id} is missing")
        return FileResponse(
            path, media_type=content_type, filename=PurePosixPath(name).name,
            content_disposition_type="inline",
        )  # fmt: skip
    return Response(storage.get(entry["key"]), media_type=content_type)
