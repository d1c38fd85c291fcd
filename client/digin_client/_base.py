"""What `Client` and `AsyncClient` share: the constructor and every public method, each written
once as an operation of `digin_client._ops` (no I/O). `@operation` and `@stream` make a
method of both classes out of it: `Client` runs it to its result (or iterates its items),
`AsyncClient` returns a coroutine of the result (or an async iterator). The two classes differ
only in the I/O that performs an operation's steps (`_drive`).
"""

from __future__ import annotations

import abc
import builtins
import functools
import inspect
import os
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    ClassVar,
    Concatenate,
    Generic,
    ParamSpec,
    TypeVar,
    overload,
)
from urllib.parse import quote

import digin_client._ops as ops  # not via the package: its __init__ imports this module
import digin_client.events as live
from digin_client.events import Event
from digin_client.models import (
    ArtifactList,
    Audit,
    Batch,
    Image,
    Job,
    ModelList,
    ResultFormat,
    ResultRecord,
)

if TYPE_CHECKING:
    from digin_client._async import AsyncClient
    from digin_client._sync import Client

P = ParamSpec("P")
T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an item of a list or stream
S = TypeVar("S")  # what the method returns on a Client
A = TypeVar("A")  # what it returns on an AsyncClient
H = TypeVar("H")  # the httpx client


class Method(Generic[P, S, A]):
    """A method of both clients: looked up on a `Client`, a function of P returning S; on an
    `AsyncClient`, one returning A."""

    def __init__(self, sync: Callable[..., Any], asynchronous: Callable[..., Any]) -> None:
        self._flavours = (sync, asynchronous)
        self.__doc__ = sync.__doc__

    @overload
    def __get__(self, client: None, owner: type[Any] | None = None) -> Callable[..., Any]: ...
    @overload
    def __get__(self, client: Client, owner: type[Any] | None = None) -> Callable[P, S]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type[Any] | None = None) -> Callable[P, A]: ...
    def __get__(self, client: BaseClient[Any] | None, owner: type[Any] | None = None) -> Any:
        if client is None:  # looked up on the class: the plain function, as for any method
            return self._flavours[getattr(owner, "_asynchronous", False)]
        return types.MethodType(self._flavours[client._asynchronous], client)


def _signed(function: Callable[..., Any], op: Callable[..., Any], returns: str) -> None:
    """Give `function` the signature of `op` (which it wraps), but returning `returns` with
    the operation's result type for `{}` (`ops.Op[Job]` -> `Job`, `ops.Stream[Job]` ->
    `Iterator[Job]`), so that `help()` and `inspect` show what the method returns."""
    signature = inspect.signature(op)
    result = str(signature.return_annotation).partition("[")[2][:-1]
    function.__signature__ = signature.replace(  # type: ignore[attr-defined]
        return_annotation=returns.format(result)
    )


def operation(
    op: Callable[Concatenate[Any, P], ops.Op[T]],
) -> Method[P, T, Coroutine[Any, Any, T]]:
    """A method that runs the operation `op` returns to its result."""

    @functools.wraps(op)
    def call(client: Client, *args: P.args, **kwargs: P.kwargs) -> T:
        run = ops.Run(op(client, *args, **kwargs), client.url)
        for _ in client._drive(run):
            pass  # an operation emits nothing
        return run.result

    @functools.wraps(op)
    async def call_async(client: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> T:
        run = ops.Run(op(client, *args, **kwargs), client.url)
        async for _ in client._drive(run):
            pass
        return run.result

    _signed(call, op, "{}")
    _signed(call_async, op, "{}")
    return Method(call, call_async)


def stream(
    op: Callable[Concatenate[Any, P], ops.Stream[I]],
) -> Method[P, Iterator[I], AsyncIterator[I]]:
    """A method that returns an iterator (on an AsyncClient, an async iterator) over the items
    that the operation `op` returns emits."""

    @functools.wraps(op)
    def items(client: Client, *args: P.args, **kwargs: P.kwargs) -> Iterator[I]:
        return client._drive(ops.Run(op(client, *args, **kwargs), client.url))

    @functools.wraps(op)
    def items_async(client: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[I]:
        return client._drive(ops.Run(op(client, *args, **kwargs), client.url))

    _signed(items, op, "Iterator[{}]")
    _signed(items_async, op, "AsyncIterator[{}]")
    return Method(items, items_async)


class BaseClient(abc.ABC, Generic[H]):
    """The constructor and the methods of both clients (see `Client` for the arguments)."""

    _asynchronous: ClassVar[bool]

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        poll_max: float = 10.0,
        retry_wait_max: float = 60.0,
        max_retries: int = 5,
        **httpx_options: Any,
    ) -> None:
        self.url = ops.resolve_url(url)
        self.policy = ops.Policy(
            poll_max=poll_max, retry_wait_max=retry_wait_max, max_retries=max_retries
        )
        headers = ops.default_headers(ops.resolve_key(api_key))
        self._http = self._connect(
            base_url=self.url, headers=headers, timeout=timeout, **httpx_options
        )

    @abc.abstractmethod
    def _connect(self, **options: Any) -> H:
        """The httpx client (sync or async) built with these options."""

    # --- jobs -------------------------------------------------------------------------------------
    @operation
    def submit(
        self,
        kind: str,
        params: Mapping[str, Any] | None = None,
        seed: int | None = None,
        priority: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        *,
        webhook: Mapping[str, Any] | None = None,
        retry_on_429: bool = False,
    ) -> ops.Op[Job]:
        """Submit a job (`POST /v1/jobs`); returns it queued. With `retry_on_429`, a per-tenant
        cap (429) is waited out as the server's Retry-After says, up to `max_retries` times."""
        body = ops.job_body(
            kind, params, seed=seed, priority=priority, metadata=metadata, webhook=webhook
        )
        return ops.create("/v1/jobs", body, Job, idempotency_key=idempotency_key,
                          retry_on_429=retry_on_429, policy=self.policy)  # fmt: skip

    @operation
    def get(self, job_id: object) -> ops.Op[Job]:
        """The job (`GET /v1/jobs/{id}`)."""
        return ops.fetch("GET", ops.job_path(job_id), Job)

    @stream
    def list(
        self,
        status: str | Sequence[str] | None = None,
        kind: str | None = None,
        batch_id: object | None = None,
        limit: int | None = None,
        *,
        page_size: int = 100,
    ) -> ops.Stream[Job]:
        """Every job matching the filters, newest first, across all pages (at most `limit`)."""
        query = ops.job_filters(status, kind, batch_id)
        return ops.paginate("/v1/jobs", query, Job, limit=limit, page_size=page_size)

    @operation
    def cancel(self, job_id: object) -> ops.Op[Job]:
        """Queued: canceled at once; running: `canceling` until the worker stops."""
        return ops.fetch("POST", ops.job_path(job_id, "/cancel"), Job)

    @operation
    def wait(
        self,
        job_id: object,
        timeout: float | None = None,
        on_progress: Callable[[Job], object] | None = None,
        *,
        until: Callable[[Job], bool] | None = None,
        follow: bool = False,
    ) -> ops.Op[Job]:
        """Poll until the job has finished (succeeded, failed or canceled), or until
        `until(job)` holds, and return it; raise WaitTimeoutError after `timeout` seconds. A
        failed job is returned, not raised. `on_progress` sees every state read. With
        `follow`, read the job's live events instead of polling (polling if they fail)."""
        if follow:
            return live.wait_following(
                ops.job_path(job_id, "/events"), ops.job_path(job_id), Job,
                until or Job.is_done, terminal=Job.is_done, what=f"job {job_id}",
                timeout=timeout, on_progress=on_progress, policy=self.policy,
            )  # fmt: skip
        return ops.wait(ops.job_path(job_id), Job, until or Job.is_done, what=f"job {job_id}",
                        timeout=timeout, on_progress=on_progress, policy=self.policy)  # fmt: skip

    @stream
    def events(self, job_id: object, *, last_event_id: int | None = None) -> ops.Stream[Event]:
        """The job's live events (`GET /v1/jobs/{id}/events`, server-sent events): a
        `snapshot` (the job) first, then `status`, `progress` and `artifacts` as they happen,
        and a last `snapshot` when it has finished, where the iterator ends. A dropped
        connection is resumed from the last event id (`last_event_id` resumes from one)."""
        path = ops.job_path(job_id, "/events")
        return live.follow(path, last_event_id=last_event_id, policy=self.policy)

    @operation
    def artifacts(self, job_id: object) -> ops.Op[ArtifactList]:
        """The job's artifacts with URLs minted for this read (empty until it succeeded)."""
        return ops.fetch("GET", ops.job_path(job_id, "/artifacts"), ArtifactList)

    @operation
    def download(
        self, job_id: object, dest_dir: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> ops.Op[builtins.list[Path]]:
        """Stream the job's artifacts (all, or `names`) into `dest_dir`, following redirects to
        presigned URLs; each file appears whole (written as `.part`, then renamed)."""
        return ops.download(job_id, dest_dir, names)

    @operation
    def upload_image(
        self, image: bytes | str | os.PathLike[str], filename: str | None = None
    ) -> ops.Op[Image]:
        """Upload a start image (a path or bytes); its `id` goes into job params."""
        return ops.upload_image(image, filename)

    @operation
    def models(self) -> ops.Op[ModelList]:
        """The models, schemes and job kinds the server offers (`GET /v1/models`)."""
        return ops.fetch("GET", "/v1/models", ModelList)

    # --- batches ----------------------------------------------------------------------------------
    @operation
    def create_batch(
        self,
        /,
        kind: str,
        params_template: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        retry_on_429: bool = False,
        **fields: Any,
    ) -> ops.Op[Batch]:
        """Create a sweep (`POST /v1/batches`): axes over the template (`classes`,
        `classifiers`, `classifier_pairs`, `seeds`, `images_per_class`) or explicit `items`
        (`[{custom_id, params, seed?}]`), plus `priority`, `metadata`, `webhook`."""
        body = ops.batch_body(kind, {"params_template": params_template, **fields})
        return ops.create("/v1/batches", body, Batch, idempotency_key=idempotency_key,
                          retry_on_429=retry_on_429, policy=self.policy)  # fmt: skip

    @operation
    def get_batch(self, batch_id: object) -> ops.Op[Batch]:
        """The batch (`GET /v1/batches/{id}`): counts per status, progress, ETA."""
        return ops.fetch("GET", ops.batch_path(batch_id), Batch)

    @stream
    def list_batches(self, limit: int | None = None, *, page_size: int = 100) -> ops.Stream[Batch]:
        """Every batch, across all pages (at most `limit`)."""
        return ops.paginate("/v1/batches", [], Batch, limit=limit, page_size=page_size)

    @operation
    def cancel_batch(self, batch_id: object) -> ops.Op[Batch]:
        """Cancel the items not yet finished; finished ones stay readable."""
        return ops.fetch("POST", ops.batch_path(batch_id, "/cancel"), Batch)

    @operation
    def wait_batch(
        self,
        batch_id: object,
        timeout: float | None = None,
        on_progress: Callable[[Batch], object] | None = None,
        *,
        until: Callable[[Batch], bool] | None = None,
        follow: bool = False,
    ) -> ops.Op[Batch]:
        """Poll until every item has finished (or `until(batch)` holds); raise
        WaitTimeoutError after `timeout` seconds. With `follow`, read the batch's live events
        instead of polling (polling if they fail)."""
        if follow:
            return live.wait_following(
                ops.batch_path(batch_id, "/events"), ops.batch_path(batch_id), Batch,
                until or Batch.is_done, terminal=Batch.is_done, what=f"batch {batch_id}",
                timeout=timeout, on_progress=on_progress, policy=self.policy,
            )  # fmt: skip
        return ops.wait(ops.batch_path(batch_id), Batch, until or Batch.is_done,
                        what=f"batch {batch_id}", timeout=timeout, on_progress=on_progress,
                        policy=self.policy)  # fmt: skip

    @stream
    def batch_events(
        self, batch_id: object, *, last_event_id: int | None = None
    ) -> ops.Stream[Event]:
        """The batch's live events (`GET /v1/batches/{id}/events`): a `snapshot` (the batch)
        first, then each item's `status`, `progress` and `artifacts` events (their `job_id`
        names the item), a fresh `snapshot` at most once a second while items change, and
        `batch_finished` and a last `snapshot` at its end, where the iterator ends."""
        path = ops.batch_path(batch_id, "/events")
        return live.follow(path, last_event_id=last_event_id, policy=self.policy)

    @stream
    def iter_results(self, batch_id: object) -> ops.Stream[ResultRecord]:
        """The batch's results index, one record per item in item order, streamed (readable
        while the batch runs)."""
        return ops.results(batch_id)

    @operation
    def export_results(
        self, batch_id: object, out: IO[bytes], format: ResultFormat = "jsonl"
    ) -> ops.Op[int]:
        """Stream the results index as the server writes it (JSON lines or CSV) into `out`;
        returns the bytes written."""
        return ops.export_results(batch_id, out, format)

    # --- audits -----------------------------------------------------------------------------------
    @operation
    def create_audit(
        self,
        /,
        classifier: str,
        classes: Sequence[int | str] | str = "all",
        *,
        idempotency_key: str | None = None,
        retry_on_429: bool = False,
        **fields: Any,
    ) -> ops.Op[Audit]:
        """Audit a classifier across its classes (`POST /v1/audits`): `classes` (indices or
        names, or 'all'), and any of `images` (`{digits: split}`, `{folder: ".../{class}"}` or
        `{image_ids: {class: [ids]}}`), `reference`, `diffusion`, `prompt`, `keep_class`,
        `guidance`, `budget`, `thresholds`, `seed`, `priority`, `metadata`."""
        listed = classes if isinstance(classes, str) else builtins.list(classes)
        body = {"classifier": classifier, "classes": listed}
        body |= {k: v for k, v in fields.items() if v is not None}
        return ops.create("/v1/audits", body, Audit, idempotency_key=idempotency_key,
                          retry_on_429=retry_on_429, policy=self.policy)  # fmt: skip

    @operation
    def get_audit(self, audit_id: object) -> ops.Op[Audit]:
        """The audit (`GET /v1/audits/{id}`): its stage, every class's state and finished rows."""
        return ops.fetch("GET", _audit_path(audit_id), Audit)

    @stream
    def list_audits(self, limit: int | None = None, *, page_size: int = 100) -> ops.Stream[Audit]:
        """Every audit, newest first, across all pages (at most `limit`)."""
        return ops.paginate("/v1/audits", [], Audit, limit=limit, page_size=page_size)

    @operation
    def cancel_audit(self, audit_id: object) -> ops.Op[Audit]:
        """Cancel what is left of the audit; no follow-ups or report are written after."""
        path = _audit_path(audit_id, "/cancel")
        return ops.fetch("POST", path, Audit)

    @operation
    def wait_audit(
        self,
        audit_id: object,
        timeout: float | None = None,
        on_progress: Callable[[Audit], object] | None = None,
    ) -> ops.Op[Audit]:
        """Poll until the audit's report is built (or it failed or was canceled); raise
        WaitTimeoutError after `timeout` seconds."""
        path = _audit_path(audit_id)
        return ops.wait(path, Audit, Audit.is_done, what=f"audit {audit_id}", timeout=timeout,
                        on_progress=on_progress, policy=self.policy)  # fmt: skip

    @operation
    def audit_report(self, audit_id: object, out: IO[bytes], format: str = "json") -> ops.Op[int]:
        """Stream the audit's report into `out`: `json` (classes ranked, images named
        `<job id>/<artifact name>`) or `html` (one self-contained page); returns the bytes."""
        if format not in ("json", "html"):
            raise ValueError(f"format must be 'json' or 'html', got {format!r}")
        path = _audit_path(audit_id, "/report")
        call = ops.Call("GET", path, params=[("format", format)], stream=True,
                        follow_redirects=True)  # fmt: skip
        return _copied(call, out, f"reading the report of audit {audit_id}")


def _audit_path(audit_id: object, tail: str = "") -> str:
    return f"/v1/audits/{quote(str(audit_id), safe='')}{tail}"


def _copied(call: ops.Call, out: IO[bytes], what: str) -> ops.Op[int]:
    """A streamed request's body written into `out`; returns the bytes written."""
    with ops.reading(what):
        body = yield from ops.open_body(call)
        return (yield from ops.copy(body, out))
