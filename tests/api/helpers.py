"""Factories shared by the API tests."""

from __future__ import annotations

from typing import Any

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
