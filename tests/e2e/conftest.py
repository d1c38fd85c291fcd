"""End-to-end fixtures: real servers and real processes (docs/architecture.md §11).

PostgreSQL (the API tests' throwaway database), Redis (a dedicated DB number, flushed), S3 through
moto's threaded server with the real minio client, and Celery workers started as subprocesses
(`python -m celery -A digin.worker.app:app worker`, prefork, concurrency 1), each in its own process
group so that a test can SIGKILL a whole worker. Tests are skipped, with the reason, when
PostgreSQL or Redis is absent. Every wait polls with a deadline; nothing asserts on timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from digin.service import repo
from digin.service.db import Job
from digin.service.dispatch import enqueue
from digin.service.settings import Settings, fresh_settings
from tests.api.conftest import _no_digin_environment, postgresql_url  # noqa: F401 - fixtures
from tests.conftest import worker_redis_url
from tests.worker.helpers import ROOT, ParamsFactory, digits_params, normalised

REDIS_URL = worker_redis_url(
    os.environ.get("DIGIN_TEST_REDIS_E2E_URL", "redis://127.0.0.1:6379/12")
)
WORKER_READY_S = 90.0
JOB_TIMEOUT_S = 180.0


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def flushed_redis(url: str) -> Iterator[str]:
    """A Redis database of the tests' own, emptied before and after (skips without Redis)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.skip(f"Redis not reachable at {url}: {exc}")
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    yield from flushed_redis(REDIS_URL)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    server_module = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def e2e_params() -> ParamsFactory:
    return digits_params


@dataclass
class Service:
    """The settings of one production-mode deployment (Postgres, Redis, S3), as field values
    for `fresh_settings` here and as DIGIN_* variables for the worker processes."""

    values: dict[str, Any]
    logs: Path
    workers: list[Worker] = field(default_factory=list)
    _sessions: Any = None

    @property
    def settings(self) -> Settings:
        return fresh_settings(**self.values)

    @property
    def sessions(self) -> Any:
        if self._sessions is None:
            from digin.service.db import make_engine, session_factory

            self._sessions = session_factory(make_engine(self.settings.database_url))
        return self._sessions

    @property
    def storage(self) -> Any:
        from digin.service.storage import storage_from_settings

        return storage_from_settings(self.settings)

    def close(self) -> None:
        """Stop the workers, empty the tables (as the API tests' `engine` fixture does)."""
        for worker in self.workers:
            worker.stop()
        if self._sessions is not None:
            from sqlalchemy import delete

            from digin.service.db import ApiKey, Batch, Image, Tenant, WebhookDelivery

            with self.sessions.begin() as session:
                for model in (WebhookDelivery, Job, Batch, Image, ApiKey, Tenant):
                    session.execute(delete(model))
            self.sessions.kw["bind"].dispose()

    def celery(self) -> Any:
        from digin.service.dispatch import make_celery

        return make_celery(self.settings, name="e2e-test")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIGIN_")}
        env |= {f"DIGIN_{k.upper()}": str(v) for k, v in self.values.items()}
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env |= {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "DIGIN_DEVICE": "cpu"}
        return env

    def start_worker(self, name: str | None = None) -> Worker:
        name = name or f"w{len(self.workers) + 1}"
        log = self.logs / f"{name}.log"
        argv = [sys.executable, "-m", "celery", "-A", "digin.worker.app:app", "worker",
                "--queues=interactive,sweep", "--concurrency=1", "--pool=prefork",
                "--loglevel=INFO", "--without-gossip", "--without-mingle",
                f"--hostname={name}-{uuid.uuid4().hex[:6]}@%h"]  # fmt: skip
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        worker = Worker(proc, log)
        self.workers.append(worker)
        wait_until(f"worker {name} to be ready ({log})", worker.ready, WORKER_READY_S, 0.2)
        return worker


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return found

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited ({self.proc.returncode}): {self.log.read_text()}")
        return any(line["msg"].endswith(" ready.") for line in self.lines())

    def events(self, job_id: uuid.UUID | str, event: str) -> list[dict[str, Any]]:
        return [
            x for x in self.lines() if x.get("job_id") == str(job_id) and x.get("event") == event
        ]

    def kill(self) -> None:
        """SIGKILL the worker and its pool children (the machine lost power)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def make_service(
    database_url: str, redis_url: str, s3_endpoint: str, folder: Path, **overrides: Any
) -> Service:
    values = {
        "data_dir": folder / "data",
        "database_url": database_url,
        "broker_url": redis_url,
        "storage_url": f"s3://digin-e2e-{uuid.uuid4().hex[:8]}",
        "s3_endpoint": s3_endpoint,
        "s3_access_key": "e2e-access-key",
        "s3_secret_key": "e2e-secret-key-not-a-placeholder",
        "s3_region": "us-east-1",
        "auth": "on",
        # a tiny job takes seconds; the margin is for a machine shared with `pytest -n 2`
        "task_time_limit_seconds": 300,
        "visibility_timeout_seconds": 600,
    } | overrides
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    service = Service(values, logs)
    from digin.service.storage import storage_from_settings

    storage_from_settings(service.settings).ensure_bucket()
    return service


@pytest.fixture(scope="module")
def service(
    postgresql_url: str,  # noqa: F811
    redis_url: str,
    s3_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    """A deployment with one worker subprocess, shared by the tests of a module."""
    service = make_service(postgresql_url, redis_url, s3_endpoint, tmp_path_factory.mktemp("e2e"))
    try:
        yield service
    finally:
        service.close()


# --- jobs ----------------------------------------------------------------------------------------
def submit(service: Service, tenant: str, raw: dict[str, Any], *, messages: int = 1) -> Job:
    """A committed job of `tenant`, then `messages` messages for it (the API sends one)."""
    with service.sessions() as session:
        owner = repo.ensure_tenant(session, name=tenant)
        job, _ = repo.create_job(session, tenant_id=owner.id, kind="guided",
                                 params=normalised("guided", raw), seed=1, priority=0,
                                 queue="interactive", max_attempts=3)  # fmt: skip
        session.commit()
        app = service.celery()
        for _ in range(messages):
            enqueue(app, job_id=str(job.id), queue="interactive")
        repo.mark_enqueued(session, job_id=job.id)
        session.commit()
        app.close()
        return job


def row(service: Service, job_id: uuid.UUID) -> Job:
    with service.sessions() as session:
        return session.get_one(Job, job_id)


def wait_status(service: Service, job_id: uuid.UUID, statuses: tuple[str, ...]) -> Job:
    def check() -> Job | None:
        job = row(service, job_id)
        return job if job.status in statuses else None

    return wait_until(f"job {job_id} to be {statuses}", check, JOB_TIMEOUT_S, 0.05)
