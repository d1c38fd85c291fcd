"""What the dashboard's pages show, read from a job's stored result summary (the `result.json`
that `core` writes: `digin.core.jobs.JobResult.summary`,
`digin.core.analysis.AnalysisResult.summary`,
`digin.core.counterfactual.job.CounterfactualResult.summary`) and from a batch's custom ids
(`digin.api.sweeps`: `c=<class>|m=<classifier>|s=<seed>`). Pure functions: no I/O, no templates.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from digin.service.db import SUCCEEDED, Job
from digin.service.repo.dashboard import BatchItem

GENERATIVE = ("guided", "disagreement", "neuron", "pca_component")
MAX_ITEMS_SHOWN = 64  # images of one job on its page (every one is in result.json)
MAX_COMPONENTS_SHOWN = 8  # neural PCA components in the table
# the artifact that stands for a job in lists and matrices, by preference
THUMB_ORDER = ("item_000.png", "visualizations.png", "top_images.png", "roc.png", "grid.png")
CUSTOM_ID = re.compile(r"^(?:c=(?P<cls>.*?)\|)?m=(?P<model>.*)\|s=(?P<seed>-?\d+)$")


def artifact_names(job: Job) -> list[str]:
    if job.status != SUCCEEDED or not job.result:
        return []
    return [str(a.get("name")) for a in job.result.get("artifacts") or [] if a.get("name")]


def summary_of(job: Job) -> dict[str, Any]:
    if not job.result:
        return {}
    summary = job.result.get("summary")
    return summary if isinstance(summary, dict) else {}


def thumb_name(names: Sequence[str]) -> str | None:
    for name in THUMB_ORDER:
        if name in names:
            return name
    return next((n for n in names if n.endswith(".png")), None)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# --- one line per job (lists, matrix cells) -----------------------------------------------------
def headline(job: Job) -> list[tuple[str, float | str]]:
    """The job's outcome in a few (label, value) pairs: the mean best confidences of a
    generative job, flips and p(target) of a counterfactual, the top component's share of a
    neural PCA, the mean AUC of a spurious score. Empty until it succeeded."""
    summary = summary_of(job)
    if job.status != SUCCEEDED or not summary:
        return []
    items = [i for i in summary.get("items") or [] if isinstance(i, dict)]
    if job.kind in GENERATIVE:
        names = list(summary.get("metric_names") or {})
        return [
            (name, value)
            for name in names
            if (value := _mean([_number((i.get("best") or {}).get(name)) for i in items]))
            is not None
        ]
    if job.kind == "counterfactual":
        flips = [bool(i.get("flip")) for i in items if "flip" in i]
        out: list[tuple[str, float | str]] = []
        if flips:
            out.append(("flips", f"{sum(flips)}/{len(flips)}"))
        p = _mean([_number((i.get("after") or {}).get("p_target")) for i in items])
        if p is not None:
            out.append(("p(target)", p))
        return out
    if job.kind == "neural_pca":
        ratios = (summary.get("pca") or {}).get("explained_variance_ratio") or []
        share = _number(ratios[0]) if ratios else None
        return [("PC0 share", share)] if share is not None else []
    if job.kind == "spurious_score":
        auc = _number(summary.get("mean_auc"))
        return [("mean AUC", auc)] if auc is not None else []
    return []


def classes_of(job: Job) -> str:
    """The classes (or neurons, or the class) the job's params name, shortened."""
    params = job.params or {}
    for name in ("classes", "neurons", "targets"):
        value = params.get(name)
        if isinstance(value, list) and value:
            text = ", ".join(str(v) for v in value[:4])
            return text + (f" (+{len(value) - 4})" if len(value) > 4 else "")
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    value = params.get("class")
    return "" if value is None else str(value)


def progress_fraction(job_status: str, progress: dict[str, Any] | None) -> float | None:
    """0..1 of the current stage while a job runs, else None."""
    if job_status not in ("running", "canceling") or not progress:
        return None
    step, total = progress.get("step"), progress.get("total")
    if not isinstance(step, int | float) or not isinstance(total, int | float) or total <= 0:
        return None
    return max(0.0, min(1.0, float(step) / float(total)))


# --- a job's page -------------------------------------------------------------------------------
@dataclass
class Metric:
    name: str
    value: float
    description: str = ""


@dataclass
class Item:
    """One generated image: its class (or neuron, component), best iteration and confidences,
    and the per-iteration trajectory of the clean loss and every metric."""

    index: int
    label: str
    prompt: str
    image: str | None  # artifact names
    start: str | None
    best_iteration: int | None
    best: list[Metric]
    columns: list[str]  # trajectory table: "clean_loss", then the metric names
    trajectory: list[list[float | None]]  # rows: iterations 0..I


def _label(item: dict[str, Any]) -> str:
    parts = []
    if item.get("class_name") is not None:
        parts.append(str(item["class_name"]))
    if item.get("neuron") is not None:
        parts.append(f"neuron {item['neuron']}")
    if item.get("component") is not None:
        parts.append(f"component {item['component']}")
    return ", ".join(parts) or f"item {item.get('index')}"


def shown_items(
    summary: dict[str, Any], names: Sequence[str], prefix: str = ""
) -> Iterator[tuple[dict[str, Any], int, str | None, str | None]]:
    """(item, index, image, start image) of the first MAX_ITEMS_SHOWN items of a result: its
    images are `<prefix>item_XXX.png` and `<prefix>item_XXX_start.png`, None where not stored."""
    for raw in (summary.get("items") or [])[:MAX_ITEMS_SHOWN]:
        if isinstance(raw, dict):
            index = int(raw.get("index") or 0)
            image, start = f"{prefix}item_{index:03d}.png", f"{prefix}item_{index:03d}_start.png"
            yield raw, index, image if image in names else None, start if start in names else None


def generative_items(
    summary: dict[str, Any], names: Sequence[str], *, prefix: str = ""
) -> list[Item]:
    """The items of a guided / disagreement / neuron / pca_component result (or a neural
    PCA's visualisation sub-job, whose images are `<prefix>item_XXX.png`)."""
    described: dict[str, str] = summary.get("metric_names") or {}
    out = []
    for raw, index, image, start in shown_items(summary, names, prefix):
        best = raw.get("best") or {}
        metrics = [
            Metric(name, float(best[name]), described.get(name, ""))
            for name in [*described, *(k for k in best if k not in described)]
            if _number(best.get(name)) is not None
        ]
        series = {"clean_loss": raw.get("clean_loss") or [], **(raw.get("metrics") or {})}
        columns = [c for c, values in series.items() if isinstance(values, list) and values]
        length = max((len(series[c]) for c in columns), default=0)
        trajectory = [
            [_number(series[c][i]) if i < len(series[c]) else None for c in columns]
            for i in range(length)
        ]
        out.append(
            Item(
                index=index,
                label=_label(raw),
                prompt=str(raw.get("prompt") or ""),
                image=image,
                start=start,
                best_iteration=raw.get("best_iteration"),
                best=metrics,
                columns=columns,
                trajectory=trajectory,
            )
        )
    return out


@dataclass
class Counterfactual:
    index: int
    target: str
    image: str | None
    edit: str | None  # iteration 0: the prompt-to-prompt edit before optimisation
    flip: bool | None
    prediction: Any
    # stage → (p(start), p(target)): before (the original), reconstruction, edit, after
    probabilities: list[tuple[str, float | None, float | None]]
    l1: float | None
    l2: float | None
    best_iteration: int | None


def counterfactual_view(summary: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    items = []
    for raw, index, image, edit in shown_items(summary, names):
        stages = []
        for stage in ("before", "reconstruction", "edit", "after"):
            values = raw.get(stage)
            if isinstance(values, dict):
                stages.append(
                    (stage, _number(values.get("p_start")), _number(values.get("p_target")))
                )
        items.append(
            Counterfactual(
                index=index,
                target=str(raw.get("target_name") or raw.get("target_index")),
                image=image,
                edit=edit,
                flip=raw.get("flip"),
                prediction=(raw.get("after") or {}).get("prediction"),
                probabilities=stages,
                l1=_number(raw.get("l1_distance")),
                l2=_number(raw.get("l2_distance")),
                best_iteration=raw.get("best_iteration"),
            )
        )
    start = summary.get("start_class") or {}
    return {
        "items": items,
        "start": start.get("name") or start.get("index"),
        "caption": summary.get("caption"),
        "image": summary.get("image") or {},
        "inversion": summary.get("inversion") or {},
        "mask_share": _number((summary.get("mask") or {}).get("foreground_share")),
        "flip_rate": _number(summary.get("flip_rate")),
        "figures": [n for n in ("original.png", "reconstruction.png", "mask.png") if n in names],
    }


@dataclass
class Component:
    index: int
    share: float | None  # explained variance ratio
    cumulative: float | None
    patch_r: float | None  # correlation with the planted patch (digits image sets)
    top_images: list[str]


def pca_view(summary: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    pca = summary.get("pca") or {}
    ratios = pca.get("explained_variance_ratio") or []
    patch = summary.get("patch_correlation") or []
    images = summary.get("images") or []
    tops = summary.get("top_images") or []
    components, total = [], 0.0
    for index in range(min(len(ratios), MAX_COMPONENTS_SHOWN)):
        share = _number(ratios[index])
        total += share or 0.0
        top = []
        for i in (tops[index] if index < len(tops) else [])[:6]:
            if isinstance(i, int) and 0 <= i < len(images) and isinstance(images[i], dict):
                top.append(str(images[i].get("name") or i))
        components.append(
            Component(
                index=index,
                share=share,
                cumulative=total,
                patch_r=_number(patch[index]) if index < len(patch) else None,
                top_images=top,
            )
        )
    visual = (summary.get("jobs") or {}).get("visualization")
    visualisations = (
        generative_items(visual, names, prefix="visualization_") if isinstance(visual, dict) else []
    )
    return {
        "class_name": summary.get("class_name") or pca.get("class_name"),
        "classifier": pca.get("classifier"),
        "num_images": summary.get("num_images") or pca.get("num_images"),
        "num_components": len(ratios),
        "components": components,
        "visualisations": visualisations,
        "figures": [n for n in ("top_images.png", "visualizations.png") if n in names],
        "trajectories": "visualization_trajectories.png"
        if "visualization_trajectories.png" in names
        else None,
    }


def spurious_view(summary: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    classes = []
    for raw in summary.get("classes") or []:
        if isinstance(raw, dict):
            classes.append(
                {
                    "name": raw.get("class_name") or raw.get("class_index"),
                    "auc": _number(raw.get("auc")),
                    "mean_p_class": _number(raw.get("mean_p_class")),
                    "mean_p_spurious": _number(raw.get("mean_p_spurious")),
                    "class_images": raw.get("num_class_images"),
                    "spurious_images": raw.get("num_spurious_images"),
                }
            )
    return {
        "mean_auc": _number(summary.get("mean_auc")),
        "classes": classes,
        "roc": "roc.png" if "roc.png" in names else None,
        "descriptions": summary.get("metric_names") or {},
    }


def timings(job: Job, summary: dict[str, Any]) -> list[tuple[str, float]]:
    """Seconds in the queue and running (from the row), then the core's own timings."""
    out = []
    start = job.enqueued_at or job.created_at
    if job.started_at is not None and start is not None:
        out.append(("queued", (job.started_at - start).total_seconds()))
    if job.started_at is not None and job.finished_at is not None:
        out.append(("running", (job.finished_at - job.started_at).total_seconds()))
    for name, value in (summary.get("timings") or {}).items():
        if (number := _number(value)) is not None:
            out.append((str(name), number))
    return out


# --- a batch's class x classifier matrix --------------------------------------------------------
@dataclass
class Matrix:
    rows: list[str]  # class references of this page, in item order
    columns: list[str]  # classifier labels (a pair: "c1,c2")
    cells: dict[tuple[str, str], list[BatchItem]] = field(default_factory=dict)
    total_rows: int = 0
    page: int = 1
    pages: int = 1
    by_axes: bool = True  # False: explicit items (one column, a row per item)

    def ids(self) -> list[uuid.UUID]:
        return [item.id for items in self.cells.values() for item in items]


def batch_matrix(items: Sequence[BatchItem], *, page: int, rows_per_page: int) -> Matrix:
    """Lay out a batch's items as classes (rows) x classifiers (columns), seeds side by side
    in a cell, `rows_per_page` classes per page. Items whose custom ids are not the axes' form
    (explicit items) get a row each in one column."""
    parsed = [(item, CUSTOM_ID.match(item.custom_id or "")) for item in items]
    by_axes = bool(parsed) and all(m is not None for _, m in parsed)
    rows: dict[str, None] = {}
    columns: dict[str, None] = {}
    placed: list[tuple[str, str, BatchItem]] = []
    for item, match in parsed:
        if by_axes:
            assert match is not None
            row, column = match["cls"] if match["cls"] is not None else "-", match["model"]
        else:
            row, column = item.custom_id or f"#{item.item_index}", "item"
        rows.setdefault(row)
        columns.setdefault(column)
        placed.append((row, column, item))
    all_rows = list(rows)
    pages = max(1, math.ceil(len(all_rows) / rows_per_page))
    page = min(max(1, page), pages)
    shown = all_rows[(page - 1) * rows_per_page : page * rows_per_page]
    wanted = set(shown)
    matrix = Matrix(rows=shown, columns=list(columns), total_rows=len(all_rows), page=page,
                    pages=pages, by_axes=by_axes)  # fmt: skip
    for row, column, item in placed:
        if row in wanted:
            matrix.cells.setdefault((row, column), []).append(item)
    return matrix


def class_label(ref: str, column: str, names_of: Any) -> str:
    """'3 · three' for a class index whose classifier's names are known, else the reference."""
    if not ref.isdigit():
        return ref
    names = names_of(column.split(",")[0])
    index = int(ref)
    return f"{ref} · {names[index]}" if names is not None and index < len(names) else ref
