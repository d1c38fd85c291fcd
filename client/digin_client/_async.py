"""The asynchronous client: `AsyncClient`, over `httpx.AsyncClient`, with the methods of
`Client` (same names, same arguments, awaited; `list`, `list_batches` and `iter_results` are
async iterators).

Every method but the streaming ones runs an operation of `digin_client._ops` (shared with
`Client`); see that module for what each does on the wire.
"""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import httpx

import digin_client._ops as ops  # not via the package: its __init__ imports this module
from digin_client.errors import DiginConnectionError, error_from_response
from digin_client.models import (
    ArtifactList,
    Batch,
    Image,
    Job,
    ModelList,
    ResultFormat,
    ResultRecord,
)

T = TypeVar("T")


class AsyncClient:
    """An asyncio client of the DiG-IN job service (see `Client` for the arguments).

    `url` defaults to DIGIN_URL (else http://127.0.0.1:8000) and `api_key` to DIGIN_API_KEY
    (sent as `Authorization: Bearer`). `timeout` is per HTTP request; `poll_max` caps the
    backoff between polls when the server sends no Retry-After, `retry_wait_max` the longest
    Retry-After honoured, `max_retries` how many 429s (`retry_on_429`) or 502/503/504s while
    polling are ridden out in a row. Other keyword arguments go to `httpx.AsyncClient`
    (`transport`, `verify`, `event_hooks`, ...). Use it as a context manager, or `close()` it.
    """

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
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=ops.default_headers(ops.resolve_key(api_key)),
            timeout=timeout,
            **httpx_options,
        )

    # --- plumbing ---------------------------------------------------------------------------------
    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: ops.Call) -> httpx.Response:
        try:
            return await self._http.request(
                call.method, call.path, params=call.params, json=call.json,
                headers=call.headers, files=call.files,
            )  # fmt: skip
        except httpx.TransportError as exc:
            raise DiginConnectionError(f"{call.method} {self.url}{call.path}: {exc!r}") from exc

    async def _run(self, op: ops.Op[T]) -> T:
        """Run a shared operation: send its calls, sleep its sleeps, throw errors into it."""
        reply: Any = None
        error: DiginConnectionError | None = None
        while True:
            try:
                step = op.throw(error) if error is not None else op.send(reply)
            except StopIteration as stop:
                result: T = stop.value
                return result
            reply, error = None, None
            if isinstance(step, ops.Sleep):
                await asyncio.sleep(step.seconds)
                continue
            try:
                reply = await self._send(step)
            except DiginConnectionError as exc:
                error = exc

    async def _paginate(
        self, path: str, query: ops.Query, limit: int | None,
        page_size: int, parse: Callable[[dict[str, Any]], T],
    ) -> AsyncIterator[T]:  # fmt: skip
        cursor, seen = None, 0
        while limit is None or seen < limit:
            size = ops.page_size(page_size, limit, seen)
            page = await self._run(ops.page(path, query, cursor, size))
            for item in page.data[: None if limit is None else limit - seen]:
                seen += 1
                yield parse(item)
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # --- jobs -------------------------------------------------------------------------------------
    async def submit(
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
    ) -> Job:
        """Submit a job (`POST /v1/jobs`); returns it queued. With `retry_on_429`, a per-tenant
        cap (429) is waited out as the server's Retry-After says, up to `max_retries` times."""
        body = ops.job_body(
            kind, params, seed=seed, priority=priority, metadata=metadata, webhook=webhook
        )
        return await self._run(
            ops.create("/v1/jobs", body, Job, idempotency_key=idempotency_key,
                       retry_on_429=retry_on_429, policy=self.policy)
        )  # fmt: skip

    async def get(self, job_id: object) -> Job:
        return await self._run(ops.get_job(job_id))

    def list(
        self,
        status: str | Sequence[str] | None = None,
        kind: str | None = None,
        batch_id: object | None = None,
        limit: int | None = None,
        *,
        page_size: int = 100,
    ) -> AsyncIterator[Job]:
        """Every job matching the filters, newest first, across all pages (at most `limit`)."""
        query = ops.job_filters(status, kind, batch_id)
        return self._paginate("/v1/jobs", query, limit, page_size, Job.model_validate)

    async def cancel(self, job_id: object) -> Job:
        """Queued: canceled at once; running: `canceling` until the worker stops."""
        return await self._run(ops.cancel_job(job_id))

    async def wait(
        self,
        job_id: object,
        timeout: float | None = None,
        on_progress: Callable[[Job], object] | None = None,
        *,
        until: Callable[[Job], bool] | None = None,
    ) -> Job:
        """Poll until the job has finished (succeeded, failed or canceled), or until
        `until(job)` holds, and return it; raise WaitTimeoutError after `timeout` seconds. A
        failed job is returned, not raised. `on_progress` sees every state read."""
        return await self._run(
            ops.wait(ops.read_job(job_id), until or Job.is_done, what=f"job {job_id}",
                     timeout=timeout, on_progress=on_progress, policy=self.policy)
        )  # fmt: skip

    async def artifacts(self, job_id: object) -> ArtifactList:
        """The job's artifacts with URLs minted for this read (empty until it succeeded)."""
        return await self._run(ops.artifacts(job_id))

    async def download(
        self, job_id: object, dest_dir: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> builtins.list[Path]:
        """Stream the job's artifacts (all, or `names`) into `dest_dir`, following redirects to
        presigned URLs; each file appears whole (written as `.part`, then renamed)."""
        chosen = ops.select_artifacts(await self.artifacts(job_id), names)
        dest = Path(dest_dir)
        paths = []
        for artifact in chosen:
            target = ops.artifact_target(dest, artifact.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = ops.partial_path(target)
            path = ops.artifact_path(job_id, artifact.name)
            try:
                async with self._http.stream("GET", path, follow_redirects=True) as response:
                    if not response.is_success:
                        await response.aread()
                        raise error_from_response(response)
                    with partial.open("wb") as out:
                        async for chunk in response.aiter_bytes():
                            out.write(chunk)
            except httpx.TransportError as exc:
                partial.unlink(missing_ok=True)
                raise DiginConnectionError(f"downloading {artifact.name}: {exc!r}") from exc
            partial.replace(target)
            paths.append(target)
        return paths

    async def upload_image(
        self, image: bytes | str | os.PathLike[str], filename: str | None = None
    ) -> Image:
        """Upload a start image (a path or bytes); its `id` goes into job params."""
        return await self._run(ops.upload_image(image, filename))

    async def models(self) -> ModelList:
        return await self._run(ops.models())

    # --- batches ----------------------------------------------------------------------------------
    async def create_batch(
        self,
        kind: str,
        params_template: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        retry_on_429: bool = False,
        **fields: Any,
    ) -> Batch:
        """Create a sweep (`POST /v1/batches`): axes over the template (`classes`,
        `classifiers`, `classifier_pairs`, `seeds`, `images_per_class`) or explicit `items`
        (`[{custom_id, params, seed?}]`), plus `priority`, `metadata`, `webhook`."""
        body = ops.batch_body(kind, {"params_template": params_template, **fields})
        return await self._run(
            ops.create("/v1/batches", body, Batch, idempotency_key=idempotency_key,
                       retry_on_429=retry_on_429, policy=self.policy)
        )  # fmt: skip

    async def get_batch(self, batch_id: object) -> Batch:
        return await self._run(ops.get_batch(batch_id))

    def list_batches(
        self, limit: int | None = None, *, page_size: int = 100
    ) -> AsyncIterator[Batch]:
        """Every batch, across all pages (at most `limit`)."""
        return self._paginate("/v1/batches", [], limit, page_size, Batch.model_validate)

    async def cancel_batch(self, batch_id: object) -> Batch:
        """Cancel the items not yet finished; finished ones stay readable."""
        return await self._run(ops.cancel_batch(batch_id))

    async def wait_batch(
        self,
        batch_id: object,
        timeout: float | None = None,
        on_progress: Callable[[Batch], object] | None = None,
        *,
        until: Callable[[Batch], bool] | None = None,
    ) -> Batch:
        """Poll until every item has finished (or `until(batch)` holds); raise
        WaitTimeoutError after `timeout` seconds."""
        return await self._run(
            ops.wait(ops.read_batch(batch_id), until or Batch.is_done, what=f"batch {batch_id}",
                     timeout=timeout, on_progress=on_progress, policy=self.policy)
        )  # fmt: skip

    async def iter_results(self, batch_id: object) -> AsyncIterator[ResultRecord]:
        """The batch's results index, one record per item in item order, streamed (readable
        while the batch runs)."""
        path, query, headers = ops.results_request(batch_id, "jsonl")
        try:
            async with self._http.stream("GET", path, params=query, headers=headers) as response:
                if not response.is_success:
                    await response.aread()
                    raise error_from_response(response)
                async for line in response.aiter_lines():
                    record = ops.result_record(line)
                    if record is not None:
                        yield record
        except httpx.TransportError as exc:
            raise DiginConnectionError(f"reading the results of {batch_id}: {exc!r}") from exc

    async def export_results(
        self, batch_id: object, out: IO[bytes], format: ResultFormat = "jsonl"
    ) -> int:
        """Stream the results index as the server writes it (JSON lines or CSV) into `out`;
        returns the bytes written."""
        path, query, headers = ops.results_request(batch_id, format)
        written = 0
        try:
            async with self._http.stream("GET", path, params=query, headers=headers) as response:
                if not response.is_success:
                    await response.aread()
                    raise error_from_response(response)
                async for chunk in response.aiter_bytes():
                    written += out.write(chunk)
        except httpx.TransportError as exc:
            raise DiginConnectionError(f"reading the results of {batch_id}: {exc!r}") from exc
        return written
