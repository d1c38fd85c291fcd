"""Database models (docs/architecture.md §9.1, §9.6, §9.9, §9.10): tenants, their API keys,
jobs, uploaded images, batches (sweeps), audits, webhook deliveries and ended dashboard
sessions.

Portable between PostgreSQL and SQLite: `Uuid` keys (native uuid / CHAR(32)), JSON (JSONB on
PostgreSQL), timestamps always timezone-aware UTC (`UTCDateTime`). Status and queue values are
plain strings with CHECK constraints, so adding one is a one-line migration.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

QUEUED, RUNNING, CANCELING = "queued", "running", "canceling"
SUCCEEDED, FAILED, CANCELED = "succeeded", "failed", "canceled"
STATUSES = (QUEUED, RUNNING, CANCELING, SUCCEEDED, FAILED, CANCELED)
TERMINAL = (SUCCEEDED, FAILED, CANCELED)
ACTIVE = (RUNNING, CANCELING)  # a worker holds the job
QUEUES = ("interactive", "sweep")
PENDING, DELIVERED = "pending", "delivered"  # webhook deliveries: pending → delivered | failed
DELIVERY_STATUSES = (PENDING, DELIVERED, FAILED)

JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that only takes aware datetimes and always returns them in UTC
    (SQLite keeps no zone: values are stored as UTC and read back as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware (UTC) one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    webhook_secret: Mapped[str | None] = mapped_column(String(128))


class ApiKey(Base):
    """A bearer key `dg_<prefix>_<random>`: only its prefix (lookup, display) and the SHA-256
    of the whole secret are stored (`digin.service.security`)."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    """One explanation job; the row is the truth about its state (docs/architecture.md §9.1)."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        CheckConstraint(f"status IN {STATUSES}", name="status"),
        CheckConstraint(f"queue IN {QUEUES}", name="queue"),
        # GET /v1/jobs: newest first, keyset cursor over (created_at, id).
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        # per-tenant caps: counts of queued / running jobs.
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
        # the reaper: stale heartbeats of running jobs, never-dispatched queued jobs.
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
        # a batch's items in item order (results index, GET /v1/jobs?batch_id=), unique in it
        UniqueConstraint("batch_id", "item_index"),
        # a batch's counts per status, and a worker claiming the next queued items of a batch
        Index("ix_jobs_batch_status_item", "batch_id", "status", "item_index"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    params: Mapped[dict[str, Any]] = mapped_column(JsonType)  # validated, defaults filled in
    seed: Mapped[int] = mapped_column(BigInteger)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    queue: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("batches.id"))
    item_index: Mapped[int | None] = mapped_column(Integer)  # position in its batch (0-based)
    custom_id: Mapped[str | None] = mapped_column(String(200))  # the item's id in its batch
    # jobs of one batch with equal group keys may run as one batched optimisation (a hash of
    # the kind and the params without the per-item fields; None: always alone)
    group_key: Mapped[str | None] = mapped_column(String(64))
    webhook: Mapped[dict[str, Any] | None] = mapped_column(JsonType)  # {url, events}
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JsonType)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JsonType)  # {step, total, stage}
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonType)  # metrics, artifact keys
    error: Mapped[dict[str, Any] | None] = mapped_column(JsonType)  # {code, message, retryable}
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[dict[str, Any] | None] = mapped_column(JsonType)  # {host, gpu, pid}


class Image(Base):
    """An uploaded start image (POST /v1/images); the bytes live in storage at `storage_key`."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("tenant_id", "sha256"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Batch(Base):
    """A sweep (docs/architecture.md §9.9): its items are ordinary jobs with `batch_id` and
    `item_index`."""

    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        # GET /v1/batches: newest first, keyset cursor over (created_at, id).
        Index("ix_batches_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    kind: Mapped[str] = mapped_column(String(32))
    params_template: Mapped[dict[str, Any]] = mapped_column(JsonType)  # as the client sent it
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)  # the axes, or {"items": n}
    total: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JsonType)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    webhook: Mapped[dict[str, Any] | None] = mapped_column(JsonType)  # {url, events}
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the user canceled it
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # its last item ended


class Audit(Base):
    """An audit of a classifier across its classes (docs/architecture.md §9.14). Its id is the
    id of its batch, whose items are its jobs: one `audit_class` job per class (items 0 to
    `classes` - 1), the follow-ups their results ask for, and last the `audit_report` job whose
    artifacts are the report."""

    __tablename__ = "audits"
    __table_args__ = (
        # GET /v1/audits: newest first, keyset cursor over (created_at, id).
        Index("ix_audits_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    params: Mapped[dict[str, Any]] = mapped_column(JsonType)  # validated, defaults filled in
    classes: Mapped[int] = mapped_column(Integer)  # audit_class items: 0 .. classes - 1
    seed: Mapped[int] = mapped_column(BigInteger)
    report_job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """One event for one endpoint (docs/architecture.md §9.10): the payload is fixed when the
    event happens; every retry sends the same `event_id` and body (with a fresh timestamp and
    signature)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(f"status IN {DELIVERY_STATUSES}", name="status"),
        # the sender: pending deliveries that are due
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    event_id: Mapped[str] = mapped_column(String(64), unique=True)  # stable: same on retries
    event_type: Mapped[str] = mapped_column(String(32))  # running, succeeded, batch.completed…
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("batches.id"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[str] = mapped_column(Text)  # the exact JSON body sent on every attempt
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(1000))
    log: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType)  # the last attempts
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EndedSession(Base):
    """A dashboard session ended by its logout before it expired (docs/architecture.md §9.11):
    the session cookie is stateless and signed, so a copy of it stays valid until its expiry
    unless its nonce is listed here. Rows are deleted once `expires_at` has passed."""

    __tablename__ = "ended_sessions"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class JobEvent(Base):
    """A job's status change or a batch's end, written by a database trigger in the transaction
    that makes the change (migration 0005): the log that live event streams replay from
    (`digin.service.events`, docs/architecture.md §8.12). `data` is JSON text; `at` seconds since
    the epoch (old rows are pruned by it)."""

    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_job_id_id", "job_id", "id"),
        Index("ix_job_events_batch_id_id", "batch_id", "id"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))  # status | batch_finished
    data: Mapped[str] = mapped_column(Text)
    at: Mapped[float] = mapped_column(Float, index=True)
