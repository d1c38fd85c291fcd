"""Audit submission benchmark: `POST /v1/audits` of an audit of `--classes` classes of an
ImageNet classifier through ONE API process (uvicorn), timed from the client: validated
(params, models, every class, every class step, the uploads), one `audit_class` job per class
written and sent. Two deployments:

1. embedded (SQLite, the filesystem broker, local storage, auth off): `classes: "all"` with a
   server folder template (`/data/imagenet/{class}`, never read at submission);
2. production (a throwaway PostgreSQL database and a Redis DB, bench/batches.py's deployment):
   paths on the server are refused, so the images are uploads, two PNGs named for every class
   (`images.image_ids`). The map of ids is stored once, with the audit; each class step refers
   to it (`images: {"audit": true}`, `others: "audit"`) instead of carrying a copy, so what is
   written grows with the classes, not their square.

Printed and written as JSON; nothing is asserted (the load average is recorded beside every
figure).

    python bench/audits_submit.py [--classes 1000] [--repeat 3]
        [--out bench/results/audits_submit.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batches import Deployment, loadavg  # noqa: E402 - after the path is set

CLASSIFIER = "timm:resnet50.a1_in1k"
TARGET_S = 2.0  # an audit of 1,000 classes is accepted in under this


def png(shade: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (shade, shade, shade)).save(out, format="PNG")
    return out.getvalue()


def body(classes: int, image_ids: list[str]) -> dict[str, Any]:
    """Classes by index (ImageNet repeats two names), each with the same two uploads."""
    return {
        "classifier": CLASSIFIER,
        "classes": list(range(classes)),
        "images": {"image_ids": {str(k): image_ids for k in range(classes)}, "per_class": 2},
        "seed": 0,
    }


def folder_body(classes: int) -> dict[str, Any]:
    listed: Any = "all" if classes == 1000 else list(range(classes))
    return {"classifier": CLASSIFIER, "classes": listed,
            "images": {"folder": "/data/imagenet/{class}"}, "seed": 0}  # fmt: skip


class EmbeddedDeployment(Deployment):
    """Embedded mode in a temporary folder: SQLite, the filesystem broker, local storage."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="digin-bench-audits-"))
        self.values = {"data_dir": str(self.folder / "data")}
        self.url = self.settings().database_url
        self.api = None

    def setup(self) -> dict[str, str]:
        from digin.service.db import make_engine, migrate, session_factory

        migrate(self.url)
        self.sessions = session_factory(make_engine(self.url))
        return {}

    def messages(self) -> int:
        return len(list((self.folder / "data").rglob("*.sweep.msg")))

    def close(self) -> None:
        if self.api is not None and self.api.poll() is None:
            os.killpg(self.api.pid, signal.SIGTERM)
            self.api.wait(timeout=30)
        self.sessions.kw["bind"].dispose()
        shutil.rmtree(self.folder, ignore_errors=True)


def accept(dep: Deployment, base: str, headers: dict[str, str], request: dict[str, Any]) -> dict:
    from digin.service.db import Job

    data = json.dumps(request).encode()
    before = dep.messages()
    load = loadavg()
    started = time.perf_counter()
    response = httpx.post(f"{base}/v1/audits", content=data, timeout=300,
                          headers={**headers, "content-type": "application/json"})  # fmt: skip
    seconds = time.perf_counter() - started
    if response.status_code != 202:
        raise RuntimeError(f"{response.status_code}: {response.text[:2000]}")
    audit = response.json()
    with dep.sessions() as session:
        rows = session.scalar(
            select(func.count()).select_from(Job).where(Job.batch_id == uuid.UUID(audit["id"]))
        )
    return {
        "audit_id": audit["id"],
        "classes": audit["total_classes"],
        "request_bytes": len(data),
        "seconds": round(seconds, 3),
        "rows_written": rows,
        "messages_sent": dep.messages() - before,
        "target_s": TARGET_S,
        "met": seconds < TARGET_S,
        "loadavg_before": load,
    }


def runs(
    dep: Deployment, base: str, headers: dict[str, str], request: dict[str, Any], repeat: int,
    label: str,
) -> dict[str, Any]:  # fmt: skip
    done = []
    for i in range(repeat):
        run = accept(dep, base, headers, request)
        print(f"{label} {i + 1}: {run['classes']} classes ({run['request_bytes'] / 2**10:.0f} "
              f"KiB) in {run['seconds']} s, rows {run['rows_written']}, messages "
              f"{run['messages_sent']}, load {run['loadavg_before']}")  # fmt: skip
        done.append(run)
    seconds = sorted(r["seconds"] for r in done)
    return {"runs": done, "best_s": seconds[0], "median_s": seconds[len(seconds) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "audits_submit.json"))
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_start": loadavg()},
        "classifier": CLASSIFIER,
    }  # fmt: skip
    embedded = EmbeddedDeployment()
    try:
        headers = embedded.setup()
        base = embedded.start_api()
        accept(embedded, base, headers, folder_body(2))  # warm-up: imports, caches
        result["embedded_folder"] = runs(embedded, base, headers, folder_body(args.classes),
                                         args.repeat, "embedded, folder template")  # fmt: skip
    finally:
        embedded.close()
    dep = Deployment()
    try:
        headers = dep.setup()
        base = dep.start_api()
        ids = []
        for shade in (40, 200):
            files = {"file": ("digit.png", png(shade), "image/png")}
            uploaded = httpx.post(f"{base}/v1/images", files=files, headers=headers, timeout=60)
            ids.append(uploaded.raise_for_status().json()["id"])
        accept(dep, base, headers, body(2, ids))  # warm-up
        result["production_uploads"] = runs(dep, base, headers, body(args.classes, ids),
                                            args.repeat, "production, uploads")  # fmt: skip
    finally:
        dep.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
