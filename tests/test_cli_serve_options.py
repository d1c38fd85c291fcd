"""`digin serve` and `digin api` listen where --host and --port say; the options override
DIGIN_HOST and DIGIN_PORT, which override the `.env` file, which overrides the defaults; both
refuse a non-loopback address while auth is off, before they start anything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import uvicorn
from typer.testing import CliRunner

from digin.cli import app
from digin.service.settings import get_settings
from tests.e2e.conftest import wait_until
from tests.e2e.test_embedded import alive, descendants, free_port, stop_tree
from tests.worker.helpers import ROOT

runner = CliRunner()


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working folder (no `.env` of the checkout), no DIGIN_* variables, and the
    environment as it was afterwards (the commands write --host and --port into it)."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("DIGIN_")]:
        del os.environ[name]
    os.environ["DIGIN_DATA_DIR"] = str(tmp_path / ".digin")
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    try:
        yield tmp_path
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The calls of uvicorn.run (nothing is served)."""
    calls: list[dict[str, Any]] = []

    def run(target: Any, **kwargs: Any) -> None:
        calls.append({"target": target, **kwargs})

    monkeypatch.setattr(uvicorn, "run", run)
    return calls


def _option(command: str, name: str) -> Any:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    params = {p.name: p for p in commands[command].params}
    assert name in params, f"`digin {command}` has no --{name}"
    return params[name]


@pytest.mark.parametrize("name", ["host", "port"])
def test_serve_and_api_share_the_host_and_port_options(name: str):
    api, serve = _option("api", name), _option("serve", name)
    assert serve.opts == api.opts == [f"--{name}"]
    assert serve.default is api.default is None  # None: DIGIN_HOST / DIGIN_PORT decide
    assert serve.type_descriptor.annotation == api.type_descriptor.annotation
    assert (getattr(serve, "min", None), getattr(serve, "max", None)) == (
        getattr(api, "min", None),
        getattr(api, "max", None),
    )
    assert serve.help == api.help and f"DIGIN_{name.upper()}" in serve.help


@pytest.mark.parametrize(
    ("dotenv", "env", "argv", "expected"),
    [
        ("", {}, [], ("127.0.0.1", 8000)),
        ("DIGIN_PORT=9100\n", {}, [], ("127.0.0.1", 9100)),
        ("DIGIN_PORT=9100\n", {"DIGIN_PORT": "9200"}, [], ("127.0.0.1", 9200)),
        ("DIGIN_PORT=9100\n", {"DIGIN_PORT": "9200"}, ["--port", "9300"], ("127.0.0.1", 9300)),
        ("", {"DIGIN_HOST": "localhost"}, ["--host", "::1"], ("::1", 8000)),
        # the environment's host would be refused (auth off); the option's is a loopback one
        ("", {"DIGIN_HOST": "0.0.0.0"}, ["--host", "127.0.0.1"], ("127.0.0.1", 8000)),
    ],
)
def test_api_options_override_the_environment_over_dotenv_over_defaults(
    folder: Path, served: list[dict[str, Any]], dotenv: str, env: dict[str, str], argv, expected
):
    (folder / ".env").write_text(dotenv)
    os.environ.update(env)
    result = runner.invoke(app, ["api", *argv])
    assert result.exit_code == 0, result.output
    (call,) = served
    assert (call["host"], call["port"]) == expected
    settings = get_settings()  # what the app (create_app) sees in this process
    assert (settings.host, settings.port) == expected
    # ... and what uvicorn's worker processes read: the environment
    if "--host" in argv:
        assert os.environ["DIGIN_HOST"] == expected[0]
    if "--port" in argv:
        assert os.environ["DIGIN_PORT"] == str(expected[1])


def test_api_options_win_over_settings_read_before(folder: Path, served: list[dict[str, Any]]):
    os.environ["DIGIN_PORT"] = "9001"
    assert get_settings().port == 9001  # cached for the process
    result = runner.invoke(app, ["api", "--port", "9002"])
    assert result.exit_code == 0, result.output
    assert served[0]["port"] == 9002
    assert get_settings().port == 9002  # the app checks and serves the same settings


def test_api_with_auth_on_may_listen_on_any_address(folder: Path, served: list[dict[str, Any]]):
    os.environ["DIGIN_AUTH"] = "on"
    result = runner.invoke(app, ["api", "--host", "0.0.0.0", "--port", "9400"])
    assert result.exit_code == 0, result.output
    assert (served[0]["host"], served[0]["port"]) == ("0.0.0.0", 9400)


@pytest.mark.parametrize("command", ["api", "serve"])
@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_public_address_with_auth_off_is_refused_before_anything_starts(
    folder: Path, served: list[dict[str, Any]], command: str, how: str
):
    if how == "option":
        argv = [command, "--host", "0.0.0.0"]
    else:
        os.environ["DIGIN_HOST"] = "0.0.0.0"
        argv = [command]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert "loopback" in result.output and "DIGIN_AUTH=on" in result.output
    assert served == []
    assert not (folder / ".digin").exists()  # no database, broker or artifact folder made


@pytest.mark.parametrize("command", ["api", "serve"])
@pytest.mark.parametrize("port", ["0", "65536"])
def test_a_port_out_of_range_is_refused(
    folder: Path, served: list[dict[str, Any]], command: str, port: str
):
    result = runner.invoke(app, [command, "--port", port])
    assert result.exit_code == 2
    assert "Invalid value for '--port'" in result.output
    assert served == []


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int, Path]]:
    """`digin serve --host 127.0.0.1 --port P` in an empty folder, with DIGIN_HOST and
    DIGIN_PORT set to something else (a public address, another port)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the process-tree checks read /proc")
    port, env_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGIN_")}
    env |= {
        "DIGIN_DATA_DIR": str(tmp_path / ".digin"),
        "DIGIN_HOST": "0.0.0.0",  # refused with auth off: the option must win
        "DIGIN_PORT": str(env_port),
        "DIGIN_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    argv = [sys.executable, "-m", "digin", "serve", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, port, env_port, log
    finally:
        stop_tree(proc, timeout=30)  # the test failed early: stop everything it started


def test_digin_serve_listens_on_its_host_and_port_options(serve_process):
    proc, port, env_port, log = serve_process

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"digin serve exited ({proc.returncode}):\n{log.read_text()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until("the API to answer on the --port", healthy, 90, 0.25)
    assert f"API on http://127.0.0.1:{port} " in log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{env_port}/healthz", timeout=2)
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    wait_until("no process of digin serve to be left", lambda: not any(map(alive, children)), 15)


@pytest.mark.parametrize("interval", ["0", "-1"])
def test_reaper_refuses_an_interval_that_would_spin(interval):
    result = CliRunner().invoke(app, ["reaper", "--interval", interval, "--once"])
    assert result.exit_code == 2
    assert "--interval" in result.output
