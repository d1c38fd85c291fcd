"""Fixtures of the API tests: the real PostgreSQL and a SQLite file, both migrated with the
Alembic migrations; tests that take `session` run once on each.

PostgreSQL: a fresh database with a random name, created through the `postgres` database at
DIGIN_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres) and
dropped at the end; the tests that need it are skipped, with the reason, when it is absent.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, delete, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from api import repo
from api.db import ApiKey, Image, Job, Tenant, make_engine, migrate, session_factory

POSTGRES_ADMIN_URL = os.environ.get(
    "DIGIN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(autouse=True)
def _no_digin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's DIGIN_* variables do not leak into the settings the tests build."""
    for name in list(os.environ):
        if name.startswith("DIGIN_") and name != "DIGIN_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    admin = create_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    name = f"digin_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # no server here: skip, saying why
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        migrate(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'digin.db'}"
    migrate(url)
    return url


@pytest.fixture(scope="session", params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture(scope="session")
def _engines() -> Iterator[dict[str, Engine]]:
    engines: dict[str, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.dispose()


@pytest.fixture
def engine(db_url: str, _engines: dict[str, Engine]) -> Iterator[Engine]:
    """The migrated database's engine; its tables are emptied after each test."""
    if db_url not in _engines:
        _engines[db_url] = make_engine(db_url)
    engine = _engines[db_url]
    yield engine
    with engine.begin() as conn:
        for model in (Job, Image, ApiKey, Tenant):
            conn.execute(delete(model))


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session:
        yield session


@pytest.fixture
def tenant(session: Session) -> Tenant:
    tenant = repo.ensure_tenant(session, name="acme")
    session.commit()
    return tenant
