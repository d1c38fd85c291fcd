"""The service commands of `digin` (digin/server_cli.py), on a SQLite file in a temporary folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from digin.server_cli import register
from digin.service import repo
from digin.service.db import make_engine, session_factory
from digin.service.settings import get_settings

runner = CliRunner()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[typer.Typer]:
    monkeypatch.setenv("DIGIN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # no .env file of the checkout
    get_settings.cache_clear()
    app = typer.Typer()
    app.command("version")(lambda: None)  # typer needs two commands to keep the names
    register(app)
    yield app
    get_settings.cache_clear()


def test_migrate_then_keys_create_list_revoke(cli: typer.Typer, tmp_path: Path):
    result = runner.invoke(cli, ["migrate"])
    assert result.exit_code == 0 and "up to date" in result.output
    assert runner.invoke(cli, ["migrate"]).exit_code == 0  # idempotent

    created = runner.invoke(cli, ["keys", "create", "--tenant", "acme"])
    assert created.exit_code == 0, created.output
    secret = created.stdout.splitlines()[0]
    sessions = session_factory(engine := make_engine(get_settings().database_url))
    with sessions() as session:
        tenant = repo.authenticate(session, secret=secret)
        assert tenant is not None and tenant.name == "acme"
        (key, _), = repo.list_api_keys(session, tenant_name="acme")  # fmt: skip

    listed = runner.invoke(cli, ["keys", "list", "--tenant", "acme"])
    assert listed.exit_code == 0 and key.prefix in listed.output and secret not in listed.output
    assert runner.invoke(cli, ["keys", "revoke", key.prefix]).exit_code == 0
    assert runner.invoke(cli, ["keys", "revoke", key.prefix]).exit_code == 1
    with sessions() as session:
        assert repo.authenticate(session, secret=secret) is None
    assert runner.invoke(cli, ["keys", "create", "--tenant", "Bad Name"]).exit_code == 2
    engine.dispose()


def test_serve_refuses_production_settings(cli: typer.Typer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIGIN_DATABASE_URL", "postgresql://digin@db.example:5432/digin")
    monkeypatch.setenv("DIGIN_AUTH", "on")
    result = runner.invoke(cli, ["serve"])
    assert result.exit_code == 2
    assert "embedded mode only" in result.output and "digin worker" in result.output


def test_bad_settings_and_options_are_clear_errors(cli, monkeypatch: pytest.MonkeyPatch):
    result = runner.invoke(cli, ["worker", "--queues", "gpu"])
    assert result.exit_code == 2 and "interactive, sweep" in result.output
    monkeypatch.setenv("DIGIN_BROKER_URL", "amqp://rabbit")
    get_settings.cache_clear()
    result = runner.invoke(cli, ["migrate"])
    assert result.exit_code == 2 and "DIGIN_BROKER_URL" in result.output
