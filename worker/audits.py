"""Audits in the workers (docs/architecture.md §9.14): the edges of an audit's job graph and its
report job.

An audit's jobs are items of its batch and run like any sweep item; three things are added:

- `finish`: a succeeded `audit_class` job writes its follow-ups (`digin.core.audit_params.
  follow_ups`: a `pca_component` job for its flagged components, a `disagreement` job with a
  reference classifier) as new items of the batch in the same transaction that marks it
  succeeded, guarded by its attempt: a retried or lost attempt writes none, a finished class
  always has its follow-ups, and the batch never looks finished between the two.
- `advance`: after a job of an audit ended, the report job is written once no other item is
  unfinished (the batch row locked: exactly once), and whatever the audit has queued but not
  sent goes to the broker. The reaper calls it too (`reap_audits`) for audits whose last item
  ended elsewhere (canceled through the API, failed by the reaper, a worker gone in between).
- `compute_report`: the `audit_report` job reads the finished items' results, builds the
  ranked report (`build_report`) and its HTML page with the images inline (`render_html`);
  the runner uploads both as the job's artifacts and finishes it like any job.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import QUEUED, SUCCEEDED, Job, session_scope, utcnow
from digin.service.db.models import Audit
from digin.service.repo import audits as repo_audits
from digin.service.repo.submit import mark_sent
from digin.service.storage import ArtifactNotFound
from digin.worker.execution import ClaimedJob, Enqueue, JobFailure, WorkerContext

log = logging.getLogger("digin.worker")

REPORT_KIND = repo_audits.REPORT_KIND
CLASS_KIND = repo_audits.CLASS_KIND
REPORT_FILES = ("report.json", "report.html")
IMAGE_TYPES = (".png", ".jpg", ".jpeg")


# --- a class step's references, resolved from its audit ----------------------------------------
def bind_params(job: ClaimedJob, params: Any, sessions: sessionmaker[Session]) -> Any:
    """A class job's params bound to its audit (`digin.core.audit_params.bind_step`): its
    `images: {"audit": true}` and `others: "audit"` resolve to the audit's stored params, read
    from the `audits` row of the job's batch (an audit's params never change). Other jobs'
    params are returned as they are; a class job outside an audit must give its images."""
    from digin.core.audit_params import AuditParams, bind_step
    from digin.core.params import AuditClassParams

    if not isinstance(params, AuditClassParams):
        return params
    audit_params = None
    if job.batch_id is not None:
        with sessions() as session:
            stored = session.scalar(select(Audit.params).where(Audit.id == job.batch_id))
        audit_params = None if stored is None else AuditParams.model_validate(stored)
    return bind_step(params, audit_params)


# --- a class's follow-ups, written with its success --------------------------------------------
def finish(session: Session, job: ClaimedJob, result: dict[str, Any], *, max_attempts: int) -> bool:
    """Mark the job succeeded with `result` (`digin.service.repo.finish_job`); for an audit's
    class job first write its follow-ups, in the same transaction and only while this attempt
    holds the job. False if it no longer does (nothing written)."""
    audit = _audit_of(session, job) if job.kind == CLASS_KIND else None
    if audit is not None:
        if not repo_audits.held(session, job_id=job.id, attempt=job.attempt):
            return False
        items = follow_up_items(audit, job, result.get("summary") or {})
        repo_audits.add_items(session, audit=audit, items=items, max_attempts=max_attempts)
    return repo.finish_job(session, job_id=job.id, attempt=job.attempt, result=result)


def _audit_of(session: Session, job: ClaimedJob) -> Audit | None:
    return session.get(Audit, job.batch_id) if job.batch_id is not None else None


def follow_up_items(
    audit: Audit, job: ClaimedJob, summary: dict[str, Any]
) -> list[repo_audits.NewItem]:
    """The follow-up jobs of a class's result, validated by their kinds' params models (a
    follow-up that does not validate is a bug here: it raises and the class job fails naming
    it). Custom ids `follow=<class>|<kind>`; seeds from the class's seed."""
    from digin.core.audit_params import AuditParams, follow_ups
    from digin.core.params import group_key, validate_params

    params = AuditParams.model_validate(audit.params)
    name = str(summary.get("class_name", summary.get("class_index", "")))
    items = []
    for i, (kind, raw) in enumerate(follow_ups(params, summary)):
        normalised = validate_params(kind, raw).model_dump(mode="json", by_alias=True)
        items.append(
            repo_audits.NewItem(
                kind=kind, params=normalised, seed=job.seed + 1 + i,
                custom_id=f"follow={name}|{kind}"[:200], group_key=group_key(kind, normalised),
            )
        )  # fmt: skip
    return items


# --- the report job, and sending what the audit has queued -------------------------------------
def advance(
    job_id: uuid.UUID | str, *, sessions: sessionmaker[Session], enqueue: Enqueue,
    max_attempts: int,
) -> uuid.UUID | None:  # fmt: skip
    """After a job ended: if it is an audit's, write the report job once nothing else is
    unfinished, then send the audit's queued items that have no message yet. Returns the
    audit's id (None for other jobs)."""
    with sessions() as session:
        audit_id = session.scalar(
            select(Audit.id)
            .join(Job, Job.batch_id == Audit.id)
            .where(Job.id == uuid.UUID(str(job_id)))
        )
    if audit_id is None:
        return None
    complete(audit_id, sessions=sessions, enqueue=enqueue, max_attempts=max_attempts)
    return audit_id


def complete(
    audit_id: uuid.UUID, *, sessions: sessionmaker[Session], enqueue: Enqueue, max_attempts: int
) -> list[uuid.UUID]:
    """Write the audit's report job if it is due, then send its unsent queued items (the report
    and follow-ups written by other transactions); returns the ids sent. A message sent twice
    runs once (the claim); one that fails to go out is sent by the reaper."""
    with session_scope(sessions) as session:
        repo_audits.add_report(session, audit_id=audit_id, max_attempts=max_attempts)
    with sessions() as session:
        unsent = session.execute(
            select(Job.id, Job.queue, Job.priority)
            .where(Job.batch_id == audit_id, Job.status == QUEUED, Job.enqueued_at.is_(None))
            .order_by(Job.item_index)
        ).all()
    sent = []
    for ident, queue, priority in unsent:
        try:
            enqueue(job_id=ident, queue=queue, priority=priority)
        except Exception:
            log.exception("enqueue failed; the reaper sends it", extra={"job_id": str(ident)})
            break
        sent.append(ident)
    if sent:
        now = utcnow()
        with session_scope(sessions) as session:
            mark_sent(session, [(ident, now) for ident in sent])
    return sent


def reap_audits(
    *, sessions: sessionmaker[Session], enqueue: Enqueue, max_attempts: int
) -> list[uuid.UUID]:
    """The reaper's part: complete every audit whose items all ended without a report job
    (and that was not canceled). Returns their ids."""
    with sessions() as session:
        due = repo_audits.audits_awaiting_report(session)
    for audit_id in due:
        complete(audit_id, sessions=sessions, enqueue=enqueue, max_attempts=max_attempts)
        log.info("reaper: audit report written", extra={"batch_id": str(audit_id),
                                                        "event": "reap_audit"})  # fmt: skip
    return due


# --- the report job -----------------------------------------------------------------------------
def compute_report(
    job: ClaimedJob, ctx: WorkerContext, should_stop: Callable[[], bool]
) -> dict[str, Any] | None:
    """The report job's artifacts (name → bytes, plus '__summary__'): `report.json` (the
    classes ranked by `build_report`, images named `<job id>/<artifact name>`, and the classes
    whose jobs did not succeed) and `report.html` (`render_html`, images inline). None if it
    was asked to stop."""
    from digin.core.audit_params import AuditParams, build_report, render_html

    audit_id = uuid.UUID(str(job.params["audit"]))
    with ctx.sessions() as session:
        audit = session.get_one(Audit, audit_id)
        params = AuditParams.model_validate(audit.params)
        jobs = list(
            session.scalars(
                select(Job).where(Job.batch_id == audit_id, Job.kind != REPORT_KIND)
                .order_by(Job.item_index)
            )
        )  # fmt: skip
        classes = audit.classes
    records = {j.id: _record(j) for j in jobs if j.status == SUCCEEDED and j.result}
    class_records = [
        records[j.id] for j in jobs if j.id in records and (j.item_index or 0) < classes
    ]
    follow_records = [
        records[j.id] for j in jobs if j.id in records and (j.item_index or 0) >= classes
    ]
    report = build_report(params, class_records, follow_records)
    report["unfinished"] = [
        {"index": j.item_index, "custom_id": j.custom_id, "job_id": str(j.id), "kind": j.kind,
         "status": j.status, "error": j.error}
        for j in jobs if j.status != SUCCEEDED
    ]  # fmt: skip
    if should_stop():
        return None
    keys = {
        f"{j.id}/{a['name']}": str(a["key"])
        for j in jobs if j.id in records
        for a in (j.result or {}).get("artifacts") or [] if a.get("name") and a.get("key")
    }  # fmt: skip
    images = _report_images(report, keys, ctx)
    page = render_html(report, images)
    summary = {
        "audit": str(audit_id),
        "classes": len(report["classes"]),
        "flagged": report["flagged"],
        "ranking": [
            {"rank": r["rank"], "class_index": r["class_index"], "class_name": r["class_name"],
             "flagged": r["flagged"], "auc": r["auc"], "min_auc": r["min_auc"]}
            for r in report["classes"][:20]
        ],
        "unfinished": len(report["unfinished"]),
    }  # fmt: skip
    return {
        "report.json": json.dumps(report, indent=1).encode(),
        "report.html": page.encode(),
        "__summary__": summary,
    }


def _record(job: Job) -> dict[str, Any]:
    """A finished item as the report takes it: its artifacts named `<job id>/<name>`."""
    result = job.result or {}
    names = [str(a["name"]) for a in result.get("artifacts") or [] if a.get("name")]
    return {
        "kind": job.kind,
        "params": job.params,
        "result": result.get("summary") or {},
        "artifacts": {name: f"{job.id}/{name}" for name in names},
    }


def _report_images(
    report: dict[str, Any], keys: dict[str, str], ctx: WorkerContext
) -> dict[str, bytes]:
    """The bytes of every image the report names (`<job id>/<name>`), read from the items'
    stored artifact keys. An image that is gone is left out (the page names it instead);
    storage that does not answer re-queues the report job (`storage_unavailable`)."""
    wanted: set[str] = set()
    for row in report["classes"]:
        wanted.update(row.get("disagreement") or [])
        for c in row.get("components") or []:
            wanted.add(c.get("top_other_image") or "")
            wanted.update(c.get("visualizations") or [])
    images = {}
    for ref in sorted(wanted):
        key = keys.get(ref)
        if key is None or not key.lower().endswith(IMAGE_TYPES):
            continue
        try:
            images[ref] = ctx.storage.get(key)
        except ArtifactNotFound:
            continue
        except Exception as exc:
            raise JobFailure(
                "requeue", "storage_unavailable",
                f"could not read {ref!r} for the report: {type(exc).__name__}: {exc}",
                {"stage": "loading"},
            ) from exc  # fmt: skip
    return images
