"""Service settings (docs/architecture.md §9.12): environment variables prefixed ``DIGIN_``,
documented in ``.env.example``.

With no variables set, everything runs on one machine (embedded mode): SQLite under
``data_dir``, Celery's filesystem broker under ``data_dir``, artifacts in a local directory, no
auth. Pointing any of the three URLs at a server (PostgreSQL, Redis, S3) selects production
mode, which requires auth and has no default secrets.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Mode = Literal["embedded", "production"]

KNOWN_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# The default of DIGIN_MAX_JOB_COST, in pixel-steps (digin.core.limits.estimate_cost): e.g. 90
# images of SD 1.5 at 512 px with the default 20 iterations of 20 DDIM steps (about 20 minutes on
# an H200 with the optimised preset, BENCHMARKS.md), 22 of SDXL at 1024 px, or 350,000 of the
# digits zoo's 16 px images at its 10 iterations of 5 steps. Every example job costs < 3e8.
DEFAULT_MAX_JOB_COST = 10**10
# The share of the machine's memory that the pool processes of a CPU worker may use together
# when DIGIN_WORKER_MEMORY_LIMIT_MB is unset.
WORKER_MEMORY_SHARE = 0.75
# Values of the .env.example file: refused as secrets in production mode.
PLACEHOLDER_SECRETS = {"", "changethis", "changeme", "secret", "password", "minioadmin", "example"}


def is_placeholder(secret: str) -> bool:
    """A secret copied from an example rather than made: one of the usual placeholders in any
    case and punctuation (`ChangeThis`, `change-me`, `CHANGE_THIS_…`), repeated or not, or one
    character repeated."""
    plain = "".join(c for c in secret.lower() if c.isalnum())
    if len(set(plain)) <= 1 or plain.startswith(("changethis", "changeme")):
        return True
    # a placeholder, or one repeated to reach a length rule (PasswordPassword…)
    return any(word and (word * (len(plain) // len(word) + 1)).startswith(plain)
               for word in PLACEHOLDER_SECRETS)  # fmt: skip


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# A CSP frame-ancestors source: 'self', 'none', or scheme://host[:port] (host may start with *.)
_FRAME_SOURCE = re.compile(r"^('self'|'none'|https?://(\*\.)?[A-Za-z0-9.-]+(:(\d{1,5}|\*))?)$")


def _split_list(value: Any) -> Any:
    """Env lists read as JSON ('["PNG","JPEG"]') or comma-separated ('PNG,JPEG')."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [item.strip() for item in text.split(",") if item.strip()]


class Settings(BaseSettings):
    """Every setting of the API and the workers; see `.env.example` for the variables."""

    model_config = SettingsConfigDict(
        env_prefix="DIGIN_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    # --- where things live ---------------------------------------------------------------------
    data_dir: Path = Field(Path(".digin"), description="embedded-mode files (made absolute)")
    database_url: str = Field("", description="default: sqlite:///<data_dir>/digin.db")
    broker_url: str = Field("filesystem://", description="Celery broker; filesystem:// = embedded")
    storage_url: str = Field("", description="file://<dir> or s3://<bucket>; default: data_dir")
    s3_endpoint: str = Field("s3.amazonaws.com", description="host[:port] or http(s)://host:port")
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = Field(True, description="https to the S3 endpoint (ignored if it has one)")
    s3_region: str = Field("us-east-1", description="bucket region (presigning needs no lookup)")
    s3_public_endpoint: str | None = Field(None, description="host clients use for presigned URLs")
    url_expiry_seconds: int = Field(900, ge=1, le=7 * 24 * 3600)

    # --- the API ---------------------------------------------------------------------------------
    auth: Literal["on", "off"] | None = Field(None, description="default: off embedded, else on")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    # --- the dashboard (/ui, docs/architecture.md §9.11) -----------------------------------------
    secret_key: SecretStr | None = Field(
        None,
        description="signs dashboard sessions and CSRF tokens (HMAC-SHA256; 32+ characters). "
        "Production: the dashboard login needs it; embedded: made once in data_dir",
    )
    session_seconds: int = Field(
        8 * 3600, ge=60, le=30 * 24 * 3600, description="lifetime of a dashboard session"
    )
    frame_ancestors: Annotated[list[str], NoDecode] = Field(
        default=["'self'"],
        description="who may embed the dashboard in a frame: CSP frame-ancestors sources",
    )

    # --- limits (docs/architecture.md §9.6, §9.7) ----------------------------------------------
    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    max_image_bytes: int = Field(10 * 2**20, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64)
    image_formats: Annotated[list[str], NoDecode] = Field(default=["PNG", "JPEG", "WEBP"])
    max_queued_per_tenant: int = Field(
        10_000, ge=1, description="queued interactive jobs of a tenant (sweep items apart)"
    )
    max_running_per_tenant: int = Field(8, ge=1)
    auth_failure_rate: str = Field(
        "20/minute",
        description="refused API keys allowed per client address and per key prefix in a moving "
        "window (a `limits` rate: N/second, N/minute, N/hour); beyond it 429 with Retry-After",
    )
    rate_limit_storage: str | None = Field(
        None,
        description="where the counts of refused keys live (redis://…, or memory://); default: "
        "the broker's Redis when the broker is Redis, else this process's memory",
    )
    key_cache_seconds: float = Field(
        5.0,
        ge=0,
        le=300,
        description="a successful API-key check is remembered this long per API process "
        "(revocation: at once on PostgreSQL, within this time on SQLite); 0 turns it off",
    )
    db_pool_size: int = Field(
        20,
        ge=1,
        le=500,
        description="PostgreSQL connections each API process keeps open; requests beyond them "
        "wait for one (up to 30 s) instead of opening and closing more",
    )
    max_streams_per_tenant: int = Field(
        100, ge=1, description="open event streams (/events) of a tenant per API process"
    )
    events_heartbeat_seconds: float = Field(
        15.0, gt=0, le=300, description="an idle event stream sends a comment this often"
    )
    events_poll_seconds: float = Field(
        0.5, gt=0, le=10, description="SQLite: how often the API reads new events for its streams"
    )
    max_job_cost: int = Field(
        DEFAULT_MAX_JOB_COST,
        ge=0,
        description="the largest estimated cost of one job (pixel-steps: items x passes x DDIM "
        "steps x pixels, digin.core.limits); a job or batch item above it is refused with a 422 "
        "naming its estimate; 0: no cap",
    )
    model_allow_list: Annotated[list[str] | None, NoDecode] = None
    model_roots: Annotated[list[Path] | None, NoDecode] = Field(
        None,
        description="folders a model spec's local path must lie in ('..' and symbolic links "
        "resolved; the bundled digits zoo always may); unset: none in production, any path "
        "embedded (see model_path_roots)",
    )

    # --- workers and the reaper (docs/architecture.md §9.3, §9.4) ------------------------------
    max_attempts: int = Field(3, ge=1, le=20)
    heartbeat_stale_seconds: int = Field(600, ge=10)
    queued_stale_seconds: int = Field(1800, ge=10)
    task_time_limit_seconds: int = Field(3000, ge=10)
    visibility_timeout_seconds: int = Field(3600, ge=10)
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="worker device: auto (cuda if the worker sees a GPU, else cpu), cpu, cuda[:N]",
    )
    max_batch: int = Field(8, ge=1, le=256, description="items a worker optimises in one run")
    worker_memory_limit_mb: int | None = Field(
        None,
        ge=0,
        description="memory (MB of data segment) each worker pool process may use: a job that "
        "needs more fails with resource_limit and the process takes the next job. Unset: on "
        "CPU workers a share of the machine's (or container's) memory, "
        f"{WORKER_MEMORY_SHARE:.0%} divided among the pool processes; off on GPU workers. 0: off",
    )
    model_cache_size: int = Field(
        8,
        ge=1,
        le=1024,
        description="models a worker process keeps loaded (least recently used dropped first)",
    )

    # --- sweeps and webhooks (docs/architecture.md §9.9, §9.10) ---------------------------------
    max_items_per_batch: int = Field(100_000, ge=1, description="items of one batch")
    max_queued_sweep_items_per_tenant: int = Field(
        1_000_000, ge=1, description="queued batch items of a tenant (interactive jobs apart)"
    )
    batch_max_items: int = Field(
        8,
        ge=1,
        le=256,
        description="a worker taking a sweep item also claims compatible queued items of its "
        "batch and runs them as one batched optimisation, up to this many images (1: off)",
    )
    batch_memory_mb: int | None = Field(
        None,
        ge=1,
        description="CUDA: also keep a batched run's estimated peak GPU memory (measured per "
        "image on earlier runs of the same models and settings) under this many MB",
    )
    webhook_backoff_seconds: float = Field(
        5.0, gt=0, le=3600, description="wait before retry n: this × 2^(n-1) (≤ 1 h)"
    )
    webhook_interval_seconds: float = Field(
        2.0, gt=0, le=300, description="how often the sender looks for due deliveries"
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=60, description="per attempt")
    worker_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="port of the Prometheus metrics of a worker or reaper process (unset: none)",
    )

    @field_validator("max_job_cost", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """'1e10' as well as '10000000000'."""
        if isinstance(value, str | float):
            try:
                number = float(value)
            except ValueError:
                return value  # the int validation names it
            if number.is_integer():
                return int(number)
        return value

    @field_validator(
        "image_formats", "model_allow_list", "model_roots", "frame_ancestors", mode="before"
    )
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("image_formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        formats = [f.upper() for f in value]
        unknown = sorted(set(formats) - set(KNOWN_IMAGE_FORMATS))
        if unknown or not formats:
            raise ValueError(
                f"DIGIN_IMAGE_FORMATS: {unknown or 'empty'}; pick from {list(KNOWN_IMAGE_FORMATS)}"
            )
        return formats

    @field_validator("model_roots")
    @classmethod
    def _model_roots(cls, value: list[Path] | None) -> list[Path] | None:
        """Made absolute as written (not resolved: a spec is compared with the root as spelled
        and, symbolic links resolved on both sides, with its real folder)."""
        if value is None:
            return None
        roots = []
        for root in value:
            if not str(root).strip():
                raise ValueError("DIGIN_MODEL_ROOTS: an empty folder name")
            absolute = Path(os.path.abspath(root.expanduser()))
            if absolute == Path(absolute.anchor):
                raise ValueError(
                    f"DIGIN_MODEL_ROOTS: {str(root)!r} is the file system's root, which would let "
                    "specs name any file; list the folders that hold models"
                )
            roots.append(absolute)
        return roots

    @field_validator("frame_ancestors")
    @classmethod
    def _frame_ancestors(cls, value: list[str]) -> list[str]:
        value = [f"'{v}'" if v in ("self", "none") else v for v in value]  # quotes are optional
        bad = [v for v in value if not _FRAME_SOURCE.match(v)]
        if bad or not value:
            raise ValueError(
                f"DIGIN_FRAME_ANCESTORS: {bad or 'empty'} are not CSP sources; give 'self', "
                "'none', or origins such as https://dashboard.example.org or https://*.example.org"
            )
        if "'none'" in value and len(value) > 1:
            raise ValueError("DIGIN_FRAME_ANCESTORS: 'none' cannot be combined with other sources")
        return value

    @field_validator("auth_failure_rate")
    @classmethod
    def _auth_failure_rate(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError(
                f"DIGIN_AUTH_FAILURE_RATE={value!r}: a rate such as 20/minute or 5/second"
            ) from None
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError(
                "DIGIN_SECRET_KEY must have at least 32 characters "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return value

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        self.database_url = _database_url(self.database_url, self.data_dir)
        self.storage_url = _storage_url(self.storage_url, self.data_dir)
        scheme = self.broker_url.split("://", 1)[0]
        if "://" not in self.broker_url or scheme not in {
            "filesystem",
            "memory",
            "redis",
            "rediss",
        }:
            raise ValueError(
                f"DIGIN_BROKER_URL={self.broker_url!r}: supported are "
                "filesystem:// (embedded), redis://host:port/db, rediss://…"
            )
        if self.task_time_limit_seconds >= self.visibility_timeout_seconds:
            raise ValueError(
                f"DIGIN_TASK_TIME_LIMIT_SECONDS ({self.task_time_limit_seconds}) must be below "
                f"DIGIN_VISIBILITY_TIMEOUT_SECONDS ({self.visibility_timeout_seconds}): otherwise "
                "the broker redelivers a still-running task to a second worker"
            )
        if self.auth is None:
            self.auth = "off" if self.mode == "embedded" else "on"
        if self.mode == "production":
            self._check_production()
        return self

    def _check_production(self) -> None:
        servers = ", ".join(self.servers)
        if self.auth != "on":
            raise ValueError(
                f"DIGIN_AUTH=off is allowed only in embedded mode; this is production "
                f"mode ({servers}): set DIGIN_AUTH=on"
            )
        if self.storage_backend == "s3":
            for name in ("s3_access_key", "s3_secret_key"):
                secret: SecretStr | None = getattr(self, name)
                if secret is None or is_placeholder(secret.get_secret_value()):
                    raise ValueError(
                        f"DIGIN_{name.upper()} must be set to a real secret in "
                        f"production mode ({servers}); it has no default"
                    )
        if self.secret_key is not None and is_placeholder(self.secret_key.get_secret_value()):
            raise ValueError(
                f"DIGIN_SECRET_KEY is a placeholder; production mode ({servers}) needs a real "
                "secret (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )

    # --- derived values --------------------------------------------------------------------------
    @property
    def rate_limit_storage_uri(self) -> str:
        """The counts of refused keys: the setting, else the broker's Redis, else memory."""
        if self.rate_limit_storage:
            return self.rate_limit_storage
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return "memory://"

    @property
    def servers(self) -> list[str]:
        """The settings that point at servers (empty in embedded mode)."""
        found = []
        if not self.database_url.startswith("sqlite"):
            found.append("DIGIN_DATABASE_URL is PostgreSQL")
        if self.broker_url.split("://", 1)[0] not in {"filesystem", "memory"}:
            found.append("DIGIN_BROKER_URL is Redis")
        if self.storage_backend == "s3":
            found.append("DIGIN_STORAGE_URL is S3")
        return found

    @property
    def mode(self) -> Mode:
        """'embedded' when database, broker and storage are all local, else 'production'."""
        return "production" if self.servers else "embedded"

    @property
    def model_path_roots(self) -> list[Path] | None:
        """The folders that model specs naming local paths are confined to
        (`digin.core.registry.check_model_roots`): DIGIN_MODEL_ROOTS; unset, none in production
        (only the bundled digits zoo) and None in embedded mode (any path: the user's machine)."""
        if self.model_roots is not None:
            return list(self.model_roots)
        return [] if self.mode == "production" else None

    @property
    def auth_enabled(self) -> bool:
        return self.auth == "on"

    @property
    def storage_backend(self) -> Literal["local", "s3"]:
        return "s3" if self.storage_url.startswith("s3://") else "local"

    @property
    def storage_root(self) -> Path:
        """The local artifact directory (storage_backend 'local')."""
        return Path(self.storage_url.removeprefix("file://"))

    @property
    def s3_bucket(self) -> str:
        return self.storage_url.removeprefix("s3://")

    def broker_transport_options(self) -> dict[str, Any]:
        """Celery `broker_transport_options`: the filesystem broker's folders (created here),
        or Redis's visibility timeout."""
        if self.broker_url.startswith("filesystem://"):
            queue = self.data_dir / "broker" / "queue"
            control = self.data_dir / "broker" / "control"
            for folder in (queue, control):
                folder.mkdir(parents=True, exist_ok=True)
            # One folder for in and out: producers (API) and consumers (workers) share it.
            return {
                "data_folder_in": str(queue),
                "data_folder_out": str(queue),
                "control_folder": str(control),
            }
        if self.broker_url.startswith("redis"):
            # "priority": a worker consuming `-Q interactive,sweep` takes interactive
            # messages first, sweeps only when no interactive job waits (kombu's default,
            # round robin, would give each queue every other free slot)
            return {
                "visibility_timeout": self.visibility_timeout_seconds,
                "queue_order_strategy": "priority",
            }
        return {}


def _database_url(url: str, data_dir: Path) -> str:
    if not url:
        return f"sqlite:///{data_dir / 'digin.db'}"
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    if url.startswith("postgresql+psycopg://"):
        return url
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix) and url != prefix:  # absolute: API and workers agree on it
            return f"sqlite:///{Path(url.removeprefix(prefix)).expanduser().resolve()}"
    raise ValueError(
        f"DIGIN_DATABASE_URL={url.split('@')[-1]!r}: supported are "
        "postgresql://user:password@host:port/db and sqlite:///<file>"
    )


def _storage_url(url: str, data_dir: Path) -> str:
    if not url:
        return f"file://{data_dir / 'artifacts'}"
    if url.startswith("file://"):
        path = Path(url.removeprefix("file://")).expanduser().resolve()
        return f"file://{path}"
    if url.startswith("s3://"):
        bucket = url.removeprefix("s3://").rstrip("/")
        if not _BUCKET.match(bucket):
            raise ValueError(
                f"DIGIN_STORAGE_URL={url!r}: the bucket name must be 3-63 lowercase "
                "letters, digits, dots or hyphens (s3://<bucket>, no path)"
            )
        return f"s3://{bucket}"
    raise ValueError(f"DIGIN_STORAGE_URL={url!r}: supported are file://<dir> and s3://<bucket>")


def fresh_settings(**overrides: Any) -> Settings:
    """New Settings from the environment (no .env file) and `overrides`: for tests and tools."""
    return Settings(_env_file=None, **overrides)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once (`get_settings.cache_clear()` re-reads them)."""
    return Settings()
