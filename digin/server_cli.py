"""The service commands of ``digin`` (docs/architecture.md §10): migrate, keys, worker,
reaper, api, serve.

    digin serve [--host --port]    embedded mode (§9.12): everything on this machine, one command
    digin migrate                  production: upgrade the database
    digin api [--host --port]      production: the HTTP API (uvicorn)
    digin worker [-Q …] [-c 1]     production: a Celery worker, one per GPU
    digin reaper                   production: the reaper loop (one or more, anywhere)
    digin keys create|list|revoke  API keys of tenants

Options and settings agree: an option that sets what a DIGIN_* variable sets (``--host``,
``--port``) overrides it, the variable overrides the ``.env`` file, and that overrides the default.

Top-level imports stay torch-free and light (``digin models`` starts fast); each command
imports what it needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from digin.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_WORKER_NAME = "embedded"

keys_app = typer.Typer(help="API keys: bearer tokens bound to a tenant.", no_args_is_help=True)


def _settings() -> Settings:
    """The DIGIN_* settings, or a clear error and exit code 2."""
    from pydantic import ValidationError

    from digin.service.settings import get_settings

    try:
        return get_settings()
    except (ValidationError, ValueError) as exc:
        typer.echo(f"error: invalid DIGIN_* settings: {exc}", err=True)
        raise typer.Exit(code=2) from None


def _sessions(settings: Settings) -> Any:
    from digin.service.db import make_engine, session_factory

    return session_factory(make_engine(settings.database_url))


# --- database and keys -------------------------------------------------------------------------
def migrate_command(
    storage: Annotated[
        bool,
        typer.Option(help="Also create the artifact bucket (S3) or folder if it is missing."),
    ] = True,
) -> None:
    """Create or upgrade the database to the current schema, and create the artifact bucket
    or folder (idempotent; the deployment runs it before the API starts)."""
    from digin.service.db import migrate
    from digin.service.storage import storage_from_settings

    settings = _settings()
    migrate(settings.database_url)
    typer.echo(f"database is up to date ({settings.database_url.split('@')[-1]})")
    if storage:
        storage_from_settings(settings).ensure_bucket()
        typer.echo(f"artifact storage is ready ({settings.storage_url})")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant name (created if missing).")],
) -> None:
    """Create an API key for TENANT; the secret is printed once and never stored."""
    from digin.service import repo
    from digin.service.db import session_scope

    settings = _settings()
    try:
        with session_scope(_sessions(settings)) as session:
            key, secret = repo.create_api_key(session, tenant_name=tenant)
            prefix = key.prefix
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(secret)
    typer.echo(
        f"key {prefix} for tenant {tenant!r}: keep the secret above, it is not shown again",
        err=True,
    )
    if not settings.auth_enabled:
        typer.echo("note: DIGIN_AUTH is off here, so the API does not ask for keys", err=True)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's keys.")] = None,
) -> None:
    """List API keys (prefix, tenant, created, revoked); secrets cannot be listed."""
    from digin.service import repo

    with _sessions(_settings())() as session:
        rows = repo.list_api_keys(session, tenant_name=tenant)
    header = ("PREFIX", "TENANT", "CREATED", "REVOKED")
    table = [
        (
            key.prefix,
            name,
            key.created_at.isoformat(timespec="seconds"),
            key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-",
        )
        for key, name in rows
    ]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@keys_app.command("webhook-secret")
def keys_webhook_secret(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant name (created if missing).")],
    rotate: Annotated[
        bool, typer.Option("--rotate", help="Replace the secret (receivers need the new one).")
    ] = False,
) -> None:
    """Print TENANT's webhook signing secret (whsec_…, created on first use); --rotate
    replaces it. Tenants read theirs with GET /v1/webhooks/secret."""
    from digin.service import repo
    from digin.service.db import session_scope
    from digin.service.repo.webhooks import webhook_secret

    settings = _settings()
    try:
        with session_scope(_sessions(settings)) as session:
            owner = repo.ensure_tenant(session, name=tenant)
            secret = webhook_secret(session, tenant_id=owner.id, rotate=rotate)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(secret)
    if rotate:
        typer.echo(f"rotated the webhook secret of tenant {tenant!r}", err=True)


@keys_app.command("revoke")
def keys_revoke(prefix: Annotated[str, typer.Argument(help="The key's prefix.")]) -> None:
    """Revoke the key with PREFIX (requests with it get 401 from now on)."""
    from digin.service import repo
    from digin.service.db import session_scope

    with session_scope(_sessions(_settings())) as session:
        revoked = repo.revoke_api_key(session, prefix=prefix)
    if not revoked:
        typer.echo(f"error: no active key with prefix {prefix!r}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"revoked {prefix}")


# --- workers and the reaper --------------------------------------------------------------------
def _queues(value: str) -> str:
    from digin.service.dispatch import QUEUES

    queues = [q.strip() for q in value.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown or not queues:
        raise typer.BadParameter(
            f"{unknown or 'empty'}: choose from {', '.join(QUEUES)}", param_hint="--queues"
        )
    return ",".join(queues)


def worker_argv(
    *,
    queues: str,
    concurrency: int,
    loglevel: str = "INFO",
    hostname: str | None = None,
    beat: bool = False,
    schedule: Path | None = None,
    quiet: bool = False,
) -> list[str]:
    """Arguments of `celery -A digin.worker.app:app` for a worker: prefork pool (time limits work
    only there), `concurrency` processes (one per GPU)."""
    argv = [
        "worker",
        f"--queues={queues}",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        f"--loglevel={loglevel}",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    if beat:
        argv += ["--beat", f"--schedule={schedule}"]
    if quiet:  # one machine: no cluster events, no start-up sync with other workers
        argv += ["--without-gossip", "--without-mingle"]
    return argv


def worker_command(
    queues: Annotated[
        str, typer.Option("--queues", "-Q", help="Comma-separated: interactive, sweep.")
    ] = "interactive,sweep",
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Processes; 1 per GPU.")
    ] = 1,
    beat: Annotated[
        bool,
        typer.Option(
            "--beat", "-B", help="Also schedule the reaper (Celery beat); else run `digin reaper`."
        ),
    ] = False,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
    hostname: Annotated[str | None, typer.Option("--hostname", "-n")] = None,
) -> None:
    """Run a Celery worker (prefork; the GPU is used only in its child processes).

    One worker per GPU: CUDA_VISIBLE_DEVICES=0 digin worker -c 1; DIGIN_DEVICE picks the device
    (default: cuda if the child sees one, else cpu)."""
    settings = _settings()
    if beat:
        settings.data_dir.mkdir(parents=True, exist_ok=True)  # the beat schedule file
    argv = worker_argv(
        queues=_queues(queues),
        concurrency=concurrency,
        loglevel=loglevel,
        hostname=hostname,
        beat=beat,
        schedule=settings.data_dir / "celerybeat-schedule",
    )
    from digin.worker.app import app as celery_app

    celery_app.worker_main(argv)


def _enqueuer(settings: Settings) -> Any:
    from digin.service.dispatch import make_celery
    from digin.worker.tasks import celery_enqueuer

    return celery_enqueuer(make_celery(settings))


def reaper_command(
    interval: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Seconds between rounds, at least 0.1 (default: heartbeat threshold / 4, ≤ 30 s).",
        ),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="One round, then exit.")] = False,
) -> None:
    """Re-queue jobs of dead workers and re-send lost messages, every INTERVAL seconds; send
    due webhook deliveries (every DIGIN_WEBHOOK_INTERVAL_SECONDS)."""
    from digin.worker.logs import configure_logging
    from digin.worker.reaper import reap_once, run_reaper

    settings = _settings()
    configure_logging()
    if settings.worker_metrics_port is not None:  # reaper actions on GET /metrics
        from digin.worker import metrics

        metrics.enable()
        metrics.serve(settings.worker_metrics_port)
    sessions, enqueue = _sessions(settings), _enqueuer(settings)
    if once:
        reap_once(sessions=sessions, settings=settings, enqueue=enqueue)
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from digin.worker.webhooks import run_sender  # the webhook sender runs beside the reaper

    sender = threading.Thread(
        target=run_sender,
        kwargs={"sessions": sessions, "settings": settings, "stop": stop},
        name="webhooks",
        daemon=True,
    )
    sender.start()
    run_reaper(sessions=sessions, settings=settings, enqueue=enqueue, stop=stop, interval=interval)
    sender.join(timeout=15)


# --- the API -----------------------------------------------------------------------------------
HostOption = Annotated[
    str | None,
    typer.Option(
        help="Address the API listens on (sets DIGIN_HOST). Default: DIGIN_HOST, 127.0.0.1. "
        "With auth off, only a loopback address."
    ),
]
PortOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=65535,
        help="Port the API listens on (sets DIGIN_PORT). Default: DIGIN_PORT, 8000.",
    ),
]


def _listen_settings(host: str | None, port: int | None) -> Settings:
    """The settings of `digin api` and `digin serve`: --host and --port override DIGIN_HOST and
    DIGIN_PORT, which override the defaults. The options are written to the environment, where
    the app, uvicorn's worker processes and the embedded worker read them; a clear error (exit
    code 2) if the API may not listen there (auth off: a loopback address only)."""
    overrides = {"DIGIN_HOST": host, "DIGIN_PORT": None if port is None else str(port)}
    given = {name: value for name, value in overrides.items() if value is not None}
    if given:
        from digin.service.settings import get_settings

        os.environ.update(given)
        get_settings.cache_clear()  # settings read before the options would not see them
    settings = _settings()
    try:
        from digin.api.app import check_binding
    except ImportError as exc:
        typer.echo(f"error: the API is not available: {exc}", err=True)
        raise typer.Exit(code=1) from None
    try:
        check_binding(settings)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    return settings


def api_command(
    host: HostOption = None,
    port: PortOption = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the HTTP API with uvicorn (run `digin migrate` first)."""
    import uvicorn

    settings = _listen_settings(host, port)
    uvicorn.run(
        "digin.api.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        proxy_headers=True,
    )


# --- embedded mode -----------------------------------------------------------------------------
class _Shutdown(Exception):
    pass


def _die_with_parent() -> None:
    """In the worker child, before exec: get SIGTERM if `digin serve` dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn_embedded_worker(settings: Settings, *, concurrency: int = 1) -> subprocess.Popen[bytes]:
    """Start the embedded Celery worker as a child in its own process group (so `digin serve`
    decides when and how it stops), on the same data folder, database, broker and storage."""
    env = {
        **os.environ,
        "DIGIN_DATA_DIR": str(settings.data_dir),
        "DIGIN_DATABASE_URL": settings.database_url,
        "DIGIN_BROKER_URL": settings.broker_url,
        "DIGIN_STORAGE_URL": settings.storage_url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    argv = worker_argv(
        queues="interactive,sweep",
        concurrency=concurrency,
        hostname=f"{EMBEDDED_WORKER_NAME}-{os.getpid()}@%h",
        quiet=True,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "digin.worker.app:app", *argv],
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


def stop_process_group(proc: subprocess.Popen[bytes], *, grace: float) -> None:
    """Stop the worker: warm shutdown (it finishes its task) for `grace` seconds, then cold,
    then SIGKILL to whatever is left of its process group (no orphans)."""
    steps = [(signal.SIGTERM, grace), (signal.SIGQUIT, 5.0)]
    for sig, wait in steps:
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its pool children, if any outlived it
    proc.wait()


def serve_command(
    host: HostOption = None,
    port: PortOption = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Worker processes.")
    ] = 1,
    shutdown_grace: Annotated[
        float,
        typer.Option(help="Seconds a running job may take to finish on Ctrl-C before it is cut."),
    ] = 10.0,
) -> None:
    """Embedded mode: API, worker and reaper on this machine, no servers needed.

    SQLite, the filesystem broker and artifacts under DIGIN_DATA_DIR (./.digin), auth off, the
    bundled digits models; the API on http://HOST:PORT (--host, --port; default DIGIN_HOST,
    DIGIN_PORT: 127.0.0.1:8000). Ctrl-C or SIGTERM stops the API, then the worker. With DIGIN_*
    server URLs set (production), run `digin migrate`, `digin api`, `digin worker` and
    `digin reaper` instead."""
    settings = _listen_settings(host, port)
    _refuse_server_settings(settings)

    import uvicorn

    from digin.service.db import migrate
    from digin.service.storage import storage_from_settings
    from digin.worker.logs import configure_logging

    configure_logging()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        from digin.api.app import create_app
    except ImportError as exc:
        typer.echo(f"error: the API is not available: {exc}", err=True)
        raise typer.Exit(code=1) from None

    def terminate(_sig: int, _frame: FrameType | None) -> None:
        raise _Shutdown

    previous = signal.signal(signal.SIGTERM, terminate)  # uvicorn re-raises it after its shutdown
    migrate(settings.database_url)
    storage_from_settings(settings).ensure_bucket()
    api = create_app(settings)
    worker = spawn_embedded_worker(settings, concurrency=concurrency)
    stop = threading.Event()
    loops = _start_background_loops(settings, stop)
    typer.echo(
        f"digin serve: embedded mode, data in {settings.data_dir}, API on "
        f"http://{settings.host}:{settings.port} (worker pid {worker.pid}); Ctrl-C stops",
        err=True,
    )
    try:
        uvicorn.run(api, host=settings.host, port=settings.port, log_config=None)
    except (KeyboardInterrupt, _Shutdown):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean stop, not interrupted
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop.set()
        stop_process_group(worker, grace=shutdown_grace)
        for thread, timeout in loops:
            thread.join(timeout=timeout)
        signal.signal(signal.SIGTERM, previous)
        typer.echo("digin serve: stopped", err=True)


def _refuse_server_settings(settings: Settings) -> None:
    """`digin serve` is the embedded mode: settings that point at servers exit with code 2."""
    if settings.mode != "embedded":
        typer.echo(
            f"error: `digin serve` runs the embedded mode only; these settings point at servers "
            f"({'; '.join(settings.servers)}). In production run `digin migrate`, then "
            "`digin api`, `digin worker` (one per GPU) and `digin reaper`.",
            err=True,
        )
        raise typer.Exit(code=2)


def _start_background_loops(
    settings: Settings, stop: threading.Event
) -> list[tuple[threading.Thread, float]]:
    """The reaper and the webhook sender as daemon threads until `stop` is set; each with the
    seconds its stop may take."""
    from digin.worker.reaper import run_reaper
    from digin.worker.webhooks import run_sender  # deliveries, outside the API's requests

    reaper = threading.Thread(
        target=run_reaper,
        kwargs={
            "sessions": _sessions(settings),
            "settings": settings,
            "enqueue": _enqueuer(settings),
            "stop": stop,
        },
        name="reaper",
        daemon=True,
    )
    sender = threading.Thread(
        target=run_sender,
        kwargs={"sessions": _sessions(settings), "settings": settings, "stop": stop},
        name="webhooks",
        daemon=True,
    )
    reaper.start()
    sender.start()
    return [(reaper, 10.0), (sender, 15.0)]


def register(app: typer.Typer) -> None:
    """Add the service commands to the `digin` command line."""
    app.command("migrate")(migrate_command)
    app.add_typer(keys_app, name="keys")
    app.command("worker")(worker_command)
    app.command("reaper")(reaper_command)
    app.command("api")(api_command)
    app.command("serve")(serve_command)
