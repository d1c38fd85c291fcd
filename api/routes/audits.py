"""`/v1/audits`: one request audits a classifier across its classes (docs/architecture.md §9.14).

An audit is validated as a whole before anything is written (the audit's params with
`digin.core.audit_params.AuditParams`, its models against the allow-list, each class against
the classifier's classes, each class step, uploads, the caps), then written as a batch whose
first items are one `audit_class` job per class, sent to the `sweep` queue in bulk. The workers
add each class's follow-ups as it finishes and the report job once nothing else is left
(`digin.worker.audits`); GET shows the classes' states and finished rows while it runs, and
the report (JSON, or one self-contained HTML page) once it is built.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.orm import Session

from digin.api.deps import (
    CallerDep,
    CeleryDep,
    KeyFirstRoute,
    MetricsDep,
    ServicesDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    TenantDep,
    WritingTenantDep,
)
from digin.api.problems import ProblemError, field_problem, problem_responses
from digin.api.routes.batches import accepted_headers, send, sweep_write_refusals
from digin.api.routes.events import (
    BATCH_REFRESH_S,
    STREAM_RESPONSES,
    LastEventId,
    checked,
    event_stream_response,
    key_allowed,
)
from digin.api.routes.jobs import (
    Cursor,
    IdempotencyKey,
    cursor_problem,
    found,
    get_artifact,
    link_next_page,
    root,
)
from digin.api.schemas import (
    MAX_METADATA_KEYS,
    MAX_PRIORITY,
    MAX_SEED,
    BatchCounts,
    JobCreate,
    JobError,
    MetadataKey,
    MetadataValue,
    check_model_spec,
    model_specs,
    params_problem,
    server_paths,
)
from digin.api.sweeps import class_error, class_names
from digin.core.audit_params import AuditParams, build_report, class_steps, expanded_step
from digin.core.limits import cost_error
from digin.core.registry import ModelRoots, classifier_facts
from digin.service import repo
from digin.service.db import SUCCEEDED, TERMINAL, Job, Tenant
from digin.service.db.models import Audit
from digin.service.events import Feed
from digin.service.events import Scope as EventScope
from digin.service.repo import audits as repo_audits
from digin.service.repo.batches import BatchPlan, PlannedItem
from digin.service.repo.jobs import MAX_PAGE, InvalidCursor

router = APIRouter(prefix="/v1/audits", tags=["audits"], route_class=KeyFirstRoute)

POLL_AFTER_S = 10  # Retry-After on a running audit
DEFAULT_PAGE = 20
MAX_ERRORS = 20  # bad classes reported in one problem


# --- schemas ------------------------------------------------------------------------------------
class AuditCreate(AuditParams):
    """A new audit (`POST /v1/audits`): the audit's params (`digin.core.audit_params.AuditParams`:
    classifier, classes or 'all', the images of each class, an optional reference classifier,
    the follow-ups' diffusion model and guidance, budget, thresholds) and how to run it."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "example": {
                "classifier": "digits:cnn-spurious",
                "classes": "all",
                "images": {"digits": "test", "per_class": 40},
                "guidance": {"iterations": 4},
            }
        },
    )

    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="seed of the audit's jobs; default: random"
    )
    priority: int = Field(
        5, ge=0, le=MAX_PRIORITY, description="broker priority of its jobs, 0 (first) to 9"
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=MAX_METADATA_KEYS)

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return JobCreate._metadata_size(value)

    def audit_params(self) -> AuditParams:
        fields = set(AuditParams.model_fields)
        return AuditParams.model_validate(self.model_dump(include=fields, by_alias=True))

    def request_hash(self) -> str:
        """What an Idempotency-Key guards: the whole request as sent (an audit's, never equal
        to a batch's)."""
        body = {"audit": self.model_dump(mode="json")}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


AuditStatus = Literal["running", "succeeded", "failed", "canceled"]
AuditStage = Literal["classes", "follow_ups", "report", "canceling", "done"]


class AuditClass(BaseModel):
    """One audited class: its `audit_class` job and, once that succeeded, its row of the
    table (`digin.core.audit_params.build_report`; follow-up images come with the report)."""

    index: int
    name: str
    job_id: uuid.UUID
    status: str
    error: JobError | None = None
    row: dict[str, Any] | None = Field(None, description="the class's row once it succeeded")


class AuditUrls(BaseModel):
    self: str = Field(description="this audit (GET)")
    report: str = Field(description="the report, JSON (GET; `?format=html`: one HTML page)")
    batch: str = Field(description="its jobs as a batch, with the results index")
    cancel: str = Field(description="POST to cancel what is left")


class AuditPublic(BaseModel):
    """An audit: its state, the classes' jobs, and the report once built."""

    id: uuid.UUID
    status: AuditStatus = Field(
        description="running until the report job ended: succeeded (report built), failed "
        "(the report could not be built) or canceled"
    )
    stage: AuditStage = Field(description="what runs now: class jobs, follow-ups or the report")
    classifier: str
    total_classes: int
    class_counts: BatchCounts = Field(description="the class jobs per status")
    follow_up_counts: BatchCounts = Field(description="the follow-up jobs per status")
    progress: float = Field(description="finished jobs / jobs so far, 0..1")
    flagged: list[str] | None = Field(description="the report's flagged classes, once built")
    classes: list[AuditClass] | None = Field(
        None, description="every class in class order (GET of one audit; null in lists)"
    )
    report_job_id: uuid.UUID | None
    params: dict[str, Any]
    seed: int
    priority: int
    metadata: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None
    urls: AuditUrls


class AuditList(BaseModel):
    data: list[AuditPublic]
    next_cursor: str | None = Field(description="null on the last page")


# --- validation ---------------------------------------------------------------------------------
def check_models(params: dict[str, Any], *, allow_list: list[str] | None, embedded: bool,
                 model_roots: ModelRoots | None) -> list[dict[str, str]]:  # fmt: skip
    """The audit's model specs (classifier, reference, diffusion) well-formed, of the right kind
    and allowed; in production no paths on the server (an image folder included)."""
    if model_roots is None and not embedded:
        model_roots = ()
    specs = [(f.lstrip("."), spec, kind) for f, spec, kind in model_specs(params, prefix="")]
    if params.get("reference") is not None:  # a classifier under another name
        specs.append(("reference", params["reference"], "classifier"))
    errors = [
        {"field": field, "message": message}
        for field, spec, expected in specs
        if (
            message := check_model_spec(
                spec, expected, allow_list, allow_paths=embedded, model_roots=model_roots
            )
        )  # fmt: skip
    ]
    if not embedded:
        errors += [
            {"field": field, "message": "paths on the server are not accepted in production "
             "mode; upload images (POST /v1/images) and pass their ids per class"}
            for field in (f.lstrip(".") for f in server_paths(params, prefix=""))
        ]  # fmt: skip
    return errors


def check_classes(audit: AuditParams, model_roots: ModelRoots | None) -> tuple[str, ...] | None:
    """The classifier's class names where known; a 422 naming `classes.<i>` for a listed
    class the classifier does not have, or `classes` for 'all' of a classifier whose classes
    are not known without loading it."""
    names = class_names(audit.classifier, model_roots)
    if isinstance(audit.classes, list):
        errors = []
        for i, ref in enumerate(audit.classes):
            if (message := class_error(ref, audit.classifier, model_roots)) is not None:
                errors.append({"field": f"classes.{i}", "message": message})
                if len(errors) >= MAX_ERRORS:
                    break
        if errors:
            raise params_problem(errors)
    elif names is None and classifier_facts(audit.classifier)[1] is None:
        raise field_problem(
            422, "invalid-params", "classes",
            f"'all' needs the classes of {audit.classifier!r}, which are not known without "
            "loading it; list the classes",
        )  # fmt: skip
    return names


def class_name(ref: Any, names: tuple[str, ...] | None) -> str:
    if isinstance(ref, int) and names is not None and 0 <= ref < len(names):
        return names[ref]
    return str(ref)


def plan_audit(
    audit: AuditParams, *, seed: int, max_items: int, max_cost: int | None,
    model_roots: ModelRoots | None,
) -> BatchPlan:  # fmt: skip
    """One planned `audit_class` job per class (custom id `class=<name>`, seed + class
    position), every step validated; a 422 naming the field otherwise."""
    names = check_classes(audit, model_roots)
    try:
        steps = class_steps(audit, list(names) if names is not None else None)
    except (ValueError, ValidationError) as exc:
        raise params_problem([{"field": "classes", "message": str(exc)}]) from None
    if len(steps) > max_items:
        raise field_problem(
            422, "invalid-params", "classes",
            f"{len(steps)} classes; this service audits at most {max_items} in one audit "
            "(DIGIN_MAX_ITEMS_PER_BATCH)",
        )  # fmt: skip
    # every step costs the same (as many other classes, the same cap per class): the first's
    # cost, with its references to the audit's images and classes written out
    error = cost_error("audit_class", expanded_step(steps[0], audit), max_cost)
    if error is not None:
        raise params_problem([{"field": "classes.0", "message": error["message"]}])
    items = [
        PlannedItem(index=i, custom_id=f"class={class_name(step['class'], names)}"[:200],
                    params=step, seed=seed + i, group_key=None)
        for i, step in enumerate(steps)
    ]  # fmt: skip
    return BatchPlan(kind=repo_audits.CLASS_KIND, items=items, spec={"audit": True})


def check_image_ids(session: Session, tenant: Tenant, audit: AuditParams) -> None:
    """Every uploaded image id of `images.image_ids` must be one of the tenant's uploads (one
    query); a 422 naming `images.image_ids.<class>.<i>` otherwise."""
    ids = audit.images.image_ids or {}
    fields = {v: f"images.image_ids.{k}.{i}" for k, vs in ids.items() for i, v in enumerate(vs)}
    if not fields:
        return
    parsed = {}
    for value in fields:
        try:
            parsed[value] = uuid.UUID(value)
        except ValueError:
            continue
    owned = repo.owned_image_ids(session, tenant_id=tenant.id, image_ids=list(parsed.values()))
    errors = [
        {"field": field, "message": f"no uploaded image {value!r} (upload it with POST /v1/images)"}
        for value, field in fields.items()
        if parsed.get(value) not in owned
    ]
    if errors:
        raise params_problem(errors[:MAX_ERRORS])


# --- answers ------------------------------------------------------------------------------------
def public(
    session: Session, audit: Audit, *, base: str = "", with_classes: bool = True
) -> AuditPublic:
    state = repo_audits.audit_state(session, audit)
    class_counts = BatchCounts()
    for job in state.class_jobs:
        setattr(class_counts, job.status, getattr(class_counts, job.status) + 1)
    finished = sum(c for s, c in class_counts.model_dump().items() if s in TERMINAL)
    finished += sum(c for s, c in state.follow_ups.items() if s in TERMINAL)
    total = len(state.class_jobs) + sum(state.follow_ups.values()) + 1
    done = 1 if state.report is not None and state.report.status in TERMINAL else 0
    report = state.report
    summary = (
        (report.result or {}).get("summary") if report and report.status == SUCCEEDED else None
    )
    path = f"{base}/v1/audits/{audit.id}"
    return AuditPublic(
        id=audit.id, status=state.status, stage=state.stage,
        classifier=audit.params.get("classifier", ""), total_classes=audit.classes,
        class_counts=class_counts, follow_up_counts=BatchCounts(**state.follow_ups),
        progress=(finished + done) / total, flagged=(summary or {}).get("flagged"),
        classes=class_rows(audit, state.class_jobs) if with_classes else None,
        report_job_id=audit.report_job_id, params=audit.params, seed=audit.seed,
        priority=state.batch.priority, metadata=state.batch.meta, created_at=audit.created_at,
        finished_at=report.finished_at if report is not None else None,
        urls=AuditUrls(self=path, report=f"{path}/report", batch=f"{base}/v1/batches/{audit.id}",
                       cancel=f"{path}/cancel"),
    )  # fmt: skip


def class_rows(audit: Audit, jobs: list[repo_audits.ClassJob]) -> list[AuditClass]:
    """The classes in class order; a succeeded class carries its table row, ranked among the
    classes finished so far (`build_report` over their results, without follow-ups)."""
    params = AuditParams.model_validate(audit.params)
    records = [
        {"kind": job.kind, "params": job.params, "result": job.summary,
         "artifacts": {name: f"{job.id}/{name}" for name in job.artifacts}}
        for job in jobs if job.summary is not None
    ]  # fmt: skip
    rows = {r["class_index"]: r for r in build_report(params, records)["classes"]}
    return [
        AuditClass(
            index=job.item_index, name=str(job.custom_id or "").removeprefix("class="),
            job_id=job.id, status=job.status,
            error=JobError(**job.error) if job.error else None,
            row=rows.get(job.summary["class_index"]) if job.summary is not None else None,
        )
        for job in jobs
    ]  # fmt: skip


def find_audit(session: Session, tenant: Tenant, audit_id: uuid.UUID) -> Audit:
    audit = repo_audits.get_audit(session, tenant_id=tenant.id, audit_id=audit_id)
    return found(audit, "audit", audit_id)


# --- routes -------------------------------------------------------------------------------------
@router.post(
    "",
    status_code=202,
    summary="Create an audit",
    response_description="accepted: the audit validated, one audit_class job per class written "
    "and sent to the sweep queue (`Location` is the audit's URL, `Retry-After` the polling "
    "interval); a replayed Idempotency-Key returns the original audit",
    responses=problem_responses(401, 413, 422, 429),
)
def create_audit(
    body: AuditCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: WritingTenantDep,
    settings: SettingsDep,
    celery: CeleryDep,
    metrics: MetricsDep,
    idempotency_key: IdempotencyKey = None,
) -> AuditPublic:
    embedded = settings.mode == "embedded"
    # 1. Validate everything before writing anything (the key was checked first, then the
    #    body's values: WritingTenantDep): models, classes, each class step, uploads
    audit = body.audit_params()
    params = audit.model_dump(mode="json")
    errors = check_models(params, allow_list=settings.model_allow_list, embedded=embedded,
                          model_roots=settings.model_path_roots)  # fmt: skip
    if errors:
        raise params_problem(errors)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    plan = plan_audit(
        audit, seed=seed, max_items=settings.max_items_per_batch,
        max_cost=settings.max_job_cost or None, model_roots=settings.model_path_roots,
    )  # fmt: skip
    check_image_ids(session, tenant, audit)
    # 2. Write the audit, its batch and its class jobs in one transaction, and commit
    waiting_for = "the tenant's sweeps and audits"
    with sweep_write_refusals(repo_audits.AuditIdempotencyConflict, waiting_for):
        row, created = repo_audits.create_audit(
            session, tenant_id=tenant.id, plan=plan, params=params, seed=seed,
            priority=body.priority, max_attempts=settings.max_attempts, metadata=body.metadata,
            idempotency_key=idempotency_key,
            request_hash=body.request_hash() if idempotency_key else None,
            max_queued_items=settings.max_queued_sweep_items_per_tenant,
        )  # fmt: skip
    session.commit()
    # 3. Send the class jobs' messages in bulk (after the commit)
    if created:
        metrics.jobs_created.labels(repo_audits.CLASS_KIND).inc(len(plan.items))
        batch = repo_audits.audit_batch(session, row)
        send(session, celery, batch, [str(item.job_id) for item in plan.items], metrics)
    result = public(session, row, base=root(request), with_classes=False)
    accepted_headers(response, created=created, location=result.urls.self)
    return result


@router.get("", summary="List audits", responses=problem_responses(401, 422))
def list_audits(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> AuditList:
    try:
        audits, next_cursor = repo_audits.list_audits(
            session, tenant_id=tenant.id, limit=limit, cursor=cursor
        )
    except InvalidCursor as exc:
        raise cursor_problem(exc) from None
    link_next_page(request, response, next_cursor)
    base = root(request)
    data = [public(session, a, base=base, with_classes=False) for a in audits]
    return AuditList(data=data, next_cursor=next_cursor)


@router.get("/{audit_id}", summary="Get an audit", responses=problem_responses(401, 404, 422))
def get_audit(
    audit_id: uuid.UUID, request: Request, response: Response, session: SessionDep,
    tenant: TenantDep,
) -> AuditPublic:  # fmt: skip
    result = public(session, find_audit(session, tenant, audit_id), base=root(request))
    if result.status == "running":
        response.headers["Retry-After"] = str(POLL_AFTER_S)
    return result


@router.post(
    "/{audit_id}/cancel",
    summary="Cancel an audit",
    response_description="the audit: queued jobs canceled at once, running ones `canceling` "
    "until their workers stop; no follow-ups or report are written after",
    responses=problem_responses(401, 404, 422),
)
def cancel_audit(
    audit_id: uuid.UUID, request: Request, session: SessionDep, tenant: TenantDep
) -> AuditPublic:
    canceled = repo_audits.cancel_audit(session, tenant_id=tenant.id, audit_id=audit_id)
    audit = found(canceled, "audit", audit_id)
    session.commit()
    return public(session, audit, base=root(request), with_classes=False)


@router.get(
    "/{audit_id}/report",
    summary="Download an audit's report",
    response_class=Response,
    responses={
        200: {
            "description": "the report: JSON (classes ranked, images named `<job id>/<artifact "
            "name>`) or, with `format=html`, one self-contained HTML page",
            "content": {"application/json": {}, "text/html": {}},
        },
        307: {"description": "S3: redirect to a short-lived presigned URL"},
        **problem_responses(401, 404, 409, 422),
    },
)
def audit_report(
    audit_id: uuid.UUID,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    format: Literal["json", "html"] = "json",
) -> Response:
    audit = find_audit(session, tenant, audit_id)
    report = session.get(Job, audit.report_job_id) if audit.report_job_id else None
    if report is None or report.status != SUCCEEDED:
        raise ProblemError(
            409, "report-not-ready",
            f"audit {audit_id} has no report yet (GET /v1/audits/{audit_id} shows its stage)",
        )  # fmt: skip
    name = "report.html" if format == "html" else "report.json"
    return get_artifact(report.id, name, session, tenant, settings, storage)


# --- events -------------------------------------------------------------------------------------
def audit_feed(tenant: Tenant, audit_id: uuid.UUID, *, base: str = "") -> Feed:
    """An audit's stream: the events of all its jobs (its batch's items, follow-ups and report
    included); its snapshot is the audit as `GET /v1/audits` lists it (without the classes);
    it ends when the audit has (its report job ended, or it was canceled)."""

    def snapshot(session: Session) -> dict[str, Any]:
        audit = find_audit(session, tenant, audit_id)
        return public(session, audit, base=base, with_classes=False).model_dump(mode="json")

    def finished(session: Session) -> bool:
        audit = find_audit(session, tenant, audit_id)
        return repo_audits.audit_state(session, audit).status != "running"

    scope = EventScope(tenant.id, batch_ids=frozenset({audit_id}))
    return Feed(scope, snapshot, finished, base, refresh_s=BATCH_REFRESH_S)


@router.get(
    "/{audit_id}/events",
    summary="Follow an audit's events (server-sent events)",
    response_class=StreamingResponse,
    responses=STREAM_RESPONSES,
)
async def audit_events(
    audit_id: uuid.UUID,
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    tenant = await checked(services, caller, lambda s, t: find_audit(s, t, audit_id))
    feed = audit_feed(tenant, audit_id, base=root(request))
    return event_stream_response(services, feed, last_event_id, key_allowed(services, caller))
