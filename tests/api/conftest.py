"""Fixtures of the API tests: the real PostgreSQL and a SQLite file, both migrated with the
Alembic migrations; tests that take `session` run once on each.

PostgreSQL: a fresh database with a random name, created through the `postgres` database at
DIGIN_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres) and
dropped at the end; the tests that need it are skipped, with the reason, when it is absent.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, delete, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import (
    ApiKey,
    Batch,
    Image,
    Job,
    Tenant,
    WebhookDelivery,
    make_engine,
    migrate,
    session_factory,
)
from tests.conftest import worker_redis_url

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
        for model in (WebhookDelivery, Job, Batch, Image, ApiKey, Tenant):
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


# --- the FastAPI app (tests/api/test_app_*.py) ---------------------------------------------------
REDIS_TEST_URL = worker_redis_url(
    os.environ.get("DIGIN_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
)


@dataclass
class Broker:
    """The broker the app sends to: Redis (a dedicated DB, flushed per test) beside
    PostgreSQL, the filesystem broker in the test's data folder beside SQLite."""

    url: str
    folder: Path | None = None  # filesystem: where the messages are written
    redis: Any = None

    def raw_messages(self, queue: str = "interactive") -> list[bytes]:
        if self.redis is not None:  # kombu keeps priorities > 0 in lists `<queue>\x06\x16<n>`
            keys = [queue.encode(), *sorted(self.redis.keys(f"{queue}\x06\x16*"))]
            return [m for key in keys for m in self.redis.lrange(key, 0, -1)]
        assert self.folder is not None
        return [p.read_bytes() for p in sorted(self.folder.glob(f"*.{queue}.msg"))]

    def job_ids(self, queue: str = "interactive") -> list[str]:
        """The job ids of the `digin.run_job` messages waiting in `queue`."""
        ids = []
        for raw in self.raw_messages(queue):
            message = json.loads(raw)
            assert message["headers"]["task"] == "digin.run_job"
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            ids.append(args[0])
        return ids


@pytest.fixture
def broker(db_url: str, tmp_path: Path) -> Iterator[Broker]:
    if not db_url.startswith("postgresql"):
        yield Broker("filesystem://", folder=tmp_path / "data" / "broker" / "queue")
        return
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.skip(f"Redis not reachable at {REDIS_TEST_URL}: {exc}")
    client.flushdb()
    try:
        yield Broker(REDIS_TEST_URL, redis=client)
    finally:
        client.flushdb()
        client.close()


AppFactory = Callable[..., TestClient]


@pytest.fixture
def make_client(
    engine: Engine, db_url: str, broker: Broker, tmp_path: Path
) -> Iterator[AppFactory]:
    """Builds the app on the test's database and broker (auth on, local storage in the test's
    data folder unless overridden) and returns a started TestClient."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        from digin.api.app import create_app
        from digin.service.settings import fresh_settings

        values = {"data_dir": tmp_path / "data", "database_url": db_url,
                  "broker_url": broker.url, "auth": "on"}  # fmt: skip
        client = TestClient(create_app(fresh_settings(**(values | overrides))))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: AppFactory) -> TestClient:
    return make_client()


@pytest.fixture
def auth(sessions: sessionmaker[Session]) -> Callable[[str], dict[str, str]]:
    """`auth("acme")`: headers with a new API key of tenant acme (created if missing)."""

    def make(tenant_name: str) -> dict[str, str]:
        with sessions() as session:
            _, secret = repo.create_api_key(session, tenant_name=tenant_name)
            session.commit()
        return {"Authorization": f"Bearer {secret}"}

    return make
