"""`/v1/batches`: sweeps over classes × classifiers × seeds, or explicit items
(docs/architecture.md §9.9).

A batch is validated as a whole before anything is written (`digin.api.sweeps`), its items are
inserted as ordinary jobs in one multi-row INSERT and committed, then their messages go to the
`sweep` queue in bulk (`digin.service.dispatch.enqueue_many`); a broker that is down leaves the
items queued for the reaper to send. The results index streams one line per item, readable at any
time while the batch runs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from digin.api.deps import (
    CeleryDep,
    KeyFirstRoute,
    MetricsDep,
    ServicesDep,
    SessionDep,
    SettingsDep,
    TenantDep,
    WritingTenantDep,
)
from digin.api.problems import ProblemError, field_problem, problem_responses
from digin.api.routes.jobs import (
    Cursor,
    IdempotencyKey,
    cursor_problem,
    found,
    link_next_page,
    root,
    stored_artifacts,
    uploaded_image_ids,
)
from digin.api.routes.webhooks import stored_webhook
from digin.api.schemas import (
    BatchCounts,
    BatchCreate,
    BatchList,
    BatchPublic,
    BatchUrls,
    artifact_path,
    params_problem,
)
from digin.api.sweeps import plan_batch
from digin.service import repo
from digin.service.db import Batch, Tenant, utcnow
from digin.service.dispatch import PartialEnqueue, enqueue_many
from digin.service.repo import batches as repo_batches
from digin.service.repo.jobs import MAX_PAGE, InvalidCursor, TenantLimitExceeded
from digin.service.storage import LocalStorage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/batches", tags=["batches"], route_class=KeyFirstRoute)

POLL_AFTER_S = 10  # Retry-After on a running batch
DEFAULT_PAGE = 20
CSV_COLUMNS = ("index", "custom_id", "job_id", "status", "seed", "params", "metrics",
               "artifacts", "error")  # fmt: skip


def public(session: Session, batches: list[Batch], *, base: str = "") -> list[BatchPublic]:
    stats = repo_batches.batch_stats(session, batches)
    out = []
    for batch in batches:
        s = stats[batch.id]
        path = f"{base}/v1/batches/{batch.id}"
        out.append(
            BatchPublic(
                id=batch.id, kind=batch.kind, status=s.status,
                total=batch.total, counts=BatchCounts(**s.counts), progress=s.progress,
                throughput_per_min=s.throughput_per_min, eta_seconds=s.eta_seconds,
                priority=batch.priority, metadata=batch.meta, created_at=batch.created_at,
                finished_at=batch.finished_at,
                urls=BatchUrls(self=path, results=f"{path}/results",
                               jobs=f"{base}/v1/jobs?batch_id={batch.id}",
                               cancel=f"{path}/cancel"),
            )
        )  # fmt: skip
    return out


def find_batch(session: Session, tenant: Tenant, batch_id: uuid.UUID) -> Batch:
    batch = repo_batches.get_batch(session, tenant_id=tenant.id, batch_id=batch_id)
    return found(batch, "batch", batch_id)


def check_batch_uploads(session: Session, tenant: Tenant, plan: repo_batches.BatchPlan) -> None:
    """A 422 naming the first field of each image id, in any item, that is not one of the
    tenant's uploads (another tenant's image included): refused here, not by the worker later.
    One query for all the distinct ids of the batch."""
    first: dict[str, str] = {}  # image id -> the first field that names it
    for item in plan.items:
        for field, value in uploaded_image_ids(item.params, f"items.{item.index}.params"):
            first.setdefault(value, field)
    if not first:
        return
    ids = {}
    for value in first:
        try:
            ids[value] = uuid.UUID(value)
        except ValueError:
            continue
    owned = repo.owned_image_ids(session, tenant_id=tenant.id, image_ids=list(ids.values()))
    errors = [
        {"field": field, "message": f"no uploaded image {value!r} (upload it with POST /v1/images)"}
        for value, field in first.items()
        if ids.get(value) not in owned
    ]
    if errors:
        raise params_problem(errors)


@router.post(
    "",
    status_code=202,
    summary="Create a batch (sweep)",
    response_description="accepted: every item validated, written as a queued job and sent to "
    "the sweep queue (`Location` is the batch's URL, `Retry-After` the polling interval); a "
    "replayed Idempotency-Key returns the original batch",
    responses=problem_responses(401, 413, 422, 429),
)
def create_batch(
    body: BatchCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: WritingTenantDep,
    settings: SettingsDep,
    celery: CeleryDep,
    metrics: MetricsDep,
    idempotency_key: IdempotencyKey = None,
) -> BatchPublic:
    embedded = settings.mode == "embedded"
    # 1. Validate everything before writing anything (the key was checked first, then the
    #    body's values: WritingTenantDep): the webhook, then every item
    webhook = stored_webhook(body.webhook, settings, batch=True)
    plan = plan_batch(
        body, allow_list=settings.model_allow_list, allow_paths=embedded,
        max_items=settings.max_items_per_batch, model_roots=settings.model_path_roots,
        max_cost=settings.max_job_cost or None,
    )  # fmt: skip
    check_batch_uploads(session, tenant, plan)
    # 2. Write the batch and its items in one transaction, and commit
    with sweep_write_refusals(repo_batches.BatchIdempotencyConflict, "the tenant's sweeps"):
        batch, created = repo_batches.create_batch(
            session, tenant_id=tenant.id, plan=plan, params_template=body.params_template,
            priority=body.priority, max_attempts=settings.max_attempts, metadata=body.metadata,
            webhook=webhook, idempotency_key=idempotency_key,
            request_hash=body.request_hash() if idempotency_key else None,
            max_queued_items=settings.max_queued_sweep_items_per_tenant,
        )  # fmt: skip
    session.commit()
    # 3. Send the items' messages in bulk (after the commit), then record it
    if created:
        metrics.jobs_created.labels(batch.kind).inc(batch.total)
        ids = [str(item.job_id) for item in plan.items]
        send(session, celery, batch, ids, metrics)
    (result,) = public(session, [batch], base=root(request))
    accepted_headers(response, created=created, location=result.urls.self)
    return result


@contextmanager
def sweep_write_refusals(conflict: type[Exception], waiting_for: str) -> Iterator[None]:
    """The refusals of a sweep's writer as problems: an Idempotency-Key reused for another
    request (`conflict`) → 422; the tenant's cap of queued sweep items → 429 with Retry-After,
    asking to wait for `waiting_for` to progress."""
    try:
        yield
    except conflict as exc:
        raise field_problem(422, "idempotency-key-reused", "Idempotency-Key", str(exc)) from None
    except TenantLimitExceeded as exc:
        raise ProblemError(
            429, "tenant-limit", f"{exc}; wait for {waiting_for} to progress",
            headers={"Retry-After": str(exc.retry_after)}, limit=exc.limit,
        ) from None  # fmt: skip


def accepted_headers(response: Response, *, created: bool, location: str) -> None:
    """The headers of an accepted sweep: its URL, the polling interval, and whether an
    Idempotency-Key replayed the original."""
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = location
    response.headers["Retry-After"] = str(POLL_AFTER_S)


def send(session: Session, celery: Any, batch: Batch, job_ids: list[str], metrics: Any) -> int:
    """Enqueue the committed items in bulk; what a broker error leaves unsent gets its
    `enqueued_at` cleared, and the reaper sends it."""
    try:
        return enqueue_many(celery, job_ids, queue="sweep", priority=batch.priority)
    except PartialEnqueue as exc:
        metrics.enqueue_failures.labels("sweep").inc(len(job_ids) - exc.sent)
        log.warning(
            "batch %s: %d of %d messages sent (%s); the reaper sends the rest",
            batch.id, exc.sent, len(job_ids), exc.__cause__,
        )  # fmt: skip
        repo_batches.clear_unsent(session, batch_id=batch.id, from_index=exc.sent)
        session.commit()
        return exc.sent


@router.get("", summary="List batches", responses=problem_responses(401, 422))
def list_batches(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> BatchList:
    try:
        batches, next_cursor = repo_batches.list_batches(
            session, tenant_id=tenant.id, limit=limit, cursor=cursor
        )
    except InvalidCursor as exc:
        raise cursor_problem(exc) from None
    link_next_page(request, response, next_cursor)
    return BatchList(data=public(session, batches, base=root(request)), next_cursor=next_cursor)


@router.get("/{batch_id}", summary="Get a batch", responses=problem_responses(401, 404, 422))
def get_batch(
    batch_id: uuid.UUID,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
) -> BatchPublic:
    (result,) = public(session, [find_batch(session, tenant, batch_id)], base=root(request))
    if result.status == "running":
        response.headers["Retry-After"] = str(POLL_AFTER_S)
    return result


@router.post(
    "/{batch_id}/cancel",
    summary="Cancel a batch",
    response_description="the batch: its queued items are canceled at once, running ones are "
    "`canceling` until their workers stop (within one iteration); finished items stay readable",
    responses=problem_responses(401, 404, 422),
)
def cancel_batch(
    batch_id: uuid.UUID, request: Request, session: SessionDep, tenant: TenantDep
) -> BatchPublic:
    canceled = repo_batches.cancel_batch(session, tenant_id=tenant.id, batch_id=batch_id)
    batch = found(canceled, "batch", batch_id)
    session.commit()
    (result,) = public(session, [batch], base=root(request))
    return result


# --- the results index --------------------------------------------------------------------------
@router.get(
    "/{batch_id}/results",
    summary="Stream the results index of a batch",
    response_class=StreamingResponse,
    response_description="one line per item in item order: {index, custom_id, job_id, status, "
    "params, seed, metrics, artifacts: [{name, url}], error}; metrics and artifacts are null "
    "and empty until the item succeeded. JSON lines (default) or CSV (`format=csv` or "
    "`Accept: text/csv`; params, metrics, artifacts and error as JSON text)",
    responses={
        200: {"content": {"application/x-ndjson": {}, "text/csv": {}}},
        **problem_responses(401, 404, 422),
    },
)
def batch_results(
    batch_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    services: ServicesDep,
    format: Literal["jsonl", "csv"] | None = None,
    accept: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    batch = find_batch(session, tenant, batch_id)
    chosen = format or ("csv" if accept and "text/csv" in accept else "jsonl")
    pages = result_pages(services, tenant, batch.id, base=root(request))
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    if chosen == "csv":
        body: Iterator[str] = csv_pages(pages)
        media, name = "text/csv; charset=utf-8", f"batch-{batch.id}-{stamp}.csv"
    else:
        body = ("".join(map(_json_line, page)) for page in pages)
        media, name = "application/x-ndjson", f"batch-{batch.id}-{stamp}.jsonl"
    headers = {"Content-Disposition": f'inline; filename="{name}"', "Cache-Control": "no-store"}
    return StreamingResponse(body, media_type=media, headers=headers)


def result_pages(
    services: Any, tenant: Tenant, batch_id: uuid.UUID, *, base: str
) -> Iterator[list[tuple[dict[str, Any], str, dict[str, Any]]]]:
    """The index lines a page (1000 items) at a time, read with a session of their own (the
    request's is closed by the time the body streams); one chunk of the response per page.
    Each line: (index … status, params as stored JSON text, seed … error)."""
    storage, expiry = services.storage, services.settings.url_expiry_seconds
    local = isinstance(storage, LocalStorage)  # URLs are this API's download routes
    with services.sessions() as session:
        for rows in repo_batches.iter_items(session, batch_id=batch_id):
            page = []
            for row in rows:
                artifacts = [
                    {"name": e["name"],
                     "url": (None if local else storage.url(e["key"], expires=expiry))
                     or artifact_path(row.id, e["name"], base=base)}
                    for e in stored_artifacts(row, tenant)
                ]  # fmt: skip
                head = {"index": row.item_index, "custom_id": row.custom_id,
                        "job_id": str(row.id), "status": row.status}  # fmt: skip
                tail = {"seed": row.seed, "metrics": repo_batches.item_metrics(row),
                        "artifacts": artifacts, "error": row.error}  # fmt: skip
                page.append((head, row.params_json, tail))
            session.rollback()  # end the page's read transaction (no snapshot held open)
            yield page


def _json_line(line: tuple[dict[str, Any], str, dict[str, Any]]) -> str:
    """{index, custom_id, job_id, status, params, seed, metrics, artifacts, error}: the stored
    params JSON is spliced in as it is."""
    head, params, tail = line
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    return f'{dumps(head)[:-1]},"params":{params},{dumps(tail)[1:]}\n'


def csv_pages(pages: Iterator[list[tuple[dict[str, Any], str, dict[str, Any]]]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for page in pages:
        for head, params, tail in page:
            values = {**head, "params": params, **tail}
            writer.writerow(
                json.dumps(values[c], separators=(",", ":")) if isinstance(values[c], dict | list)
                else ("" if values[c] is None else values[c])
                for c in CSV_COLUMNS
            )  # fmt: skip
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()
