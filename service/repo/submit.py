"""Writing many job submissions in one transaction (the API's group commit,
`digin.api.submissions`).

`submit_jobs` does for a list of submissions what `create_job` does for one, with a handful of
statements for the whole list instead of five per job: authenticate every bearer secret in one
query, lock each tenant row once (in id order, so two API processes never deadlock), look up
every idempotency key in one query, count each tenant's queued jobs once, and insert the
accepted jobs in one multi-row INSERT. The outcome of each submission is its own: a job
(created or replayed) or the error that refused it, exactly as `create_job` would have decided
had the submissions come one after another in list order.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from digin.service.db.models import QUEUED, QUEUES, ApiKey, Job, Tenant, utcnow
from digin.service.repo.jobs import (
    RETRY_AFTER_S,
    IdempotencyConflict,
    TenantLimitExceeded,
    lock_tenant,
)
from digin.service.repo.tenants import DUMMY_HASH, local_tenant
from digin.service.security import key_prefix, verify_api_key

LOCAL = object()  # `Submission.secret` when auth is off: the embedded `local` tenant


class Unauthenticated(Exception):
    """The bearer secret is not an active API key."""


@dataclass
class Submission:
    """One accepted-for-writing job: `secret` is the caller's bearer secret (or `LOCAL`),
    `values` the job's columns (kind, params, seed, priority, queue, max_attempts, meta,
    idempotency_key, request_hash, and any others of `Job`); `max_queued` the tenant's cap on
    queued jobs of the same queue."""

    secret: str | object
    values: dict[str, Any]
    max_queued: int | None = None


@dataclass
class Outcome:
    """What became of a submission: `job` (and whether it was `created`), or `error`."""

    job: Job | None = None
    created: bool = False
    error: Exception | None = None
    tenant: Tenant | None = None


@dataclass
class _Tenants:
    by_secret: dict[str, Tenant] = field(default_factory=dict)
    local: Tenant | None = None


def _authenticate(session: Session, submissions: list[Submission]) -> _Tenants:
    """Every distinct secret's tenant, in one query (constant-time hash checks as in
    `digin.service.repo.authenticate`)."""
    found = _Tenants()
    if any(s.secret is LOCAL for s in submissions):
        found.local = local_tenant(session)
    secrets_ = {s.secret for s in submissions if isinstance(s.secret, str)}
    prefixes = {p for p in map(key_prefix, secrets_) if p is not None}
    rows = {}
    if prefixes:
        stmt = (
            select(ApiKey.prefix, ApiKey.hash, Tenant)
            .join(Tenant, ApiKey.tenant_id == Tenant.id)
            .where(ApiKey.prefix.in_(prefixes), ApiKey.revoked_at.is_(None))
        )
        rows = {prefix: (stored, tenant) for prefix, stored, tenant in session.execute(stmt)}
    for secret in secrets_:
        row = rows.get(key_prefix(secret) or "")
        if row is None:
            verify_api_key(secret, DUMMY_HASH)  # the same work as for a known prefix
        elif verify_api_key(secret, row[0]):
            found.by_secret[secret] = row[1]
    return found


def submit_jobs(session: Session, submissions: list[Submission]) -> list[Outcome]:
    """Write `submissions` (flushes; the caller commits). One Outcome per submission, in
    order. Raises only for database errors (then nothing of the list may be committed)."""
    tenants = _authenticate(session, submissions)
    outcomes: list[Outcome] = []
    for sub in submissions:
        tenant = tenants.local if sub.secret is LOCAL else tenants.by_secret.get(sub.secret)  # type: ignore[call-overload]
        if tenant is None:
            outcomes.append(Outcome(error=Unauthenticated("the API key is invalid or revoked")))
            continue
        queue = sub.values.get("queue")
        if queue not in QUEUES:
            raise ValueError(f"queue: {queue!r} is not one of {list(QUEUES)}")
        outcomes.append(Outcome(tenant=tenant))
    live = [(s, o) for s, o in zip(submissions, outcomes, strict=True) if o.tenant is not None]
    if not live:
        return outcomes
    tenant_ids = sorted({o.tenant.id for _, o in live})  # type: ignore[union-attr]
    for tenant_id in tenant_ids:  # id order: no deadlock between API processes
        lock_tenant(session, tenant_id=tenant_id)

    # idempotency keys: the stored jobs, then earlier submissions of this same list
    keys = {(o.tenant.id, s.values["idempotency_key"]) for s, o in live  # type: ignore[union-attr]
            if s.values.get("idempotency_key") is not None}  # fmt: skip
    existing: dict[tuple[uuid.UUID, str], Job] = {}
    if keys:
        found = select(Job).where(tuple_(Job.tenant_id, Job.idempotency_key).in_(list(keys)))
        existing = {(j.tenant_id, j.idempotency_key): j for j in session.scalars(found)}  # type: ignore[misc]

    # the cap counts the tenant's queued jobs of the same queue (sweep items have their own)
    queued: dict[tuple[uuid.UUID, str], int] = defaultdict(int)
    capped = {o.tenant.id for s, o in live if s.max_queued is not None}  # type: ignore[union-attr]
    if capped:
        counts = (
            select(Job.tenant_id, Job.queue, func.count())
            .where(Job.tenant_id.in_(capped), Job.status == QUEUED)
            .group_by(Job.tenant_id, Job.queue)
        )
        queued.update({(t, q): int(n) for t, q, n in session.execute(counts)})

    rows: list[dict[str, Any]] = []
    now = utcnow()
    for sub, outcome in live:
        tenant_id = outcome.tenant.id  # type: ignore[union-attr]
        key = sub.values.get("idempotency_key")
        if key is not None and (tenant_id, key) in existing:
            job = existing[(tenant_id, key)]
            if job.request_hash != sub.values.get("request_hash"):
                outcome.error = IdempotencyConflict(key, job.id)
            else:
                outcome.job = job
            continue
        if sub.max_queued is not None and queued[tenant_id, sub.values["queue"]] >= sub.max_queued:
            limit = sub.max_queued
            outcome.error = TenantLimitExceeded("max_queued_per_tenant", limit, RETRY_AFTER_S)
            continue
        row = _row(sub.values, tenant_id=tenant_id, now=now)
        rows.append(row)
        outcome.job, outcome.created = Job(**row), True
        queued[tenant_id, sub.values["queue"]] += 1
        if key is not None:
            existing[(tenant_id, key)] = outcome.job
    if rows:
        session.execute(insert(Job), rows)
    return outcomes


def _row(values: dict[str, Any], *, tenant_id: uuid.UUID, now: datetime) -> dict[str, Any]:
    row = {
        "id": uuid.uuid4(),
        "status": QUEUED,
        "attempts": 0,
        "cancel_requested": False,
        "created_at": now,
        "idempotency_key": None,
        "request_hash": None,
        "meta": None,
        **values,
        "tenant_id": tenant_id,
    }
    if row["max_attempts"] < 1:
        raise ValueError(f"max_attempts: {row['max_attempts']} must be at least 1")
    return row


def mark_sent(session: Session, sent: list[tuple[uuid.UUID, datetime]]) -> None:
    """Record when each job's message was sent (`enqueued_at`), in one executemany; a job
    that a worker claimed meanwhile still gets its time (only unset times are written)."""
    if not sent:
        return
    jobs = Job.__table__.c
    stmt = (
        update(Job)
        .where(jobs.id == bindparam("job_id"), jobs.enqueued_at.is_(None))
        .values(enqueued_at=bindparam("sent_at"))
    )
    session.connection().execute(stmt, [{"job_id": i, "sent_at": t} for i, t in sent])
