"""Live events of a job or a batch (server-sent events), written once without I/O like every
operation of `digin_client._ops`.

`follow(path)` reads `GET {path}` (`/v1/jobs/{id}/events`, `/v1/batches/{id}/events`) and emits
each `Event`; when the connection drops before the server ended the stream, it reconnects with
`Last-Event-ID` (what was missed comes first), up to `policy.max_retries` times in a row. The
server ends a stream after the last `snapshot` of a finished job or batch.

`wait_following(...)` is `wait` over the stream: the state is the last `snapshot` with the
`status` and `progress` events applied to it; if the stream cannot be had (an older server, a
proxy that buffers, too many failures) it polls instead (`digin_client._ops.wait`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from digin_client._ops import (
    Body,
    Call,
    Emit,
    Op,
    Policy,
    Read,
    Sleep,
    Stream,
    check,
    transient,
    wait,
)
from digin_client.errors import APIError, DiginConnectionError, DiginError, WaitTimeoutError

M = TypeVar("M", bound=BaseModel)
TERMINAL = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Event:
    """One server-sent event: `type` (`snapshot`, `status`, `progress`, `artifacts`,
    `batch_finished`, `error`), its JSON `data`, and its `id` (stored events only)."""

    type: str
    data: dict[str, Any]
    id: int | None = None

    @property
    def ends(self) -> bool:
        """A snapshot of a finished job or batch: the server ends the stream after it."""
        if self.type != "snapshot":
            return self.type == "error"
        status = self.data.get("status")
        if "counts" in self.data:  # a batch
            return self.data.get("finished_at") is not None or status != "running"
        return status in TERMINAL


@dataclass
class Parser:
    """Server-sent events from a byte stream, as the HTML standard parses them (fields
    `event`, `data` (joined by newlines), `id`; comments and `retry` ignored)."""

    buffer: bytes = b""
    fields: dict[str, list[str]] = field(default_factory=dict)

    def feed(self, chunk: bytes) -> Iterator[Event]:
        self.buffer += chunk
        while True:
            line, sep, rest = self.buffer.partition(b"\n")
            if not sep:
                return
            self.buffer = rest
            text = line.decode().removesuffix("\r")
            if text == "":
                event = self._dispatch()
                if event is not None:
                    yield event
            elif not text.startswith(":"):
                name, _, value = text.partition(":")
                self.fields.setdefault(name, []).append(value.removeprefix(" "))

    def _dispatch(self) -> Event | None:
        fields, self.fields = self.fields, {}
        if "data" not in fields:
            return None
        try:
            data = json.loads("\n".join(fields["data"]))
        except json.JSONDecodeError as exc:
            raise DiginError(f"the event stream sent data that is not JSON: {exc}") from None
        ident = (fields.get("id") or [""])[-1]
        kind = (fields.get("event") or ["message"])[-1]
        return Event(kind, data, int(ident) if ident.isdigit() else None)


def follow(
    path: str, *, last_event_id: int | None, policy: Policy, deadline: float | None = None
) -> Stream[Event]:
    """Emit the events of `GET path` until the server ends the stream; reconnect with
    `Last-Event-ID` after a dropped connection (up to `policy.max_retries` in a row). With a
    `deadline` (time.monotonic()), no read waits past it."""
    failures = 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        left = None if deadline is None else max(deadline - time.monotonic(), 0.05)
        try:
            body: Body = yield Call("GET", path, headers=headers, stream=True, timeout=left)
            check(body.response)
            parser = Parser()
            while (chunk := (yield Read(body))) is not None:
                for event in parser.feed(chunk):
                    failures = 0
                    last_event_id = event.id if event.id is not None else last_event_id
                    yield Emit(event)
                    if event.ends:
                        return
        except (APIError, DiginConnectionError) as exc:
            if not transient(exc) or failures >= policy.max_retries:
                raise
        failures += 1  # the stream ended (or broke) before its end: resume
        if failures > policy.max_retries:
            raise DiginConnectionError(f"GET {path}: the event stream ended before the end")
        yield Sleep(min(policy.poll_initial * 2.0 ** (failures - 1), policy.poll_max))


def apply(state: M, event: Event) -> M:
    """`state` (a Job or Batch) with what `event` says changed: a snapshot replaces it; a
    job's own status or progress event updates it."""
    if event.type == "snapshot":
        return type(state).model_validate(event.data)
    if event.data.get("job_id") != str(getattr(state, "id", None)):
        return state
    if event.type == "status":
        changed = {"status": event.data["status"]}
    elif event.type == "progress":
        changed = {
            "progress": {k: v for k, v in event.data.items() if k not in ("job_id", "batch_id")}
        }
    else:
        return state
    return type(state).model_validate(state.model_dump() | changed)


def wait_following(
    events_path: str,
    poll_path: str,
    model: type[M],
    done: Callable[[M], bool],
    *,
    terminal: Callable[[M], bool],
    what: str,
    timeout: float | None,
    on_progress: Callable[[M], object] | None,
    policy: Policy,
) -> Op[M]:
    """Follow the stream until `done(state)`, the state kept from its events (once
    `terminal(state)`, until the last snapshot, which carries the result); poll instead
    (`wait`) when the stream fails. WaitTimeoutError after `timeout` seconds (checked between
    events and heartbeats)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    state: M | None = None
    stream = follow(events_path, last_event_id=None, policy=policy, deadline=deadline)
    reply: Any = None
    error: DiginConnectionError | None = None
    try:
        while True:
            step = stream.throw(error) if error is not None else stream.send(reply)
            reply, error = None, None
            if isinstance(step, Emit):
                event: Event = step.item
                state = model.model_validate(event.data) if state is None else apply(state, event)
                if event.type != "artifacts" and on_progress is not None:
                    on_progress(state)
                if done(state) and (event.type == "snapshot" or not terminal(state)):
                    return state  # a finished one's last snapshot (its result) is coming
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"{what} did not finish within {timeout:g} s", state)
            try:
                reply = yield step
            except DiginConnectionError as exc:  # the driver's: for `follow` to handle
                error = exc
    except StopIteration:
        pass  # the server ended the stream: the state is read again below
    except (APIError, DiginConnectionError) as exc:
        if isinstance(exc, APIError) and exc.status in (401, 403):
            raise  # holds for polling too (a 404 is checked by the poll; a 429 is the stream cap)
    finally:
        stream.close()
    left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    return (
        yield from wait(poll_path, model, done, what=what, timeout=left,
                        on_progress=on_progress, policy=policy)
    )  # fmt: skip
