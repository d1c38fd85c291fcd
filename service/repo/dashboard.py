"""Reads of the dashboard (docs/architecture.md §9.11) that the REST API has no use for: light
rows for live progress and for a batch's outcome matrix, the key behind a dashboard session,
and the sessions ended by a logout. Every read is scoped to a tenant, like the rest of the
repository.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from digin.service.db.models import ApiKey, EndedSession, Job, Tenant, utcnow

MAX_IDS = 500  # ids of one lookup (a page of the dashboard never shows more)


class JobState(NamedTuple):
    id: uuid.UUID
    status: str
    progress: dict[str, Any] | None


class BatchItem(NamedTuple):
    id: uuid.UUID
    item_index: int
    custom_id: str | None
    status: str


def session_tenant(
    session: Session, *, prefix: str, tenant_id: uuid.UUID, nonce: str
) -> Tenant | None:
    """The tenant of the active (not revoked) key with this prefix, if it is `tenant_id` and the
    session `nonce` was not ended by a logout: a dashboard session re-checks both on every
    request (one query), so revoking the key or logging out ends it, copies of its cookie too."""
    ended = select(EndedSession.nonce).where(EndedSession.nonce == nonce).exists()
    return session.scalars(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(
            ApiKey.prefix == prefix,
            ApiKey.revoked_at.is_(None),
            Tenant.id == tenant_id,
            ~ended,
        )
    ).one_or_none()


def end_session(session: Session, *, nonce: str, expires_at: datetime) -> None:
    """List a logged-out session's nonce until the cookie would have expired anyway, and drop
    the entries whose cookies have expired since (flushes; the caller commits)."""
    session.execute(delete(EndedSession).where(EndedSession.expires_at <= utcnow()))
    if session.get(EndedSession, nonce) is None:
        session.add(EndedSession(nonce=nonce, expires_at=expires_at))
    session.flush()


def _check(ids: Sequence[uuid.UUID]) -> None:
    if len(ids) > MAX_IDS:
        raise ValueError(f"ids: at most {MAX_IDS} per lookup, got {len(ids)}")


def job_states(
    session: Session, *, tenant_id: uuid.UUID, job_ids: Sequence[uuid.UUID]
) -> list[JobState]:
    """Status and progress of the tenant's jobs among `job_ids` (others' ids are left out)."""
    _check(job_ids)
    if not job_ids:
        return []
    rows = session.execute(
        select(Job.id, Job.status, Job.progress).where(
            Job.tenant_id == tenant_id, Job.id.in_(job_ids)
        )
    )
    return [JobState(*row) for row in rows]


def jobs_by_ids(
    session: Session, *, tenant_id: uuid.UUID, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Job]:
    """The tenant's jobs among `job_ids`, by id."""
    _check(job_ids)
    if not job_ids:
        return {}
    jobs = session.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.id.in_(job_ids)))
    return {job.id: job for job in jobs}


def batch_items(session: Session, *, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> list[BatchItem]:
    """Every item of the tenant's batch in item order, four small columns each (no params or
    results): what the outcome matrix is laid out from."""
    rows = session.execute(
        select(Job.id, Job.item_index, Job.custom_id, Job.status)
        .where(Job.batch_id == batch_id, Job.tenant_id == tenant_id)
        .order_by(Job.item_index)
    )
    return [
        BatchItem(job_id, index or 0, custom_id, status)
        for job_id, index, custom_id, status in rows
    ]
