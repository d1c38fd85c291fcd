"""The `digin` client commands (typer's CliRunner, in process) against a real API (uvicorn on
SQLite, no worker): submit, status, wait, download and their errors, as JSON and as text."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from digin.cli import app
from tests.client.conftest import LiveAPI
from tests.worker.helpers import digits_params

runner = CliRunner()


@pytest.fixture
def env(lite: LiveAPI) -> dict[str, str]:
    """The server and a fresh tenant's key, as the CLI reads them from the environment."""
    return {"DIGIN_URL": lite.url, "DIGIN_API_KEY": lite.key(f"cli-{uuid.uuid4().hex[:8]}")}


def invoke(args: list[str], env: dict[str, str], stdin: str | None = None):
    return runner.invoke(app, args, env=env, input=stdin)


def submit(env: dict[str, str]) -> dict:
    """A queued job, submitted through the CLI."""
    result = invoke(
        ["submit", "guided", "--params", "-", "--json"], env, json.dumps(digits_params())
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_submit_and_status(env: dict[str, str], tmp_path: Path):
    params = tmp_path / "params.json"
    params.write_text(json.dumps(digits_params()))
    result = invoke(
        ["submit", "guided", "--params", str(params), "--seed", "3", "--priority", "4",
         "--metadata", '{"who": "cli"}', "--json"], env,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert (job["status"], job["seed"], job["priority"]) == ("queued", 3, 4)
    assert job["metadata"] == {"who": "cli"}

    result = invoke(["status", job["id"], "--json"], env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == job["id"]

    result = invoke(["status", job["id"]], env)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"job {job['id']}  guided  queued")
    assert "seed 3  priority 4" in result.stdout

    stdin = json.dumps(digits_params(iterations=1))
    result = invoke(["submit", "guided", "--params", "-", "--json"], env, stdin=stdin)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"]["guidance"]["iterations"] == 1


def test_flags_win_over_the_environment(lite: LiveAPI, env: dict[str, str]):
    job = submit(env)
    wrong = {"DIGIN_URL": "http://127.0.0.1:9", "DIGIN_API_KEY": "wrong"}
    args = ["status", job["id"], "--json", "--url", lite.url, "--key", env["DIGIN_API_KEY"]]
    result = invoke(args, wrong)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == job["id"]


def test_errors_exit_4_with_the_problem(env: dict[str, str]):
    missing = str(uuid.uuid4())
    result = invoke(["status", missing, "--json"], env)
    assert result.exit_code == 4
    problem = json.loads(result.stdout)["error"]
    assert problem["status"] == 404 and missing in problem["detail"]

    result = invoke(["status", missing], env)
    assert result.exit_code == 4 and "404" in result.stderr and result.stdout == ""

    bad = json.dumps(digits_params(iterations=100_000))
    result = invoke(["submit", "guided", "--params", "-"], env, stdin=bad)
    assert result.exit_code == 4
    assert "params.guidance.iterations: Input should be less than or equal to 500" in result.stderr

    result = invoke(["status", missing, "--json"], env | {"DIGIN_API_KEY": "nope"})
    assert result.exit_code == 4 and json.loads(result.stdout)["error"]["status"] == 401

    result = invoke(["submit", "guided", "--params", "-"], env, stdin="[1, 2]")
    assert result.exit_code == 2 and "JSON object" in result.output


def test_wait_timeout_and_download_of_an_unfinished_job(env: dict[str, str], tmp_path: Path):
    job = submit(env)  # stays queued
    result = invoke(["wait", job["id"], "--timeout", "0.3", "--json"], env)
    assert result.exit_code == 3
    assert json.loads(result.stdout)["last"]["status"] == "queued"

    result = invoke(["wait", job["id"], "--timeout", "0.3"], env)  # with the progress bar
    assert result.exit_code == 3 and "did not finish within 0.3 s" in result.stderr

    result = invoke(["download", job["id"], "--out", str(tmp_path), "--json"], env)
    assert result.exit_code == 4
    assert "artifacts exist once it has succeeded" in json.loads(result.stdout)["error"]["detail"]

    job_id = submit(env)["id"]
    from digin_client import Client

    with Client(env["DIGIN_URL"], env["DIGIN_API_KEY"]) as client:
        client.cancel(job_id)
    result = invoke(["wait", job_id, "--json"], env)
    assert result.exit_code == 1 and json.loads(result.stdout)["status"] == "canceled"
