"""Typed responses of the REST API, as the client reads them.

Lean copies of the server's shapes (the server's `api/schemas.py`, which the client, a
distribution of its own, never imports). They accept members they do
not know (a newer server may add some; `model_extra` keeps them) and never reject a response
for an unknown status string: the server is the judge of what is valid.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JOB_TERMINAL = frozenset({"succeeded", "failed", "canceled"})
BATCH_TERMINAL = frozenset({"succeeded", "failed", "canceled", "completed"})


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --- jobs -----------------------------------------------------------------------------------------
class Progress(_Response):
    step: int | None = None  # optimisation steps done
    total: int | None = None  # steps in all
    stage: str | None = None  # loading, optimizing, uploading, ...


class JobError(_Response):
    code: str  # gpu_oom, worker_lost, invalid_params, ...
    message: str
    retryable: bool = False


class ArtifactRef(_Response):
    name: str  # grid.png, item_000.png, result.json, ...
    content_type: str = "application/octet-stream"
    size: int | None = None  # bytes


class JobResult(_Response):
    summary: dict[str, Any] = Field(default_factory=dict)  # the core's metrics per item
    artifacts: list[ArtifactRef] = Field(default_factory=list)


class JobUrls(_Response):
    self: str
    cancel: str
    artifacts: str


class Job(_Response):
    """A job as its tenant sees it (`GET /v1/jobs/{id}`)."""

    id: str
    kind: str
    status: str  # queued, running, canceling, succeeded, failed, canceled
    params: dict[str, Any]
    seed: int
    priority: int
    queue: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None  # the item's id in its batch
    item_index: int | None = None  # the item's position in its batch
    metadata: dict[str, Any] | None = None
    attempts: int = 0
    max_attempts: int | None = None
    cost: int | None = None  # estimated pixel-steps (the deployment caps it: DIGIN_MAX_JOB_COST)
    progress: Progress | None = None
    result: JobResult | None = None
    error: JobError | None = None
    cancel_requested: bool = False
    created_at: datetime
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    finished_at: datetime | None = None
    worker: dict[str, Any] | None = None
    urls: JobUrls | None = None

    @property
    def done(self) -> bool:
        """Finished: succeeded, failed or canceled (terminal states never change)."""
        return self.status in JOB_TERMINAL

    def is_done(self) -> bool:
        return self.done


class Artifact(_Response):
    """A stored output of a job with a URL minted for this read: presigned (S3, expires at
    `expires_at`) or the API's own download path (local storage; relative to the API)."""

    name: str
    content_type: str = "application/octet-stream"
    size: int | None = None
    url: str
    expires_at: datetime | None = None


class ArtifactList(_Response):
    job_id: str
    status: str
    data: list[Artifact]  # empty until the job has succeeded


# --- images and models ----------------------------------------------------------------------------
class Image(_Response):
    """An uploaded start image; its `id` is what job params refer to."""

    id: str
    sha256: str
    format: str
    width: int
    height: int
    size_bytes: int
    created_at: datetime


class Model(_Response):
    spec: str
    kind: str
    description: str = ""
    source: str | None = None
    resolution: int | None = None
    num_classes: int | None = None
    available: bool = False  # weights present on the server
    allowed: bool = True  # on the server's allow-list


class ModelList(_Response):
    models: list[Model]
    schemes: list[dict[str, Any]] = Field(default_factory=list)
    allow_list: list[str] | None = None
    kinds: list[str] = Field(default_factory=list)


# --- batches --------------------------------------------------------------------------------------
class BatchCounts(_Response):
    queued: int = 0
    running: int = 0
    canceling: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.canceled


class BatchUrls(_Response):
    self: str
    results: str
    jobs: str
    cancel: str


class Batch(_Response):
    """A sweep (`GET /v1/batches/{id}`): items are ordinary jobs with this `batch_id`."""

    id: str
    kind: str
    status: str  # running, succeeded, failed, canceled, completed
    total: int
    counts: BatchCounts
    progress: float  # finished / total, 0..1
    throughput_per_min: float | None = None  # finished items per minute; None before any
    eta_seconds: float | None = None  # None when unknown
    priority: int
    metadata: dict[str, Any] | None = None
    created_at: datetime
    finished_at: datetime | None = None
    urls: BatchUrls | None = None

    @property
    def done(self) -> bool:
        """Every item finished: succeeded, completed, failed or canceled."""
        return self.status in BATCH_TERMINAL

    def is_done(self) -> bool:
        return self.done


# --- audits ---------------------------------------------------------------------------------------
class AuditClass(_Response):
    """One audited class: its `audit_class` job, and its table row once that succeeded."""

    index: int
    name: str
    job_id: str
    status: str
    error: JobError | None = None
    row: dict[str, Any] | None = None  # rank, flagged, auc, components, ... (the report's row)


class Audit(_Response):
    """An audit (`GET /v1/audits/{id}`): a classifier audited across its classes."""

    id: str
    status: str  # running, succeeded, failed, canceled
    stage: str  # classes, follow_ups, report, canceling, done
    classifier: str
    total_classes: int
    class_counts: BatchCounts
    follow_up_counts: BatchCounts
    progress: float  # finished jobs / jobs so far, 0..1
    flagged: list[str] | None = None  # the report's flagged classes, once built
    classes: list[AuditClass] | None = None  # every class (GET of one audit; None in lists)
    report_job_id: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int
    priority: int
    metadata: dict[str, Any] | None = None
    created_at: datetime
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        """The report job ended (succeeded or failed), or the audit was canceled."""
        return self.status in JOB_TERMINAL

    def is_done(self) -> bool:
        return self.done


class ResultArtifact(_Response):
    name: str
    url: str


class ResultRecord(_Response):
    """One line of a batch's results index (`GET /v1/batches/{id}/results`), in item order."""

    index: int
    custom_id: str
    job_id: str
    status: str
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    metrics: dict[str, Any] | None = None  # the job result's metrics; None until it succeeded
    artifacts: list[ResultArtifact] = Field(default_factory=list)
    error: JobError | None = None


ResultFormat = Literal["jsonl", "csv"]


class Page(_Response):
    """One page of a cursor-paged list."""

    data: list[dict[str, Any]]
    next_cursor: str | None = None
