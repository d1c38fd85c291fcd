"""The ``digin`` command line.

Top-level imports stay torch-free so that ``digin models`` (and ``--help``) start fast; commands
that need the core import it inside their function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from digin.client_cli import register as register_client_commands
from digin.core.params import KINDS
from digin.core.registry import list_models, list_schemes
from digin.server_cli import register as register_service_commands

app = typer.Typer(
    name="digin",
    help="DiG-IN: diffusion guidance for investigating image classifiers.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the model registry: curated models, whether their weights are here, spec schemes."""
    infos, schemes = list_models(), list_schemes()
    if as_json:
        payload = {
            "models": [m.model_dump() for m in infos],
            "schemes": [s.model_dump() for s in schemes],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    header = ("SPEC", "KIND", "RES", "CLASSES", "LOCAL", "SOURCE")
    rows = [
        (
            m.spec,
            m.kind,
            str(m.resolution or "-"),
            str(m.num_classes or "-"),
            "yes" if m.available else "no",
            m.source or "-",
        )
        for m in infos
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    typer.echo("\nSpec forms (any well-formed spec can be used, not only the list above):")
    for s in schemes:
        typer.echo(f"  {s.scheme:<10} {' | '.join(s.forms)}")


@app.command("make-tiny-models")
def make_tiny_models_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the tiny models into.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write small random-weight models (SD, SDXL, timm, open_clip) for tests and smoke runs."""
    from digin.core.tiny import make_tiny_models  # torch: imported only when the command runs

    specs = make_tiny_models(out_dir, seed=seed)
    for name, spec in specs.items():
        typer.echo(f"{name}: {spec}")


@app.command("make-random-models")
def make_random_models_command(
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="New folder to write the pipeline into (an old pipeline there is replaced)."
        ),
    ],
    arch: Annotated[str, typer.Option(help="Architecture: sd15 (SD 1.5) or sdxl (SDXL base).")],
    dtype: Annotated[
        str, typer.Option(help="Stored weight dtype: fp16 (half the disk), bf16 or fp32.")
    ] = "fp16",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a full-size random-weight SD 1.5 or SDXL pipeline (timing and memory only)."""
    from digin.core.random_models import ARCHS, DTYPES, make_random_models  # torch: imported here

    if arch not in ARCHS:
        raise typer.BadParameter(f"must be one of {', '.join(ARCHS)}", param_hint="--arch")
    if dtype not in DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(DTYPES)}", param_hint="--dtype")
    try:
        typer.echo(make_random_models(arch, out_dir, dtype=dtype, seed=seed))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="OUT_DIR") from None


@app.command()
def run(
    kind: Annotated[
        str,
        typer.Argument(help=f"Job kind: {', '.join(KINDS)}."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for result.json and images.")],
    params: Annotated[
        Path | None,
        typer.Option(
            "--params",
            help="JSON file of the kind's params; models not named default to the digits zoo.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (cuda:N).")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of item 0; item i uses seed + i.")] = 0,
    max_batch: Annotated[int, typer.Option(help="Items optimised together in one run.")] = 8,
) -> None:
    """Run one explanation locally (no service) and write its artifacts to --out."""
    from digin.core.params import ParamsError, validate_params

    try:
        raw = {} if params is None else json.loads(params.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {params}: {exc}", param_hint="--params") from None
    if not isinstance(raw, dict):
        raise typer.BadParameter("the params file must hold a JSON object", param_hint="--params")
    try:
        validated = validate_params(kind, raw)
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    if device != "cpu" and not device.startswith("cuda"):
        raise typer.BadParameter(f"must be cpu or cuda[:N], got {device!r}", param_hint="--device")

    from digin.core.kinds import run_job  # torch: imported only when the command runs
    from digin.core.output import write_outputs

    def progress(step: int, total: int, info: dict[str, Any]) -> None:
        typer.echo(f"iteration {step}/{total}  clean loss {info.get('clean_loss')}", err=True)

    try:
        result = run_job(
            kind, validated, seed=seed, device=device, max_batch=max_batch, progress=progress
        )
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    paths = write_outputs(result, out)
    main = next((paths[n] for n in ("grid.png", "top_images.png", "roc.png") if n in paths), None)
    typer.echo(f"wrote {len(paths)} files to {out} (figure: {main or paths['result.json']})")


register_service_commands(app)  # migrate, keys, worker, reaper, api, serve
register_client_commands(app)  # submit, status, wait, download, batch (over HTTP)

if __name__ == "__main__":
    app()
