"""Live events of jobs and batches (docs/architecture.md §8.12): what server-sent event streams
read, one `EventHub` per API process.

Where events come from. Database triggers (migration 0005) write a `job_events` row for every
change of a job's status and for a batch's end, in the transaction that makes the change, so
every code path (a worker's compare-and-set, a batch's bulk cancel, a group claim, the reaper)
is covered and a rolled-back change has no event. The row's id orders a job's events (the job
row is locked by the change) and is the stream's `id:` for resume (`Last-Event-ID`).

How they reach a stream. PostgreSQL: the triggers also NOTIFY them on `digin_events` (delivered
at commit), with the job's progress as it changes (not stored); the hub holds ONE listening
connection per API process and fans each notification out to the streams whose scope matches
(dictionaries by job id and batch id: no database read per stream). A revoked API key is
notified on `digin_keys` and dropped from the key cache (`digin.service.keycache`). SQLite
(embedded mode): no NOTIFY; while streams are open the hub reads new `job_events` rows and the
progress of the running jobs streamed, once per `poll_interval` for the whole process.

Bounds. Each subscription has a queue of `queue_size` events; a stream that does not keep up is
marked lagged, its queue dropped, and it catches up from the table (status events are stored;
progress is sent again with the next change). Streams are capped per tenant per process.

`stream_events` is the generic stream: a `Feed` says which jobs and batches (`Scope`), how to
read the current state (`snapshot`) and when the stream ends (`finished`). Jobs and batches use
it (`digin.api.routes.events`); so can anything built of jobs (an audit: its batch, or a set of
job ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from sqlalchemy import delete, func, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from digin.service.db import ACTIVE, Job
from digin.service.db.models import JobEvent

log = logging.getLogger(__name__)

CHANNEL = "digin_events"  # job events (migration 0005)
KEYS_CHANNEL = "digin_keys"  # revoked API keys' prefixes (migration 0005)
REPLAY_PAGE = 500
EVENTS_RETENTION_S = 7 * 24 * 3600  # stored events older than this are pruned by the reaper
RECONNECT_S = (0.5, 30.0)  # the listener's backoff after a lost connection: first, most


class TooManyStreams(Exception):
    """The tenant has `limit` streams open on this API process already."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"max_streams_per_tenant={limit} event streams are open for this tenant")


@dataclass(frozen=True)
class Event:
    """`status` (a job's status changed; stored, with an id), `progress` (a running job's
    {step, total, stage}; not stored, no id) or `batch_finished` (stored)."""

    type: str
    tenant_id: uuid.UUID
    job_id: uuid.UUID | None
    batch_id: uuid.UUID | None
    data: dict[str, Any]
    id: int | None = None


def _uuid(value: Any) -> uuid.UUID | None:
    return None if value is None else value if isinstance(value, uuid.UUID) else uuid.UUID(value)


def parse_notification(payload: str) -> Event:
    """An event from the JSON a trigger NOTIFYs."""
    raw = json.loads(payload)
    tenant_id = _uuid(raw["tenant_id"])
    assert tenant_id is not None
    return Event(
        type=raw["type"], tenant_id=tenant_id, job_id=_uuid(raw.get("job_id")),
        batch_id=_uuid(raw.get("batch_id")), data=raw.get("data") or {}, id=raw.get("id"),
    )  # fmt: skip


def _from_row(row: JobEvent) -> Event:
    return Event(
        type=row.type, tenant_id=row.tenant_id, job_id=row.job_id, batch_id=row.batch_id,
        data=json.loads(row.data), id=row.id,
    )  # fmt: skip


@dataclass(frozen=True)
class Scope:
    """The jobs a stream follows: `job_ids`, and every item of `batch_ids`; one tenant's."""

    tenant_id: uuid.UUID
    job_ids: frozenset[uuid.UUID] = frozenset()
    batch_ids: frozenset[uuid.UUID] = frozenset()

    def matches(self, event: Event) -> bool:
        return event.tenant_id == self.tenant_id and (
            event.job_id in self.job_ids or event.batch_id in self.batch_ids
        )

    def where(self) -> Any:
        """The stored events of the scope (a SQL condition on `job_events`)."""
        terms = [JobEvent.job_id.in_(self.job_ids)] if self.job_ids else []
        terms += [JobEvent.batch_id.in_(self.batch_ids)] if self.batch_ids else []
        return (JobEvent.tenant_id == self.tenant_id) & or_(*terms)


def read_events(
    session: Session, scope: Scope, *, after: int, limit: int = REPLAY_PAGE
) -> list[Event]:
    """The scope's stored events with ids above `after`, oldest first, up to `limit`."""
    stmt = select(JobEvent).where(scope.where(), JobEvent.id > after)
    return [_from_row(r) for r in session.scalars(stmt.order_by(JobEvent.id).limit(limit))]


def last_event_id(session: Session, *, scope: Scope) -> int:
    """The id of the scope's newest stored event (0: none yet)."""
    return int(session.scalar(select(func.max(JobEvent.id)).where(scope.where())) or 0)


def prune_events(session: Session, *, older_than_s: float) -> int:
    """Delete stored events older than `older_than_s` seconds (the reaper's rounds, with
    EVENTS_RETENTION_S); how many. The caller commits."""
    stmt = delete(JobEvent).where(JobEvent.at < time.time() - older_than_s)
    return int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]


# --- the hub ------------------------------------------------------------------------------------
class Subscription:
    """A stream's bounded queue of live events. `lagged` is set (and the queue emptied) when it
    overflowed: the stream then reads what it missed from the table."""

    def __init__(self, hub: EventHub, scope: Scope, size: int) -> None:
        self.hub, self.scope = hub, scope
        self.queue: asyncio.Queue[Event] = asyncio.Queue(size)
        self.lagged = False
        self.closed = False

    def offer(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lagged = True
            while not self.queue.empty():
                self.queue.get_nowait()

    async def next(self, timeout: float) -> Event | None:
        """The next live event, or None after `timeout` seconds (or when lagged)."""
        if self.lagged:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub.unsubscribe(self)


@dataclass
class HubStats:
    notifications: int = 0
    polls: int = 0
    reconnects: int = 0
    tenants: dict[uuid.UUID, int] = field(default_factory=dict)  # open streams per tenant


class EventHub:
    """One per API process: the single source of live events for every stream it serves."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        database_url: str,
        *,
        max_streams_per_tenant: int,
        queue_size: int = 256,
        poll_interval: float = 0.5,
        on_key_revoked: Callable[[str], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.url = make_url(database_url)
        self.postgresql = self.url.get_backend_name() == "postgresql"
        self.max_streams = max_streams_per_tenant
        self.queue_size = queue_size
        self.poll_interval = poll_interval
        self.on_key_revoked = on_key_revoked
        self.by_job: dict[uuid.UUID, set[Subscription]] = {}
        self.by_batch: dict[uuid.UUID, set[Subscription]] = {}
        self.stats = HubStats()
        self.listening = asyncio.Event()  # PostgreSQL: LISTEN is in place
        self._task: asyncio.Task[None] | None = None

    # subscriptions
    def subscribe(self, scope: Scope) -> Subscription:
        """A subscription to `scope`'s live events; TooManyStreams at the tenant's cap."""
        open_now = self.stats.tenants.get(scope.tenant_id, 0)
        if open_now >= self.max_streams:
            raise TooManyStreams(self.max_streams)
        self.stats.tenants[scope.tenant_id] = open_now + 1
        sub = Subscription(self, scope, self.queue_size)
        for key, index in self._indexes(scope):
            index.setdefault(key, set()).add(sub)
        self.ensure_started()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        tenant = sub.scope.tenant_id
        left = self.stats.tenants.get(tenant, 1) - 1
        if left > 0:
            self.stats.tenants[tenant] = left
        else:
            self.stats.tenants.pop(tenant, None)
        for key, index in self._indexes(sub.scope):
            subs = index.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del index[key]

    def _indexes(
        self, scope: Scope
    ) -> Iterable[tuple[uuid.UUID, dict[uuid.UUID, set[Subscription]]]]:
        yield from ((j, self.by_job) for j in scope.job_ids)
        yield from ((b, self.by_batch) for b in scope.batch_ids)

    def publish(self, event: Event) -> None:
        """Hand `event` to every subscription whose scope holds it (on the event loop)."""
        targets: set[Subscription] = set()
        if event.job_id is not None:
            targets |= self.by_job.get(event.job_id, set())
        if event.batch_id is not None:
            targets |= self.by_batch.get(event.batch_id, set())
        for sub in targets:
            if sub.scope.matches(event):
                sub.offer(event)

    def lag_all(self) -> None:
        """Every stream catches up from the table (after the listener lost its connection)."""
        for index in (self.by_job, self.by_batch):
            for subs in index.values():
                for sub in subs:
                    sub.lagged = True

    # the source
    def ensure_started(self) -> None:
        """Start the listener (PostgreSQL) or the poller (SQLite) once, on the running loop."""
        if self._task is None or self._task.done():
            source = self._listen if self.postgresql else self._poll
            self._task = asyncio.get_running_loop().create_task(source(), name="event-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _listen(self) -> None:
        """PostgreSQL: LISTEN on both channels and fan out, reconnecting with backoff."""
        import psycopg

        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        delay = RECONNECT_S[0]
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await conn.execute(f"LISTEN {KEYS_CHANNEL}")
                    self.listening.set()
                    delay = RECONNECT_S[0]
                    self.lag_all()  # whatever happened while not listening is in the table
                    if self.on_key_revoked is not None:
                        self.on_key_revoked("")  # keys cached while not listening: check again
                    async for note in conn.notifies():
                        self._dispatch(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event listener: %s; reconnecting in %.1f s", exc, delay)
            self.listening.clear()
            self.stats.reconnects += 1
            if self.on_key_revoked is not None:
                self.on_key_revoked("")  # revocations may be missed meanwhile: forget all keys
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_S[1])

    def _dispatch(self, channel: str, payload: str) -> None:
        self.stats.notifications += 1
        if channel == KEYS_CHANNEL:
            if self.on_key_revoked is not None:
                self.on_key_revoked(payload)
            return
        try:
            self.publish(parse_notification(payload))
        except (ValueError, KeyError) as exc:
            log.error("event listener: bad notification %r: %s", payload[:200], exc)

    async def _poll(self) -> None:
        """SQLite: while streams are open, read new stored events and the progress of the
        running jobs streamed, once per `poll_interval` for the whole process."""
        last = await to_thread.run_sync(self._newest)
        seen: dict[uuid.UUID, Any] = {}  # the progress last sent per job streamed
        while True:
            await asyncio.sleep(self.poll_interval)
            if not self.by_job and not self.by_batch:
                seen.clear()
                continue
            watched = (list(self.by_job), list(self.by_batch))  # taken on the loop
            try:
                last, events = await to_thread.run_sync(self._poll_once, last, seen, *watched)
            except Exception as exc:  # the database is busy or away: next round
                log.warning("event poll: %s", exc)
                continue
            self.stats.polls += 1
            for event in events:
                self.publish(event)

    def _newest(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.max(JobEvent.id))) or 0)

    def _poll_once(
        self,
        last: int,
        seen: dict[uuid.UUID, Any],
        jobs: list[uuid.UUID],
        batches: list[uuid.UUID],
    ) -> tuple[int, list[Event]]:
        """(the newest id read, the events): stored ones after `last` (REPLAY_PAGE at most),
        then the progress of the running jobs among `jobs` and `batches`' items that moved."""
        with self.sessions() as session:
            stmt = select(JobEvent).where(JobEvent.id > last).order_by(JobEvent.id)
            events = [_from_row(r) for r in session.scalars(stmt.limit(REPLAY_PAGE))]
            if batches:
                jobs = jobs + list(
                    session.scalars(
                        select(Job.id).where(Job.batch_id.in_(batches), Job.status.in_(ACTIVE))
                    )
                )
            running: dict[uuid.UUID, Any] = {}
            for start in range(0, len(jobs), 500):
                chunk = jobs[start : start + 500]
                rows = session.execute(
                    select(Job.id, Job.tenant_id, Job.batch_id, Job.progress).where(
                        Job.id.in_(chunk), Job.status.in_(ACTIVE)
                    )
                )
                for job_id, tenant_id, batch_id, value in rows:
                    running[job_id] = value
                    if isinstance(value, dict) and seen.get(job_id) != value:
                        events.append(Event("progress", tenant_id, job_id, batch_id, value))
        seen.clear()
        seen.update(running)  # only the jobs running now: the map stays bounded
        ids = [e.id for e in events if e.id is not None]
        return max(ids, default=last), events


# --- one stream ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Feed:
    """What one stream follows: its `scope`, `snapshot(session)` (the current state, JSON-able:
    sent first and last as the `snapshot` event) and `finished(session)` (the stream ends after
    the event that makes it true)."""

    scope: Scope
    snapshot: Callable[[Session], dict[str, Any]]
    finished: Callable[[Session], bool]
    base: str = ""  # the root path the API is served under (for the URLs events name)
    refresh_s: float | None = None  # a fresh snapshot at most this often while events come


def sse(event: str, data: dict[str, Any], ident: int | None = None) -> bytes:
    """One server-sent event: `id:` (when it has one), `event:`, `data:` (one JSON line)."""
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def public_data(event: Event) -> dict[str, Any]:
    """What a client sees of an event: the job (or batch) it is about and the event's data."""
    about = {"job_id": event.job_id, "batch_id": event.batch_id}
    return {k: str(v) for k, v in about.items() if v is not None} | event.data


class _Sent:
    """The stored events a stream sent lately (a live event may also come in a replay)."""

    def __init__(self, size: int = 4096) -> None:
        self.order: deque[int] = deque()
        self.ids: set[int] = set()
        self.size = size
        self.cursor = 0  # the highest stored id sent

    def first_time(self, ident: int) -> bool:
        if ident in self.ids:
            return False
        self.ids.add(ident)
        self.order.append(ident)
        if len(self.order) > self.size:
            self.ids.discard(self.order.popleft())
        self.cursor = max(self.cursor, ident)
        return True


class EventStream:
    """One client's stream over a `Feed` and its hub `Subscription` (see `stream_events`)."""

    def __init__(
        self,
        sub: Subscription,
        feed: Feed,
        sessions: sessionmaker[Session],
        *,
        heartbeat_s: float,
        allowed: Callable[[], Awaitable[bool]],
    ) -> None:
        self.sub, self.feed, self.sessions = sub, feed, sessions
        self.heartbeat_s, self.allowed = heartbeat_s, allowed
        self.sent = _Sent()
        self.changed_since: float | None = None  # the first stored event since the snapshot

    def _read(self, fn: Callable[[Session], Any]) -> Any:
        with self.sessions() as session:
            return fn(session)

    async def read(self, fn: Callable[[Session], Any]) -> Any:
        return await to_thread.run_sync(self._read, fn)

    def _start(self, session: Session) -> tuple[int, dict[str, Any], bool]:
        cursor = last_event_id(session, scope=self.feed.scope)
        return cursor, self.feed.snapshot(session), self.feed.finished(session)

    def render(self, event: Event) -> list[bytes]:
        """The SSE frames of a live or stored event; none for a stored one already sent."""
        if event.id is not None and not self.sent.first_time(event.id):
            return []
        frames = [sse(event.type, public_data(event), event.id)]
        if event.id is not None and self.changed_since is None and self.feed.refresh_s:
            self.changed_since = time.monotonic()
        if event.type == "status" and event.data.get("status") == "succeeded":
            url = f"{self.feed.base}/v1/jobs/{event.job_id}/artifacts"
            count = event.data.get("artifacts")
            frames.append(
                sse("artifacts", {"job_id": str(event.job_id), "count": count, "url": url})
            )
        return frames

    async def catch_up(self) -> AsyncIterator[bytes]:
        """The stored events after the cursor (a resume, or after the queue overflowed)."""
        while True:
            read = functools.partial(read_events, scope=self.feed.scope, after=self.sent.cursor)
            events = await self.read(read)
            for event in events:
                for frame in self.render(event):
                    yield frame
            if len(events) < REPLAY_PAGE:
                return

    async def final(self) -> bytes:
        """The last frame: the state as it ended."""
        snapshot = await self.read(self.feed.snapshot)
        return sse("snapshot", snapshot, self.sent.cursor or None)

    def wait_s(self) -> float:
        """How long to wait for the next live event: until the next heartbeat, or the next
        refresh of the snapshot when events came since the last one."""
        if self.feed.refresh_s is None or self.changed_since is None:
            return self.heartbeat_s
        due = self.changed_since + self.feed.refresh_s - time.monotonic()
        return max(min(due, self.heartbeat_s), 0.0)

    async def refresh(self) -> AsyncIterator[bytes]:
        """A fresh snapshot once `refresh_s` passed since the first event it would include."""
        if self.wait_s() <= 0 and self.changed_since is not None:
            self.changed_since = None
            yield await self.final()

    async def run(self, last_event_id: int | None) -> AsyncIterator[bytes]:
        # 1. The start: a resume replays what was stored after Last-Event-ID; a new stream
        #    gets the current state (its id: the newest stored event it includes)
        if last_event_id is not None:
            self.sent.cursor = last_event_id
            async for frame in self.catch_up():
                yield frame
            finished = await self.read(self.feed.finished)
        else:
            cursor, snapshot, finished = await self.read(self._start)
            self.sent.cursor = cursor
            yield sse("snapshot", snapshot, cursor or None)
            if finished:
                return
        # 2. Live events until the feed is finished; a comment line when idle
        while not finished:
            event = await self.sub.next(self.wait_s())
            async for frame in self.refresh():
                yield frame
            if event is not None:
                for frame in self.render(event):
                    yield frame
                if event.id is None:  # progress never ends a stream
                    continue
            elif self.sub.lagged:
                self.sub.lagged = False
                async for frame in self.catch_up():
                    yield frame
            elif self.changed_since is not None:
                continue  # a fresh snapshot is due, not a heartbeat
            else:
                if not await self.allowed():
                    yield sse("error", {"detail": "the API key is invalid or revoked"})
                    return
                yield b": keepalive\n\n"
                continue
            finished = await self.read(self.feed.finished)
        # 3. What the end's transaction also stored (a batch's last items, its end), then the
        #    state as it ended
        async for frame in self.catch_up():
            yield frame
        yield await self.final()


async def stream_events(
    sub: Subscription,
    feed: Feed,
    sessions: sessionmaker[Session],
    *,
    last_event_id: int | None,
    heartbeat_s: float,
    allowed: Callable[[], Awaitable[bool]],
    retry_ms: int = 2000,
) -> AsyncIterator[bytes]:
    """The server-sent events of `feed`, as bytes, until it is finished (then a last
    `snapshot`), the key is no longer allowed (checked at each heartbeat), or the client goes.
    `sub` (from `EventHub.subscribe(feed.scope)`, taken before the state is read so nothing
    falls between) is closed at the end.

    Frames: `snapshot` (the state: first on a new stream, last when finished; its id the
    newest stored event it includes), `status` (id: the stored event), `progress` (no id),
    `artifacts` (after a job succeeded), `batch_finished` (id), and `: keepalive` comments
    every `heartbeat_s` seconds when nothing happened."""
    try:
        yield f"retry: {retry_ms}\n\n".encode()
        stream = EventStream(sub, feed, sessions, heartbeat_s=heartbeat_s, allowed=allowed)
        async for frame in stream.run(last_event_id):
            yield frame
    finally:
        sub.close()
