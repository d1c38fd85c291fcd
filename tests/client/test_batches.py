"""Batch methods of the client and `digin batch` against the real API: validation errors naming
the item's field, cancel, the results index as JSON lines and CSV, lists (on the `lite` API,
no worker); a sweep followed to the end with a real worker (`full`).

Skipped, naming the route, until the server side of batches (api/routes/batches.py) is in the
checkout."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from digin.cli import app
from digin_client import AsyncClient, Batch, Client, UnprocessableError
from tests.client.conftest import LiveAPI
from tests.e2e.conftest import JOB_TIMEOUT_S
from tests.worker.helpers import ROOT, digits_params

pytestmark = pytest.mark.skipif(
    not (ROOT / "api" / "routes" / "batches.py").exists(),
    reason="api/routes/batches.py (POST/GET /v1/batches, the server side of batches) is not in "
    "this checkout yet",
)

TEMPLATE = {"guidance": {"iterations": 1}}


@pytest.fixture
def api(lite: LiveAPI) -> LiveAPI:
    return lite


@pytest.fixture
def client(api: LiveAPI) -> Iterator[Client]:
    with Client(api.url, api.key(f"b-{uuid.uuid4().hex[:8]}")) as client:
        yield client


def items(n: int) -> list[dict]:
    return [{"custom_id": f"item-{i}", "params": digits_params(), "seed": i} for i in range(n)]


def test_a_bad_item_is_named_and_nothing_is_written(client: Client):
    bad = items(3)
    bad[1]["params"] = digits_params(iterations=100_000)
    with pytest.raises(UnprocessableError) as info:
        client.create_batch("guided", items=bad)
    assert info.value.field == "items[1].params.guidance.iterations"
    with pytest.raises(UnprocessableError):
        client.create_batch("guided", TEMPLATE, classes=[3], items=items(1))  # not both
    assert list(client.list_batches()) == []
    assert list(client.list()) == []


def test_create_cancel_and_read_the_results(client: Client):
    batch = client.create_batch(
        "guided", TEMPLATE, classes=[3, "seven"], classifiers=["digits:cnn", "digits:mlp"],
        seeds=[0], metadata={"sweep": "client-test"},
    )  # fmt: skip
    assert (batch.status, batch.total, batch.priority) == ("running", 4, 5)
    assert batch.counts.queued == 4 and batch.progress == 0 and not batch.done
    assert batch.metadata == {"sweep": "client-test"}
    assert client.get_batch(batch.id).id == batch.id

    records = list(client.iter_results(batch.id))  # readable while it runs
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert len({r.custom_id for r in records}) == 4
    assert all(r.status == "queued" and r.metrics is None for r in records)
    jobs = list(client.list(batch_id=batch.id))
    assert {j.id for j in jobs} == {r.job_id for r in records}
    assert all(j.batch_id == batch.id for j in jobs)

    canceled = client.cancel_batch(batch.id)
    assert canceled.status == "canceled" and canceled.counts.canceled == 4
    assert canceled.progress == 1 and canceled.done
    assert client.wait_batch(batch.id, timeout=10).status == "canceled"
    assert {r.status for r in client.iter_results(batch.id)} == {"canceled"}

    out = io.BytesIO()
    assert client.export_results(batch.id, out, format="csv") == len(out.getvalue())
    rows = list(csv.DictReader(io.StringIO(out.getvalue().decode())))
    assert [row["custom_id"] for row in rows] == [r.custom_id for r in records]

    second = client.create_batch("guided", items=items(2), priority=7)
    assert second.total == 2 and second.priority == 7
    assert [b.id for b in client.list_batches(page_size=1)] == [second.id, batch.id]
    assert [b.id for b in client.list_batches(limit=1)] == [second.id]
    client.cancel_batch(second.id)


def test_async_batches(api: LiveAPI):
    key = api.key(f"ab-{uuid.uuid4().hex[:8]}")

    async def scenario() -> None:
        async with AsyncClient(api.url, key) as client:
            batch = await client.create_batch("guided", items=items(3))
            assert batch.total == 3
            assert (await client.get_batch(batch.id)).id == batch.id
            assert [b.id async for b in client.list_batches()] == [batch.id]
            ids = [r.custom_id async for r in client.iter_results(batch.id)]
            assert ids == ["item-0", "item-1", "item-2"]
            assert (await client.cancel_batch(batch.id)).status == "canceled"
            assert (await client.wait_batch(batch.id, timeout=10)).done

    asyncio.run(scenario())


def test_cli_batch_commands(api: LiveAPI, tmp_path: Path):
    runner = CliRunner()
    env = {"DIGIN_URL": api.url, "DIGIN_API_KEY": api.key(f"cb-{uuid.uuid4().hex[:8]}")}
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps({"kind": "guided", "params_template": TEMPLATE,
                                "classes": {"start": 0, "stop": 3}, "seeds": [0, 1]}))  # fmt: skip
    result = runner.invoke(app, ["batch", "create", "--file", str(spec), "--json"], env=env)
    assert result.exit_code == 0, result.output
    batch = Batch.model_validate(json.loads(result.stdout))
    assert batch.total == 6

    result = runner.invoke(app, ["batch", "status", batch.id], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"batch {batch.id}  guided  running")
    assert "0/6 finished" in result.stdout

    out = tmp_path / "results.csv"
    args = ["batch", "results", batch.id, "--format", "csv", "--out", str(out), "--json"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bytes"] == out.stat().st_size
    assert len(list(csv.DictReader(out.open()))) == 6

    result = runner.invoke(app, ["batch", "results", batch.id], env=env)  # JSON lines, stdout
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["index"] for line in lines] == list(range(6))

    result = runner.invoke(app, ["batch", "cancel", batch.id, "--json"], env=env)
    assert result.exit_code == 0 and json.loads(result.stdout)["status"] == "canceled"
    result = runner.invoke(app, ["batch", "wait", batch.id], env=env)
    assert result.exit_code == 1  # finished, but not succeeded
    result = runner.invoke(app, ["batch", "list", "--json"], env=env)
    assert [b["id"] for b in json.loads(result.stdout)] == [batch.id]

    spec.write_text(json.dumps({"kind": "guided", "items": items(1), "classez": [1]}))
    result = runner.invoke(app, ["batch", "create", "--file", str(spec)], env=env)
    assert result.exit_code == 2 and "classez" in result.output


@pytest.mark.slow
def test_a_sweep_runs_to_the_end(full: LiveAPI, tmp_path: Path):
    seen: list[Batch] = []
    with Client(full.url, full.key("sweeper")) as client:
        batch = client.create_batch(
            "guided", TEMPLATE, classes=[1, 7], classifiers=["digits:cnn"], seeds=[0]
        )
        done = client.wait_batch(batch.id, timeout=JOB_TIMEOUT_S, on_progress=seen.append)
        assert done.status == "succeeded", done
        assert done.counts.succeeded == 2 and done.progress == 1 and done.finished_at
        assert seen[-1] == done
        records = list(client.iter_results(batch.id))
        assert [r.status for r in records] == ["succeeded", "succeeded"]
        assert all(r.metrics is not None and r.error is None for r in records)
        names = {a.name for a in records[0].artifacts}
        assert "grid.png" in names
        (grid,) = client.download(records[0].job_id, tmp_path, names=["grid.png"])
        assert grid.stat().st_size > 0
