"""Service benchmark: one API process on PostgreSQL and Redis, measured from outside.

1. Submissions per second: `--submissions` POST /v1/jobs (digits guided jobs) from
   `--concurrency` concurrent keep-alive connections (a lean asyncio HTTP/1.1 client, not
   httpx: see `RawConnection`) through ONE API process (`digin api`: uvicorn with
   `digin.api.app:create_app`, factory=True), the per-tenant queued cap raised above the total.
   Every accepted job is checked in the database and in the broker afterwards.
2. GET /v1/jobs/{id} latency and the API's CPU per GET: one client back to back (the cost of a
   GET without queueing), then `--pollers` concurrent clients poll random jobs of step 1 for
   `--poll-seconds`: back to back (no pause: the API saturated, so latency is mostly waiting in
   line: about pollers / throughput), paced (each client waits the Retry-After the API answers,
   2 s for an unfinished job, as clients are told to), and every X seconds for each X of
   `--poll-intervals` (offered rate pollers / X: where the latency stays low). p50/p95/p99 as
   the clients see them, and the server-side shares under 5-100 ms from the API's own
   Prometheus histogram.
3. Queue-to-start latency: a real Celery worker subprocess (`digin worker -c 1`) on the same
   Redis and PostgreSQL; `--queue-jobs` tiny digits jobs (one guidance iteration) submitted
   through the API one after another, each once the previous one finished; started_at − created_at
   and enqueued_at − created_at from the job rows (one warm-up job first, reported apart: it
   includes the worker's first database connection).

Targets (reported, never asserted): ≥ 300 submissions/s, GET p99 ≤ 50 ms (every polling mode
is reported against it), ≤ 1 ms of API CPU per GET (one client, and saturated). CPU per
request (API process, the live PostgreSQL backends of the bench database, the bench's own
clients) is reported beside every rate: on a shared machine it says more than the rate does.

Everything is set up here and removed at the end: a fresh PostgreSQL database (created through
`--admin-url`, migrated, dropped WITH (FORCE)), a dedicated Redis DB (`--redis-url`, flushed
before and after), local artifact storage in a temporary folder, auth on with an API key made
by `digin.service.repo.create_api_key`.

    python bench/service.py [--submissions 2000] [--concurrency 32] [--pollers 50]
        [--poll-seconds 15] [--queue-jobs 10] [--out bench/results/service.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, delete, func, select, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get(
    "DIGIN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = "redis://127.0.0.1:6379/14"  # the tests use 11-13
TENANT = "bench"
SUBMIT_BODY = {"kind": "guided", "params": {"classes": ["seven"]}}
TINY_BODY = {"kind": "guided", "params": {"classes": ["seven"], "guidance": {"iterations": 1}}}
TARGET_SUBMIT_PER_S = 300.0
TARGET_GET_P99_MS = 50.0
TARGET_GET_CPU_MS = 1.0  # the API's CPU per GET /v1/jobs/{id}


# --- small helpers --------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def latency_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50": round(percentile(ms, 50), 2),
        "p95": round(percentile(ms, 95), 2),
        "p99": round(percentile(ms, 99), 2),
        "max": round(max(ms), 2) if ms else float("nan"),
        "mean": round(statistics.fmean(ms), 2) if ms else float("nan"),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backends_cpu_s(db_name: str) -> dict[int, float]:
    """CPU seconds of the live PostgreSQL backends serving `db_name` (their process title
    names the database), by pid; {} where /proc does not show them."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if db_name.encode() in (entry / "cmdline").read_bytes():
                found[int(entry.name)] = proc_cpu_s(int(entry.name))
        except OSError:
            continue
    return found


class CpuMeter:
    """CPU seconds spent during a phase by the API process, the bench's own clients, and the
    PostgreSQL backends of the bench database (those alive at the end: a backend that exited
    in between is not counted), with the sessions PostgreSQL opened meanwhile."""

    def __init__(self, deployment: Deployment) -> None:
        self.d = deployment
        self.api = proc_cpu_s(deployment.api_pid)
        self.client = time.process_time()
        self.backends = backends_cpu_s(deployment.db_name)
        self.sessions = deployment.pg_sessions()

    def done(self, requests: int) -> dict[str, Any]:
        api = proc_cpu_s(self.d.api_pid) - self.api
        client = time.process_time() - self.client
        now = backends_cpu_s(self.d.db_name)
        pg = sum(cpu - self.backends.get(pid, 0.0) for pid, cpu in now.items())
        per = 1000 / max(requests, 1)
        return {
            "api_cpu_s": round(api, 2),
            "api_cpu_ms_per_request": round(api * per, 3),
            "postgres_backends_cpu_ms_per_request": round(pg * per, 3),
            "client_cpu_ms_per_request": round(client * per, 3),
            "postgres_sessions_opened": self.d.pg_sessions() - self.sessions,
        }


def target(value: float, bar: float, *, at_least: bool) -> dict[str, Any]:
    met = value >= bar if at_least else value <= bar
    return {
        "value": round(value, 2),
        "target": ("≥ " if at_least else "≤ ") + f"{bar:g}",
        "met": met,
    }


def stop_group(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the process (it shuts down cleanly), then SIGKILL its whole group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --- the deployment -------------------------------------------------------------------------------
class Deployment:
    """A throwaway database, Redis DB and data folder; the API and the worker as subprocesses."""

    def __init__(self, admin_url: str, redis_url: str, max_queued: int) -> None:
        import redis

        self.redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
        self.redis.ping()  # before the database is made: nothing to undo if Redis is absent
        self.redis.flushdb()
        self.admin = create_engine(
            admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
        )
        self.db_name = f"digin_bench_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        self.database_url = (
            make_url(admin_url).set(database=self.db_name).render_as_string(hide_password=False)
        )
        self.tmp = Path(tempfile.mkdtemp(prefix="digin-bench-"))
        self.values = {
            "data_dir": self.tmp / "data",
            "database_url": self.database_url,
            "broker_url": redis_url,
            "storage_url": f"file://{self.tmp / 'artifacts'}",
            "auth": "on",
            "max_queued_per_tenant": max_queued,
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.engine: Any = None

    def setup(self) -> str:
        """Migrate, make the tenant's API key; returns the key."""
        from digin.service import repo
        from digin.service.db import make_engine, migrate, session_factory

        migrate(self.database_url)
        self.engine = make_engine(self.database_url)
        self.sessions = session_factory(self.engine)
        with self.sessions() as session:
            _, secret = repo.create_api_key(session, tenant_name=TENANT)
            session.commit()
        return secret

    def pg_sessions(self) -> int:
        """Sessions PostgreSQL has opened on the bench database so far (PostgreSQL 14+)."""
        query = text("SELECT sessions FROM pg_stat_database WHERE datname = :name")
        with self.admin.connect() as conn:
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            return int(conn.scalar(query, {"name": self.db_name}) or 0)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIGIN_")}
        env |= {f"DIGIN_{k.upper()}": str(v) for k, v in self.values.items()}
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env |= {"PYTHONPATH": pythonpath, "DIGIN_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
        return env

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                cwd=self.tmp,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.tmp / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def start_api(self) -> str:
        """`digin api` on a free loopback port (the cwd is the temp folder: no .env is read)."""
        port = free_port()
        argv = [sys.executable, "-m", "digin", "api", "--host", "127.0.0.1", "--port", str(port)]
        proc = self.spawn("api", argv)
        self.api_pid = proc.pid
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the API exited ({proc.returncode}):\n{self.log_tail('api')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    return base
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start in 60 s:\n{self.log_tail('api')}")
            time.sleep(0.2)

    def start_worker(self) -> subprocess.Popen[bytes]:
        """`digin worker -c 1` (prefork, one process) on the interactive queue; waits for its
        "ready." log line."""
        name = f"bench-{uuid.uuid4().hex[:6]}@%h"
        argv = [
            sys.executable,
            "-m",
            "digin",
            "worker",
            "-c",
            "1",
            "-Q",
            "interactive",
            "--hostname",
            name,
        ]
        proc = self.spawn("worker", argv)
        deadline = time.monotonic() + 120
        log = self.tmp / "worker.log"
        while not re.search(r'"msg": "[^"]* ready\."', log.read_text(errors="replace")):
            if proc.poll() is not None:
                tail = self.log_tail("worker")
                raise RuntimeError(f"the worker exited ({proc.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker was not ready in 120 s:\n{self.log_tail('worker')}")
            time.sleep(0.2)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                stop_group(proc)
        if self.engine is not None:
            self.engine.dispose()
        with contextlib.suppress(Exception):
            self.redis.flushdb()
        self.redis.close()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        self.admin.dispose()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- a lean HTTP/1.1 client ---------------------------------------------------------------------
class RawResponse:
    def __init__(self, status_code: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.body = status_code, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """One keep-alive HTTP/1.1 connection driven by asyncio streams, a request at a time, like
    `wrk`: tens of microseconds of client CPU per request where httpx spends milliseconds, so
    that on a 2-core machine the clients do not take the CPU the API is measured on. Only what
    the API answers is understood: Content-Length bodies (no chunked encoding)."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        url = httpx.URL(base)
        self.host, self.port = url.host, url.port or 80
        self.fixed = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> RawResponse:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.fixed}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        data = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return RawResponse(int(status_line.split()[1]), headers, data)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def request(
    conn: RawConnection,
    method: str,
    path: str,
    latencies: list[float],
    statuses: Counter[str],
    body: bytes | None = None,
) -> RawResponse | None:
    """One request: its latency recorded and its status counted ("202"), or a transport
    error counted by name ("ConnectionResetError") with no latency; None then."""
    start = time.perf_counter()
    try:
        response = await conn.request(method, path, body)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        statuses[type(exc).__name__] += 1
        await conn.close()
        return None
    latencies.append(time.perf_counter() - start)
    statuses[str(response.status_code)] += 1
    return response


# --- 1. submissions -------------------------------------------------------------------------------
async def submit_many(
    base: str, headers: dict[str, str], total: int, concurrency: int
) -> tuple[float, list[float], Counter[str], list[str]]:
    """`total` POST /v1/jobs from `concurrency` clients (a keep-alive connection each);
    (seconds, latencies, statuses, ids)."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    ids: list[str] = []
    remaining = iter(range(total))
    body = json.dumps(SUBMIT_BODY).encode()
    conns = [RawConnection(base, headers) for _ in range(concurrency)]

    async def one_client(conn: RawConnection) -> None:
        for _ in remaining:
            response = await request(conn, "POST", "/v1/jobs", latencies, statuses, body)
            if response is not None and response.status_code == 202:
                ids.append(response.json()["id"])

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in conns))
    elapsed = time.perf_counter() - start
    for conn in conns:
        await conn.close()
    return elapsed, latencies, statuses, ids


# --- 2. polling -----------------------------------------------------------------------------------
async def poll_many(
    base: str,
    headers: dict[str, str],
    ids: list[str],
    pollers: int,
    seconds: float,
    pause: float | str | None,
) -> tuple[float, list[float], Counter[str]]:
    """`pollers` clients GET random jobs of `ids` for `seconds`: back to back (`pause` None),
    paced by the Retry-After the API answered (`pause` "retry-after", as clients are told to),
    or every `pause` seconds (an offered rate of pollers / pause); starts spread over the
    first interval."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def one_poller(rng: random.Random) -> None:
        conn = RawConnection(base, headers)
        if pause is not None:
            await asyncio.sleep(rng.uniform(0, 2 if isinstance(pause, str) else pause))
        while time.perf_counter() < deadline:
            path = f"/v1/jobs/{rng.choice(ids)}"
            sent = time.perf_counter()
            response = await request(conn, "GET", path, latencies, statuses)
            if pause is None:
                continue
            if isinstance(pause, str):
                retry_after = None if response is None else response.headers.get("retry-after")
                wait = float(retry_after or 2)
            else:  # a fixed period from one request's start to the next
                wait = pause - (time.perf_counter() - sent)
            await asyncio.sleep(max(0.0, min(wait, deadline - time.perf_counter())))
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_poller(random.Random(i)) for i in range(pollers)))
    elapsed = time.perf_counter() - start
    return elapsed, latencies, statuses


_BUCKET = re.compile(
    r'^digin_http_request_duration_seconds_bucket\{le="([^"]+)",method="GET",'
    r'route="/v1/jobs/\{job_id\}"\} ([0-9.e+]+)$'
)


def server_histogram(base: str, headers: dict[str, str]) -> dict[str, float]:
    """The API's own latency histogram of GET /v1/jobs/{id}: {le: cumulative count}."""
    body = httpx.get(f"{base}/metrics", headers=headers, timeout=30).text
    found = {}
    for line in body.splitlines():
        match = _BUCKET.match(line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    counts = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total = counts.get("+Inf", 0.0)
    if not total:
        return {"requests": 0}
    share = {
        f"le_{float(le) * 1000:g}ms": round(n / total, 4)
        for le, n in counts.items()
        if le != "+Inf" and float(le) <= 0.1
    }
    return {"requests": int(total), "share_within": share}


# --- 3. queue to start ----------------------------------------------------------------------------
def run_sequential(
    deployment: Deployment, base: str, headers: dict[str, str], n: int
) -> list[dict[str, Any]]:
    """Submit `n` tiny jobs through the API, each once the previous one is finished; the
    timestamps of their rows."""
    from digin.service.db import TERMINAL, Job

    rows = []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for _ in range(n):
            response = client.post("/v1/jobs", json=TINY_BODY)
            response.raise_for_status()
            job_id = uuid.UUID(response.json()["id"])
            deadline = time.monotonic() + 300
            while True:
                with deployment.sessions() as session:
                    job = session.get_one(Job, job_id)
                if job.status in TERMINAL:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job_id} not finished in 300 s ({job.status})")
                time.sleep(0.02)

            def since_created(at: Any, job: Job = job) -> float | None:
                return None if at is None else (at - job.created_at).total_seconds()

            rows.append(
                {
                    "id": str(job_id),
                    "status": job.status,
                    "enqueued_s": since_created(job.enqueued_at),
                    "started_s": since_created(job.started_at),
                    "run_s": (job.finished_at - job.started_at).total_seconds()
                    if job.finished_at and job.started_at
                    else None,
                }
            )
    return rows


def summary_s(values: list[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    if not present:
        return {"n": 0}
    return {
        "n": len(present),
        "p50_ms": round(statistics.median(present) * 1000, 2),
        "max_ms": round(max(present) * 1000, 2),
    }


# --- main -----------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "uvicorn": version("uvicorn"),
        "fastapi": version("fastapi"),
        "sqlalchemy": version("sqlalchemy"),
        "psycopg": version("psycopg"),
        "celery": version("celery"),
        "httpx": version("httpx"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--submissions", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100, help="submissions before the timed ones")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent submitting clients")
    p.add_argument("--pollers", type=int, default=50)
    p.add_argument("--poll-seconds", type=float, default=15.0)
    p.add_argument(
        "--poll-intervals",
        type=float,
        nargs="*",
        default=[0.5, 0.25],
        help="also poll every X seconds per poller (offered rate pollers / X)",
    )
    p.add_argument("--queue-jobs", type=int, default=10, help="0 skips the worker part")
    p.add_argument("--admin-url", default=ADMIN_URL, help="PostgreSQL database to create from")
    p.add_argument("--redis-url", default=REDIS_URL, help="a Redis DB of its own (flushed)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service.json")
    args = p.parse_args()

    results: dict[str, Any] = {"machine": machine() | {"loadavg_before": loadavg()}}
    results["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "admin_url")}
    results["config"] |= {
        "api": "digin api --host 127.0.0.1 --port <free> (uvicorn, digin.api.app:create_app, "
        "factory=True, one process, its defaults: access log on, uvloop, httptools)",
        "worker": "digin worker -c 1 -Q interactive (prefork, DIGIN_DEVICE=cpu)",
        "storage": "local (temporary folder)",
        "auth": "on (a key from digin.service.repo.create_api_key)",
        "submit_body": SUBMIT_BODY,
    }
    total = args.warmup + args.submissions
    deployment = Deployment(args.admin_url, args.redis_url, max_queued=10 * total + 1000)
    try:
        secret = deployment.setup()
        with deployment.engine.connect() as conn:
            results["machine"]["postgresql"] = conn.scalar(text("SHOW server_version"))
        results["machine"]["redis"] = deployment.redis.info("server")["redis_version"]
        headers = {"Authorization": f"Bearer {secret}"}
        base = deployment.start_api()
        print(f"API (pid {deployment.api_pid}) at {base}; database {deployment.db_name}")

        # 1. submissions
        asyncio.run(submit_many(base, headers, args.warmup, min(args.concurrency, args.warmup)))
        load_1 = loadavg()
        meter = CpuMeter(deployment)
        elapsed, lat, statuses, ids = asyncio.run(
            submit_many(base, headers, args.submissions, args.concurrency)
        )
        cpu = meter.done(args.submissions)
        rate = statuses["202"] / elapsed
        from digin.service.db import Job

        with deployment.sessions() as session:
            rows = session.scalar(select(func.count()).select_from(Job))
            enqueued = session.scalar(
                select(func.count()).select_from(Job).where(Job.enqueued_at.is_not(None))
            )
        messages = deployment.redis.llen("interactive")
        results["submit"] = {
            "requests": args.submissions,
            "concurrency": args.concurrency,
            "seconds": round(elapsed, 3),
            "per_second": round(rate, 1),
            "statuses": dict(sorted(statuses.items())),
            "latency_ms": latency_ms(lat),
            "cpu": cpu,
            "check": {
                "job_rows": rows,
                "rows_enqueued": enqueued,
                "broker_messages": messages,
                "expected": total,
            },
            "loadavg_at_start": load_1,
        }
        print(
            f"1. submissions: {statuses['202']}/{args.submissions} accepted in {elapsed:.2f} s "
            f"= {rate:.0f}/s ({args.concurrency} clients); latency ms "
            f"{results['submit']['latency_ms']}; rows {rows}, enqueued {enqueued}, "
            f"broker messages {messages} (expected {total}); CPU {cpu}"
        )

        # 2. polling: one client back to back (the API's CPU per GET with no queueing), many
        #    back to back (the API saturated), paced by Retry-After, fixed periods
        modes: dict[str, float | str | None] = {
            "one_client": None, "back_to_back": None, "paced": "retry-after",
        }  # fmt: skip
        modes |= {f"every_{x:g}s": x for x in args.poll_intervals}
        for mode, pause in modes.items():
            pollers = 1 if mode == "one_client" else args.pollers
            before = server_histogram(base, headers)
            load_2 = loadavg()
            meter = CpuMeter(deployment)
            elapsed, lat, statuses = asyncio.run(
                poll_many(base, headers, ids, pollers, args.poll_seconds, pause)
            )
            cpu = meter.done(len(lat))
            after = server_histogram(base, headers)
            poll = results.setdefault("poll", {})[mode] = {
                "pollers": pollers,
                "pause_s": pause,
                "seconds": round(elapsed, 3),
                "requests": sum(statuses.values()),
                "answered_per_second": round(len(lat) / elapsed, 1),
                "statuses": dict(sorted(statuses.items())),
                "latency_ms": latency_ms(lat),
                "cpu": cpu,
                "server_side": server_side(before, after),
                "loadavg_at_start": load_2,
            }
            print(
                f"2. GET /v1/jobs/{{id}} {mode}: {len(lat)} in {elapsed:.1f} s = "
                f"{poll['answered_per_second']:.0f}/s ({pollers} pollers); latency ms "
                f"{poll['latency_ms']}; server-side {poll['server_side']}; CPU {cpu}"
            )

        # 3. queue to start, on an otherwise empty queue
        if args.queue_jobs > 0:
            deployment.redis.flushdb()
            with deployment.sessions.begin() as session:
                session.execute(delete(Job))
            deployment.start_worker()
            load_3 = loadavg()
            first = run_sequential(deployment, base, headers, 1)
            timed = run_sequential(deployment, base, headers, args.queue_jobs)
            results["queue_to_start"] = {
                "jobs": args.queue_jobs,
                "params": TINY_BODY,
                "statuses": dict(Counter(r["status"] for r in timed)),
                "started_minus_created": summary_s([r["started_s"] for r in timed]),
                "enqueued_minus_created": summary_s([r["enqueued_s"] for r in timed]),
                "enqueued_at_missing": sum(r["enqueued_s"] is None for r in timed),
                "run": summary_s([r["run_s"] for r in timed]),
                "first_job": first[0],
                "jobs_detail": timed,
                "loadavg_at_start": load_3,
            }
            q = results["queue_to_start"]
            print(
                f"3. queue to start ({args.queue_jobs} jobs, one at a time): started − created "
                f"{q['started_minus_created']}, enqueued − created "
                f"{q['enqueued_minus_created']}, run {q['run']}; statuses {q['statuses']}; "
                f"first job after worker start {first[0]}"
            )
    except BaseException:
        for name in ("api", "worker"):
            if (deployment.tmp / f"{name}.log").exists():
                print(f"--- {name}.log (tail)\n{deployment.log_tail(name)}", file=sys.stderr)
        raise
    finally:
        deployment.close()

    results["machine"]["loadavg_after"] = loadavg()
    results["targets"] = {
        "submissions_per_s": target(
            results["submit"]["per_second"], TARGET_SUBMIT_PER_S, at_least=True
        ),
        **{
            f"get_api_cpu_ms_{mode}": target(
                results["poll"][mode]["cpu"]["api_cpu_ms_per_request"],
                TARGET_GET_CPU_MS,
                at_least=False,
            )  # fmt: skip
            for mode in ("one_client", "back_to_back")
        },
        **{
            f"get_p99_ms_{mode}": target(
                poll["latency_ms"]["p99"], TARGET_GET_P99_MS, at_least=False
            )
            for mode, poll in results["poll"].items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    print(
        f"\nmachine: {m['cores']} cores, load average {m['loadavg_before']} before, "
        f"{m['loadavg_after']} after; python {m['python']}, uvicorn {m['uvicorn']}"
    )
    for name, t in results["targets"].items():
        print(
            f"target {name}: {t['value']} (target {t['target']}): {'met' if t['met'] else 'MISSED'}"
        )
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
