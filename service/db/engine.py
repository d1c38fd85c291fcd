"""Engines, sessions and migrations.

SQLite (embedded mode) is shared by several processes (API, worker, CLI): every connection uses
WAL (readers never block the writer), a 30 s busy timeout (a writer waits for the other instead
of failing with "database is locked") and enforced foreign keys. pysqlite's own transaction
handling is kept: a transaction begins at the first write, so a read never holds a snapshot
that a later write in the same transaction would have to upgrade (SQLITE_BUSY_SNAPSHOT); the
repository makes every check-then-write atomic with conditional UPDATEs and a tenant-row lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; no fsync per commit
    cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url` (sqlite:///<file> or postgresql+psycopg://…). Create it in the
    process that uses it (after a fork, a worker makes its own)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError(f"{url!r}: use a SQLite file, shared by the API and the workers")
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded rows readable after commit (the API serialises them)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on an exception."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str) -> Any:
    """Alembic's Config for `url`, pointing at the project's `migrations/` folder."""
    from alembic.config import Config

    if not (MIGRATIONS / "env.py").is_file():
        raise FileNotFoundError(
            f"no Alembic migrations at {MIGRATIONS}: run from a source "
            "checkout (the migrations ship beside the api package)"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at `url` to `revision` (`digin migrate`; the API image runs it
    before start). Idempotent: an up-to-date database is left as it is."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
