"""The synchronous client: `Client`, over `httpx.Client`.

Its methods are those of `BaseClient`, each an operation of `digin_client._ops`; this module
only performs their steps: requests with `httpx.Client`, pauses with `time.sleep`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import httpx

import digin_client._ops as ops  # not via the package: its __init__ imports this module
from digin_client._base import BaseClient


class Client(BaseClient[httpx.Client]):
    """A client of the DiG-IN job service.

    `url` defaults to DIGIN_URL (else http://127.0.0.1:8000) and `api_key` to DIGIN_API_KEY
    (sent as `Authorization: Bearer`). `timeout` is per HTTP request; `poll_max` caps the
    backoff between polls when the server sends no Retry-After, `retry_wait_max` the longest
    Retry-After honoured, `max_retries` how many 429s (`retry_on_429`) or 502/503/504s while
    polling are ridden out in a row. Other keyword arguments go to `httpx.Client`
    (`transport`, `verify`, `event_hooks`, ...). Use it as a context manager, or `close()` it.
    """

    _asynchronous = False

    def _connect(self, **options: Any) -> httpx.Client:
        return httpx.Client(**options)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()

    def close(self) -> None:
        self._http.close()

    def _drive(self, run: ops.Run[Any]) -> Iterator[Any]:
        """Perform the steps of `run`'s operation; yield the items it emits."""
        with contextlib.ExitStack() as opened:
            for step in run.steps(opened):
                if isinstance(step, ops.Emit):
                    yield step.item
                    continue
                with run.answering():
                    run.reply = self._perform(step, opened)

    def _perform(self, step: ops.Step, opened: contextlib.ExitStack) -> Any:
        if isinstance(step, ops.Sleep):
            return time.sleep(step.seconds)
        if isinstance(step, ops.Read):
            return next(step.body.chunks, None)  # httpx closes the response at its end
        response = self._http.send(self._http.build_request(**step.request()), **step.sending())
        if not step.stream:
            return response
        opened.callback(response.close)
        if not response.is_success:
            response.read()
        return ops.Body(step, response, response.iter_bytes())
