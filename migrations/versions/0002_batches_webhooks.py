"""batches (sweeps) and webhooks: batches, webhook_deliveries; jobs gain their batch item
position, custom id, group key and webhook

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

jobs.batch_id (present since 0001) becomes a foreign key to batches; its single-column index
gives way to (batch_id, item_index) unique and (batch_id, status, item_index). SQLite runs the
jobs changes in batch mode (the table is copied). tests/api/test_migrations.py checks that the
migrated schema matches service/db/models.py on PostgreSQL and SQLite.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def timestamp(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("params_template", json(), nullable=False),
        sa.Column("spec", json(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("metadata", json(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("webhook", json(), nullable=True),
        timestamp("created_at", nullable=False),
        timestamp("canceled_at"),
        timestamp("finished_at"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_batches_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint(
            "tenant_id", "idempotency_key", name=op.f("uq_batches_tenant_id_idempotency_key")
        ),
    )
    op.create_index("ix_batches_tenant_created", "batches", ["tenant_id", "created_at", "id"])

    op.drop_index(op.f("ix_jobs_batch_id"), table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("item_index", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("custom_id", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("group_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("webhook", json(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_jobs_batch_id_batches"), "batches", ["batch_id"], ["id"]
        )
        batch.create_unique_constraint(
            op.f("uq_jobs_batch_id_item_index"), ["batch_id", "item_index"]
        )
    op.create_index(
        "ix_jobs_batch_status_item", "jobs", ["batch_id", "status", "item_index"]
    )

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("batch_id", sa.Uuid(), nullable=True),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=1000), nullable=True),
        sa.Column("log", json(), nullable=True),
        timestamp("created_at", nullable=False),
        timestamp("next_attempt_at"),
        timestamp("delivered_at"),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed')",
            name=op.f("ck_webhook_deliveries_status"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_webhook_deliveries_tenant_id_tenants")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_webhook_deliveries_job_id_jobs")
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_webhook_deliveries_batch_id_batches")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("event_id", name=op.f("uq_webhook_deliveries_event_id")),
    )
    op.create_index(
        op.f("ix_webhook_deliveries_job_id"), "webhook_deliveries", ["job_id"]
    )
    op.create_index(
        op.f("ix_webhook_deliveries_batch_id"), "webhook_deliveries", ["batch_id"]
    )
    op.create_index(
        "ix_webhook_deliveries_status_next", "webhook_deliveries", ["status", "next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_jobs_batch_status_item", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("uq_jobs_batch_id_item_index"), type_="unique")
        batch.drop_constraint(op.f("fk_jobs_batch_id_batches"), type_="foreignkey")
        batch.drop_column("webhook")
        batch.drop_column("group_key")
        batch.drop_column("custom_id")
        batch.drop_column("item_index")
    op.create_index(op.f("ix_jobs_batch_id"), "jobs", ["batch_id"])
    op.drop_table("batches")
