"""The asynchronous client: `AsyncClient`, over `httpx.AsyncClient`, with the methods of
`Client` (same names, same arguments, awaited; `list`, `list_batches` and `iter_results` are
async iterators).

Its methods are those of `BaseClient`, each an operation of `digin_client._ops`; this module
only performs their steps: requests with `httpx.AsyncClient`, pauses with `asyncio.sleep`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpx

import digin_client._ops as ops  # not via the package: its __init__ imports this module
from digin_client._base import BaseClient


class AsyncClient(BaseClient[httpx.AsyncClient]):
    """An asyncio client of the DiG-IN job service, with the arguments of `Client`; other
    keyword arguments go to `httpx.AsyncClient`. Use it as an async context manager, or
    `aclose()` it."""

    _asynchronous = True

    def _connect(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(**options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _drive(self, run: ops.Run[Any]) -> AsyncIterator[Any]:
        """Perform the steps of `run`'s operation; yield the items it emits."""
        async with contextlib.AsyncExitStack() as opened:
            for step in run.steps(opened):
                if isinstance(step, ops.Emit):
                    yield step.item
                    continue
                with run.answering():
                    run.reply = await self._perform(step, opened)

    async def _perform(self, step: ops.Step, opened: contextlib.AsyncExitStack) -> Any:
        if isinstance(step, ops.Sleep):
            return await asyncio.sleep(step.seconds)
        if isinstance(step, ops.Read):
            return await anext(step.body.chunks, None)  # httpx closes the response at its end
        request = self._http.build_request(**step.request())
        response = await self._http.send(request, **step.sending())
        if not step.stream:
            return response
        opened.push_async_callback(response.aclose)
        if not response.is_success:
            await response.aread()
        return ops.Body(step, response, response.aiter_bytes())
