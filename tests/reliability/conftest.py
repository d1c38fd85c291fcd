"""Fixtures of the reliability suite: one private Redis, PostgreSQL (migrated) and S3
per test session, on free loopback ports (`tests/reliability/stack.py`); each test makes its own
deployment (bucket, workers, reaper) over them. Skipped, with the reason, where redis-server,
the PostgreSQL binaries or the `postgres` user are missing."""

from __future__ import annotations

import pwd
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import _no_digin_environment  # noqa: F401 - fixture
from tests.reliability.stack import S3, PrivatePostgres, PrivateRedis, postgres_bin


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path_factory.mktemp("redis"))
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    try:
        postgres_bin("initdb")
        pwd.getpwnam("postgres")
    except (FileNotFoundError, KeyError) as exc:
        pytest.skip(f"no PostgreSQL server binaries or postgres user: {exc}")
    from digin.service.db import migrate

    postgres = PrivatePostgres()
    postgres.init()
    try:
        migrate(postgres.url())
        yield postgres
    finally:
        postgres.stop()


@pytest.fixture(scope="session")
def private_s3() -> Iterator[S3]:
    pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
    s3 = S3()
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture
def servers(
    private_redis: PrivateRedis, private_postgres: PrivatePostgres, private_s3: S3, tmp_path: Path
) -> dict:
    """Keyword arguments of `stack.deployment` for this test."""
    return {"redis": private_redis, "postgres": private_postgres, "s3": private_s3,
            "folder": tmp_path / "deployment"}  # fmt: skip
