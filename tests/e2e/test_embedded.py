"""Embedded mode end to end: `digin serve` in an empty folder (SQLite, filesystem broker, local
artifacts, a Celery worker child, the reaper) takes a job over HTTP and serves its grid; SIGTERM
stops it and its worker, leaving no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import JOB_TIMEOUT_S, wait_until
from tests.worker.helpers import ROOT, ParamsFactory, decode_png


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_tree(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Stop a `digin serve` started by a test and everything below it: SIGTERM, then SIGKILL
    after `timeout` seconds, then SIGKILL for any process of its tree still alive."""
    below = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in below:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


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
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "digin", "serve"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        stop_tree(proc, timeout=30)  # the test failed early: stop everything it started


def test_digin_serve_runs_a_job_and_stops_cleanly(serve, e2e_params: ParamsFactory):
    proc, base, log = serve

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"digin serve exited ({proc.returncode}):\n{log.read_text()}")
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until("the API to answer", healthy, 90, 0.25)
    with httpx.Client(base_url=base, timeout=30) as http:
        body = {"kind": "guided", "params": e2e_params(iterations=2)}
        created = http.post("/v1/jobs", json=body)  # no key: embedded mode has auth off
        assert created.status_code == 202, created.text
        location = created.headers["Location"]

        def finished() -> dict | None:
            job = http.get(location).json()
            return job if job["status"] in ("succeeded", "failed", "canceled") else None

        job = wait_until("the job to finish", finished, JOB_TIMEOUT_S, 0.2)
        assert job["status"] == "succeeded", (job, log.read_text()[-3000:])
        grid = http.get(f"{location}/artifacts/grid.png")
        assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
        decode_png(grid.content)

    children = descendants(proc.pid)
    assert len(children) >= 2  # the worker and its pool process
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    wait_until("no process of digin serve to be left", lambda: not any(map(alive, children)), 15)
    assert "digin serve: stopped" in log.read_text()
