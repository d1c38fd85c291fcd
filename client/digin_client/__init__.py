"""A typed Python client of the DiG-IN job service (`Client`, and `AsyncClient` for asyncio).

    from digin_client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as digin:
        job = digin.submit("guided", {"classes": ["seven"]}, seed=0)
        job = digin.wait(job.id, on_progress=lambda j: print(j.status, j.progress))
        digin.download(job.id, "out/")

Only httpx, pydantic and the standard library: nothing of the server (no torch, FastAPI or
SQLAlchemy) is imported.
The server URL and key default to DIGIN_URL and DIGIN_API_KEY.
"""

from digin_client._async import AsyncClient
from digin_client._sync import Client
from digin_client.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DiginConnectionError,
    DiginError,
    FieldError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    UnprocessableError,
    UnsupportedMediaError,
    WaitTimeoutError,
)
from digin_client.events import Event
from digin_client.models import (
    Artifact,
    ArtifactList,
    Audit,
    AuditClass,
    Batch,
    BatchCounts,
    Image,
    Job,
    JobError,
    ModelList,
    Progress,
    ResultRecord,
)

__all__ = [
    "APIError",
    "Artifact",
    "ArtifactList",
    "AsyncClient",
    "Audit",
    "AuditClass",
    "AuthenticationError",
    "BadRequestError",
    "Batch",
    "BatchCounts",
    "Client",
    "ConflictError",
    "DiginConnectionError",
    "DiginError",
    "Event",
    "FieldError",
    "Image",
    "Job",
    "JobError",
    "ModelList",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Progress",
    "RateLimitError",
    "ResultRecord",
    "ServerError",
    "UnprocessableError",
    "UnsupportedMediaError",
    "WaitTimeoutError",
]
