"""The client commands of ``digin``: talk to a running service over HTTP (`digin_client`).

    digin submit KIND [--params FILE|-] [--seed N] [--priority N] [--wait]
    digin status JOB        digin wait JOB        digin download JOB [--out DIR]
    digin batch create --file SPEC.json [--wait]
    digin batch status|wait|cancel ID       digin batch results ID [--format jsonl|csv]
    digin batch list

Every command takes `--url` (DIGIN_URL, default http://127.0.0.1:8000), `--key`
(DIGIN_API_KEY) and `--json` (machine-readable output on stdout; no progress bars). Progress
bars and messages go to stderr. Exit codes: 0 done (a waited job or batch succeeded), 1 the job
or batch finished without succeeding, 2 bad usage, 3 a wait timed out, 4 the request failed
(the service's problem is printed, as JSON with `--json`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from digin_client import APIError, Batch, Client, DiginError, Job, WaitTimeoutError

EXIT_UNSUCCESSFUL, EXIT_USAGE, EXIT_TIMEOUT, EXIT_REQUEST = 1, 2, 3, 4

UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="DIGIN_URL", help="The service's base URL."),
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="DIGIN_API_KEY",
        show_default=False,
        help="API key (Authorization: Bearer); not needed in embedded mode.",
    ),  # fmt: skip
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts (stdout).")]
TimeoutOption = Annotated[
    float | None, typer.Option("--timeout", help="Give up waiting after this many seconds.")
]
DEFAULT_URL = "http://127.0.0.1:8000"


class ResultsFormat(StrEnum):
    jsonl = "jsonl"
    csv = "csv"


batch_app = typer.Typer(
    help="Sweeps: create, follow, read and cancel batches.", no_args_is_help=True
)


def _stderr() -> Console:
    return Console(file=sys.stderr, highlight=False)


def _client(url: str, key: str | None) -> Client:
    try:
        return Client(url, key)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--url") from None


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@contextlib.contextmanager
def _reporting(as_json: bool) -> Iterator[None]:
    """Turn the client's errors into a message (or the problem as JSON) and an exit code."""
    try:
        yield
    except WaitTimeoutError as exc:
        if as_json:
            last = exc.last.model_dump(mode="json") if exc.last is not None else None
            _print_json({"error": {"title": "timeout", "detail": str(exc)}, "last": last})
        else:
            _stderr().print(f"[red]timeout:[/] {exc}")
        raise typer.Exit(EXIT_TIMEOUT) from None
    except APIError as exc:
        if as_json:
            _print_json({"error": exc.to_dict()})
        else:
            console = _stderr()
            console.print(f"[red]error:[/] {exc}", markup=True)
            for error in exc.errors:
                console.print(f"  {error.field}: {error.message}", markup=False)
        raise typer.Exit(EXIT_REQUEST) from None
    except DiginError as exc:
        if as_json:
            _print_json({"error": {"title": type(exc).__name__, "detail": str(exc)}})
        else:
            _stderr().print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_REQUEST) from None


def _read_json(source: str, option: str) -> dict[str, Any]:
    """A JSON object from a file, or from stdin for '-'."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        value = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {source}: {exc}", param_hint=option) from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{source} must hold a JSON object", param_hint=option)
    return value


# --- human-readable output ------------------------------------------------------------------------
def _describe_job(job: Job) -> str:
    lines = [f"job {job.id}  {job.kind}  {job.status}"]
    if job.progress is not None and job.progress.total:
        stage = f" ({job.progress.stage})" if job.progress.stage else ""
        lines.append(f"  progress  {job.progress.step or 0}/{job.progress.total}{stage}")
    lines.append(f"  seed {job.seed}  priority {job.priority}  attempts {job.attempts}")
    if job.batch_id:
        lines.append(f"  batch     {job.batch_id}")
    if job.error is not None:
        lines.append(f"  error     {job.error.code}: {job.error.message}")
    if job.result is not None and job.result.artifacts:
        lines.append(f"  artifacts {', '.join(a.name for a in job.result.artifacts)}")
    lines.append(f"  created   {job.created_at:%Y-%m-%d %H:%M:%S}")
    if job.started_at and job.finished_at:
        lines.append(f"  ran       {(job.finished_at - job.started_at).total_seconds():.1f} s")
    return "\n".join(lines)


def _eta(seconds: float | None) -> str:
    return "-" if seconds is None else str(timedelta(seconds=round(seconds)))


def _describe_batch(batch: Batch) -> str:
    c = batch.counts
    lines = [
        f"batch {batch.id}  {batch.kind}  {batch.status}",
        f"  items     {c.finished}/{batch.total} finished ({batch.progress:.0%}): "
        f"{c.succeeded} succeeded, {c.failed} failed, {c.canceled} canceled, "
        f"{c.running} running, {c.queued} queued" + (f", {c.canceling} canceling" if c.canceling
                                                      else ""),
        f"  rate      {batch.throughput_per_min or 0:.1f} items/min  ETA {_eta(batch.eta_seconds)}",
        f"  priority  {batch.priority}  created {batch.created_at:%Y-%m-%d %H:%M:%S}",
    ]  # fmt: skip
    return "\n".join(lines)


class _JobBar:
    """A progress bar of a job's optimisation steps (stderr)."""

    def __init__(self, job_id: str, enabled: bool) -> None:
        self.short = job_id[:8]
        self.bar = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=_stderr(), disable=not enabled,
        )  # fmt: skip
        self.task: TaskID | None = None

    def __enter__(self) -> _JobBar:
        self.bar.start()
        self.task = self.bar.add_task(f"job {self.short}", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, job: Job) -> None:
        assert self.task is not None
        step, total, stage = 0, None, ""
        if job.progress is not None:
            step, total = job.progress.step or 0, job.progress.total
            stage = f" · {job.progress.stage}" if job.progress.stage else ""
        if job.status == "succeeded" and total:
            step = total
        description = f"job {self.short} {job.status}{stage}"
        self.bar.update(self.task, total=total, completed=step, description=description)


class _BatchBar:
    """A progress bar of a batch's finished items with the service's ETA (stderr)."""

    def __init__(self, batch_id: str, enabled: bool) -> None:
        self.short = batch_id[:8]
        self.bar = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}  ETA {task.fields[eta]}"), TimeElapsedColumn(),
            console=_stderr(), disable=not enabled,
        )  # fmt: skip
        self.task: TaskID | None = None

    def __enter__(self) -> _BatchBar:
        self.bar.start()
        self.task = self.bar.add_task(f"batch {self.short}", total=None, rate="", eta="-")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, batch: Batch) -> None:
        assert self.task is not None
        c = batch.counts
        failed = f" [red]{c.failed + c.canceled} not succeeded[/]" if c.failed + c.canceled else ""
        rate = f"{batch.throughput_per_min:.1f}/min" if batch.throughput_per_min else ""
        self.bar.update(
            self.task, total=batch.total, completed=c.finished, rate=rate,
            eta=_eta(batch.eta_seconds), description=f"batch {self.short} {batch.status}{failed}",
        )  # fmt: skip


def _finish_job(job: Job, as_json: bool) -> None:
    if as_json:
        _print_json(job.model_dump(mode="json"))
    else:
        typer.echo(_describe_job(job))
    if job.done and job.status != "succeeded":
        raise typer.Exit(EXIT_UNSUCCESSFUL)


def _finish_batch(batch: Batch, as_json: bool) -> None:
    if as_json:
        _print_json(batch.model_dump(mode="json"))
    else:
        typer.echo(_describe_batch(batch))
    if batch.done and batch.status != "succeeded":
        raise typer.Exit(EXIT_UNSUCCESSFUL)


def _wait_job(client: Client, job_id: str, timeout: float | None, as_json: bool) -> Job:
    with _JobBar(job_id, enabled=not as_json) as bar:
        return client.wait(job_id, timeout=timeout, on_progress=bar.update)


def _wait_batch(client: Client, batch_id: str, timeout: float | None, as_json: bool) -> Batch:
    with _BatchBar(batch_id, enabled=not as_json) as bar:
        return client.wait_batch(batch_id, timeout=timeout, on_progress=bar.update)


# --- jobs -----------------------------------------------------------------------------------------
def submit_command(
    kind: Annotated[str, typer.Argument(help="Job kind (guided, disagreement, neuron, ...).")],
    params: Annotated[
        str | None,
        typer.Option("--params", help="JSON file of the kind's params, or - for stdin."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of item 0 (default: random).")] = None,
    priority: Annotated[int | None, typer.Option(help="0 (first) to 9 (last).")] = None,
    metadata: Annotated[
        str | None, typer.Option("--metadata", help="A JSON object of your own labels.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="Resubmitting returns the same job.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to finish.")] = False,
    timeout: TimeoutOption = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a job to the service; with --wait, follow it to the end."""
    raw = {} if params is None else _read_json(params, "--params")
    labels = None
    if metadata is not None:
        try:
            labels = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(str(exc), param_hint="--metadata") from None
    with _reporting(as_json), _client(url, key) as client:
        job = client.submit(
            kind, raw, seed=seed, priority=priority, metadata=labels,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        if not as_json:
            _stderr().print(f"submitted job {job.id}")
        if wait:
            job = _wait_job(client, job.id, timeout, as_json)
        _finish_job(job, as_json)


def status_command(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a job: status, progress, error, artifacts."""
    with _reporting(as_json), _client(url, key) as client:
        job = client.get(job_id)
    if as_json:
        _print_json(job.model_dump(mode="json"))
    else:
        typer.echo(_describe_job(job))


def wait_command(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    timeout: TimeoutOption = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Wait for a job to finish, with a progress bar; exit 1 unless it succeeded."""
    with _reporting(as_json), _client(url, key) as client:
        job = _wait_job(client, job_id, timeout, as_json)
    _finish_job(job, as_json)


def download_command(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the artifacts into.")] = Path(
        "."
    ),
    names: Annotated[
        list[str] | None, typer.Option("--name", help="Only this artifact (repeatable).")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download a succeeded job's artifacts (grid.png, item_XXX.png, result.json, ...)."""
    with _reporting(as_json), _client(url, key) as client:
        paths = client.download(job_id, out, names=names or None)
    if as_json:
        _print_json({"job_id": job_id, "files": [str(p) for p in paths]})
    else:
        for path in paths:
            typer.echo(str(path))


# --- batches --------------------------------------------------------------------------------------
@batch_app.command("create")
def batch_create(
    file: Annotated[
        str,
        typer.Option(
            "--file", help="JSON spec: the POST /v1/batches body ({kind, params_template, ...})."
        ),
    ],
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="Resubmitting returns the same batch.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for every item to finish.")] = False,
    timeout: TimeoutOption = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a sweep from a spec file (axes over a params template, or explicit items)."""
    spec = _read_json(file, "--file")
    kind = spec.pop("kind", None)
    if not isinstance(kind, str):
        raise typer.BadParameter("the spec needs a 'kind'", param_hint="--file")
    with _reporting(as_json), _client(url, key) as client:
        try:
            batch = client.create_batch(kind, idempotency_key=idempotency_key, **spec)
        except TypeError as exc:  # a field the batch API does not have
            raise typer.BadParameter(str(exc), param_hint="--file") from None
        if not as_json:
            _stderr().print(f"created batch {batch.id} of {batch.total} items")
        if wait:
            batch = _wait_batch(client, batch.id, timeout, as_json)
        _finish_batch(batch, as_json)


@batch_app.command("status")
def batch_status(
    batch_id: Annotated[str, typer.Argument(help="The batch's id.")],
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a batch: counts per status, progress, throughput and ETA."""
    with _reporting(as_json), _client(url, key) as client:
        batch = client.get_batch(batch_id)
    if as_json:
        _print_json(batch.model_dump(mode="json"))
    else:
        typer.echo(_describe_batch(batch))


@batch_app.command("wait")
def batch_wait(
    batch_id: Annotated[str, typer.Argument(help="The batch's id.")],
    timeout: TimeoutOption = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Wait for every item of a batch, with a progress bar; exit 1 unless all succeeded."""
    with _reporting(as_json), _client(url, key) as client:
        batch = _wait_batch(client, batch_id, timeout, as_json)
    _finish_batch(batch, as_json)


@batch_app.command("cancel")
def batch_cancel(
    batch_id: Annotated[str, typer.Argument(help="The batch's id.")],
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel the items of a batch that have not finished; finished ones stay readable."""
    with _reporting(as_json), _client(url, key) as client:
        batch = client.cancel_batch(batch_id)
    if as_json:
        _print_json(batch.model_dump(mode="json"))
    else:
        typer.echo(_describe_batch(batch))


@batch_app.command("results")
def batch_results(
    batch_id: Annotated[str, typer.Argument(help="The batch's id.")],
    format: Annotated[
        ResultsFormat, typer.Option("--format", help="JSON lines or CSV.")
    ] = ResultsFormat.jsonl,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write to this file instead of stdout.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stream a batch's results index (one line per item: custom_id, status, metrics, artifact
    URLs); readable while the batch runs."""
    with _reporting(as_json), _client(url, key) as client:
        if out is None:
            stdout = sys.stdout.buffer
            client.export_results(batch_id, stdout, format=format.value)
            stdout.flush()
            return
        partial = out.with_name(out.name + ".part")
        with partial.open("wb") as handle:
            written = client.export_results(batch_id, handle, format=format.value)
        partial.replace(out)
    if as_json:
        _print_json({"batch_id": batch_id, "path": str(out), "bytes": written})
    else:
        _stderr().print(f"wrote {written} bytes to {out}")


@batch_app.command("list")
def batch_list(
    limit: Annotated[int, typer.Option(help="At most this many batches, newest first.")] = 20,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List your batches, newest first."""
    with _reporting(as_json), _client(url, key) as client:
        batches = list(client.list_batches(limit=limit))
    if as_json:
        _print_json([b.model_dump(mode="json") for b in batches])
        return
    for b in batches:
        typer.echo(
            f"{b.id}  {b.kind:<14} {b.status:<10} {b.counts.finished}/{b.total}  "
            f"{b.created_at:%Y-%m-%d %H:%M}"
        )


def register(app: typer.Typer) -> None:
    """Add the client commands to the `digin` command line."""
    app.command("submit")(submit_command)
    app.command("status")(status_command)
    app.command("wait")(wait_command)
    app.command("download")(download_command)
    app.add_typer(batch_app, name="batch")
