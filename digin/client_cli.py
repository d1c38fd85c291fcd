"""The client commands of ``digin``: talk to a running service over HTTP (`digin_client`).

    digin submit KIND [--params FILE|-] [--seed N] [--priority N] [--wait]
    digin status JOB        digin wait JOB        digin download JOB [--out DIR]
    digin batch create --file SPEC.json [--wait]
    digin batch status|wait|cancel ID       digin batch results ID [--format jsonl|csv]
    digin batch list
    digin audit create --classifier SPEC [--classes all|a,b] [--file SPEC.json] [--wait]
    digin audit status|wait|cancel ID       digin audit report ID [--format json|html]
    digin audit list

Every command takes `--url` (DIGIN_URL, default http://127.0.0.1:8000), `--key`
(DIGIN_API_KEY) and `--json` (machine-readable output on stdout; no progress bars). Progress
bars and messages go to stderr. Exit codes: 0 done (a waited job or batch succeeded), 1 the job
or batch finished without succeeding, 2 bad usage, 3 a wait timed out, 4 the request failed
(the service's problem is printed, as JSON with `--json`). Waiting (`wait`, `--wait`) follows
the job's or batch's live events (server-sent events) and polls if the stream fails.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Concatenate, ParamSpec

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
from digin_client.models import Audit

EXIT_UNSUCCESSFUL, EXIT_USAGE, EXIT_TIMEOUT, EXIT_REQUEST = 1, 2, 3, 4
DEFAULT_URL = "http://127.0.0.1:8000"

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
# the options of submit and batch create
IdempotencyKeyOption = Annotated[
    str | None,
    typer.Option(
        "--idempotency-key", help="Resubmitting with this key returns the job or batch it made."
    ),
]
WaitOption = Annotated[
    bool, typer.Option("--wait", help="Wait for it to finish (a batch: every item).")
]
JobId = Annotated[str, typer.Argument(help="The job's id.")]
BatchId = Annotated[str, typer.Argument(help="The batch's id.")]
# The options every client command takes, after its own (see `client_command`).
COMMON_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=option)
    for name, option, default in [
        ("url", UrlOption, DEFAULT_URL),
        ("key", KeyOption, None),
        ("as_json", JsonOption, False),
    ]
]

P = ParamSpec("P")


class ResultsFormat(StrEnum):
    jsonl = "jsonl"
    csv = "csv"


def _stderr() -> Console:
    return Console(file=sys.stderr, highlight=False)


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
def _describe(state: Job | Batch) -> str:
    return _describe_job(state) if isinstance(state, Job) else _describe_batch(state)


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


class _Bar:
    """A progress bar on stderr: a job's optimisation steps, or a batch's finished items with
    the service's rate and ETA."""

    def __init__(self, noun: str, object_id: str, enabled: bool) -> None:
        self.label = f"{noun} {object_id[:8]}"
        rate = TextColumn("{task.fields[rate]}  ETA {task.fields[eta]}")
        extra = [rate] if noun == "batch" else []
        self.bar = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            *extra, TimeElapsedColumn(), console=_stderr(), disable=not enabled,
        )  # fmt: skip
        self.task: TaskID | None = None

    def __enter__(self) -> _Bar:
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=None, rate="", eta="-")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, state: Job | Batch) -> None:
        assert self.task is not None
        if isinstance(state, Batch):
            c = state.counts
            failed = c.failed + c.canceled
            rate = f"{state.throughput_per_min:.1f}/min" if state.throughput_per_min else ""
            self.bar.update(
                self.task, total=state.total, completed=c.finished, rate=rate,
                eta=_eta(state.eta_seconds),
                description=f"{self.label} {state.status}"
                + (f" [red]{failed} not succeeded[/]" if failed else ""),
            )  # fmt: skip
            return
        step, total, stage = 0, None, ""
        if state.progress is not None:
            step, total = state.progress.step or 0, state.progress.total
            stage = f" · {state.progress.stage}" if state.progress.stage else ""
        if state.status == "succeeded" and total:
            step = total
        description = f"{self.label} {state.status}{stage}"
        self.bar.update(self.task, total=total, completed=step, description=description)


# --- the options and output every command shares --------------------------------------------------
@dataclass
class Session:
    """What a client command works with: the client, and whether to print JSON for scripts."""

    client: Client
    as_json: bool

    def note(self, message: str) -> None:
        """A message for people, on stderr; none with --json."""
        if not self.as_json:
            _stderr().print(message)

    def show(self, state: Job | Batch) -> None:
        """The job or batch as JSON, or described in a few lines."""
        if self.as_json:
            _print_json(state.model_dump(mode="json"))
        else:
            typer.echo(_describe(state))

    def finish(self, state: Job | Batch) -> None:
        """Show it; exit 1 if it has finished without succeeding."""
        self.show(state)
        if state.done and state.status != "succeeded":
            raise typer.Exit(EXIT_UNSUCCESSFUL)

    def bar(self, noun: str, object_id: str) -> _Bar:
        return _Bar(noun, object_id, enabled=not self.as_json)

    def wait(self, job_id: str, timeout: float | None) -> Job:
        """Follow the job's live events (polling if the stream fails) to its end."""
        with self.bar("job", job_id) as bar:
            return self.client.wait(job_id, timeout=timeout, on_progress=bar.update, follow=True)

    def wait_batch(self, batch_id: str, timeout: float | None) -> Batch:
        """Follow the batch's live events (polling if the stream fails) to its end."""
        with self.bar("batch", batch_id) as bar:
            return self.client.wait_batch(
                batch_id, timeout=timeout, on_progress=bar.update, follow=True
            )


def client_command(function: Callable[Concatenate[Session, P], None]) -> Callable[..., None]:
    """A command from `function(session, <its own arguments and options>)`: it also takes the
    options of every client command (--url, --key, --json); the client is opened for it, and
    the service's errors are reported (a message, or the problem as JSON; exit 4, 3 for a wait
    that timed out)."""
    own = list(inspect.signature(function, eval_str=True).parameters.values())[1:]
    run: Callable[..., None] = function  # typer passes every parameter by name

    @functools.wraps(function)
    def command(*, url: str, key: str | None, as_json: bool, **params: Any) -> None:
        try:
            client = Client(url, key)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--url") from None
        with _reporting(as_json), client:
            run(Session(client, as_json), **params)

    command.__signature__ = inspect.Signature([*own, *COMMON_OPTIONS])  # type: ignore[attr-defined]
    return command


# --- jobs -----------------------------------------------------------------------------------------
@client_command
def submit_command(
    session: Session,
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
    idempotency_key: IdempotencyKeyOption = None,
    wait: WaitOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """Submit a job to the service; with --wait, follow it to the end."""
    raw = {} if params is None else _read_json(params, "--params")
    labels = None
    if metadata is not None:
        try:
            labels = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(str(exc), param_hint="--metadata") from None
    job = session.client.submit(
        kind, raw, seed=seed, priority=priority, metadata=labels, idempotency_key=idempotency_key
    )
    session.note(f"submitted job {job.id}")
    session.finish(session.wait(job.id, timeout) if wait else job)


@client_command
def status_command(session: Session, job_id: JobId) -> None:
    """Show a job: status, progress, error, artifacts."""
    session.show(session.client.get(job_id))


@client_command
def wait_command(session: Session, job_id: JobId, timeout: TimeoutOption = None) -> None:
    """Wait for a job to finish, with a progress bar; exit 1 unless it succeeded."""
    session.finish(session.wait(job_id, timeout))


@client_command
def download_command(
    session: Session,
    job_id: JobId,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the artifacts into.")] = Path(
        "."
    ),
    names: Annotated[
        list[str] | None, typer.Option("--name", help="Only this artifact (repeatable).")
    ] = None,
) -> None:
    """Download a succeeded job's artifacts (grid.png, item_XXX.png, result.json, ...)."""
    paths = session.client.download(job_id, out, names=names or None)
    if session.as_json:
        _print_json({"job_id": job_id, "files": [str(p) for p in paths]})
    else:
        for path in paths:
            typer.echo(str(path))


# --- batches --------------------------------------------------------------------------------------
@client_command
def batch_create(
    session: Session,
    file: Annotated[
        str,
        typer.Option(
            "--file", help="JSON spec: the POST /v1/batches body ({kind, params_template, ...})."
        ),
    ],
    idempotency_key: IdempotencyKeyOption = None,
    wait: WaitOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """Create a sweep from a spec file (axes over a params template, or explicit items)."""
    spec = _read_json(file, "--file")
    kind = spec.pop("kind", None)
    if not isinstance(kind, str):
        raise typer.BadParameter("the spec needs a 'kind'", param_hint="--file")
    try:
        batch = session.client.create_batch(kind, idempotency_key=idempotency_key, **spec)
    except TypeError as exc:  # a field the batch API does not have
        raise typer.BadParameter(str(exc), param_hint="--file") from None
    session.note(f"created batch {batch.id} of {batch.total} items")
    session.finish(session.wait_batch(batch.id, timeout) if wait else batch)


@client_command
def batch_wait(session: Session, batch_id: BatchId, timeout: TimeoutOption = None) -> None:
    """Wait for every item of a batch, with a progress bar; exit 1 unless all succeeded."""
    session.finish(session.wait_batch(batch_id, timeout))


@client_command
def batch_status(session: Session, batch_id: BatchId) -> None:
    """Show a batch: counts per status, progress, throughput and ETA."""
    session.show(session.client.get_batch(batch_id))


@client_command
def batch_cancel(session: Session, batch_id: BatchId) -> None:
    """Cancel the items of a batch that have not finished; finished ones stay readable."""
    session.show(session.client.cancel_batch(batch_id))


@client_command
def batch_results(
    session: Session,
    batch_id: BatchId,
    format: Annotated[
        ResultsFormat, typer.Option("--format", help="JSON lines or CSV.")
    ] = ResultsFormat.jsonl,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Stream a batch's results index (one line per item: custom_id, status, metrics, artifact
    URLs); readable while the batch runs."""
    if out is None:
        stdout = sys.stdout.buffer
        session.client.export_results(batch_id, stdout, format=format.value)
        stdout.flush()
        return
    partial = out.with_name(out.name + ".part")
    with partial.open("wb") as handle:
        written = session.client.export_results(batch_id, handle, format=format.value)
    partial.replace(out)
    if session.as_json:
        _print_json({"batch_id": batch_id, "path": str(out), "bytes": written})
    else:
        _stderr().print(f"wrote {written} bytes to {out}")


@client_command
def batch_list(
    session: Session,
    limit: Annotated[int, typer.Option(help="At most this many batches, newest first.")] = 20,
) -> None:
    """List your batches, newest first."""
    batches = list(session.client.list_batches(limit=limit))
    if session.as_json:
        _print_json([b.model_dump(mode="json") for b in batches])
        return
    for b in batches:
        typer.echo(
            f"{b.id}  {b.kind:<14} {b.status:<10} {b.counts.finished}/{b.total}  "
            f"{b.created_at:%Y-%m-%d %H:%M}"
        )


# --- audits ---------------------------------------------------------------------------------------
AuditId = Annotated[str, typer.Argument(help="The audit's id.")]


class ReportFormat(StrEnum):
    json = "json"
    html = "html"


def _describe_audit(audit: Audit) -> str:
    c, f = audit.class_counts, audit.follow_up_counts
    lines = [
        f"audit {audit.id}  {audit.classifier}  {audit.status} ({audit.stage})",
        f"  classes   {c.finished}/{audit.total_classes} finished: {c.succeeded} succeeded, "
        f"{c.failed} failed, {c.canceled} canceled, {c.running} running",
        f"  follow-ups {f.finished}/{f.finished + f.queued + f.running + f.canceling} finished",
        f"  progress  {audit.progress:.0%}  created {audit.created_at:%Y-%m-%d %H:%M:%S}",
    ]
    if audit.flagged is not None:
        lines.append(f"  flagged   {', '.join(audit.flagged) or 'none'}")
    rows = sorted((c.row for c in audit.classes or [] if c.row), key=lambda r: r["rank"])
    for row in rows[:10]:
        auc = "-" if row.get("min_auc") is None else f"{row['min_auc']:.3f}"
        mark = "FLAGGED" if row.get("flagged") else ""
        lines.append(f"  #{row['rank']:<3} {row['class_name']:<20} lowest AUC {auc}  {mark}")
    return "\n".join(lines)


def _show_audit(session: Session, audit: Audit) -> None:
    if session.as_json:
        _print_json(audit.model_dump(mode="json"))
    else:
        typer.echo(_describe_audit(audit))


def _wait_audit(session: Session, audit_id: str, timeout: float | None) -> Audit:
    with session.bar("audit", audit_id) as bar:

        def progress(audit: Audit) -> None:
            assert bar.task is not None
            bar.bar.update(bar.task, total=100, completed=round(100 * audit.progress),
                           description=f"{bar.label} {audit.stage}")  # fmt: skip

        return session.client.wait_audit(audit_id, timeout=timeout, on_progress=progress)


def _finish_audit(session: Session, audit: Audit) -> None:
    _show_audit(session, audit)
    if audit.done and audit.status != "succeeded":
        raise typer.Exit(EXIT_UNSUCCESSFUL)


@client_command
def audit_create(
    session: Session,
    classifier: Annotated[
        str | None, typer.Option("--classifier", help="The classifier to audit.")
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option("--classes", help="'all' (default) or a comma-separated list of classes."),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option("--file", help="JSON spec: the POST /v1/audits body (options override it)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the audit's jobs.")] = None,
    idempotency_key: IdempotencyKeyOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the report.")] = False,
    timeout: TimeoutOption = None,
) -> None:
    """Audit a classifier across its classes: one audit_class job per class, follow-ups for
    flagged classes, then a ranked report."""
    spec = _read_json(file, "--file") if file is not None else {}
    if classifier is not None:
        spec["classifier"] = classifier
    if classes is not None:
        listed = [c.strip() for c in classes.split(",") if c.strip()]
        spec["classes"] = (
            "all" if listed == ["all"] else [int(c) if c.isdigit() else c for c in listed]
        )
    if seed is not None:
        spec["seed"] = seed
    if not isinstance(spec.get("classifier"), str):
        raise typer.BadParameter(
            "give --classifier (or a spec with one)", param_hint="--classifier"
        )
    audit = session.client.create_audit(idempotency_key=idempotency_key, **spec)
    session.note(f"created audit {audit.id} of {audit.total_classes} classes")
    _finish_audit(session, _wait_audit(session, audit.id, timeout) if wait else audit)


@client_command
def audit_status(session: Session, audit_id: AuditId) -> None:
    """Show an audit: its stage, the classes' states and the rows of the finished ones."""
    _show_audit(session, session.client.get_audit(audit_id))


@client_command
def audit_wait(session: Session, audit_id: AuditId, timeout: TimeoutOption = None) -> None:
    """Wait for an audit's report, with a progress bar; exit 1 unless it succeeded."""
    _finish_audit(session, _wait_audit(session, audit_id, timeout))


@client_command
def audit_cancel(session: Session, audit_id: AuditId) -> None:
    """Cancel what is left of an audit."""
    _show_audit(session, session.client.cancel_audit(audit_id))


@client_command
def audit_report(
    session: Session,
    audit_id: AuditId,
    format: Annotated[
        ReportFormat, typer.Option("--format", help="JSON, or one self-contained HTML page.")
    ] = ReportFormat.json,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Download an audit's report (once its status is succeeded)."""
    if out is None:
        stdout = sys.stdout.buffer
        session.client.audit_report(audit_id, stdout, format=format.value)
        stdout.flush()
        return
    partial = out.with_name(out.name + ".part")
    with partial.open("wb") as handle:
        written = session.client.audit_report(audit_id, handle, format=format.value)
    partial.replace(out)
    if session.as_json:
        _print_json({"audit_id": audit_id, "path": str(out), "bytes": written})
    else:
        _stderr().print(f"wrote {written} bytes to {out}")


@client_command
def audit_list(
    session: Session,
    limit: Annotated[int, typer.Option(help="At most this many audits, newest first.")] = 20,
) -> None:
    """List your audits, newest first."""
    audits = list(session.client.list_audits(limit=limit))
    if session.as_json:
        _print_json([a.model_dump(mode="json") for a in audits])
        return
    for a in audits:
        typer.echo(f"{a.id}  {a.classifier:<24} {a.status:<10} {a.stage:<10} "
                   f"{a.total_classes} classes  {a.created_at:%Y-%m-%d %H:%M}")  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add the client commands to the `digin` command line."""
    for name, command in [
        ("submit", submit_command),
        ("status", status_command),
        ("wait", wait_command),
        ("download", download_command),
    ]:
        app.command(name)(command)
    batch_app = typer.Typer(
        help="Sweeps: create, follow, read and cancel batches.", no_args_is_help=True
    )
    for name, command in [
        ("create", batch_create),
        ("status", batch_status),
        ("wait", batch_wait),
        ("cancel", batch_cancel),
        ("results", batch_results),
        ("list", batch_list),
    ]:
        batch_app.command(name)(command)
    app.add_typer(batch_app, name="batch")
    audit_app = typer.Typer(
        help="Audits: a classifier across its classes, with a ranked report.",
        no_args_is_help=True,
    )
    for name, command in [
        ("create", audit_create),
        ("status", audit_status),
        ("wait", audit_wait),
        ("cancel", audit_cancel),
        ("report", audit_report),
        ("list", audit_list),
    ]:
        audit_app.command(name)(command)
    app.add_typer(audit_app, name="audit")
