"""audits: a classifier audited across its classes, one row per audit over its batch

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

An audit's id is its batch's id (the batch's items are the audit's jobs: one audit_class job
per class, their follow-ups, the report job); `report_job_id` names the report job once it
exists (docs/architecture.md §9.14). tests/api/test_migrations.py checks that the migrated
schema matches service/db/models.py on PostgreSQL and SQLite.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "audits",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("params", json(), nullable=False),
        sa.Column("classes", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("report_job_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["id"], ["batches.id"], name=op.f("fk_audits_id_batches")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_audits_tenant_id_tenants")
        ),
        sa.ForeignKeyConstraint(
            ["report_job_id"], ["jobs.id"], name=op.f("fk_audits_report_job_id_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audits")),
    )
    op.create_index("ix_audits_tenant_created", "audits", ["tenant_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_audits_tenant_created", table_name="audits")
    op.drop_table("audits")
