"""The polling path's read of one job on PostgreSQL (docs/architecture.md §8.12): on the event
loop, through a few psycopg async connections of its own, with a prepared statement; no thread
pool trip, no ORM session, no pool ping. `GET /v1/jobs/{id}` uses it once the caller's key is in
the key cache (service/keycache.py); every other read goes through the SQLAlchemy sessions.

A connection that fails is dropped (the next read opens a new one) and the driver's error
propagates: the API answers 503 for it as for any database outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import make_url

from digin.service.db import Job

# the columns GET /v1/jobs/{id} shows, as (column, attribute of Job)
COLUMNS = [(c.name, key) for key, c in ((p.key, p.columns[0]) for p in Job.__mapper__.column_attrs)]
QUERY = (
    f"SELECT {', '.join(name for name, _ in COLUMNS)} FROM jobs "
    "WHERE id = %(id)s AND tenant_id = %(tenant_id)s"
)


class JobReader:
    """`await get(tenant_id=, job_id=)`: the tenant's job (a `Job` of no session), or None."""

    def __init__(self, database_url: str, *, size: int = 4) -> None:
        url = make_url(database_url)
        if url.get_backend_name() != "postgresql":
            raise ValueError(f"{url.get_backend_name()}: the fast job read is for PostgreSQL")
        self.conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.size = size
        self._idle: asyncio.Queue[Any] = asyncio.Queue()
        self._slots: asyncio.Semaphore | None = None

    async def _connection(self) -> Any:
        import psycopg

        if not self._idle.empty():
            return self._idle.get_nowait()
        return await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, prepare_threshold=0
        )

    async def get(self, *, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            row = await self._read({"id": job_id, "tenant_id": tenant_id})
        if row is None:
            return None
        values = {key: _utc(value) for (_, key), value in zip(COLUMNS, row, strict=True)}
        return Job(**values)  # transient: never added to a session

    async def _read(self, params: dict[str, Any]) -> Any:
        """The row, on an idle connection or a new one. A kept connection that fails (the
        server restarted since) is dropped with every other idle one, and the read is made
        once more on a new connection; a new one that fails raises."""
        import psycopg

        while True:
            reused = not self._idle.empty()
            conn = await self._connection()
            try:
                cursor = await conn.execute(QUERY, params)
                row = await cursor.fetchone()
            except BaseException as exc:
                await _close_quietly(conn)
                if not isinstance(exc, psycopg.OperationalError):
                    raise
                await self.close()
                if not reused:
                    raise
                continue
            self._idle.put_nowait(conn)
            return row

    async def close(self) -> None:
        """Close the idle connections (those in use close when their read fails or ends)."""
        while not self._idle.empty():
            await _close_quietly(self._idle.get_nowait())


async def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):  # a connection that is already broken
        await conn.close()


def _utc(value: Any) -> Any:
    """Timestamps in UTC, as the models' UTCDateTime gives them."""
    return value.astimezone(UTC) if isinstance(value, datetime) else value
