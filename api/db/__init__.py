"""The service's database: models, engines/sessions and migrations (DESIGN §5.1)."""

from api.db.engine import make_engine, migrate, session_factory, session_scope
from api.db.models import (
    ACTIVE,
    CANCELED,
    CANCELING,
    FAILED,
    QUEUED,
    QUEUES,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    TERMINAL,
    ApiKey,
    Base,
    Image,
    Job,
    Tenant,
    utcnow,
)

__all__ = [
    "ACTIVE",
    "CANCELED",
    "CANCELING",
    "FAILED",
    "QUEUED",
    "QUEUES",
    "RUNNING",
    "STATUSES",
    "SUCCEEDED",
    "TERMINAL",
    "ApiKey",
    "Base",
    "Image",
    "Job",
    "Tenant",
    "make_engine",
    "migrate",
    "session_factory",
    "session_scope",
    "utcnow",
]
