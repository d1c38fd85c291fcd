"""Request and response schemas of the REST API (docs/architecture.md §9.1, §9.2), layered as in the
full-stack FastAPI template: `JobCreate` (what a client sends), `JobPublic` (what it reads),
`JobList` (a page), plus artifacts, images, models and health.

Responses show the job row, never Celery's task state, and never storage keys: artifacts are
named, and their URLs are minted per read (`GET /v1/jobs/{id}/artifacts`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, get_args
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    field_validator,
    model_validator,
)

from digin.api.problems import ProblemError, fields_problem
from digin.core.audit_params import bind_step
from digin.core.limits import stored_cost
from digin.core.params import KINDS, AuditClassParams, ParamsError, validate_params
from digin.core.registry import (
    ModelInfo,
    ModelRoots,
    SchemeInfo,
    check_model_roots,
    is_allowed,
    names_server_path,
    parse_spec,
)
from digin.service.db import STATUSES, Image, Job

JobStatus = Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]
assert set(get_args(JobStatus)) == set(STATUSES), "JobStatus must list digin.service.db's STATUSES"

MAX_SEED = 2**53 - 1  # exact in JSON numbers (JavaScript clients); item i uses seed + i
MAX_PRIORITY = 9
MAX_METADATA_KEYS = 50
MAX_METADATA_BYTES = 8192

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MAX_METADATA_STRING = 500


def _metadata_value(value: Any) -> Any:
    """A JSON scalar: one error per bad value (not one per member of a union)."""
    if isinstance(value, str):
        if len(value) > MAX_METADATA_STRING:
            raise ValueError(f"at most {MAX_METADATA_STRING} characters, got {len(value)}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
    elif value is not None and not isinstance(value, (bool, int)):
        raise ValueError("must be a string, a number, a boolean or null")
    return value


MetadataValue = Annotated[
    Any, PlainValidator(_metadata_value, json_schema_input_type=str | int | float | bool | None)
]


def _known_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; must be one of {list(KINDS)}")
    return kind


Kind = Annotated[str, AfterValidator(_known_kind)]  # a job kind: one of KINDS


# --- what a request body may hold ----------------------------------------------------------------
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL, and the UTF-16 surrogates
MAX_UNSTORABLE_ERRORS = 20  # places named in one problem
_STRICT_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, check_circular=False)


def unstorable(body: Any) -> list[dict[str, str]]:
    """Each place in a parsed JSON body (or any JSON value) holding what the database cannot
    store, as {field, message} with the field's JSON path (`params.classes.0`, `metadata.k`;
    at most MAX_UNSTORABLE_ERRORS): a string or object key with a NUL character (PostgreSQL's
    text and jsonb refuse it) or a lone UTF-16 surrogate (`"\\ud800"`: not Unicode text), and a
    number that is not finite (NaN, Infinity, or one too large for a float, such as 1e999:
    JSON has none of them, but Python's parser reads them). A body with none of them costs one
    serialisation in C; else one pass over it names each place (no recursion)."""
    try:  # the common case: nothing to refuse
        text = _STRICT_JSON.encode(body)
        if "\\u0000" not in text:  # (NUL is escaped; a lone surrogate fails to encode)
            text.encode()
            return []
    except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
        pass
    errors: list[dict[str, str]] = []
    # (value, its path as a chain (parent chain, key), or None at the top)
    stack: list[tuple[Any, tuple[Any, str | int] | None]] = [(body, None)]
    while stack and len(errors) < MAX_UNSTORABLE_ERRORS:
        value, path = stack.pop()
        if isinstance(value, str):
            if (found := _UNSTORABLE.search(value)) is not None:
                errors.append({"field": _field(path), "message": _refusal(found.group())})
        elif isinstance(value, float):
            if not math.isfinite(value):
                message = f"must be a finite number, got {value}"
                errors.append({"field": _field(path), "message": message})
        elif isinstance(value, dict):
            items = list(value.items())
            for key, _ in items:
                if isinstance(key, str) and (found := _UNSTORABLE.search(key)) is not None:
                    message = f'the key "{_escaped(key)}" {_refusal(found.group())}'
                    errors.append({"field": _field((path, key)), "message": message})
            stack.extend((item, (path, key)) for key, item in reversed(items))
        elif isinstance(value, list):
            stack.extend((value[i], (path, i)) for i in range(len(value) - 1, -1, -1))
    return errors[:MAX_UNSTORABLE_ERRORS]


def storable_text(value: str | None) -> str | None:
    """A validator for a text field outside the body (a header): `unstorable`'s refusal."""
    if value is not None and (found := _UNSTORABLE.search(value)) is not None:
        raise ValueError(_refusal(found.group()))
    return value


def _refusal(char: str) -> str:
    if char == "\x00":
        return "must not contain the NUL character (\\u0000): it cannot be stored"
    return f"must not contain a lone UTF-16 surrogate ({_escaped(char)}): it is not Unicode text"


def _escaped(text: str) -> str:
    """`text` with NUL, surrogates and other non-ASCII characters as JSON escapes."""
    return json.dumps(text)[1:-1] if _UNSTORABLE.search(text) else text


def _field(path: tuple[Any, str | int] | None) -> str:
    """The dotted JSON path of a chain (parent chain, key); `body` for the body itself."""
    parts: list[str] = []
    while path is not None:
        path, key = path
        parts.append(_escaped(key) if isinstance(key, str) else str(key))
    return ".".join(reversed(parts)) or "body"


class RequestBody(BaseModel):
    """Base of every request body model: unknown fields refused, and no NaN or infinity in a
    float field. (The whole body was checked by `unstorable` before it gets here:
    `digin.api.deps.get_writing_tenant`.)"""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- webhooks (docs/architecture.md §9.10) --------------------------------------------------------
WebhookEvent = Literal["running", "succeeded", "failed", "canceled", "batch.completed"]


class WebhookSpec(RequestBody):
    """Where to POST events of a job or batch, and which (Standard Webhooks signatures with the
    tenant's secret: `GET /v1/webhooks/secret`)."""

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="https URL on a public address (http and loopback only in embedded mode)",
    )
    events: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        description="jobs: running, succeeded, failed, canceled (default: the last three); "
        "batches: also batch.completed (default: batch.completed only)",
    )


# --- jobs -----------------------------------------------------------------------------------------
class JobCreate(RequestBody):
    """A new job (`POST /v1/jobs`). `params` are the kind's parameters (see `digin.core.params`),
    validated and stored with every default filled in."""

    model_config = ConfigDict(
        json_schema_extra={"example": {"kind": "guided", "params": {"classes": [3]}, "seed": 0}},
    )

    kind: Kind = Field(
        description="the objective (docs/architecture.md §4.1)",
        json_schema_extra={"enum": list(KINDS)},
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="the kind's parameters; defaults are filled in"
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="seed of item 0 (item i: seed + i); default: random"
    )
    priority: int = Field(
        0, ge=0, le=MAX_PRIORITY, description="broker priority, 0 (first) to 9 (last)"
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        None,
        max_length=MAX_METADATA_KEYS,
        description=f"the client's own labels, returned as given: at most {MAX_METADATA_KEYS} "
        f"keys of 64 characters, strings of {MAX_METADATA_STRING}, {MAX_METADATA_BYTES} bytes "
        "as JSON",
    )
    webhook: WebhookSpec | None = Field(None, description="events of this job POSTed to a URL")

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            size = len(json.dumps(value, separators=(",", ":")).encode())
            if size > MAX_METADATA_BYTES:
                raise ValueError(
                    f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}"
                )
        return value

    def normalised_params(
        self,
        allow_list: list[str] | None,
        *,
        allow_paths: bool = True,
        model_roots: ModelRoots | None = None,
    ) -> dict[str, Any]:
        """The params validated by the kind's model with every default filled in (what is
        stored and what runs), their model specs well-formed, of the right kind and on the
        allow-list; else a 422 problem naming each field (`params.guidance.iterations`).
        `allow_paths` False (production): specs naming a path on the server must be on the
        allow-list explicitly. `model_roots` (Settings.model_path_roots): the folders a spec's
        local path must lie in (`digin.core.registry.check_model_roots`); None, any path, except
        that without `allow_paths` None means no folder but the bundled digits zoo."""
        if model_roots is None and not allow_paths:
            model_roots = ()
        try:
            model = validate_params(self.kind, self.params)
        except ParamsError as exc:
            errors = [
                e if e["field"] == "kind" else {**e, "field": f"params.{e['field']}"}
                for e in exc.errors
            ]
            raise params_problem(errors) from None
        if isinstance(model, AuditClassParams):  # its references resolve only in an audit
            try:
                bind_step(model, None)
            except ValueError as exc:
                name, _, reason = str(exc).partition(": ")
                raise params_problem([{"field": f"params.{name}", "message": reason}]) from None
        params: dict[str, Any] = model.model_dump(mode="json")
        errors = [
            {"field": field, "message": message}
            for field, spec, expected in model_specs(params)
            if (
                message := check_model_spec(
                    spec, expected, allow_list, allow_paths=allow_paths, model_roots=model_roots
                )
            )
        ]
        if not allow_paths:  # production: tenants never read the server's files
            errors += [
                {
                    "field": field,
                    "message": "paths on the server are not accepted in production mode; "
                    "upload images (POST /v1/images) and pass their ids",
                }
                for field in server_paths(params)
            ]
        if errors:
            raise params_problem(errors)
        return params

    def request_hash(self, params: dict[str, Any]) -> str:
        """What an Idempotency-Key guards: this request with its normalised `params` (so `{}`
        and the same params spelled out with their defaults are the same request)."""
        canonical = {
            "kind": self.kind,
            "params": params,
            "seed": self.seed,
            "priority": self.priority,
            "metadata": self.metadata,
        }
        if self.webhook is not None:  # (absent from older hashes: their keys stay valid)
            canonical["webhook"] = self.webhook.model_dump()
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def params_problem(errors: list[dict[str, str]]) -> ProblemError:
    return fields_problem(422, "invalid-params", errors)


def model_specs(params: dict[str, Any], prefix: str = "params") -> list[tuple[str, str, str]]:
    """(field, spec, expected kind) of every model the params name, nested blocks included
    (e.g. `visualization.diffusion`, `pca.classifier`): `diffusion`, `captioner` and
    `segmenter` take a model of that kind, `classifier*` fields (a spec or a list of specs) take
    classifiers."""
    found = []
    for name, value in params.items():
        field = f"{prefix}.{name}"
        if isinstance(value, dict):
            found += model_specs(value, field)
            continue
        if name in ("diffusion", "captioner", "segmenter"):
            expected = name
        elif name.startswith("classifier"):
            expected = "classifier"
        else:
            continue
        if isinstance(value, str):
            found.append((field, value, expected))
        elif isinstance(value, list):
            found += [(f"{field}.{i}", v, expected) for i, v in enumerate(value)
                      if isinstance(v, str)]  # fmt: skip
    return found


PATH_FIELDS = ("folder", "pca", "image")  # params that may name a file or folder on the server


def server_paths(params: dict[str, Any], prefix: str = "params") -> list[str]:
    """Fields whose value names a file or folder on the machine that runs the job (an image
    folder, a neural_pca result file, a start image path); bundled digits ('digits:…') are not
    paths."""
    found = []
    for name, value in params.items():
        field = f"{prefix}.{name}"
        if isinstance(value, dict):
            found += server_paths(value, field)
        elif (
            name in (*PATH_FIELDS, "images", "spurious", "class_images")  # image set short forms
            and isinstance(value, str)
            and not value.startswith("digits:")
        ):
            found.append(field)
    return found


def check_model_spec(
    spec: str,
    expected: str,
    allow_list: list[str] | None,
    *,
    allow_paths: bool = True,
    model_roots: ModelRoots | None = None,
) -> str | None:
    """What is wrong with `spec` in a field taking an `expected` model, or None. A spec naming
    a path outside `model_roots` gets one answer, whatever is on the file system."""
    try:
        parsed = parse_spec(spec)
    except ValueError as exc:
        return str(exc)
    if parsed.kind != expected:
        return f"{spec!r} is a {parsed.kind} model; this field takes a {expected} model"
    if (outside := check_model_roots(parsed, model_roots)) is not None:
        return outside
    if not allow_paths and names_server_path(parsed) and allow_list is None:
        return (
            f"model {spec!r} reads weights from a path on the server; in production mode such "
            "specs must be on the allow-list (DIGIN_MODEL_ALLOW_LIST)"
        )
    if not is_allowed(spec, allow_list):
        return (
            f"model {spec!r} is not on this service's allow-list "
            f"(DIGIN_MODEL_ALLOW_LIST: {', '.join(allow_list or [])}); see GET /v1/models"
        )
    return None


class Progress(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: int | None = Field(None, description="optimisation steps done")
    total: int | None = Field(None, description="steps in all")
    stage: str | None = Field(None, description="what the worker is doing (loading, guiding, …)")


class JobError(BaseModel):
    code: str = Field(description="e.g. gpu_oom, worker_lost, invalid_params")
    message: str
    retryable: bool


class ArtifactRef(BaseModel):
    """A stored output of a job (its URL: `GET /v1/jobs/{id}/artifacts`)."""

    name: str = Field(description="e.g. grid.png, item_000.png, result.json")
    content_type: str
    size: int | None = Field(None, description="bytes")


class JobResult(BaseModel):
    summary: dict[str, Any] = Field(description="the core's result summary (metrics per item)")
    artifacts: list[ArtifactRef]


class WorkerInfo(BaseModel):
    host: str | None = None
    gpu: str | None = None


class JobUrls(BaseModel):
    self: str = Field(description="this job (GET)")
    cancel: str = Field(description="POST to cancel")
    artifacts: str = Field(description="its artifacts with fresh URLs (GET)")


class JobPublic(BaseModel):
    """A job as its tenant sees it; the job row is the truth (Celery state is never shown)."""

    id: uuid.UUID
    kind: str
    status: JobStatus
    params: dict[str, Any] = Field(description="validated, with every default filled in")
    seed: int
    priority: int
    queue: str
    batch_id: uuid.UUID | None
    custom_id: str | None = Field(None, description="the item's id in its batch")
    item_index: int | None = Field(None, description="the item's position in its batch")
    metadata: dict[str, Any] | None
    attempts: int
    max_attempts: int
    progress: Progress | None
    result: JobResult | None
    error: JobError | None
    cancel_requested: bool
    created_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    worker: WorkerInfo | None
    urls: JobUrls
    cost: int | None = Field(
        None,
        description="the job's estimated cost in pixel-steps (items x passes x DDIM steps x "
        "pixels; what DIGIN_MAX_JOB_COST caps), from its params",
    )

    @classmethod
    def from_job(cls, job: Job, *, base: str = "") -> JobPublic:
        """`base`: the root path the API is served under ('' unless behind a prefix)."""
        path = f"{base}/v1/jobs/{job.id}"
        result = None
        if job.result is not None:
            artifacts = [
                ArtifactRef(name=a["name"], content_type=a.get("content_type") or
                            "application/octet-stream", size=a.get("size"))
                for a in job.result.get("artifacts") or []
            ]  # fmt: skip
            result = JobResult(summary=job.result.get("summary") or {}, artifacts=artifacts)
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            params=job.params,
            seed=job.seed,
            priority=job.priority,
            queue=job.queue,
            batch_id=job.batch_id,
            custom_id=job.custom_id,
            item_index=job.item_index,
            metadata=job.meta,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            progress=Progress.model_validate(job.progress) if job.progress else None,
            result=result,
            error=JobError.model_validate(job.error) if job.error else None,
            cancel_requested=job.cancel_requested,
            created_at=job.created_at,
            enqueued_at=job.enqueued_at,
            started_at=job.started_at,
            heartbeat_at=job.heartbeat_at,
            finished_at=job.finished_at,
            worker=WorkerInfo.model_validate(job.worker) if job.worker else None,
            urls=JobUrls(self=path, cancel=f"{path}/cancel", artifacts=f"{path}/artifacts"),
            cost=stored_cost(job.kind, job.params),
        )


class JobList(BaseModel):
    """One page of jobs, newest first; pass `next_cursor` as `cursor` for the next page."""

    data: list[JobPublic]
    next_cursor: str | None = Field(description="null on the last page")


# --- artifacts ------------------------------------------------------------------------------------
class ArtifactPublic(ArtifactRef):
    url: str = Field(
        description="a short-lived presigned URL (S3), or this API's download route (local)"
    )
    expires_at: datetime | None = Field(description="when `url` stops working (null: never)")


class ArtifactList(BaseModel):
    job_id: uuid.UUID
    status: JobStatus
    data: list[ArtifactPublic] = Field(description="empty until the job has succeeded")


def artifact_path(job_id: uuid.UUID, name: str, *, base: str = "") -> str:
    return f"{base}/v1/jobs/{job_id}/artifacts/{quote(name)}"


# --- images ---------------------------------------------------------------------------------------
class ImagePublic(BaseModel):
    """An uploaded start image; its `id` is what job params refer to."""

    id: uuid.UUID
    sha256: str
    format: str
    width: int
    height: int
    size_bytes: int
    created_at: datetime

    @classmethod
    def from_image(cls, image: Image) -> ImagePublic:
        return cls(
            id=image.id,
            sha256=image.sha256,
            format=image.format,
            width=image.width,
            height=image.height,
            size_bytes=image.size_bytes,
            created_at=image.created_at,
        )


# --- models and health ----------------------------------------------------------------------------
class ModelPublic(ModelInfo):
    allowed: bool = Field(description="on this service's model allow-list")


class ModelList(BaseModel):
    models: list[ModelPublic] = Field(description="the curated models")
    schemes: list[SchemeInfo] = Field(description="every spec form a job may name")
    allow_list: list[str] | None = Field(
        description="specs jobs may use ('*' ends a prefix); null: any well-formed spec"
    )
    kinds: list[str]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ok"] = "ok"
    checks: dict[str, str] = Field(description="each dependency: 'ok'")


# --- batches (docs/architecture.md §9.9) ----------------------------------------------------------
MAX_AXIS = 10_000  # entries of one axis (classes, classifiers, seeds)
MAX_BATCH_ITEMS_LISTED = 100_000  # explicit items of one request
BatchStatus = Literal["running", "succeeded", "failed", "canceled", "completed"]


class ClassRange(RequestBody):
    """Classes `start` (inclusive) to `stop` (exclusive), as indices."""

    start: int = Field(ge=0)
    stop: int = Field(gt=0)

    @field_validator("stop")
    @classmethod
    def _after_start(cls, stop: int, info: Any) -> int:
        start = info.data.get("start")
        if start is not None and stop <= start:
            raise ValueError(f"stop ({stop}) must be greater than start ({start})")
        if start is not None and stop - start > MAX_AXIS:
            raise ValueError(f"at most {MAX_AXIS} classes in a range, got {stop - start}")
        return stop


class BatchItem(RequestBody):
    """One explicit item: params over the template (nested fields merged) and its seed."""

    custom_id: str = Field(min_length=1, max_length=200, description="unique in the batch")
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: the batch's seed")


ClassAxis = list[int | str] | Literal["all"] | ClassRange


def _duplicates(values: list[Any], name: str) -> None:
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        key = json.dumps(value, sort_keys=True)
        if key in seen:
            raise ValueError(f"{name}[{i}] repeats {name}[{seen[key]}] ({value!r})")
        seen[key] = i


class BatchCreate(RequestBody):
    """A sweep (`POST /v1/batches`): either axes over `params_template` (classes × classifiers
    or classifier pairs × seeds, with `images_per_class`), or explicit `items`, not both."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "kind": "guided",
                "params_template": {"guidance": {"iterations": 10}},
                "classes": "all",
                "classifiers": ["digits:cnn", "digits:mlp"],
                "seeds": [0],
            }
        },
    )

    kind: Kind = Field(
        description="the objective of every item", json_schema_extra={"enum": list(KINDS)}
    )
    params_template: dict[str, Any] = Field(
        default_factory=dict, description="params shared by every item (see POST /v1/jobs)"
    )
    classes: ClassAxis | None = Field(
        None,
        description="class indices or names, 'all' (every class of the classifier), or "
        "{start, stop}; one item per class",
    )
    classifiers: list[Annotated[str, StringConstraints(min_length=1, max_length=500)]] | None = (
        Field(None, min_length=1, max_length=100, description="one item per classifier spec")
    )
    classifier_pairs: (
        list[
            Annotated[
                list[Annotated[str, StringConstraints(min_length=1, max_length=500)]],
                Field(min_length=2, max_length=2),
            ]
        ]
        | None
    ) = Field(
        None, min_length=1, max_length=100, description="disagreement: [classifier1, classifier2]"
    )
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(
        None, min_length=1, max_length=1000, description="one item per seed; default: one random"
    )
    images_per_class: int | None = Field(None, ge=1, le=64, description="images of each item")
    items: list[BatchItem] | None = Field(
        None, min_length=1, max_length=MAX_BATCH_ITEMS_LISTED, description="explicit items"
    )
    priority: int = Field(
        5, ge=0, le=MAX_PRIORITY, description="broker priority of the items, 0 (first) to 9"
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=MAX_METADATA_KEYS)
    webhook: WebhookSpec | None = Field(
        None, description="events of the batch (and, if listed, of its items) POSTed to a URL"
    )

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not 1 <= len(value) <= MAX_AXIS:
                raise ValueError(f"1 to {MAX_AXIS} classes, got {len(value)}")
            _duplicates(value, "classes")
        return value

    @field_validator("classifiers", "seeds", "classifier_pairs")
    @classmethod
    def _unique(cls, value: list[Any] | None, info: Any) -> list[Any] | None:
        if value is not None:
            _duplicates(value, info.field_name)
        return value

    @field_validator("items")
    @classmethod
    def _unique_ids(cls, items: list[BatchItem] | None) -> list[BatchItem] | None:
        if items is not None:
            seen: dict[str, int] = {}
            for i, item in enumerate(items):
                if item.custom_id in seen:
                    raise ValueError(
                        f"items[{i}].custom_id {item.custom_id!r} repeats "
                        f"items[{seen[item.custom_id]}]; custom ids are unique in a batch"
                    )
                seen[item.custom_id] = i
        return items

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return JobCreate._metadata_size(value)

    @model_validator(mode="after")
    def _items_or_axes(self) -> BatchCreate:
        axes = [n for n in ("classes", "classifiers", "classifier_pairs", "seeds",
                            "images_per_class") if getattr(self, n) is not None]  # fmt: skip
        if self.items is not None and axes:
            raise ValueError(f"give either items or axes ({', '.join(axes)}), not both")
        if self.classifiers is not None and self.classifier_pairs is not None:
            raise ValueError("give either classifiers or classifier_pairs, not both")
        return self

    def request_hash(self) -> str:
        """What an Idempotency-Key guards: the whole request as sent."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


class BatchCounts(BaseModel):
    queued: int = 0
    running: int = 0
    canceling: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0


class BatchUrls(BaseModel):
    self: str = Field(description="this batch (GET)")
    results: str = Field(description="the results index, JSON lines or CSV (GET)")
    jobs: str = Field(description="its items as jobs (GET /v1/jobs?batch_id=)")
    cancel: str = Field(description="POST to cancel the remaining items")


class BatchPublic(BaseModel):
    """A batch with its items' counts, progress, throughput and ETA."""

    id: uuid.UUID
    kind: str
    status: BatchStatus = Field(
        description="running while any item is unfinished; then succeeded (all succeeded), "
        "completed (some failed or were canceled) or canceled (canceled by the user)"
    )
    total: int
    counts: BatchCounts
    progress: float = Field(description="finished items / total, 0..1")
    throughput_per_min: float | None = Field(
        description="items finished per minute (recent); null before any"
    )
    eta_seconds: float | None = Field(description="estimated seconds to finish; null: unknown")
    priority: int
    metadata: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None
    urls: BatchUrls


class BatchList(BaseModel):
    data: list[BatchPublic]
    next_cursor: str | None = Field(description="null on the last page")


class WebhookAttempt(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float | None = None


class WebhookDeliveryPublic(BaseModel):
    """One event for one webhook: pending (retried with backoff), delivered or failed."""

    event_id: str = Field(description="the `webhook-id` header: the same on every retry")
    event_type: str
    job_id: uuid.UUID | None
    batch_id: uuid.UUID | None
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    max_attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    log: list[WebhookAttempt] = Field(description="the last attempts, oldest first")


class WebhookDeliveryList(BaseModel):
    data: list[WebhookDeliveryPublic]


class WebhookSecret(BaseModel):
    """The tenant's signing secret (Standard Webhooks `whsec_…`)."""

    secret: str
    header_format: str = "webhook-signature: v1,<base64 HMAC-SHA256 of '{id}.{timestamp}.{body}'>"
