"""`/ui`: the dashboard's pages (docs/architecture.md §9.11), server-rendered from the same
repository functions as the REST API and scoped to the viewer's tenant: another tenant's job or
batch is a 404 page, exactly as it is a 404 problem under /v1.

Pages: jobs (filters, cursor pages, live progress), a job (images large with their classifier
confidences, trajectory, params, timings, error, cancel), batches, a batch (counts, progress,
ETA, the class x classifier matrix of outcomes), models. Images come through the cookie-
authenticated artifact and thumbnail routes below. A job's and a batch's page follow their live
events (`…/events`, the REST streams with the session instead of a key); small JSON endpoints
(`…/live`) feed the page script that polls the jobs table, and any page whose stream failed.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Form, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy.orm import Session

import digin.api.dashboard.views as views  # not via the package: its __init__ imports this module
from digin.api.dashboard.auth import (
    Dashboard,
    DashboardDep,
    LoginRequired,
    PageNotFound,
    Viewer,
    ViewerDep,
    clear_session_cookie,
    read_session,
    resolve_viewer,
    safe_next,
    set_session_cookie,
)
from digin.api.dashboard.images import CACHE_CONTROL, etag, matches, thumbnail
from digin.api.deps import Services, SessionDep, StorageDep
from digin.api.routes.events import LastEventId, batch_feed, event_stream_response, job_feed
from digin.api.routes.jobs import stored_artifacts
from digin.api.sweeps import class_names
from digin.core.params import KINDS
from digin.core.registry import is_allowed, list_models, list_schemes
from digin.service import repo
from digin.service.db import STATUSES, TERMINAL, Job
from digin.service.events import Feed
from digin.service.ratelimit import AuthFailureLimiter
from digin.service.repo import batches as repo_batches
from digin.service.repo.dashboard import (
    MAX_IDS,
    batch_items,
    end_session,
    job_states,
    jobs_by_ids,
)
from digin.service.repo.jobs import InvalidCursor
from digin.service.security import key_prefix
from digin.service.storage import ArtifactNotFound

log = logging.getLogger(__name__)
router = APIRouter(prefix="/ui", include_in_schema=False)

JOBS_PAGE = 50
BATCHES_PAGE = 20
MATRIX_ROWS = 20  # classes per page of a batch's matrix
MAX_LIVE_IDS = 200
CANCELABLE = ("queued", "running")
T = TypeVar("T")


def render(
    request: Request,
    dashboard: Any,
    viewer: Viewer | None,
    template: str,
    status_code: int = 200,
    **context: Any,
) -> Response:
    response: Response = dashboard.templates.TemplateResponse(
        request, template, {"viewer": viewer, **context}, status_code=status_code
    )
    if viewer is not None:
        viewer.apply(response, request)
    return response


def parse_id(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise PageNotFound(f"no {what} with id {value!r}") from None


def found(row: T | None, message: str) -> T:
    """`row`, or the 404 page saying `message` when there is none."""
    if row is None:
        raise PageNotFound(message)
    return row


def find_job(session: Session, viewer: Viewer, job_id: str) -> Job:
    job = repo.get_job(session, tenant_id=viewer.tenant.id, job_id=parse_id(job_id, "job"))
    return found(job, f"no job with id {job_id}")


def job_row(job: Job) -> dict[str, Any]:
    """What a row of the jobs list (and a cell of a batch matrix) shows of a job."""
    names = views.artifact_names(job)
    return {
        "job": job,
        "classes": views.classes_of(job),
        "headline": views.headline(job),
        "thumb": views.thumb_name(names),
        "fraction": views.progress_fraction(job.status, job.progress),
        "stage": (job.progress or {}).get("stage"),
        "terminal": job.status in TERMINAL,
    }


# --- jobs --------------------------------------------------------------------------------------
@router.get("")
@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/jobs")
def jobs_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    dashboard: DashboardDep,
    status: Annotated[list[str] | None, Query()] = None,
    kind: str | None = None,
    batch_id: str | None = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = JOBS_PAGE,
) -> Response:
    statuses = [s for s in status or [] if s]
    kind = kind or None
    errors = []
    if unknown := [s for s in statuses if s not in STATUSES]:
        errors.append(f"status: {unknown} is not one of {list(STATUSES)}")
    if kind is not None and kind not in KINDS:
        errors.append(f"kind: {kind!r} is not one of {list(KINDS)}")
    batch = None
    if batch_id:
        try:
            batch = uuid.UUID(batch_id)
        except ValueError:
            errors.append(f"batch: {batch_id!r} is not a batch id")
    jobs: list[Job] = []
    next_cursor = None
    if not errors:
        try:
            jobs, next_cursor = repo.list_jobs(
                session, tenant_id=viewer.tenant.id, limit=limit, status=statuses or None,
                kind=kind, batch_id=batch, cursor=cursor or None,
            )  # fmt: skip
        except InvalidCursor as exc:
            errors.append(str(exc))
    filters = {"status": statuses, "kind": kind or "", "batch_id": batch_id or ""}
    query = [("status", s) for s in statuses] + [
        (k, v) for k, v in (("kind", kind), ("batch_id", batch_id)) if v
    ]
    return render(
        request, dashboard, viewer, "jobs.html", status_code=422 if errors else 200,
        rows=[job_row(j) for j in jobs], next_cursor=next_cursor, filters=filters, query=query,
        errors=errors, statuses=STATUSES, kinds=list(KINDS), first_page=cursor is None,
    )  # fmt: skip


@router.get("/jobs/live")
def jobs_live(
    session: SessionDep,
    viewer: ViewerDep,
    id: Annotated[list[uuid.UUID], Query(max_length=MAX_LIVE_IDS)],
) -> JSONResponse:
    """Status and progress of the viewer's jobs among `id` (what the page script polls)."""
    states = job_states(session, tenant_id=viewer.tenant.id, job_ids=id)
    data = [
        {
            "id": str(s.id),
            "status": s.status,
            "terminal": s.status in TERMINAL,
            "stage": (s.progress or {}).get("stage"),
            "step": (s.progress or {}).get("step"),
            "total": (s.progress or {}).get("total"),
            "fraction": views.progress_fraction(s.status, s.progress),
        }
        for s in states
    ]
    return JSONResponse({"jobs": data}, headers={"Cache-Control": "no-store"})


@router.get("/jobs/{job_id}/row")
def job_row_partial(
    job_id: str, request: Request, session: SessionDep, viewer: ViewerDep, dashboard: DashboardDep
) -> Response:
    """One row of the jobs table, re-rendered when the script sees the job finish."""
    job = find_job(session, viewer, job_id)
    return render(request, dashboard, viewer, "job_row.html", row=job_row(job))


@router.get("/jobs/{job_id}")
def job_page(
    job_id: str, request: Request, session: SessionDep, viewer: ViewerDep, dashboard: DashboardDep
) -> Response:
    job = find_job(session, viewer, job_id)
    summary = views.summary_of(job)
    names = views.artifact_names(job)
    context: dict[str, Any] = {
        "row": job_row(job),
        "job": job,
        "summary": summary,
        "names": names,
        "artifacts": stored_artifacts(job, viewer.tenant),
        "timings": views.timings(job, summary),
        "params_json": json.dumps(job.params, indent=2, sort_keys=True),
        "cancelable": job.status in CANCELABLE,
        "generative": job.kind in views.GENERATIVE,
    }
    if job.kind in views.GENERATIVE:
        context["items"] = views.generative_items(summary, names)
        context["metric_names"] = summary.get("metric_names") or {}
    elif job.kind == "counterfactual":
        context["cf"] = views.counterfactual_view(summary, names)
    elif job.kind == "neural_pca":
        context["pca"] = views.pca_view(summary, names)
    elif job.kind == "spurious_score":
        context["spurious"] = views.spurious_view(summary, names)
    return render(request, dashboard, viewer, "job.html", **context)


class CancelForm:
    """A cancel form's POST (the dependency of both cancel routes): the viewer and the form's
    CSRF token."""

    def __init__(
        self,
        request: Request,
        session: SessionDep,
        viewer: ViewerDep,
        dashboard: DashboardDep,
        csrf: Annotated[str, Form()] = "",
    ) -> None:
        self.request, self.session, self.viewer = request, session, viewer
        self.dashboard, self.csrf = dashboard, csrf

    def submit(self, cancel: Callable[[uuid.UUID], Any], what: str, raw_id: str) -> Response:
        """Check the form's CSRF token, cancel the viewer's own job or batch (`cancel` returns
        it, or None when the tenant has none of that id), commit, and show it."""
        signer, viewer = self.dashboard.signer, self.viewer
        if not signer or not signer.check_csrf(viewer.token, self.csrf):
            return forbidden(self.request, self.dashboard, viewer)
        canceled = found(cancel(viewer.tenant.id), f"no {what} with id {raw_id}")
        self.session.commit()
        plural = {"job": "jobs", "batch": "batches"}[what]
        return RedirectResponse(f"/ui/{plural}/{canceled.id}", status_code=303)


CancelFormDep = Annotated[CancelForm, Depends()]


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, form: CancelFormDep) -> Response:
    def cancel(tenant_id: uuid.UUID) -> Any:
        job_uuid = parse_id(job_id, "job")
        outcome = repo.request_cancel(form.session, tenant_id=tenant_id, job_id=job_uuid)
        return None if outcome is None else outcome[0]

    return form.submit(cancel, "job", job_id)


def forbidden(request: Request, dashboard: Any, viewer: Viewer | None) -> Response:
    return render(
        request, dashboard, viewer, "error.html", status_code=403, title="Form expired",
        message="The form's security token did not match this session (it may have expired, "
        "or the form came from another site). Reload the page and try again.",
    )  # fmt: skip


# --- images ------------------------------------------------------------------------------------
class ArtifactRead:
    """The artifact `name` of the viewer's job `job_id` (the path of both image routes), read
    with the session cookie."""

    def __init__(
        self,
        job_id: str,
        name: str,
        session: SessionDep,
        viewer: ViewerDep,
        storage: StorageDep,
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> None:
        self.job = find_job(session, viewer, job_id)
        entries = stored_artifacts(self.job, viewer.tenant)
        entry = next((e for e in entries if e["name"] == name), None)
        self.entry = found(entry, f"job {self.job.id} has no artifact named {name!r}")
        self.name, self.storage, self.if_none_match = name, storage, if_none_match

    def headers(self, rendition: str) -> dict[str, str]:
        """ETag and Cache-Control of one rendition ("full" or "thumb") of the artifact."""
        return {"ETag": etag(self.entry, self.job.finished_at, rendition),
                "Cache-Control": CACHE_CONTROL}  # fmt: skip

    def not_modified(self, headers: dict[str, str]) -> bool:
        """Whether the client's copy (If-None-Match) is this rendition."""
        return matches(self.if_none_match, headers["ETag"])

    def data(self) -> bytes:
        try:
            return self.storage.get(self.entry["key"])
        except ArtifactNotFound:
            raise PageNotFound(f"artifact {self.name!r} of job {self.job.id} is missing") from None


ArtifactDep = Annotated[ArtifactRead, Depends()]


@router.get("/jobs/{job_id}/artifacts/{name:path}")
def artifact(read: ArtifactDep) -> Response:
    """The stored artifact, read with the session cookie."""
    headers = read.headers("full")
    if read.not_modified(headers):
        return Response(status_code=304, headers=headers)
    media = read.entry.get("content_type") or "application/octet-stream"
    return Response(read.data(), media_type=media, headers=headers)


@router.get("/jobs/{job_id}/thumbs/{name:path}")
def thumb(read: ArtifactDep, dashboard: DashboardDep) -> Response:
    """A thumbnail (at most 128 px a side) of a PNG artifact, made on first request."""
    if (read.entry.get("content_type") or "") != "image/png":
        raise PageNotFound(f"artifact {read.name!r} is not an image")
    headers = read.headers("thumb")
    if read.not_modified(headers):
        return Response(status_code=304, headers=headers)
    data = dashboard.thumbs.get(headers["ETag"])
    if data is None:
        data = thumbnail(read.data())
        dashboard.thumbs.put(headers["ETag"], data)
    return Response(data, media_type="image/png", headers=headers)


# --- batches -----------------------------------------------------------------------------------
@router.get("/batches")
def batches_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    dashboard: DashboardDep,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    errors = []
    batches: list[Any] = []
    next_cursor = None
    try:
        batches, next_cursor = repo_batches.list_batches(
            session, tenant_id=viewer.tenant.id, limit=BATCHES_PAGE, cursor=cursor or None
        )
    except InvalidCursor as exc:
        errors.append(str(exc))
    stats = repo_batches.batch_stats(session, batches)
    rows = [{"batch": b, "stats": stats[b.id]} for b in batches]
    return render(
        request, dashboard, viewer, "batches.html", status_code=422 if errors else 200,
        rows=rows, next_cursor=next_cursor, errors=errors, first_page=cursor is None,
    )  # fmt: skip


def find_batch(session: Session, viewer: Viewer, batch_id: str) -> Any:
    batch = repo_batches.get_batch(
        session, tenant_id=viewer.tenant.id, batch_id=parse_id(batch_id, "batch")
    )
    return found(batch, f"no batch with id {batch_id}")


@router.get("/batches/{batch_id}")
def batch_page(
    batch_id: str,
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    dashboard: DashboardDep,
    page: Annotated[int, Query(ge=1)] = 1,
) -> Response:
    batch = find_batch(session, viewer, batch_id)
    stats = repo_batches.batch_stats(session, [batch])[batch.id]
    items = batch_items(session, tenant_id=viewer.tenant.id, batch_id=batch.id)
    matrix = views.batch_matrix(items, page=page, rows_per_page=MATRIX_ROWS)
    ids = matrix.ids()
    jobs = jobs_by_ids(session, tenant_id=viewer.tenant.id, job_ids=ids[:MAX_IDS])
    cells = {
        key: [job_row(jobs[i.id]) for i in cell if i.id in jobs]
        for key, cell in matrix.cells.items()
    }
    roots = dashboard.settings.model_path_roots  # custom ids are the client's: `m=` any text

    def names_of(label: str) -> tuple[str, ...] | None:
        return class_names(label, roots)  # None for a label that is no spec

    labels = {
        row: views.class_label(row, matrix.columns[0], names_of) if matrix.by_axes else row
        for row in matrix.rows
    }
    return render(
        request, dashboard, viewer, "batch.html", batch=batch, stats=stats, matrix=matrix,
        cells=cells, labels=labels, truncated=len(ids) > MAX_IDS,
        cancelable=batch.finished_at is None and batch.canceled_at is None,
        spec_json=json.dumps(batch.spec, indent=2, sort_keys=True),
        template_json=json.dumps(batch.params_template, indent=2, sort_keys=True),
    )  # fmt: skip


@router.get("/batches/{batch_id}/live")
def batch_live(batch_id: str, session: SessionDep, viewer: ViewerDep) -> JSONResponse:
    batch = find_batch(session, viewer, batch_id)
    s = repo_batches.batch_stats(session, [batch])[batch.id]
    body = {
        "id": str(batch.id),
        "status": s.status,
        "counts": s.counts,
        "total": batch.total,
        "progress": s.progress,
        "eta_seconds": s.eta_seconds,
        "throughput_per_min": s.throughput_per_min,
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, form: CancelFormDep) -> Response:
    def cancel(tenant_id: uuid.UUID) -> Any:
        batch_uuid = parse_id(batch_id, "batch")
        return repo_batches.cancel_batch(form.session, tenant_id=tenant_id, batch_id=batch_uuid)

    return form.submit(cancel, "batch", batch_id)


# --- models ------------------------------------------------------------------------------------
# --- live events: the REST streams (api/routes/events.py), with the session for the key -----------
async def page_events(
    request: Request,
    dashboard: Dashboard,
    find: Callable[[Session, Viewer], Any],
    feed_of: Callable[[Viewer, uuid.UUID], Feed],
    last_event_id: str | None,
) -> Response:
    """The event stream of what `find` finds for the viewer (a 404 page, or the login, else);
    the session is checked again at every heartbeat (a revoked key or a logout ends it)."""
    services: Services = request.app.state.services

    def viewer_and_id() -> tuple[Viewer, uuid.UUID]:
        with services.sessions() as session:
            viewer = resolve_viewer(request, session, dashboard)
            return viewer, find(session, viewer).id

    viewer, ident = await run_in_threadpool(viewer_and_id)

    async def allowed() -> bool:
        try:
            await run_in_threadpool(viewer_and_id)
        except (LoginRequired, PageNotFound):
            return False
        return True

    return event_stream_response(services, feed_of(viewer, ident), last_event_id, allowed)


@router.get("/jobs/{job_id}/events")
async def job_events(
    job_id: str, request: Request, dashboard: DashboardDep, last_event_id: LastEventId = None
) -> Response:
    """The job page's live updates (EventSource; the script polls `/ui/jobs/live` if they fail)."""
    return await page_events(
        request, dashboard, lambda s, v: find_job(s, v, job_id),
        lambda v, i: job_feed(v.tenant, i), last_event_id,
    )  # fmt: skip


@router.get("/batches/{batch_id}/events")
async def batch_events(
    batch_id: str, request: Request, dashboard: DashboardDep, last_event_id: LastEventId = None
) -> Response:
    """The batch page's live updates (its snapshots carry the counts, progress and ETA)."""
    return await page_events(
        request, dashboard, lambda s, v: find_batch(s, v, batch_id),
        lambda v, i: batch_feed(v.tenant, i), last_event_id,
    )  # fmt: skip


@router.get("/models")
def models_page(request: Request, viewer: ViewerDep, dashboard: DashboardDep) -> Response:
    allow = dashboard.settings.model_allow_list
    models = [
        {
            "info": info,
            "allowed": is_allowed(info.spec, allow),
            "classes": class_names(info.spec) if info.kind == "classifier" else None,
        }
        for info in list_models()
    ]
    return render(
        request, dashboard, viewer, "models.html", models=models, schemes=list_schemes(),
        allow_list=allow,
    )  # fmt: skip


# --- login and logout --------------------------------------------------------------------------
def login_form(
    request: Request, dashboard: Any, *, status_code: int = 200, error: str | None = None,
    next_url: str = "/ui/jobs",
) -> Response:  # fmt: skip
    """The login form with a CSRF token bound to a fresh anonymous session."""
    signer = dashboard.signer
    context: dict[str, Any] = {"error": error, "next_url": next_url, "csrf": "", "enabled": True}
    cookie, token = None, None
    if signer is None:
        context["enabled"] = False
        context["error"] = (
            "The dashboard login is off: this server has no DIGIN_SECRET_KEY (production "
            "mode needs one to sign sessions). The REST API works with bearer keys as before."
        )
        status_code = 503
    else:
        token = read_session(request, dashboard)
        if token is None or token.key_prefix is not None:
            cookie, token = signer.issue(key_prefix=None, tenant_id=None)
        context["csrf"] = signer.csrf(token)
    response = render(request, dashboard, None, "login.html", status_code=status_code, **context)
    if cookie is not None and token is not None:
        set_session_cookie(response, request, cookie, token.expires)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/login")
def login_page(request: Request, dashboard: DashboardDep, next: str | None = None) -> Response:
    if not dashboard.settings.auth_enabled:
        return RedirectResponse(safe_next(next), status_code=303)
    return login_form(request, dashboard, next_url=safe_next(next))


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    dashboard: DashboardDep,
    api_key: Annotated[str, Form(max_length=200)] = "",
    csrf: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/ui/jobs",
) -> Response:
    target = safe_next(next)
    if not dashboard.settings.auth_enabled:
        return RedirectResponse(target, status_code=303)
    signer = dashboard.signer
    if signer is None:
        return login_form(request, dashboard)
    if not signer.check_csrf(read_session(request, dashboard), csrf):
        message = "The login form expired; please paste the key again."
        return login_form(request, dashboard, status_code=403, error=message, next_url=target)
    secret = api_key.strip()
    prefix = key_prefix(secret)
    limiter: AuthFailureLimiter = request.app.state.services.auth_limiter
    address = request.client.host if request.client else None
    blocked = limiter.check(address, prefix)
    tenant = None
    if blocked is None or blocked.reason == "key":  # an exhausted address is not even checked
        tenant = repo.authenticate(session, secret=secret) if secret else None
    if tenant is None or prefix is None:
        if blocked is None or blocked.reason == "key":
            limiter.failed(address, prefix)
        if blocked is None:
            message = "That API key is not valid (or it was revoked)."
            return login_form(request, dashboard, status_code=401, error=message, next_url=target)
        message = f"Too many refused keys; try again in {blocked.retry_after} s."
        response = login_form(request, dashboard, status_code=429, error=message, next_url=target)
        response.headers["Retry-After"] = str(blocked.retry_after)
        return response
    cookie, token = signer.issue(key_prefix=prefix, tenant_id=tenant.id)  # a fresh nonce
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(response, request, cookie, token.expires)
    log.info("dashboard login: tenant %s, key %s", tenant.name, prefix)
    return response


@router.post("/logout")
def logout(
    request: Request,
    session: SessionDep,
    dashboard: DashboardDep,
    csrf: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """End the session on the server (a copy of its cookie stops working too), then drop the
    cookie."""
    signer = dashboard.signer
    token = read_session(request, dashboard)
    if signer is None or not signer.check_csrf(token, csrf):
        return forbidden(request, dashboard, None)
    if token is not None and token.key_prefix is not None:
        expires_at = datetime.fromtimestamp(token.expires, UTC)
        end_session(session, nonce=token.nonce, expires_at=expires_at)
        session.commit()
    response = RedirectResponse("/ui/login", status_code=303)
    clear_session_cookie(response, request)
    return response
