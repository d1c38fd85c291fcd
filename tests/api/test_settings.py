"""Settings: embedded defaults, production checks, limits, and .env.example coverage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from digin.service.settings import Settings, fresh_settings, get_settings

ROOT = Path(__file__).resolve().parents[2]
PG = "postgresql://digin:pw@db:5432/digin"


@pytest.fixture(autouse=True)
def _in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Relative paths (the default data_dir, a .env file) resolve under tmp_path."""
    monkeypatch.chdir(tmp_path)


def test_embedded_defaults(tmp_path: Path):
    s = fresh_settings()
    data = (tmp_path / ".digin").resolve()
    assert s.mode == "embedded" and s.auth == "off" and not s.auth_enabled
    assert s.data_dir == data
    assert s.database_url == f"sqlite:///{data / 'digin.db'}"
    assert s.broker_url == "filesystem://"
    assert s.storage_backend == "local" and s.storage_root == data / "artifacts"
    assert (s.host, s.port, s.max_attempts, s.url_expiry_seconds) == ("127.0.0.1", 8000, 3, 900)
    assert s.image_formats == ["PNG", "JPEG", "WEBP"] and s.model_allow_list is None


def test_filesystem_broker_options_create_the_folders(tmp_path: Path):
    options = fresh_settings(data_dir=tmp_path / "d").broker_transport_options()
    assert options["data_folder_in"] == options["data_folder_out"]  # producers and consumers
    for key in ("data_folder_in", "control_folder"):
        assert Path(options[key]).is_dir() and Path(options[key]).is_relative_to(tmp_path / "d")


def test_redis_broker_options_carry_the_visibility_timeout(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIGIN_AUTH", "on")
    s = fresh_settings(broker_url="redis://localhost:6379/0", visibility_timeout_seconds=7200)
    assert s.mode == "production"
    assert s.broker_transport_options() == {
        "visibility_timeout": 7200,
        "queue_order_strategy": "priority",  # interactive before sweep
    }


def test_environment_variables_and_lists(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIGIN_IMAGE_FORMATS", "png, jpeg")
    monkeypatch.setenv("DIGIN_MODEL_ALLOW_LIST", '["digits", "timm:*"]')
    monkeypatch.setenv("DIGIN_MAX_QUEUED_PER_TENANT", "5")
    s = fresh_settings()
    assert s.image_formats == ["PNG", "JPEG"]
    assert s.model_allow_list == ["digits", "timm:*"]
    assert s.max_queued_per_tenant == 5


def test_sqlite_url_is_made_absolute(tmp_path: Path):
    s = fresh_settings(database_url="sqlite:///rel/digin.db")
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / 'rel' / 'digin.db'}"
    assert s.mode == "embedded"


def test_postgres_url_is_normalised_to_psycopg3():
    s = fresh_settings(database_url=PG, auth="on")
    assert s.database_url == "postgresql+psycopg://digin:pw@db:5432/digin"
    assert s.mode == "production"


@pytest.mark.parametrize(
    "overrides",
    [{"database_url": PG}, {"broker_url": "redis://r:6379/0"}],
    ids=["postgres", "redis"],
)
def test_production_turns_auth_on_and_refuses_it_off(overrides: dict[str, str]):
    assert fresh_settings(**overrides).auth == "on"
    with pytest.raises(ValidationError, match="DIGIN_AUTH=off is allowed only in embedded mode"):
        fresh_settings(auth="off", **overrides)


def test_s3_in_production_needs_real_secrets():
    base = {"storage_url": "s3://digin-artifacts", "s3_endpoint": "minio:9000"}
    with pytest.raises(ValidationError, match="DIGIN_S3_ACCESS_KEY must be set"):
        fresh_settings(**base)
    with pytest.raises(ValidationError, match="DIGIN_S3_SECRET_KEY must be set"):
        fresh_settings(**base, s3_access_key="AKIA1", s3_secret_key="changethis")
    s = fresh_settings(**base, s3_access_key="AKIA1", s3_secret_key="9f8e7d")
    assert (s.storage_backend, s.s3_bucket, s.mode) == ("s3", "digin-artifacts", "production")
    assert "9f8e7d" not in repr(s)  # secrets are SecretStr


def test_time_limit_must_be_below_visibility_timeout():
    with pytest.raises(ValidationError, match=r"TIME_LIMIT_SECONDS \(3600\) must be below"):
        fresh_settings(task_time_limit_seconds=3600, visibility_timeout_seconds=3600)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"database_url": "mysql://x/y"}, "DIGIN_DATABASE_URL"),
        ({"broker_url": "amqp://x"}, "DIGIN_BROKER_URL"),
        ({"storage_url": "s3://Bad_Bucket"}, "bucket name"),
        ({"storage_url": "gs://b"}, "DIGIN_STORAGE_URL"),
        ({"image_formats": ["PNG", "FITS"]}, "FITS"),
        ({"port": 0}, "port"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_bad_values_name_the_setting(overrides: dict[str, object], message: str):
    with pytest.raises(ValidationError, match=message):
        fresh_settings(**overrides)


def test_get_settings_is_cached_until_cleared(monkeypatch: pytest.MonkeyPatch):
    get_settings.cache_clear()
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("DIGIN_PORT", "9001")
    get_settings.cache_clear()
    assert get_settings().port == 9001
    get_settings.cache_clear()


def test_env_example_documents_every_setting():
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?(DIGIN_[A-Z0-9_]+)=", text, flags=re.M))
    assert documented == {f"DIGIN_{name.upper()}" for name in Settings.model_fields}


@pytest.mark.parametrize(
    "placeholder",
    ["ChangeThis", "CHANGE_ME", "change-this-secret", "Password", "  secret ", "xxxxxxxx"],
)
def test_placeholder_secrets_are_refused_in_any_case_and_punctuation(placeholder):
    base = {"database_url": "postgresql+psycopg://h/db", "storage_url": "s3://bucket"}
    with pytest.raises(ValidationError, match="DIGIN_S3_SECRET_KEY"):
        fresh_settings(**base, s3_access_key="AKIA1", s3_secret_key=placeholder)
    key = (placeholder.strip() * 40)[:40]  # long enough for the length rule
    with pytest.raises(ValidationError, match="DIGIN_SECRET_KEY is a placeholder"):
        fresh_settings(**base, s3_access_key="AKIA1", s3_secret_key="9f8e7d", secret_key=key)


def test_auth_failure_rate_is_checked_and_the_counts_follow_the_broker():
    with pytest.raises(ValidationError, match="DIGIN_AUTH_FAILURE_RATE"):
        fresh_settings(auth_failure_rate="lots")
    assert fresh_settings().rate_limit_storage_uri == "memory://"
    redis_url = "redis://127.0.0.1:6379/5"
    assert fresh_settings(broker_url=redis_url).rate_limit_storage_uri == redis_url
    other = fresh_settings(broker_url=redis_url, rate_limit_storage="memory://")
    assert other.rate_limit_storage_uri == "memory://"


def test_model_roots_default_to_none_in_production_and_any_path_embedded():
    assert fresh_settings().model_roots is None
    assert fresh_settings().model_path_roots is None  # embedded: the user's own machine
    assert fresh_settings(database_url=PG).model_path_roots == []  # only the bundled zoo


def test_model_roots_from_the_environment_are_made_absolute_as_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.setenv("DIGIN_MODEL_ROOTS", "/models, alias/./zoo/..")
    s = fresh_settings(database_url=PG)
    assert s.model_roots == [Path("/models"), tmp_path / "alias"]  # not resolved to real/
    assert s.model_path_roots == s.model_roots
    monkeypatch.setenv("DIGIN_MODEL_ROOTS", '["/srv/zoo"]')
    assert fresh_settings().model_path_roots == [Path("/srv/zoo")]  # embedded too, when set
    monkeypatch.setenv("DIGIN_MODEL_ROOTS", "[]")
    assert fresh_settings().model_path_roots == []  # embedded: no folder but the bundled zoo


@pytest.mark.parametrize("value", ["/", "/models,/", "//", "/models/.."])
def test_the_file_system_root_is_no_model_root(monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv("DIGIN_MODEL_ROOTS", value)
    with pytest.raises(ValidationError, match="DIGIN_MODEL_ROOTS: .* the file system's root"):
        fresh_settings()
