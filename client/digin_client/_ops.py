"""What the sync and async clients share: every API operation written once, without I/O.

An operation is a generator that yields what it needs done, a `Call` (one HTTP request; the
client sends back the `httpx.Response`, body read) or a `Sleep`, and returns its result. The
sync `Client` runs it with `httpx.Client` and `time.sleep`, the `AsyncClient` with
`httpx.AsyncClient` and `asyncio.sleep`: the request building, response parsing, polling,
backoff and 429 retries live here, once ("sans-I/O").

Only streaming (downloads, the results index) is written twice, in the clients, because it
reads the body chunk by chunk; the helpers it needs (target paths, line parsing) are here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from digin_client.errors import (
    APIError,
    DiginConnectionError,
    DiginError,
    WaitTimeoutError,
    error_from_response,
    parse_retry_after,
)
from digin_client.models import (
    Artifact,
    ArtifactList,
    Batch,
    Image,
    Job,
    ModelList,
    Page,
    ResultRecord,
)

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "digin-client/0.1"

T = TypeVar("T")
Query = list[tuple[str, str | int | float | bool | None]]  # repeated keys allowed
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Call:
    """One HTTP request, relative to the client's base URL."""

    method: str
    path: str
    params: Query = field(default_factory=list)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes, str]] | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


Op = Generator[Call | Sleep, Any, T]


@dataclass(frozen=True)
class Policy:
    """How the client waits: polling intervals and how long it honours a server's pauses."""

    poll_initial: float = 0.5  # first poll interval when the server sends no Retry-After
    poll_max: float = 10.0  # cap of the exponential backoff between polls
    retry_wait_max: float = 60.0  # the longest single Retry-After the client honours
    max_retries: int = 5  # 429s (submit with retry_on_429) or 502/503/504s while polling


# --- configuration --------------------------------------------------------------------------------
def resolve_url(url: str | None) -> str:
    """The server URL: the argument, else DIGIN_URL, else http://127.0.0.1:8000."""
    chosen = url or os.environ.get("DIGIN_URL") or DEFAULT_URL
    if not chosen.startswith(("http://", "https://")):
        raise ValueError(f"the server URL must start with http:// or https://, got {chosen!r}")
    return chosen.rstrip("/")


def resolve_key(api_key: str | None) -> str | None:
    """The API key: the argument, else DIGIN_API_KEY, else none (embedded mode has auth off)."""
    return api_key or os.environ.get("DIGIN_API_KEY") or None


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


# --- responses ------------------------------------------------------------------------------------
def check(response: httpx.Response, *ok: int) -> httpx.Response:
    """The response if its status is one of `ok` (default: any 2xx), else its APIError."""
    if response.status_code in ok or (not ok and response.is_success):
        return response
    raise error_from_response(response)


def parse(response: httpx.Response, model: type[M], *ok: int) -> M:
    return model.model_validate(check(response, *ok).json())


def poll_delay(response: httpx.Response | None, attempt: int, policy: Policy) -> float:
    """Seconds until the next poll: the server's Retry-After when it sends one (capped at
    `retry_wait_max`), else exponential backoff from `poll_initial`, capped at `poll_max`."""
    after = parse_retry_after(response.headers.get("retry-after")) if response else None
    if after is not None:
        return min(after, policy.retry_wait_max)
    return min(policy.poll_initial * 2.0**attempt, policy.poll_max)


RETRYABLE_POLL = (502, 503, 504)


def _path_id(value: object) -> str:
    return quote(str(value), safe="")


# --- jobs -----------------------------------------------------------------------------------------
def job_body(
    kind: str,
    params: Mapping[str, Any] | None,
    *,
    seed: int | None,
    priority: int | None,
    metadata: Mapping[str, Any] | None,
    webhook: Mapping[str, Any] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": kind, "params": dict(params or {})}
    optional = {"seed": seed, "priority": priority, "metadata": metadata, "webhook": webhook}
    body |= {k: v for k, v in optional.items() if v is not None}
    return body


def create(
    path: str,
    body: dict[str, Any],
    model: type[M],
    *,
    idempotency_key: str | None,
    retry_on_429: bool,
    policy: Policy,
) -> Op[M]:
    """POST a job or a batch; on 429 with `retry_on_429`, wait the server's Retry-After and
    send it again (a refused request wrote nothing), at most `policy.max_retries` times."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    for attempt in range(policy.max_retries + 1):
        response = yield Call("POST", path, json=body, headers=headers)
        if response.status_code == 429 and retry_on_429 and attempt < policy.max_retries:
            yield Sleep(poll_delay(response, attempt, policy))
            continue
        return parse(response, model, 200, 201, 202)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def get_job(job_id: object) -> Op[Job]:
    return (yield from _get(f"/v1/jobs/{_path_id(job_id)}", Job))


def cancel_job(job_id: object) -> Op[Job]:
    response = yield Call("POST", f"/v1/jobs/{_path_id(job_id)}/cancel")
    return parse(response, Job)


def artifacts(job_id: object) -> Op[ArtifactList]:
    return (yield from _get(f"/v1/jobs/{_path_id(job_id)}/artifacts", ArtifactList))


def models() -> Op[ModelList]:
    return (yield from _get("/v1/models", ModelList))


def upload_image(data: bytes | str | os.PathLike[str], filename: str | None) -> Op[Image]:
    if isinstance(data, bytes):
        content, name = data, filename or "image"
    else:
        path = Path(data)
        content, name = path.read_bytes(), filename or path.name
    files = {"file": (name, content, "application/octet-stream")}
    response = yield Call("POST", "/v1/images", files=files)
    return parse(response, Image, 200, 201)


def _get(path: str, model: type[M], params: Query | None = None) -> Op[M]:
    response = yield Call("GET", path, params=params or [])
    return parse(response, model)


def job_filters(
    status: str | Sequence[str] | None, kind: str | None, batch_id: object | None
) -> Query:
    query: Query = []
    statuses = [status] if isinstance(status, str) else list(status or [])
    query += [("status", s) for s in statuses]
    if kind is not None:
        query.append(("kind", kind))
    if batch_id is not None:
        query.append(("batch_id", str(batch_id)))
    return query


def page(
    path: str,
    query: Query,
    cursor: str | None,
    size: int,
) -> Op[Page]:
    """One page of a cursor-paged list (`limit`, `cursor`)."""
    params = [*query, ("limit", size)] + ([("cursor", cursor)] if cursor else [])
    return (yield from _get(path, Page, params))


def page_size(page_size: int, limit: int | None, seen: int) -> int:
    return page_size if limit is None else max(1, min(page_size, limit - seen))


# --- waiting --------------------------------------------------------------------------------------
def wait(
    read: Callable[[], Op[tuple[T, httpx.Response]]],
    done: Callable[[T], bool],
    *,
    what: str,
    timeout: float | None,
    on_progress: Callable[[T], object] | None,
    policy: Policy,
) -> Op[T]:
    """Poll `read` until `done`; sleep the server's Retry-After between polls (else capped
    exponential backoff), never past the deadline; ride out 502/503/504 and dropped
    connections up to `policy.max_retries` in a row. `on_progress` sees every state read."""
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt, failures = 0, 0
    last: T | None = None
    while True:
        try:
            state, response = yield from read()
        except (APIError, DiginConnectionError) as exc:
            if not transient(exc) or failures >= policy.max_retries:
                raise
            failures += 1
            after = parse_retry_after(exc.headers.get("retry-after")) if isinstance(
                exc, APIError
            ) else None  # fmt: skip
            backoff = min(policy.poll_initial * 2.0**failures, policy.poll_max)
            delay = backoff if after is None else min(after, policy.retry_wait_max)
        else:
            failures, last = 0, state
            if on_progress is not None:
                on_progress(state)
            if done(state):
                return state
            delay = poll_delay(response, attempt, policy)
            attempt += 1
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeoutError(f"{what} did not finish within {timeout:g} s", last)
            delay = min(delay, left)
        yield Sleep(delay)


def transient(exc: DiginError) -> bool:
    """Worth polling again: no answer, or a gateway/unavailable status."""
    if isinstance(exc, DiginConnectionError):
        return True
    return isinstance(exc, APIError) and exc.status in RETRYABLE_POLL


def read_job(job_id: object) -> Callable[[], Op[tuple[Job, httpx.Response]]]:
    def read() -> Op[tuple[Job, httpx.Response]]:
        response = yield Call("GET", f"/v1/jobs/{_path_id(job_id)}")
        return parse(response, Job), response

    return read


def read_batch(batch_id: object) -> Callable[[], Op[tuple[Batch, httpx.Response]]]:
    def read() -> Op[tuple[Batch, httpx.Response]]:
        response = yield Call("GET", f"/v1/batches/{_path_id(batch_id)}")
        return parse(response, Batch), response

    return read


# --- downloads ------------------------------------------------------------------------------------
def select_artifacts(listing: ArtifactList, names: Sequence[str] | None) -> list[Artifact]:
    """The artifacts to download: all, or those named (each must exist)."""
    if listing.status != "succeeded":
        raise DiginError(
            f"job {listing.job_id} is {listing.status}; artifacts exist once it has succeeded"
        )
    if names is None:
        return list(listing.data)
    by_name = {a.name: a for a in listing.data}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DiginError(
            f"job {listing.job_id} has no artifact named {', '.join(missing)}; "
            f"it has {', '.join(sorted(by_name))}"
        )
    return [by_name[n] for n in names]


def artifact_target(dest_dir: Path, name: str) -> Path:
    """Where an artifact goes under `dest_dir`; a name that would leave it is refused."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise DiginError(f"refusing to write artifact {name!r}: not a plain relative name")
    return dest_dir.joinpath(*parts)


def artifact_path(job_id: object, name: str) -> str:
    """The API's download route; S3 storage answers with a redirect to a presigned URL."""
    return f"/v1/jobs/{_path_id(job_id)}/artifacts/{quote(name)}"


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


# --- batches --------------------------------------------------------------------------------------
BATCH_FIELDS = (
    "params_template",
    "classes",
    "classifiers",
    "classifier_pairs",
    "seeds",
    "images_per_class",
    "items",
    "priority",
    "metadata",
    "webhook",
)


def batch_body(kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """`POST /v1/batches`' body: the kind and every field given (None means not given)."""
    unknown = sorted(set(fields) - set(BATCH_FIELDS))
    if unknown:
        raise TypeError(f"unknown batch fields {unknown}; known: {list(BATCH_FIELDS)}")
    body: dict[str, Any] = {"kind": kind}
    for name in BATCH_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if name == "classifier_pairs":
            value = [list(pair) for pair in value]
        elif name in ("classes", "classifiers", "seeds", "items") and not isinstance(
            value, (str, dict)
        ):
            value = list(value)
        body[name] = value
    return body


def get_batch(batch_id: object) -> Op[Batch]:
    return (yield from _get(f"/v1/batches/{_path_id(batch_id)}", Batch))


def cancel_batch(batch_id: object) -> Op[Batch]:
    response = yield Call("POST", f"/v1/batches/{_path_id(batch_id)}/cancel")
    return parse(response, Batch)


def results_request(batch_id: object, fmt: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(path, query, headers) of a batch's results index in `fmt` (jsonl or csv)."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"format must be 'jsonl' or 'csv', got {fmt!r}")
    accept = "text/csv" if fmt == "csv" else "application/x-ndjson, application/jsonl"
    return f"/v1/batches/{_path_id(batch_id)}/results", {"format": fmt}, {"Accept": accept}


def result_record(line: str) -> ResultRecord | None:
    """One results-index line as a record (None for a blank line)."""
    line = line.strip()
    if not line:
        return None
    try:
        return ResultRecord.model_validate(json.loads(line))
    except (json.JSONDecodeError, ValueError) as exc:
        raise DiginError(f"the results index sent a line that is not a record: {exc}") from None
