"""job events: the log of status changes that live event streams replay, written by triggers

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

Every change of `jobs.status` (whatever code path makes it: a compare-and-set, a batch's bulk
cancel, a group claim, the reaper) inserts a `job_events` row in the same transaction through an
AFTER UPDATE trigger, and a batch whose `finished_at` is set inserts a `batch_finished` row. On
PostgreSQL the triggers also send the event with NOTIFY on the channel `digin_events` (delivered
at commit, never for a rolled-back change), and a change of `jobs.progress` sends a `progress`
notification (not stored); revoking an API key notifies its prefix on `digin_keys` (the API's
key cache forgets it). SQLite has no NOTIFY: the API reads the table (service/events.py).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "digin_events"  # service/events.py::CHANNEL
KEYS_CHANNEL = "digin_keys"  # service/events.py::KEYS_CHANNEL: revoked keys' prefixes

POSTGRESQL = [
    f"""
CREATE FUNCTION digin_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
    body jsonb;
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        body := jsonb_build_object(
            'status', NEW.status,
            'attempts', NEW.attempts,
            'error', CASE WHEN NEW.error ->> 'code' IS NULL THEN NULL ELSE jsonb_build_object(
                'code', NEW.error ->> 'code',
                'message', left(NEW.error ->> 'message', 500),
                'retryable', coalesce((NEW.error ->> 'retryable')::boolean, false)) END,
            'artifacts', CASE WHEN NEW.status = 'succeeded' THEN
                jsonb_array_length(coalesce(NEW.result -> 'artifacts', '[]'::jsonb)) END);
        INSERT INTO job_events (tenant_id, job_id, batch_id, type, data, at)
        VALUES (NEW.tenant_id, NEW.id, NEW.batch_id, 'status', body::text,
                extract(epoch from clock_timestamp()))
        RETURNING id INTO event_id;
        PERFORM pg_notify('{CHANNEL}', jsonb_build_object(
            'id', event_id, 'tenant_id', NEW.tenant_id, 'job_id', NEW.id,
            'batch_id', NEW.batch_id, 'type', 'status', 'data', body)::text);
    ELSIF NEW.progress IS DISTINCT FROM OLD.progress AND NEW.progress IS NOT NULL
            AND jsonb_typeof(NEW.progress) = 'object' THEN
        PERFORM pg_notify('{CHANNEL}', jsonb_build_object(
            'tenant_id', NEW.tenant_id, 'job_id', NEW.id, 'batch_id', NEW.batch_id,
            'type', 'progress', 'data', NEW.progress)::text);
    END IF;
    RETURN NULL;
END $$
""",
    """
CREATE TRIGGER jobs_events AFTER UPDATE OF status, progress ON jobs
FOR EACH ROW EXECUTE FUNCTION digin_job_event()
""",
    f"""
CREATE FUNCTION digin_batch_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
    body jsonb;
BEGIN
    IF OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL THEN
        body := jsonb_build_object('canceled', NEW.canceled_at IS NOT NULL);
        INSERT INTO job_events (tenant_id, job_id, batch_id, type, data, at)
        VALUES (NEW.tenant_id, NULL, NEW.id, 'batch_finished', body::text,
                extract(epoch from clock_timestamp()))
        RETURNING id INTO event_id;
        PERFORM pg_notify('{CHANNEL}', jsonb_build_object(
            'id', event_id, 'tenant_id', NEW.tenant_id, 'job_id', NULL, 'batch_id', NEW.id,
            'type', 'batch_finished', 'data', body)::text);
    END IF;
    RETURN NULL;
END $$
""",
    """
CREATE TRIGGER batches_events AFTER UPDATE OF finished_at ON batches
FOR EACH ROW EXECUTE FUNCTION digin_batch_event()
""",
    f"""
CREATE FUNCTION digin_key_revoked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL THEN
        PERFORM pg_notify('{KEYS_CHANNEL}', NEW.prefix);
    END IF;
    RETURN NULL;
END $$
""",
    """
CREATE TRIGGER api_keys_revoked AFTER UPDATE OF revoked_at ON api_keys
FOR EACH ROW EXECUTE FUNCTION digin_key_revoked()
""",
]

SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
SQLITE = [
    f"""
CREATE TRIGGER jobs_events AFTER UPDATE OF status ON jobs
WHEN NEW.status IS NOT OLD.status
BEGIN
    INSERT INTO job_events (tenant_id, job_id, batch_id, type, data, at)
    VALUES (NEW.tenant_id, NEW.id, NEW.batch_id, 'status', json_object(
        'status', NEW.status,
        'attempts', NEW.attempts,
        'error', CASE WHEN json_extract(NEW.error, '$.code') IS NULL THEN NULL ELSE json_object(
            'code', json_extract(NEW.error, '$.code'),
            'message', substr(json_extract(NEW.error, '$.message'), 1, 500),
            'retryable', json(CASE WHEN json_extract(NEW.error, '$.retryable') THEN 'true'
                              ELSE 'false' END)) END,
        'artifacts', CASE WHEN NEW.status = 'succeeded' THEN
            json_array_length(coalesce(json_extract(NEW.result, '$.artifacts'), '[]')) END),
        {SQLITE_NOW});
END
""",
    f"""
CREATE TRIGGER batches_events AFTER UPDATE OF finished_at ON batches
WHEN OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL
BEGIN
    INSERT INTO job_events (tenant_id, job_id, batch_id, type, data, at)
    VALUES (NEW.tenant_id, NULL, NEW.id, 'batch_finished',
            json_object('canceled', json(CASE WHEN NEW.canceled_at IS NULL THEN 'false'
                                         ELSE 'true' END)),
            {SQLITE_NOW});
END
""",
]


def upgrade() -> None:
    id_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "job_events",
        sa.Column("id", id_type, autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("batch_id", sa.Uuid(), nullable=True),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            name=op.f("fk_job_events_batch_id_batches"),
            ondelete="CASCADE",
        ),  # fmt: skip
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_job_events_tenant_id_tenants"),
            ondelete="CASCADE",
        ),  # fmt: skip
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index("ix_job_events_job_id_id", "job_events", ["job_id", "id"], unique=False)
    op.create_index("ix_job_events_batch_id_id", "job_events", ["batch_id", "id"], unique=False)
    op.create_index(op.f("ix_job_events_at"), "job_events", ["at"], unique=False)
    statements = POSTGRESQL if op.get_bind().dialect.name == "postgresql" else SQLITE
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS api_keys_revoked ON api_keys")
        op.execute("DROP FUNCTION IF EXISTS digin_key_revoked()")
        op.execute("DROP TRIGGER IF EXISTS batches_events ON batches")
        op.execute("DROP TRIGGER IF EXISTS jobs_events ON jobs")
        op.execute("DROP FUNCTION IF EXISTS digin_batch_event()")
        op.execute("DROP FUNCTION IF EXISTS digin_job_event()")
    else:
        op.execute("DROP TRIGGER IF EXISTS batches_events")
        op.execute("DROP TRIGGER IF EXISTS jobs_events")
    op.drop_index(op.f("ix_job_events_at"), table_name="job_events")
    op.drop_index("ix_job_events_batch_id_id", table_name="job_events")
    op.drop_index("ix_job_events_job_id_id", table_name="job_events")
    op.drop_table("job_events")
