"""Factories shared by the API tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from digin.service import repo
from digin.service.db import Job, Tenant


def new_job(session: Session, tenant: Tenant, **overrides: Any) -> Job:
    """A committed queued job of `tenant` (arguments of repo.create_job override defaults)."""
    args: dict[str, Any] = {
        "kind": "guided", "params": {"classes": [3]}, "seed": 0, "priority": 0,
        "queue": "interactive", "max_attempts": 3,
    }  # fmt: skip
    job, _ = repo.create_job(session, tenant_id=tenant.id, **(args | overrides))
    session.commit()
    return job


@contextmanager
def refusing_jobs(engine: Engine, *, seed: int) -> Iterator[None]:
    """While inside, the database refuses to insert a job with this seed ('refused by the test
    trigger'): a failure no validation foresees, from a real trigger (PostgreSQL or SQLite),
    whether the rows come by INSERT or COPY."""
    if engine.dialect.name == "postgresql":
        create = [
            "CREATE FUNCTION digin_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.seed = {int(seed)} THEN RAISE EXCEPTION 'refused by the test trigger'; "
            "END IF; RETURN NEW; END $$",
            "CREATE TRIGGER digin_test_refuse BEFORE INSERT ON jobs FOR EACH ROW "
            "EXECUTE FUNCTION digin_test_refuse()",
        ]
        drop = ["DROP TRIGGER IF EXISTS digin_test_refuse ON jobs",
                "DROP FUNCTION IF EXISTS digin_test_refuse()"]  # fmt: skip
    else:
        create = [
            f"CREATE TRIGGER digin_test_refuse BEFORE INSERT ON jobs WHEN NEW.seed = {int(seed)} "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"
        ]
        drop = ["DROP TRIGGER IF EXISTS digin_test_refuse"]
    with engine.begin() as conn:
        for statement in create:
            conn.execute(text(statement))
    try:
        yield
    finally:
        with engine.begin() as conn:
            for statement in drop:
                conn.execute(text(statement))
