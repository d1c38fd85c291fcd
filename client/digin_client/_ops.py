"""Every API operation of the clients, written once and without I/O ("sans-I/O").

An operation is a generator that yields the steps it needs done and returns its result:

- `Call`: one HTTP request, relative to the base URL. The driver sends back the
  `httpx.Response` with its body read; for `Call(stream=True)`, a `Body` to `Read` from.
- `Read(body)`: the next decoded chunk of a streamed body, or None at its end (where httpx
  closes the response; the driver closes any still open when the operation ends).
- `Sleep`: wait that many seconds.
- `Emit(item)`: only in a list or stream (`Stream`): the caller's next item.

A transport failure (no answer, a timeout, a broken stream) is thrown into the operation as a
`DiginConnectionError` at the step that failed; it may catch it (`wait` rides it out).

The sync `Client` performs the steps with `httpx.Client` and `time.sleep`, the `AsyncClient`
with `httpx.AsyncClient` and `asyncio.sleep`: request building, response parsing, polling,
backoff, 429 retries, paging and streaming live here, once. `_base.BaseClient` turns each
operation into a method of both.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Generic, TypeVar
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
    Image,
    Page,
    ResultRecord,
)

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "digin-client/0.1"

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an emitted item
Query = list[tuple[str, str | int | float | bool | None]]  # repeated keys allowed
M = TypeVar("M", bound=BaseModel)


# --- steps ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One HTTP request, relative to the client's base URL."""

    method: str
    path: str
    params: Query = field(default_factory=list)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes, str]] | None = None
    stream: bool = False  # answered with a Body to Read from (an error's body already read)
    follow_redirects: bool | None = None  # None: as the httpx client is configured
    timeout: float | None = None  # None: the client's timeout

    def request(self) -> dict[str, Any]:
        """`httpx.Client.build_request`'s arguments."""
        options = {"method": self.method, "url": self.path, "params": self.params,
                   "json": self.json, "headers": self.headers, "files": self.files}  # fmt: skip
        return options if self.timeout is None else options | {"timeout": self.timeout}

    def sending(self) -> dict[str, Any]:
        """`httpx.Client.send`'s arguments."""
        options: dict[str, Any] = {"stream": self.stream}
        if self.follow_redirects is not None:
            options["follow_redirects"] = self.follow_redirects
        return options


@dataclass(frozen=True)
class Body:
    """A streamed response: `chunks` is the driver's iterator over its decoded bytes (an
    `Iterator[bytes]` for Client, an `AsyncIterator[bytes]` for AsyncClient)."""

    call: Call
    response: httpx.Response
    chunks: Any


@dataclass(frozen=True)
class Read:
    body: Body


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Emit(Generic[I]):
    item: I


Step = Call | Read | Sleep
Op = Generator[Step, Any, T]  # an operation returning a T
Stream = Generator[Step | Emit[I], Any, None]  # a list or stream of I


class Run(Generic[T]):
    """One operation being driven. Iterating gives the steps it asks for; the driver answers
    each by setting `reply` inside `answering()`, which turns an httpx transport failure into a
    DiginConnectionError thrown into the operation at its next step. Once the iteration ends,
    `result` holds what the operation returned."""

    def __init__(self, op: Generator[Step | Emit[Any], Any, T], url: str) -> None:
        self.op, self.url = op, url
        self.reply: Any = None
        self.result: T
        self._error: DiginConnectionError | None = None
        self._step: Step | Emit[Any] | None = None

    def __iter__(self) -> Run[T]:
        return self

    def __next__(self) -> Step | Emit[Any]:
        reply, error = self.reply, self._error
        self.reply, self._error = None, None
        try:
            self._step = self.op.throw(error) if error is not None else self.op.send(reply)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration from None
        return self._step

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            call = self._step.body.call if isinstance(self._step, Read) else self._step
            assert isinstance(call, Call)  # a Sleep or an Emit does no network I/O
            self._error = DiginConnectionError(f"{call.method} {self.url}{call.path}: {exc!r}")
            self._error.__cause__ = exc

    def steps(self, opened: contextlib.ExitStack | contextlib.AsyncExitStack) -> Run[T]:
        """Iterate over the steps; the operation is closed when `opened` is, however the
        driver ends (its items abandoned, an error), so that its `finally` and `with` run."""
        opened.callback(self.op.close)
        return self


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


def fetch(method: str, path: str, model: type[M], params: Query | None = None) -> Op[M]:
    """One request without a body, its response parsed as `model`."""
    response = yield Call(method, path, params=params or [])
    return parse(response, model)


# --- jobs -----------------------------------------------------------------------------------------
def job_path(job_id: object, tail: str = "") -> str:
    return f"/v1/jobs/{_path_id(job_id)}{tail}"


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


def upload_image(data: bytes | str | os.PathLike[str], filename: str | None) -> Op[Image]:
    if isinstance(data, bytes):
        content, name = data, filename or "image"
    else:
        path = Path(data)
        content, name = path.read_bytes(), filename or path.name
    files = {"file": (name, content, "application/octet-stream")}
    response = yield Call("POST", "/v1/images", files=files)
    return parse(response, Image, 200, 201)


# --- lists ----------------------------------------------------------------------------------------
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


def paginate(
    path: str, query: Query, model: type[M], *, limit: int | None, page_size: int
) -> Stream[M]:
    """Every item of a cursor-paged list (`limit`, `cursor`), page after page, at most `limit`;
    a page asks for no more items than are still wanted."""
    cursor, seen = None, 0
    while limit is None or seen < limit:
        size = page_size if limit is None else max(1, min(page_size, limit - seen))
        params = [*query, ("limit", size)] + ([("cursor", cursor)] if cursor else [])
        page = yield from fetch("GET", path, Page, params)
        for item in page.data[: None if limit is None else limit - seen]:
            seen += 1
            yield Emit(model.model_validate(item))
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


# --- waiting --------------------------------------------------------------------------------------
def wait(
    path: str,
    model: type[M],
    done: Callable[[M], bool],
    *,
    what: str,
    timeout: float | None,
    on_progress: Callable[[M], object] | None,
    policy: Policy,
) -> Op[M]:
    """Poll `GET path` until `done`; sleep the server's Retry-After between polls (else capped
    exponential backoff), never past the deadline; ride out 502/503/504 and dropped
    connections up to `policy.max_retries` in a row. `on_progress` sees every state read."""
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt, failures = 0, 0
    last: M | None = None
    while True:
        try:
            response = yield Call("GET", path)
            state = parse(response, model)
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


# --- streamed bodies ------------------------------------------------------------------------------
def open_body(call: Call) -> Op[Body]:
    """Send a streamed request; its Body if the status is a success, else its APIError."""
    body: Body = yield call
    check(body.response)
    return body


def copy(body: Body, out: IO[bytes]) -> Op[int]:
    """Write the body into `out` as it arrives; returns the bytes written."""
    written = 0
    while (chunk := (yield Read(body))) is not None:
        written += out.write(chunk)
    return written


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Name what was being read in a connection error (`downloading grid.png: ...`)."""
    try:
        yield
    except DiginConnectionError as exc:
        raise DiginConnectionError(f"{what}: {exc.__cause__!r}") from exc.__cause__


# --- downloads ------------------------------------------------------------------------------------
def download(
    job_id: object, dest_dir: str | os.PathLike[str], names: Sequence[str] | None
) -> Op[list[Path]]:
    """Stream the artifacts (all, or `names`) into `dest_dir`, following the redirects to
    presigned URLs; each is written as `.part` and renamed once whole."""
    listing = yield from fetch("GET", job_path(job_id, "/artifacts"), ArtifactList)
    paths = []
    for artifact in select_artifacts(listing, names):
        target = artifact_target(Path(dest_dir), artifact.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        path = job_path(job_id, f"/artifacts/{quote(artifact.name)}")
        try:
            with reading(f"downloading {artifact.name}"):
                body = yield from open_body(Call("GET", path, stream=True, follow_redirects=True))
                with partial.open("wb") as out:
                    yield from copy(body, out)
        except DiginConnectionError:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
        paths.append(target)
    return paths


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


def batch_path(batch_id: object, tail: str = "") -> str:
    return f"/v1/batches/{_path_id(batch_id)}{tail}"


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


def results_call(batch_id: object, fmt: str) -> Call:
    """The streamed request of a batch's results index in `fmt` (jsonl or csv)."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"format must be 'jsonl' or 'csv', got {fmt!r}")
    accept = "text/csv" if fmt == "csv" else "application/x-ndjson, application/jsonl"
    return Call("GET", batch_path(batch_id, "/results"), params=[("format", fmt)],
                headers={"Accept": accept}, stream=True)  # fmt: skip


def export_results(batch_id: object, out: IO[bytes], fmt: str) -> Op[int]:
    """The results index in `fmt`, written into `out` as it arrives; returns the bytes."""
    call = results_call(batch_id, fmt)
    with reading(f"reading the results of {batch_id}"):
        body = yield from open_body(call)
        return (yield from copy(body, out))


def results(batch_id: object) -> Stream[ResultRecord]:
    """The results index as records, one per JSON line, each as soon as its line is whole."""
    with reading(f"reading the results of {batch_id}"):
        body = yield from open_body(results_call(batch_id, "jsonl"))
        rest = b""
        while (chunk := (yield Read(body))) is not None:
            *complete, rest = (rest + chunk).split(b"\n")
            for line in complete:
                yield from result_record(line)
        yield from result_record(rest)


def result_record(line: bytes) -> Stream[ResultRecord]:
    """One results-index line as a record (nothing for a blank line)."""
    if not line.strip():
        return
    try:
        record = ResultRecord.model_validate(json.loads(line))
    except (json.JSONDecodeError, ValueError) as exc:
        raise DiginError(f"the results index sent a line that is not a record: {exc}") from None
    yield Emit(record)
