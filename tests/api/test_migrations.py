"""The Alembic migrations build exactly the schema of the models, on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Engine, Integer, MetaData, inspect, text, update
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from digin.service.db import Base, Job, migrate
from digin.service.db.engine import alembic_config
from tests.api.helpers import new_job


def schema_diff(engine: Engine, metadata: MetaData) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def test_migrated_schema_matches_the_models(engine: Engine):
    assert schema_diff(engine, Base.metadata) == []
    with engine.connect() as conn:
        version = conn.scalar(text("SELECT version_num FROM alembic_version"))
    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    assert version == script.get_current_head() == "0005"  # the newest migration: job_events


def test_the_comparison_sees_a_difference(engine: Engine):
    """Guards the test above: a model with an extra column is reported."""
    metadata = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    metadata.tables["jobs"].append_column(Column("extra", Integer))
    assert [d[0] for d in schema_diff(engine, metadata)] == ["add_column"]


def test_migrate_is_idempotent(db_url: str, engine: Engine):
    migrate(db_url)
    assert schema_diff(engine, Base.metadata) == []


def test_list_and_reaper_indexes_exist(engine: Engine):
    indexes = {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("jobs")}
    assert indexes["ix_jobs_tenant_created"] == ["tenant_id", "created_at", "id"]
    assert indexes["ix_jobs_status_heartbeat"] == ["status", "heartbeat_at"]


def test_timestamps_come_back_as_utc(session: Session, tenant):
    job = new_job(session, tenant)
    session.expire_all()
    created = session.get_one(Job, job.id).created_at
    assert created.tzinfo is not None and created.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - created) < timedelta(hours=1)
    # another zone is stored as the same instant
    instant = datetime(2030, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    session.get_one(Job, job.id).enqueued_at = instant
    session.commit()
    session.expire_all()
    assert session.get_one(Job, job.id).enqueued_at == datetime(2030, 1, 1, 10, tzinfo=UTC)


def test_naive_timestamps_are_refused(session: Session, tenant):
    job = new_job(session, tenant)
    job.enqueued_at = datetime(2030, 1, 1)
    with pytest.raises(StatementError, match="naive datetime"):
        session.commit()
    session.rollback()


def test_status_is_checked_by_the_database(session: Session, tenant):
    job = new_job(session, tenant)
    with pytest.raises(IntegrityError, match="(?i)check"):
        session.execute(update(Job).where(Job.id == job.id).values(status="lost"))
    session.rollback()
