"""`/ui/audits`: the dashboard's audit pages (docs/architecture.md §9.11, §9.14), scoped to the
viewer's tenant like every page.

An audit's page shows its stage and counts, then the ranked table: the report's rows once the
report job succeeded (read from its `report.json` artifact), before that the rows of the classes
finished so far. Every image the table names (`<job id>/<artifact name>`) is shown through the
cookie-authenticated thumbnail route of its job, and links to the full image.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from digin.api.dashboard.auth import DashboardDep, PageNotFound, ViewerDep
from digin.api.dashboard.routes import found, parse_id, render
from digin.api.deps import SessionDep, StorageDep
from digin.api.routes.audits import class_rows
from digin.api.routes.jobs import stored_artifacts
from digin.service.db import SUCCEEDED, Job, Tenant
from digin.service.db.models import Audit
from digin.service.repo import audits as repo_audits
from digin.service.repo.jobs import InvalidCursor
from digin.service.storage import ArtifactNotFound, Storage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/ui", include_in_schema=False)

AUDITS_PAGE = 20


@router.get("/audits")
def audits_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    dashboard: DashboardDep,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    errors: list[str] = []
    audits: list[Audit] = []
    next_cursor: str | None = None
    try:
        audits, next_cursor = repo_audits.list_audits(
            session, tenant_id=viewer.tenant.id, limit=AUDITS_PAGE, cursor=cursor or None
        )
    except InvalidCursor as exc:
        errors.append(str(exc))
    rows = [{"audit": a, "state": repo_audits.audit_state(session, a)} for a in audits]
    return render(
        request, dashboard, viewer, "audits.html", status_code=422 if errors else 200,
        rows=rows, next_cursor=next_cursor, errors=errors, first_page=cursor is None,
    )  # fmt: skip


@router.get("/audits/{audit_id}")
def audit_page(
    audit_id: str,
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    dashboard: DashboardDep,
    storage: StorageDep,
) -> Response:
    audit = repo_audits.get_audit(
        session, tenant_id=viewer.tenant.id, audit_id=parse_id(audit_id, "audit")
    )
    audit = found(audit, f"no audit with id {audit_id}")
    state = repo_audits.audit_state(session, audit)
    report = read_report(state.report, viewer.tenant, storage)
    if report is not None:
        rows, unfinished = report["classes"], report.get("unfinished") or []
    else:  # while it runs: the classes finished so far, ranked among themselves
        listed = class_rows(audit, state.class_jobs)
        rows = sorted((c.row for c in listed if c.row), key=lambda r: r["rank"])
        unfinished = [c for c in listed if c.status != SUCCEEDED]
    counts: dict[str, int] = {}
    for job in state.class_jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    return render(
        request, dashboard, viewer, "audit.html", audit=audit, state=state, rows=rows,
        report=report, unfinished=unfinished, class_counts=counts,
        flagged=[r["class_name"] for r in rows if r.get("flagged")],
        cancelable=state.status == "running" and state.batch.canceled_at is None,
        params_json=json.dumps(audit.params, indent=2, sort_keys=True),
    )  # fmt: skip


def read_report(job: Job | None, tenant: Tenant, storage: Storage) -> dict[str, Any] | None:
    """The report job's `report.json`, or None before it succeeded (or if it is gone)."""
    if job is None or job.status != SUCCEEDED:
        return None
    entry = next((e for e in stored_artifacts(job, tenant) if e["name"] == "report.json"), None)
    if entry is None:
        return None
    try:
        report: dict[str, Any] = json.loads(storage.get(entry["key"]))
    except ArtifactNotFound:
        log.warning("audit report %s: report.json is missing", job.id)
        return None
    return report


@router.get("/audits/{audit_id}/report.{ext}")
def report_file(
    audit_id: str,
    ext: str,
    session: SessionDep,
    viewer: ViewerDep,
    storage: StorageDep,
) -> Response:
    """The report (`report.html` or `report.json`) as a download, read with the session cookie
    (the page's inline style and images are for a browser opening the file, not for /ui)."""
    if ext not in ("html", "json"):
        raise PageNotFound(f"no report file report.{ext}")
    audit = repo_audits.get_audit(
        session, tenant_id=viewer.tenant.id, audit_id=parse_id(audit_id, "audit")
    )
    audit = found(audit, f"no audit with id {audit_id}")
    job = session.get(Job, audit.report_job_id) if audit.report_job_id else None
    entries = stored_artifacts(job, viewer.tenant) if job is not None else []
    entry = found(
        next((e for e in entries if e["name"] == f"report.{ext}"), None),
        f"audit {audit_id} has no report yet",
    )
    try:
        data = storage.get(entry["key"])
    except ArtifactNotFound:
        raise PageNotFound(f"the report of audit {audit_id} is missing") from None
    name = f"audit-{audit.id}.{ext}"
    media = "text/html; charset=utf-8" if ext == "html" else "application/json"
    return Response(data, media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip
