"""Sweep benchmark: accepting a large batch, streaming its results index, and batched
versus one-by-one execution of sweep items. Figures are printed and written as JSON; nothing is
asserted (the machine is shared: the load average is recorded beside every figure).

1. Accept: `POST /v1/batches` of `--items` items (every ImageNet class x 5 registry classifiers
   x 10 seeds over a Stable Diffusion template: validated, inserted, enqueued) through ONE API
   process (uvicorn, `digin.api.app:create_app`) on a throwaway PostgreSQL database and a Redis DB,
   timed from the client; then the same items as an explicit `items` list. Afterwards the rows
   and the broker messages are counted. The phases (plan, insert, send) are also timed in
   process on a second batch of the same size.
2. Results index: `GET /v1/batches/{id}/results` (JSON lines and CSV) of that batch, its items
   first marked succeeded with a typical result (summary + 4 artifacts), lines per second.
3. Execution: `--exec-items` digits-zoo sweep items (guided, zoo settings, `--iterations`)
   through the worker's task (`digin.worker.runner.execute_job`: claim, optimise, render, upload,
   finish) on a throwaway SQLite database and local storage, with DIGIN_BATCH_MAX_ITEMS=1 (one
   by one) and =8 (batched runs of compatible items), torch on one thread.

    python bench/batches.py [--items 50000] [--exec-items 16] [--iterations 10]
        [--out bench/results/batches.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get(
    "DIGIN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = "redis://127.0.0.1:6379/15"  # the tests use 11-13, bench/service.py 14
CLASSIFIERS = [
    "timm:resnet50.a1_in1k",
    "timm:vit_large_patch16_224",
    "timm:seresnet152d.ra2_in1k",
    "timm:convnext_base.fb_in22k_ft_in1k",
    "open_clip:ViT-B-16/laion2b_s34b_b88k",
]
TEMPLATE = {"diffusion": "diffusers:CompVis/stable-diffusion-v1-4"}
TARGET_ACCEPT_S = 10.0


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def axes_body(items: int) -> dict[str, Any]:
    seeds = max(1, items // (1000 * len(CLASSIFIERS)))
    return {
        "kind": "guided",
        "params_template": TEMPLATE,
        "classes": "all",
        "classifiers": CLASSIFIERS,
        "seeds": list(range(seeds)),
    }


def items_body(items: int) -> dict[str, Any]:
    rows = [
        {
            "custom_id": f"item-{i}",
            "seed": i // 5000,
            "params": {"classes": [i % 1000], "classifier": CLASSIFIERS[(i // 1000) % 5]},
        }
        for i in range(items)
    ]
    return {"kind": "guided", "params_template": TEMPLATE, "items": rows}


class Deployment:
    """A throwaway PostgreSQL database, a flushed Redis DB, local storage, one API process."""

    def __init__(self) -> None:
        import redis

        self.redis = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        self.redis.ping()
        self.redis.flushdb()
        self.admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.db_name = f"digin_bench_batches_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        self.url = make_url(ADMIN_URL).set(database=self.db_name).render_as_string(False)
        self.folder = Path(tempfile.mkdtemp(prefix="digin-bench-batches-"))
        self.values = {
            "data_dir": str(self.folder / "data"),
            "database_url": self.url,
            "broker_url": REDIS_URL,
            "storage_url": f"file://{self.folder / 'art'}",
            "auth": "on",
            "max_body_bytes": 64 * 2**20,
        }
        self.api: subprocess.Popen[bytes] | None = None

    def settings(self) -> Any:
        from digin.service.settings import fresh_settings

        return fresh_settings(**self.values)

    def setup(self) -> dict[str, str]:
        from digin.service import repo
        from digin.service.db import make_engine, migrate, session_factory

        migrate(self.url)
        self.sessions = session_factory(make_engine(self.url))
        with self.sessions() as session:
            _, secret = repo.create_api_key(session, tenant_name="bench")
            session.commit()
        return {"Authorization": f"Bearer {secret}"}

    def start_api(self) -> str:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIGIN_")}
        env |= {f"DIGIN_{k.upper()}": str(v) for k, v in self.values.items()}
        env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.log = self.folder / "api.log"
        with self.log.open("wb") as out:
            self.api = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "digin.api.app:create_app",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    return base
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"the API did not start: {self.log.read_text()[-2000:]}")

    def messages(self) -> int:
        return sum(int(self.redis.llen(k)) for k in self.redis.keys("sweep*"))

    def close(self) -> None:
        if self.api is not None and self.api.poll() is None:
            os.killpg(self.api.pid, signal.SIGTERM)
            self.api.wait(timeout=30)
        if hasattr(self, "sessions"):
            self.sessions.kw["bind"].dispose()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        self.admin.dispose()
        self.redis.flushdb()
        self.redis.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def accept(dep: Deployment, base: str, headers: dict[str, str], body: dict[str, Any]) -> dict:
    from digin.service.db import Job

    data = json.dumps(body).encode()
    before = dep.messages()
    load = loadavg()
    started = time.perf_counter()
    response = httpx.post(
        f"{base}/v1/batches",
        content=data,
        timeout=300,
        headers={**headers, "content-type": "application/json"},
    )
    seconds = time.perf_counter() - started
    if response.status_code != 202:
        raise RuntimeError(f"{response.status_code}: {response.text[:2000]}")
    batch = response.json()
    with dep.sessions() as session:
        rows = session.scalar(
            select(func.count()).select_from(Job).where(Job.batch_id == uuid.UUID(batch["id"]))
        )
    return {
        "batch_id": batch["id"],
        "items": batch["total"],
        "request_bytes": len(data),
        "seconds": round(seconds, 3),
        "items_per_s": round(batch["total"] / seconds),
        "rows_written": rows,
        "messages_sent": dep.messages() - before,
        "target_s": TARGET_ACCEPT_S,
        "met": seconds <= TARGET_ACCEPT_S,
        "loadavg_before": load,
    }


def phases(dep: Deployment, items: int) -> dict[str, Any]:
    """The accept path's parts, in process (what the route does, step by step)."""
    from digin.api.schemas import BatchCreate
    from digin.api.sweeps import plan_batch
    from digin.service import repo
    from digin.service.dispatch import enqueue_many, make_celery
    from digin.service.repo.batches import create_batch

    settings = dep.settings()
    out: dict[str, Any] = {"loadavg_before": loadavg()}
    t0 = time.perf_counter()
    body = BatchCreate.model_validate(axes_body(items))
    t1 = time.perf_counter()
    plan = plan_batch(body, allow_list=None, allow_paths=False, max_items=10**6)
    t2 = time.perf_counter()
    with dep.sessions() as session:
        tenant = repo.ensure_tenant(session, name="bench")
        t3 = time.perf_counter()
        create_batch(
            session,
            tenant_id=tenant.id,
            plan=plan,
            params_template=TEMPLATE,
            priority=5,
            max_attempts=3,
        )
        session.commit()
        t4 = time.perf_counter()
    app = make_celery(settings, name="bench")
    enqueue_many(app, [str(i.job_id) for i in plan.items], queue="sweep", priority=5)
    t5 = time.perf_counter()
    app.close()
    out |= {
        "parse_s": t1 - t0,
        "validate_and_expand_s": t2 - t1,
        "insert_and_commit_s": t4 - t3,
        "enqueue_s": t5 - t4,
        "total_s": t5 - t0,
    }
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def stream(dep: Deployment, base: str, headers: dict[str, str], batch_id: str) -> dict:
    from digin.service.db import Job

    names = ["grid.png", "item_000.png", "item_000_start.png", "result.json"]
    with dep.sessions() as session:  # every item succeeded, with a typical result
        tenant = "bench"
        session.execute(
            update(Job)
            .where(Job.batch_id == uuid.UUID(batch_id))
            .values(
                status="succeeded",
                result=func.jsonb_build_object(
                    "summary",
                    func.jsonb_build_object(
                        "items",
                        func.jsonb_build_array(
                            func.jsonb_build_object(
                                "best", json.dumps({"clean_loss": 0.12, "p": 0.93})
                            )
                        ),
                    ),
                    "artifacts",
                    func.jsonb_build_array(
                        *[
                            func.jsonb_build_object(
                                "name",
                                n,
                                "key",
                                func.concat(f"{tenant}/jobs/", Job.id, f"/{n}"),
                                "content_type",
                                "image/png",
                                "size",
                                1234,
                            )
                            for n in names
                        ]
                    ),
                ),
            )
        )
        session.commit()
    out = {}
    for fmt in ("jsonl", "csv"):
        load = loadavg()
        started = time.perf_counter()
        lines = size = 0
        with httpx.stream(
            "GET",
            f"{base}/v1/batches/{batch_id}/results",
            params={"format": fmt},
            headers=headers,
            timeout=300,
        ) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                lines += 1
                size += len(line) + 1
        seconds = time.perf_counter() - started
        data_lines = lines - (1 if fmt == "csv" else 0)
        out[fmt] = {
            "lines": data_lines,
            "seconds": round(seconds, 3),
            "lines_per_s": round(data_lines / seconds),
            "mb": round(size / 2**20, 1),
            "loadavg_before": load,
        }
    return out


def execution(items: int, iterations: int) -> dict[str, Any]:
    """Worker-task throughput of digits sweep items, one by one vs batched runs."""
    import torch

    from digin.api.schemas import BatchCreate
    from digin.api.sweeps import plan_batch
    from digin.core.jobs import ModelCache
    from digin.service import repo
    from digin.service.db import Job, make_engine, migrate, session_factory
    from digin.service.repo.batches import create_batch
    from digin.service.settings import fresh_settings
    from digin.service.storage import LocalStorage
    from digin.worker.runner import WorkerContext, execute_job

    torch.set_num_threads(1)
    cache = ModelCache()
    out: dict[str, Any] = {"items": items, "iterations": iterations, "torch_threads": 1}
    folder = Path(tempfile.mkdtemp(prefix="digin-bench-exec-"))
    try:
        url = f"sqlite:///{folder / 'digin.db'}"
        migrate(url)
        sessions = session_factory(make_engine(url))
        classes = [i % 10 for i in range(items)]
        for label, max_items in (("warmup", 8), ("one_by_one", 1), ("batched_8", 8)):
            body = BatchCreate(
                kind="guided",
                params_template={"guidance": {"iterations": iterations}},
                items=[
                    {"custom_id": f"{label}-{i}", "seed": i, "params": {"classes": [c]}}
                    for i, c in enumerate(classes)
                ],
            )
            if label == "warmup":
                body.items = body.items[:2]  # type: ignore[index]
            plan = plan_batch(body, allow_list=None, allow_paths=True, max_items=10**6)
            with sessions() as session:
                tenant = repo.ensure_tenant(session, name="bench")
                create_batch(
                    session,
                    tenant_id=tenant.id,
                    plan=plan,
                    params_template=body.params_template,
                    priority=5,
                    max_attempts=3,
                )
                session.commit()
            ctx = WorkerContext(
                settings=fresh_settings(data_dir=folder / "data", batch_max_items=max_items),
                sessions=sessions,
                storage=LocalStorage(folder / "art"),
                enqueue=lambda **_: None,
                device="cpu",
                heartbeat_interval=1.0,
                cache=cache,
            )
            load = loadavg()
            started = time.perf_counter()
            outcomes = [execute_job(item.job_id, ctx=ctx) for item in plan.items]  # type: ignore[arg-type]
            seconds = time.perf_counter() - started
            if label == "warmup":
                continue
            with sessions() as session:
                done = session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.custom_id.like(f"{label}-%"), Job.status == "succeeded")
                )
            out[label] = {
                "seconds": round(seconds, 2),
                "items_per_min": round(items / seconds * 60, 1),
                "succeeded": done,
                "runs": sum(o == "succeeded" for o in outcomes),
                "skipped_messages": sum(o == "skipped" for o in outcomes),
                "loadavg_before": load,
            }
        out["speedup"] = round(out["one_by_one"]["seconds"] / out["batched_8"]["seconds"], 2)
        sessions.kw["bind"].dispose()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--exec-items", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--skip-exec", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "batches.json"))
    args = parser.parse_args()

    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": loadavg(),
        },
    }
    dep = Deployment()
    try:
        headers = dep.setup()
        base = dep.start_api()
        httpx.post(
            f"{base}/v1/batches",
            json={"kind": "guided", "classes": [1]},
            headers=headers,
            timeout=60,
        ).raise_for_status()  # warm-up
        axes = accept(dep, base, headers, axes_body(args.items))
        print(
            f"accept (axes): {axes['items']} items in {axes['seconds']} s "
            f"({axes['items_per_s']}/s), rows {axes['rows_written']}, "
            f"messages {axes['messages_sent']}, load {axes['loadavg_before']}"
        )
        explicit = accept(dep, base, headers, items_body(args.items))
        print(
            f"accept (items): {explicit['items']} items ({explicit['request_bytes'] / 2**20:.1f}"
            f" MB) in {explicit['seconds']} s, load {explicit['loadavg_before']}"
        )
        parts = phases(dep, args.items)
        print(f"phases in process: {parts}")
        streamed = stream(dep, base, headers, axes["batch_id"])
        for fmt, figures in streamed.items():
            print(
                f"results index ({fmt}): {figures['lines']} lines in {figures['seconds']} s "
                f"= {figures['lines_per_s']} lines/s ({figures['mb']} MB)"
            )
        result |= {
            "accept_axes": axes,
            "accept_items": explicit,
            "accept_phases": parts,
            "results_index": streamed,
        }
    finally:
        dep.close()
    if not args.skip_exec:
        executed = execution(args.exec_items, args.iterations)
        print(f"execution: {executed}")
        result["execution"] = executed
    result["machine"]["loadavg_end"] = loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
