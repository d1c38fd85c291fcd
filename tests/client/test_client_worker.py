"""The client and the CLI against the whole service (PostgreSQL, Redis, S3 through moto with
presigned URLs, uvicorn, one real Celery worker running the digits zoo): jobs of two
guidance iterations are waited for and their artifacts downloaded through the redirects."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from digin.cli import app
from digin_client import AsyncClient, Client, DiginError, Job
from tests.client.conftest import LiveAPI
from tests.e2e.conftest import JOB_TIMEOUT_S
from tests.worker.helpers import artifact_names, decode_png, digits_params

pytestmark = pytest.mark.slow


def test_wait_and_download(full: LiveAPI, tmp_path: Path):
    redirects: list[str] = []

    def record(response: httpx.Response) -> None:
        if response.status_code == 307:
            redirects.append(response.headers["Location"])

    key = full.key("acme")
    with Client(full.url, key, event_hooks={"response": [record]}) as client:
        job = client.submit("guided", digits_params(iterations=2), seed=0)
        seen: list[Job] = []
        done = client.wait(job.id, timeout=JOB_TIMEOUT_S, on_progress=seen.append)
        assert done.status == "succeeded", done.error
        assert seen[0].status in ("queued", "running") and seen[-1] == done
        assert done.result is not None and done.finished_at is not None

        listing = client.artifacts(job.id)
        assert sorted(a.name for a in listing.data) == artifact_names(1)
        s3 = str(full.settings.s3_endpoint)
        assert all(a.url.startswith(s3) and a.expires_at is not None for a in listing.data)

        paths = client.download(job.id, tmp_path / "all")
        assert sorted(p.name for p in paths) == artifact_names(1)
        assert all(p.parent == tmp_path / "all" for p in paths)
        assert len(redirects) == len(paths) and all(r.startswith(s3) for r in redirects)
        decode_png((tmp_path / "all" / "grid.png").read_bytes())
        result = json.loads((tmp_path / "all" / "result.json").read_text())
        assert result["kind"] == "guided"
        assert not list((tmp_path / "all").glob("*.part"))

        (only,) = client.download(job.id, tmp_path / "one", names=["grid.png"])
        assert only.read_bytes() == (tmp_path / "all" / "grid.png").read_bytes()
        with pytest.raises(DiginError, match="no artifact named nope.png"):
            client.download(job.id, tmp_path / "none", names=["nope.png"])
        assert [j.id for j in client.list(status="succeeded")] == [job.id]


def test_async_client_waits_cancels_and_downloads(full: LiveAPI, tmp_path: Path):
    key = full.key("async-tenant")

    async def scenario() -> None:
        async with AsyncClient(full.url, key) as client:
            # a long job: cancel it once it runs, and see it go canceling -> canceled
            long = await client.submit("guided", digits_params(iterations=400), seed=1)

            started = await client.wait(
                long.id, timeout=JOB_TIMEOUT_S, until=lambda j: j.status == "running" or j.done
            )
            assert started.status == "running"
            canceling = await client.cancel(long.id)
            assert canceling.status in ("canceling", "canceled")
            stopped = await client.wait(long.id, timeout=JOB_TIMEOUT_S)
            assert stopped.status == "canceled"

            job = await client.submit("guided", digits_params(iterations=1), seed=2)
            done = await client.wait(job.id, timeout=JOB_TIMEOUT_S)
            assert done.status == "succeeded", done.error
            paths = await client.download(job.id, tmp_path / "async")
            assert sorted(p.name for p in paths) == artifact_names(1)
            decode_png((tmp_path / "async" / "item_000.png").read_bytes())
            listed = [j.id async for j in client.list(page_size=1)]
            assert listed == [job.id, long.id]

    asyncio.run(scenario())


def test_cli_submit_wait_and_download(full: LiveAPI, tmp_path: Path):
    runner = CliRunner()
    env = {"DIGIN_URL": full.url, "DIGIN_API_KEY": full.key("cli-tenant")}
    params = json.dumps(digits_params(iterations=2))
    result = runner.invoke(
        app, ["submit", "guided", "--params", "-", "--seed", "5", "--wait", "--json",
              "--timeout", str(JOB_TIMEOUT_S)], env=env, input=params,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded" and job["seed"] == 5

    result = runner.invoke(app, ["wait", job["id"]], env=env)  # text, with the progress bar
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"job {job['id']}  guided  succeeded")
    assert "artifacts grid.png" in result.stdout

    out = tmp_path / "cli"
    result = runner.invoke(app, ["download", job["id"], "--out", str(out), "--json"], env=env)
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    assert sorted(Path(f).name for f in files) == artifact_names(1)
    decode_png((out / "grid.png").read_bytes())

    result = runner.invoke(app, ["download", job["id"], "--out", str(out / "g"), "--name",
                                 "grid.png"], env=env)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "g" / "grid.png")
