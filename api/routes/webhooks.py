"""Webhook delivery logs of jobs and batches, and the tenant's signing secret
(docs/architecture.md §9.10).

Deliveries are sent by the worker side (`digin.worker.webhooks`, in `digin serve`, `digin reaper`
and Celery beat), never in a request; these routes only read what happened.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from digin.api.deps import SessionDep, TenantDep
from digin.api.problems import field_problem, not_found, problem_responses
from digin.api.schemas import (
    WebhookAttempt,
    WebhookDeliveryList,
    WebhookDeliveryPublic,
    WebhookSecret,
    WebhookSpec,
)
from digin.service.db import Tenant, WebhookDelivery
from digin.service.repo import batches as repo_batches
from digin.service.repo import get_job
from digin.service.repo import webhooks as repo_webhooks
from digin.service.settings import Settings
from digin.service.webhooks import (
    DEFAULT_BATCH_EVENTS,
    DEFAULT_JOB_EVENTS,
    EVENTS,
    JOB_EVENTS,
    checked_webhook,
)

router = APIRouter(prefix="/v1", tags=["webhooks"])

Limit = Annotated[int, Query(ge=1, le=500)]


def delivery_public(d: WebhookDelivery) -> WebhookDeliveryPublic:
    return WebhookDeliveryPublic(
        event_id=d.event_id, event_type=d.event_type, job_id=d.job_id, batch_id=d.batch_id,
        url=d.url, status=d.status,
        attempts=d.attempts, max_attempts=d.max_attempts, last_status_code=d.last_status_code,
        last_error=d.last_error, created_at=d.created_at, next_attempt_at=d.next_attempt_at,
        delivered_at=d.delivered_at, log=[WebhookAttempt(**e) for e in d.log or []],
    )  # fmt: skip


@router.get(
    "/jobs/{job_id}/webhooks",
    summary="A job's webhook deliveries",
    response_description="each event for the job's webhook (and its batch's, for job events), "
    "oldest first, with its attempts",
    responses=problem_responses(401, 404, 422),
)
def job_webhooks(
    job_id: uuid.UUID, session: SessionDep, tenant: TenantDep, limit: Limit = 100
) -> WebhookDeliveryList:
    if get_job(session, tenant_id=tenant.id, job_id=job_id) is None:
        raise not_found("job", job_id)
    return deliveries(session, tenant, limit, job_id=job_id)


@router.get(
    "/batches/{batch_id}/webhooks",
    summary="A batch's webhook deliveries",
    response_description="its batch.completed event and the item events its webhook asked "
    "for, oldest first",
    responses=problem_responses(401, 404, 422),
)
def batch_webhooks(
    batch_id: uuid.UUID, session: SessionDep, tenant: TenantDep, limit: Limit = 100
) -> WebhookDeliveryList:
    if repo_batches.get_batch(session, tenant_id=tenant.id, batch_id=batch_id) is None:
        raise not_found("batch", batch_id)
    return deliveries(session, tenant, limit, batch_id=batch_id)


def deliveries(
    session: Session,
    tenant: Tenant,
    limit: int,
    *,
    job_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
) -> WebhookDeliveryList:
    """The deliveries of the tenant's job or batch, oldest first."""
    rows = repo_webhooks.list_deliveries(
        session, tenant_id=tenant.id, job_id=job_id, batch_id=batch_id, limit=limit
    )
    return WebhookDeliveryList(data=[delivery_public(d) for d in rows])


@router.get(
    "/webhooks/secret",
    summary="The tenant's webhook signing secret",
    response_description="`whsec_…` (created on first use): verify `webhook-signature` with it",
    responses=problem_responses(401),
)
def get_secret(session: SessionDep, tenant: TenantDep) -> WebhookSecret:
    return signing_secret(session, tenant)


@router.post(
    "/webhooks/secret/rotate",
    summary="Replace the tenant's webhook signing secret",
    response_description="the new secret; deliveries from now on are signed with it",
    responses=problem_responses(401),
)
def rotate_secret(session: SessionDep, tenant: TenantDep) -> WebhookSecret:
    return signing_secret(session, tenant, rotate=True)


def signing_secret(session: Session, tenant: Tenant, *, rotate: bool = False) -> WebhookSecret:
    """The tenant's secret (created on first use, or replaced with `rotate`), committed."""
    secret = repo_webhooks.webhook_secret(session, tenant_id=tenant.id, rotate=rotate)
    session.commit()
    return WebhookSecret(secret=secret)


def stored_webhook(
    spec: WebhookSpec | None, settings: Settings, *, batch: bool = False
) -> dict[str, object] | None:
    """A submitted webhook as the row stores it ({url, events} with the defaults filled in),
    checked now (the target must be public; http and loopback only in embedded mode), or a
    422 naming `webhook.url` / `webhook.events`. The sender checks the target again."""
    if spec is None:
        return None
    try:
        return checked_webhook(
            spec.url, spec.events, allowed=EVENTS if batch else JOB_EVENTS,
            defaults=DEFAULT_BATCH_EVENTS if batch else DEFAULT_JOB_EVENTS,
            allow_loopback=settings.mode == "embedded",
        )  # fmt: skip
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise field_problem(422, "invalid-webhook", field, message) from None
