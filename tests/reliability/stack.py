"""Private servers for fault injection: a Redis, a PostgreSQL and an S3 of their own,
on free loopback ports, started and stopped by process id. The machine's shared PostgreSQL
(5432) and Redis (6379) are never touched.

- `PrivateRedis`: `redis-server --save ''` (nothing on disk: a restart loses every message, the
  worst case for the broker);
- `PrivatePostgres`: `initdb` into a temporary folder (as the `postgres` user: initdb refuses
  root), `postgres` on a free port; `crash()` is an immediate shutdown (SIGQUIT: backends end
  without a checkpoint, recovery at the next start), `start()` brings it back on the same port;
- `S3`: moto's threaded server behind `TcpProxy`, a loopback TCP proxy that `down()` makes
  refuse connections (and cuts open ones) while moto keeps its buckets, and `up()` reopens.

Also used by `bench/soak.py`. Every wait polls with a deadline; nothing asserts on timings.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
READY_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


# --- Redis ---------------------------------------------------------------------------------------
class PrivateRedis:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.folder)]  # fmt: skip
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(f"redis on port {self.port}", self.ping, READY_S)

    def ping(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def crash(self) -> None:
        """SIGKILL: every queued and unacknowledged message is gone (nothing on disk)."""
        _stop(self.proc, signal.SIGKILL)

    def restart(self) -> None:
        self.crash()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)


# --- PostgreSQL ----------------------------------------------------------------------------------
def postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"no {name} under /usr/lib/postgresql/*/bin")
    return found[-1]


class PrivatePostgres:
    """A throwaway cluster owned by the `postgres` user, trust auth on loopback."""

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="digin-pg-"))  # /tmp: reachable by postgres
        self.data = self.folder / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = pwd.getpwnam("postgres")
        self.restarts = 0

    def url(self, database: str = "digin") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _as_postgres(self) -> dict[str, Any]:
        return {"user": self.user.pw_uid, "group": self.user.pw_gid} if os.getuid() == 0 else {}

    def init(self) -> None:
        if os.getuid() == 0:
            os.chown(self.folder, self.user.pw_uid, self.user.pw_gid)
        subprocess.run(
            [postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
             "--no-sync", "-E", "UTF8", "--no-instructions"],
            check=True, capture_output=True, **self._as_postgres(),
        )  # fmt: skip
        self.start()
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text('CREATE DATABASE "digin"'))
        admin.dispose()

    def start(self) -> None:
        log = open(self.folder / "postgres.log", "ab")  # noqa: SIM115 - owned by the process
        argv = [postgres_bin("postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-k", str(self.folder),
                "-c", "fsync=off", "-c", "full_page_writes=off"]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, **self._as_postgres()
        )
        wait_until(f"postgres on port {self.port}", self.ready, READY_S, 0.2)

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.folder / "postgres.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"postgres exited ({self.proc.returncode}): {log}")
        result = subprocess.run(
            [postgres_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"],
            capture_output=True,
        )
        return result.returncode == 0

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT to the postmaster): connections drop mid-transaction."""
        _stop(self.proc, signal.SIGQUIT)

    def restart(self) -> None:
        self.crash()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # fast shutdown
        shutil.rmtree(self.folder, ignore_errors=True)


# --- S3 behind a proxy that can be cut -----------------------------------------------------------
class TcpProxy:
    """127.0.0.1:port → target; `down()` closes the listener and every open connection
    (clients get 'connection refused'), `up()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.outages = 0

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            self.outages += 1
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns -= {source, sink}


class S3:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.proxy = TcpProxy(self.server.get_host_and_port())
        self.proxy.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    def stop(self) -> None:
        self.proxy.down()
        self.server.stop()


# --- the deployment: settings, workers, a reaper, jobs --------------------------------------------
@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    found.append(json.loads(line))
        return found

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited: {self.log.read_text()[-3000:]}")
        return any(str(x.get("msg", "")).endswith(" ready.") for x in self.lines())

    def kill(self) -> None:
        """SIGKILL the worker and its pool children (a machine that lost power)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
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


@dataclass
class Deployment:
    """Settings (as `fresh_settings` values and as DIGIN_* variables) over the private servers,
    with the workers and the reaper thread it started."""

    values: dict[str, Any]
    folder: Path
    workers: list[Worker] = field(default_factory=list)
    _sessions: Any = None
    _reaper: tuple[threading.Thread, threading.Event, Any] | None = None

    @property
    def settings(self) -> Any:
        from digin.service.settings import fresh_settings

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

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIGIN_")}
        env |= {f"DIGIN_{k.upper()}": str(v) for k, v in self.values.items()}
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env |= {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "DIGIN_DEVICE": "cpu"}
        return env | extra

    def start_worker(
        self, name: str, *, concurrency: int = 1, wait: bool = True, **env: str
    ) -> Worker:
        log = self.folder / f"{name}.log"
        argv = [sys.executable, "-m", "celery", "-A", "digin.worker.app:app", "worker",
                "--queues=interactive,sweep", f"--concurrency={concurrency}", "--pool=prefork",
                "--loglevel=INFO", "--without-gossip", "--without-mingle",
                f"--hostname={name}-{uuid.uuid4().hex[:6]}@%h"]  # fmt: skip
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env(**env), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        worker = Worker(name, proc, log)
        self.workers.append(worker)
        if wait:
            wait_until(f"worker {name} to be ready ({log})", worker.ready, 120.0, 0.2)
        return worker

    def start_reaper(self, interval: float = 1.0) -> None:
        from digin.service.dispatch import make_celery
        from digin.worker.reaper import run_reaper
        from digin.worker.tasks import celery_enqueuer

        app = make_celery(self.settings, name="reliability-reaper")
        stop = threading.Event()
        thread = threading.Thread(
            target=run_reaper,
            kwargs={"sessions": self.sessions, "settings": self.settings,
                    "enqueue": celery_enqueuer(app), "stop": stop, "interval": interval},
            daemon=True,
        )  # fmt: skip
        thread.start()
        self._reaper = (thread, stop, app)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self._reaper is not None:
            thread, stop, app = self._reaper
            stop.set()
            thread.join(timeout=30)
            app.close()
        if self._sessions is not None:
            self._sessions.kw["bind"].dispose()

    # --- jobs -----------------------------------------------------------------------------------
    def submit(self, tenant: str, raw: dict[str, Any], *, max_attempts: int = 3) -> uuid.UUID:
        """A committed job, then its message (as the API does)."""
        from digin.service import repo
        from digin.service.dispatch import enqueue, make_celery
        from tests.worker.helpers import normalised

        with self.sessions() as session:
            owner = repo.ensure_tenant(session, name=tenant)
            job, _ = repo.create_job(session, tenant_id=owner.id, kind="guided",
                                     params=normalised("guided", raw), seed=1, priority=0,
                                     queue="interactive", max_attempts=max_attempts)  # fmt: skip
            session.commit()
            app = make_celery(self.settings, name="reliability-submit")
            try:
                enqueue(app, job_id=str(job.id), queue="interactive")
            finally:
                app.close()
            repo.mark_enqueued(session, job_id=job.id)
            session.commit()
            return job.id

    def rows(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
        from sqlalchemy import select

        from digin.service.db import Job

        with self.sessions() as session:
            return {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}

    def wait_terminal(self, ids: list[uuid.UUID], timeout: float) -> dict[uuid.UUID, Any]:
        from digin.service.db import TERMINAL

        def check() -> dict[uuid.UUID, Any] | None:
            try:
                rows = self.rows(ids)
            except Exception:  # the database may be the fault under test
                return None
            return rows if all(r.status in TERMINAL for r in rows.values()) else None

        return wait_until(f"{len(ids)} jobs to finish", check, timeout, 0.25)

    def succeeded_events(self) -> dict[str, int]:
        """How often each job id was logged `succeeded` by any worker (a duplicate run to
        success would show as 2)."""
        counts: dict[str, int] = {}
        for worker in self.workers:
            for line in worker.lines():
                if line.get("event") == "succeeded" and "job_id" in line:
                    counts[line["job_id"]] = counts.get(line["job_id"], 0) + 1
        return counts


@contextlib.contextmanager
def deployment(
    *, redis: PrivateRedis, postgres: PrivatePostgres, s3: S3, folder: Path, **overrides: Any
) -> Iterator[Deployment]:
    """Settings over the private servers with the shortest recovery thresholds the settings
    allow, a fresh bucket, and clean tables afterwards."""
    values = {
        "data_dir": folder / "data",
        "database_url": postgres.url(),
        "broker_url": redis.url,
        "storage_url": f"s3://digin-rel-{uuid.uuid4().hex[:8]}",
        "s3_endpoint": s3.endpoint,
        "s3_access_key": "reliability-access-key",
        "s3_secret_key": "reliability-secret-key-not-a-placeholder",
        "auth": "on",
        "heartbeat_stale_seconds": 10,
        "queued_stale_seconds": 10,
        # a tiny job takes seconds; the margin is for a machine shared with `pytest -n 2`
        "task_time_limit_seconds": 300,
        "visibility_timeout_seconds": 600,
    } | overrides
    folder.mkdir(parents=True, exist_ok=True)
    dep = Deployment(values, folder)
    dep.storage.ensure_bucket()
    try:
        yield dep
    finally:
        dep.close()
        from sqlalchemy import text

        from digin.service.db import make_engine

        engine = make_engine(postgres.url())
        with contextlib.suppress(Exception), engine.begin() as conn:
            conn.execute(text("TRUNCATE jobs, images, api_keys, tenants CASCADE"))
        engine.dispose()
        import redis as redis_lib

        with contextlib.suppress(redis_lib.RedisError):
            redis_lib.Redis.from_url(redis.url).flushall()
