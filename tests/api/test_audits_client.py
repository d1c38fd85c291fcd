"""The Python client's audit methods and `digin audit` against the real API (the client tests'
`lite` server: SQLite, the filesystem broker, auth on, no worker): create, read, list, cancel,
wait, a refused audit naming its field, the report refused until it is built. The report's
download through both: tests/ui/test_audit_page.py (a finished audit)."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from digin.cli import app
from digin_client import APIError, AsyncClient, Client, UnprocessableError
from digin_client.models import Audit
from tests.client.conftest import LiveAPI, lite, lite_dir  # noqa: F401 - fixtures

IMAGES = {"digits": "test", "per_class": 20}


@pytest.fixture
def client(lite: LiveAPI) -> Iterator[Client]:  # noqa: F811
    with Client(lite.url, lite.key(f"a-{uuid.uuid4().hex[:8]}")) as client:
        yield client


def test_create_read_list_cancel_and_wait(client: Client):
    audit = client.create_audit("digits:cnn-spurious", [3, "seven"], images=IMAGES, seed=4)
    assert (audit.status, audit.stage, audit.total_classes) == ("running", "classes", 2)
    assert audit.class_counts.queued == 2 and not audit.done and audit.seed == 4
    got = client.get_audit(audit.id)
    assert [(c.index, c.name, c.status) for c in got.classes or []] == [
        (0, "three", "queued"),
        (1, "seven", "queued"),
    ]
    assert [a.id for a in client.list_audits()] == [audit.id]
    canceled = client.cancel_audit(audit.id)
    assert canceled.status == "canceled" and canceled.done
    assert client.wait_audit(audit.id, timeout=10).status == "canceled"
    with pytest.raises(APIError) as info:
        client.audit_report(audit.id, io.BytesIO())
    assert info.value.status == 409
    with pytest.raises(UnprocessableError) as refused:
        client.create_audit("digits:cnn-spurious", ["eleven"], images=IMAGES)
    assert refused.value.field == "classes.0"


def test_async_audits(lite: LiveAPI):  # noqa: F811
    key = lite.key(f"aa-{uuid.uuid4().hex[:8]}")

    async def scenario() -> None:
        async with AsyncClient(lite.url, key) as client:
            audit = await client.create_audit("digits:cnn-spurious", "all", images=IMAGES)
            assert audit.total_classes == 10
            assert [a.id async for a in client.list_audits()] == [audit.id]
            assert (await client.cancel_audit(audit.id)).status == "canceled"
            assert (await client.wait_audit(audit.id, timeout=10)).done

    asyncio.run(scenario())


def test_cli_audit_commands(lite: LiveAPI, tmp_path):  # noqa: F811
    runner = CliRunner()
    env = {"DIGIN_URL": lite.url, "DIGIN_API_KEY": lite.key(f"ca-{uuid.uuid4().hex[:8]}")}
    spec = tmp_path / "audit.json"
    spec.write_text(json.dumps({"images": IMAGES, "guidance": {"iterations": 2}}))
    args = ["audit", "create", "--classifier", "digits:cnn-spurious", "--classes", "1,seven",
            "--file", str(spec), "--json"]  # fmt: skip
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    audit = Audit.model_validate(json.loads(result.stdout))
    assert audit.total_classes == 2 and audit.params["guidance"]["iterations"] == 2

    result = runner.invoke(app, ["audit", "status", audit.id], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"audit {audit.id}  digits:cnn-spurious  running (classes)")
    result = runner.invoke(app, ["audit", "list", "--json"], env=env)
    assert [a["id"] for a in json.loads(result.stdout)] == [audit.id]
    result = runner.invoke(app, ["audit", "cancel", audit.id, "--json"], env=env)
    assert result.exit_code == 0 and json.loads(result.stdout)["status"] == "canceled"
    assert runner.invoke(app, ["audit", "wait", audit.id], env=env).exit_code == 1
    result = runner.invoke(app, ["audit", "report", audit.id], env=env)
    assert result.exit_code == 4 and "report" in result.output  # not built: a 409 problem

    bad = ["audit", "create", "--classifier", "digits:cnn-spurious", "--classes", "eleven"]
    result = runner.invoke(app, bad, env=env)
    assert result.exit_code == 4 and "classes.0" in result.output
