"""Dashboard benchmark: server-side render time of the /ui pages with many jobs in the
database. Figures are printed and written as JSON; nothing is asserted (the machine is shared:
the load average is recorded).

One tenant gets `--jobs` jobs (default 10,000): a sweep of `--batch-classes` classes x 2
classifiers (one job each), the rest single guided jobs; 80 % succeeded with a typical result
summary (2 items, 10 iterations) and artifact listing, the rest queued, running (with progress),
failed or canceled. Pages are rendered in process through the ASGI app (httpx's ASGI transport:
no sockets), each `--repeat` times; the median is reported. One job gets a stored 512 x 512 PNG
to time its thumbnail (made once, then served from the cache or answered 304 by its ETag).

    python bench/dashboard.py [--jobs 10000] [--batch-classes 1000] [--repeat 7]
        [--database-url postgresql://...] [--out bench/results/dashboard.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from digin.service import repo  # noqa: E402
from digin.service.db import Batch, make_engine, migrate, session_factory  # noqa: E402
from digin.service.repo.batches import insert_jobs  # noqa: E402
from digin.service.storage import artifact_key, storage_from_settings  # noqa: E402

TENANT = repo.LOCAL_TENANT  # auth off (SQLite): the viewer is `local`; on: a key of it
ITERATIONS = 10


def summary(p: float) -> dict[str, Any]:
    """A guided job's result summary of typical size: 2 items, 10 iterations."""
    items = []
    for index in range(2):
        curve = [min(1.0, p * (0.5 + 0.05 * i)) for i in range(ITERATIONS + 1)]
        items.append({"index": index, "seed": index, "prompt": "a handwritten digit seven",
                      "class_index": 7, "class_name": "seven", "neuron": None,
                      "best_iteration": ITERATIONS, "best": {"clean_loss": 1 - p, "p": p},
                      "clean_loss": [1 - c for c in curve], "train_loss": [1 - c for c in curve],
                      "metrics": {"p": curve}})  # fmt: skip
    models = {"diffusion": "digits", "classifier": "digits:cnn"}
    return {"kind": "guided", "seed": 0, "models": models,
            "device": "cpu", "iterations_done": ITERATIONS, "stopped": False, "items": items,
            "metric_names": {"p": "p(class | x) of digits:cnn"},
            "timings": {"load_s": 1.2, "total_s": 9.8}}  # fmt: skip


def seed(sessions: Any, storage: Any, *, jobs: int, batch_classes: int) -> dict[str, Any]:
    """Write the tenant, its batch and `jobs` jobs in bulk; returns the ids the bench reads."""
    from digin.core.params import validate_params

    params = validate_params("guided", {"classes": ["seven"]}).model_dump(mode="json")
    now = datetime.now(UTC)
    with sessions() as session:
        tenant = repo.ensure_tenant(session, name=TENANT)
        batch_items = min(jobs, 2 * batch_classes)
        batch = Batch(id=uuid.uuid4(), tenant_id=tenant.id, kind="guided", params_template={},
                      spec={"classes": list(range(batch_classes))}, total=batch_items,
                      priority=5, created_at=now - timedelta(days=2))  # fmt: skip
        session.add(batch)
        session.flush()
        rows = []
        for i in range(jobs):
            job_id = uuid.uuid4()
            created = now - timedelta(seconds=jobs - i)
            status = {8: "failed", 9: "running"}.get(i % 10, "succeeded")
            if i == jobs - 1:
                status = "succeeded"  # the newest: the one with a stored image
            row: dict[str, Any] = {
                "id": job_id, "tenant_id": tenant.id, "kind": "guided", "status": status,
                "params": params, "seed": i, "priority": 0, "queue": "interactive",
                "attempts": 1, "max_attempts": 3, "cancel_requested": False,
                "created_at": created, "enqueued_at": created, "started_at": created,
                "finished_at": None, "progress": None, "result": None, "error": None,
                "batch_id": None, "item_index": None, "custom_id": None,
            }  # fmt: skip
            if i < batch_items:  # the sweep: classes x 2 classifiers
                model = ("digits:cnn", "digits:mlp")[i // batch_classes]
                row |= {"batch_id": batch.id, "item_index": i, "queue": "sweep",
                        "custom_id": f"c={i % batch_classes}|m={model}|s=0"}  # fmt: skip
            if status == "succeeded":
                names = ["grid.png", "item_000.png", "item_000_start.png", "item_001.png",
                         "item_001_start.png", "result.json"]  # fmt: skip
                artifacts = [{"name": n, "key": artifact_key(TENANT, job_id, n), "size": 700,
                              "content_type": "application/json" if n.endswith("json")
                              else "image/png"} for n in names]  # fmt: skip
                row |= {"finished_at": created + timedelta(seconds=10),
                        "result": {"summary": summary(0.5 + (i % 50) / 100),
                                   "artifacts": artifacts}}  # fmt: skip
            elif status == "running":
                row["progress"] = {"step": 3, "total": ITERATIONS + 1, "stage": "optimizing"}
            elif status == "failed":
                row |= {"finished_at": created, "error": repo.job_error("internal", "boom")}
            rows.append(row)
        insert_jobs(session, rows)
        session.commit()
    newest = rows[-1]
    from PIL import Image

    image = Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3))  # incompressible
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.put(artifact_key(TENANT, newest["id"], "item_000.png"), buffer.getvalue(), "image/png")
    running = [r["id"] for r in rows if r["status"] == "running"][:50]
    return {"tenant": TENANT, "batch_id": batch.id, "newest": newest["id"], "running": running,
            "jobs": jobs, "batch_items": batch_items}  # fmt: skip


def median_ms(client: Any, path: str, repeat: int, **kwargs: Any) -> tuple[float, Any]:
    times, response = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        response = client.get(path, **kwargs)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code in (200, 304), (path, response.status_code, response.text[:300])
    return round(statistics.median(times), 1), response


def measure(client: Any, ids: dict[str, Any], repeat: int) -> dict[str, float]:
    """Median render times (ms) of the pages, in process."""
    figures: dict[str, float] = {}
    figures["jobs page 1 (50 rows)"], first = median_ms(client, "/ui/jobs", repeat)
    figures["jobs, status=succeeded"], _ = median_ms(client, "/ui/jobs?status=succeeded", repeat)
    figures["jobs, status=failed"], _ = median_ms(client, "/ui/jobs?status=failed", repeat)
    # follow the cursor to the middle page (page 100 of 200 with 10,000 jobs), then time it
    path, middle = "/ui/jobs", max(1, ids["jobs"] // 100)
    for _ in range(middle - 1):
        page = client.get(path)
        assert 'id="next-page"' in page.text, (path, page.status_code, page.text[-2000:])
        path = _next_link(page.text)
    figures[f"jobs page {middle} (cursor)"], _ = median_ms(client, path, repeat)
    batch = ids["batch_id"]
    figures["jobs of the batch"], _ = median_ms(client, f"/ui/jobs?batch_id={batch}", repeat)
    figures[f"batch page ({ids['batch_items']} items), matrix page 1"], _ = median_ms(
        client, f"/ui/batches/{batch}", repeat
    )
    figures["batch page, matrix page 40"], _ = median_ms(
        client, f"/ui/batches/{batch}?page=40", repeat
    )
    figures["batches list"], _ = median_ms(client, "/ui/batches", repeat)
    live = "&".join(f"id={i}" for i in ids["running"])
    figures[f"live poll of {len(ids['running'])} running jobs"], _ = median_ms(
        client, f"/ui/jobs/live?{live}", repeat
    )
    figures["job page"], _ = median_ms(client, f"/ui/jobs/{ids['newest']}", repeat)
    thumb = f"/ui/jobs/{ids['newest']}/thumbs/item_000.png"
    start = time.perf_counter()
    response = client.get(thumb)
    figures["thumbnail of a 512x512 PNG, first request"] = round(
        (time.perf_counter() - start) * 1000, 1
    )
    figures["thumbnail bytes"] = len(response.content)
    figures["thumbnail, cached"], _ = median_ms(client, thumb, repeat)
    figures["thumbnail, If-None-Match (304)"], _ = median_ms(
        client, thumb, repeat, headers={"If-None-Match": response.headers["etag"]}
    )
    figures["full 512x512 PNG bytes"] = len(
        client.get(f"/ui/jobs/{ids['newest']}/artifacts/item_000.png").content
    )
    return figures


def _next_link(html: str) -> str:
    marker = 'id="next-page"'
    anchor = html[: html.index(marker)]
    href = anchor[anchor.rindex('href="') + 6 :]
    return href[: href.index('"')].replace("&amp;", "&")


def run(database_url: str | None, jobs: int, batch_classes: int, repeat: int) -> dict[str, Any]:
    import httpx

    from digin.api.app import create_app
    from digin.service.settings import fresh_settings

    with tempfile.TemporaryDirectory(prefix="digin-bench-ui-") as folder:
        url = database_url or f"sqlite:///{Path(folder) / 'digin.db'}"
        migrate(url)
        values: dict[str, Any] = {"data_dir": Path(folder) / "data", "database_url": url}
        if database_url:  # production mode: auth on; the bench logs in like a browser
            values |= {"secret_key": "b" * 40, "auth": "on"}
        settings = fresh_settings(**values)
        engine = make_engine(url)
        sessions = session_factory(engine)
        started = time.perf_counter()
        ids = seed(sessions, storage_from_settings(settings), jobs=jobs,
                   batch_classes=batch_classes)  # fmt: skip
        seeded_s = time.perf_counter() - started
        app = create_app(settings)
        transport = httpx.ASGITransport(app=app)
        with _SyncASGI(transport) as client:
            if settings.auth_enabled:
                _login(client, sessions)
            figures = measure(client, ids, repeat)
        engine.dispose()
    return {"database": "postgresql" if database_url else "sqlite", "jobs": jobs,
            "batch_items": ids["batch_items"], "seed_s": round(seeded_s, 1),
            "median_ms": figures}  # fmt: skip


class _SyncASGI:
    """A synchronous facade over httpx's async ASGI transport (one event loop)."""

    def __init__(self, transport: Any) -> None:
        import asyncio

        import httpx

        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=transport, base_url="http://testserver")

    def __enter__(self) -> _SyncASGI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.loop.run_until_complete(self.client.get(path, **kwargs))

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.loop.run_until_complete(self.client.post(path, **kwargs))


def _login(client: _SyncASGI, sessions: Any) -> None:
    with sessions() as session:
        _, key = repo.create_api_key(session, tenant_name=TENANT)
        session.commit()
    form = client.get("/ui/login").text
    csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert client.post("/ui/login", data={"api_key": key, "csrf": csrf}).status_code == 303


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--batch-classes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--database-url", default=None, help="PostgreSQL (default: SQLite)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dashboard.json"))
    args = parser.parse_args()
    result = run(args.database_url, args.jobs, args.batch_classes, args.repeat)
    result |= {"load_average": os.getloadavg(), "python": platform.python_version(),
               "cpus": os.cpu_count()}  # fmt: skip
    for name, value in result["median_ms"].items():
        print(f"{name:48s} {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
