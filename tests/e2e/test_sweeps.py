"""Sweeps end to end in embedded mode: `digin serve` (SQLite, filesystem broker, a Celery worker
child, the reaper and the webhook sender) runs all ten digit classes x two classifiers as a
batch, in batched runs of compatible items; the results index lists 20 items with metrics and
working artifact URLs; a signed batch.completed reaches a receiver on loopback. A second sweep
canceled mid-way leaves the rest canceled and the finished items readable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from digin.service.webhooks import verify_signature
from tests.e2e.conftest import wait_until
from tests.e2e.test_embedded import free_port, stop_tree
from tests.worker.helpers import ROOT, decode_png

SWEEP_TIMEOUT_S = 240.0


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append(
                {"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
            )
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    if not sys.platform.startswith("linux"):
        pytest.skip("the process-tree checks read /proc")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGIN_")}
    env |= {
        "DIGIN_DATA_DIR": str(tmp_path / ".digin"),
        "DIGIN_PORT": str(port),
        "DIGIN_DEVICE": "cpu",
        "DIGIN_BATCH_MAX_ITEMS": "5",  # 20 items: four batched runs of five
        "DIGIN_WEBHOOK_INTERVAL_SECONDS": "0.5",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "digin", "serve"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        stop_tree(proc)


def test_sweep_of_all_digits_by_two_classifiers_then_a_canceled_sweep(serve, receiver):
    proc, base, log = serve
    hook_url, received = receiver

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"digin serve exited ({proc.returncode}):\n{log.read_text()}")
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until("the API to answer", healthy, 90, 0.25)
    with httpx.Client(base_url=base, timeout=30) as http:
        body = {
            "kind": "guided",
            "params_template": {"guidance": {"iterations": 1}},
            "classes": "all",
            "classifiers": ["digits:cnn", "digits:mlp"],
            "seeds": [0],
            "webhook": {"url": hook_url, "events": ["batch.completed"]},
        }
        created = http.post("/v1/batches", json=body)
        assert created.status_code == 202, created.text
        location = created.headers["Location"]

        def finished(url: str) -> dict | None:
            batch = http.get(url).json()
            return batch if batch["status"] != "running" else None

        batch = wait_until("the sweep to finish", lambda: finished(location), SWEEP_TIMEOUT_S, 0.5)
        assert batch["status"] == "succeeded", (batch, log.read_text()[-3000:])
        assert batch["counts"]["succeeded"] == 20 and batch["progress"] == 1.0
        assert batch["throughput_per_min"] > 0 and batch["eta_seconds"] == 0

        lines = [json.loads(x) for x in http.get(f"{location}/results").text.splitlines()]
        assert [x["index"] for x in lines] == list(range(20))
        assert len({x["custom_id"] for x in lines}) == 20
        for line in lines:
            assert line["status"] == "succeeded" and 0 <= line["metrics"]["p"] <= 1
            urls = {a["name"]: a["url"] for a in line["artifacts"]}
            assert {"grid.png", "item_000.png", "result.json"} <= set(urls)
        image = http.get(urls["item_000.png"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        decode_png(image.content)
        # the worker ran compatible items together (the log names its batched runs)
        groups = [
            json.loads(x)
            for x in log.read_text().splitlines()
            if x.startswith("{") and '"event": "group"' in x
        ]
        assert groups and max(len(g["jobs"]) for g in groups) > 1

        # the batch.completed event, signed with the tenant's secret
        wait_until("the batch.completed webhook", lambda: received, 30, 0.2)
        secret = http.get("/v1/webhooks/secret").json()["secret"]
        (event,) = received
        h = event["headers"]
        signed = {
            "webhook_id": h["webhook-id"],
            "webhook_timestamp": h["webhook-timestamp"],
            "webhook_signature": h["webhook-signature"],
        }
        assert verify_signature(secret, **signed, body=event["body"])
        payload = json.loads(event["body"])
        assert payload["type"] == "batch.completed" and payload["data"]["id"] == batch["id"]

        # a second, slower sweep canceled once its first items are done
        slow = {**body, "params_template": {"guidance": {"iterations": 25}}, "webhook": None}
        second = http.post("/v1/batches", json=slow).json()
        path = second["urls"]["self"]
        wait_until(
            "the first items of the second sweep",
            lambda: http.get(path).json()["counts"]["succeeded"] >= 1,
            SWEEP_TIMEOUT_S,
            0.2,
        )
        canceled = http.post(f"{path}/cancel").json()
        assert canceled["counts"]["queued"] == 0
        final = wait_until("the second sweep to stop", lambda: finished(path), 120, 0.2)
        assert final["status"] == "canceled"
        counts = final["counts"]
        assert counts["succeeded"] >= 1 and counts["canceled"] >= 10
        assert counts["succeeded"] + counts["canceled"] + counts["failed"] == 20
        lines = [json.loads(x) for x in http.get(f"{path}/results").text.splitlines()]
        done = [x for x in lines if x["status"] == "succeeded"]
        assert len(done) == counts["succeeded"]
        url = next(a["url"] for a in done[0]["artifacts"] if a["name"] == "grid.png")
        assert http.get(url).status_code == 200
        assert all(x["artifacts"] == [] for x in lines if x["status"] == "canceled")
