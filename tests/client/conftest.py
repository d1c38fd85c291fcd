"""Fixtures of the client tests: the real API served by uvicorn in a thread on a free loopback
port, over real databases and brokers; no part of the server is mocked.

- `lite`: SQLite, the filesystem broker (no worker reads it: jobs stay queued), local storage,
  auth on. For everything that needs no worker: errors, lists, cancel, uploads, the CLI.
- `full`: PostgreSQL, Redis (its own database number, DIGIN_TEST_REDIS_CLIENT_URL, default
  redis://127.0.0.1:6379/15), S3 through moto's server with presigned URLs, and one real Celery
  worker subprocess running the digits zoo. For waiting and downloading.
Both are skipped, with the reason, where their servers are absent.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from digin.service.settings import Settings, fresh_settings
from tests.api.conftest import _no_digin_environment, postgresql_url  # noqa: F401 - fixtures
from tests.conftest import worker_redis_url
from tests.e2e.conftest import (  # noqa: F401
    Service,
    flushed_redis,
    make_service,
    s3_endpoint,
    wait_until,
)

REDIS_URL = worker_redis_url(
    os.environ.get("DIGIN_TEST_REDIS_CLIENT_URL", "redis://127.0.0.1:6379/15")
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveAPI:
    """One running API: its URL and settings; `key(tenant)` makes an API key."""

    url: str
    settings: Settings

    def key(self, tenant: str = "acme") -> str:
        from digin.service import repo
        from digin.service.db import make_engine, session_factory

        engine = make_engine(self.settings.database_url)
        try:
            with session_factory(engine)() as session:
                _, secret = repo.create_api_key(session, tenant_name=tenant)
                session.commit()
        finally:
            engine.dispose()
        return secret


def serve(settings: Settings, port: int | None = None) -> Iterator[LiveAPI]:
    """The app of `settings` served by uvicorn in a daemon thread until the generator closes."""
    import uvicorn

    from digin.api.app import create_app

    port = port or free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        wait_until("uvicorn to start", lambda: server.started or not thread.is_alive(), 30, 0.02)
        assert thread.is_alive(), "uvicorn exited at start (see the log above)"
        yield LiveAPI(f"http://127.0.0.1:{port}", settings)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


running = contextlib.contextmanager(serve)  # `with running(settings) as live:`


def lite_settings(folder: Path, **overrides: Any) -> Settings:
    from digin.service.db import migrate

    url = f"sqlite:///{folder / 'digin.db'}"
    if not (folder / "digin.db").exists():
        folder.mkdir(parents=True, exist_ok=True)
        migrate(url)
    values = {"data_dir": folder / "data", "database_url": url, "auth": "on"}
    return fresh_settings(**(values | overrides))


@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-lite")


@pytest.fixture(scope="module")
def lite(lite_dir: Path) -> Iterator[LiveAPI]:
    """SQLite + filesystem broker + local storage, auth on; no worker."""
    yield from serve(lite_settings(lite_dir))


@pytest.fixture(scope="module")
def redis_client_url() -> Iterator[str]:
    yield from flushed_redis(REDIS_URL)


@pytest.fixture(scope="module")
def full(
    postgresql_url: str,  # noqa: F811
    redis_client_url: str,
    s3_endpoint: str,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveAPI]:
    """PostgreSQL + Redis + S3 (moto) and one real worker subprocess."""
    service: Service = make_service(
        postgresql_url, redis_client_url, s3_endpoint, tmp_path_factory.mktemp("client-full")
    )
    try:
        started = time.monotonic()
        service.start_worker()
        print(f"worker ready after {time.monotonic() - started:.1f} s")
        yield from serve(service.settings)
    finally:
        service.close()
