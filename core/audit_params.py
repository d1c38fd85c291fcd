"""Classifier audits: one request that searches every class of a classifier for spurious
features (docs/architecture.md §4.8). Torch-free, so the API and the workers import it.

An audit expands into steps, each an ordinary job:

    1. `audit_class` per class k (`class_steps`): neural PCA of the class-k images, and for each
       top component the AUC of p(k|x) separating the class-k images from the images of the other
       classes that carry the component most (its highest α_l); low AUC → flagged
    2. follow-ups of a finished class step (`follow_ups`): a `pca_component` visualisation of each
       flagged component, and with a reference classifier a `disagreement` job for a flagged class
    3. the report (`build_report`): classes ranked by suspected reliance, as JSON, and as one
       self-contained HTML file (`render_html`)

`digin.core.audit.run_audit` runs the steps one after the other in one process; the service runs
each as its own job. Step results are passed in as records

    {"kind": ..., "params": {...}, "result": <the job's result.json>, "artifacts": {name: key}}

where `artifacts` maps the job's file names to the keys the caller stores them under (the report
names files by these keys; `render_html` looks the keys up in its `images`).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from digin.core.config import GuidanceConfig, apply_preset
from digin.core.digits import settings as digits_settings
from digin.core.params import (
    DEFAULT_CLASSIFIER,
    DEFAULT_DIFFUSION,
    AuditClassParams,
    AuditImages,
    AuditImagesRef,
    AuditThresholds,
    ClassRef,
    ModelSpec,
    is_digits_diffusion,
)
from digin.core.registry import classifier_facts

__all__ = [
    "AuditBudget",
    "AuditClassParams",
    "AuditImages",
    "AuditParams",
    "AuditThresholds",
    "bind_step",
    "build_report",
    "class_steps",
    "expanded_step",
    "follow_ups",
    "render_html",
    "step_images",
    "step_others",
]

StepRecord = Mapping[str, Any]  # {"kind", "params", "result", "artifacts": {name: key}}


class AuditBudget(BaseModel):
    """How much an audit examines and generates."""

    model_config = ConfigDict(extra="forbid")

    components: Annotated[int, Field(ge=1, le=16)] = Field(
        default=3, description="top components examined per class (by explained variance)"
    )
    images_per_component: Annotated[int, Field(ge=1, le=16)] = Field(
        default=4, description="generated images per flagged component (and per disagreement)"
    )
    top_other: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=20, description="other-class images at the top of each component's ranking: the "
        "negatives of its AUC",
    )  # fmt: skip
    shown: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8, description="top other-class images shown per component"
    )


class AuditParams(BaseModel):
    """An audit of one classifier (`POST /v1/audits`, `digin.core.audit.run_audit`)."""

    model_config = ConfigDict(extra="forbid")

    classifier: ModelSpec = DEFAULT_CLASSIFIER
    classes: Annotated[list[ClassRef], Field(min_length=1, max_length=1000)] | Literal["all"] = (
        Field(default="all", description="classes to audit (indices or names); 'all': every one")
    )
    images: AuditImages = Field(
        default_factory=lambda: AuditImages(digits="train"),
        description="the images of each class; default: the digits train split, with the zoo "
        "classifier's planted feature at its training rates",
    )
    reference: ModelSpec | None = Field(
        default=None,
        description="a reference classifier: a `disagreement` job (the classifier finds the "
        "class, the reference does not) for every flagged class",
    )
    diffusion: ModelSpec = Field(
        default=DEFAULT_DIFFUSION, description="diffusion model of the follow-up jobs"
    )
    prompt: Annotated[str, Field(max_length=1000)] | None = Field(
        default=None, description="prompt template of the follow-ups; default: the kinds' default"
    )
    keep_class: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        default=0.5, description="pca_component follow-ups: weight of the −log p(k|x) term"
    )
    guidance: GuidanceConfig = Field(
        default_factory=GuidanceConfig,
        description="guidance settings of the follow-ups (docs/architecture.md §3); fields not "
        "given take the defaults (the digits zoo's for a digits diffusion model)",
    )
    budget: AuditBudget = Field(default_factory=AuditBudget)
    thresholds: AuditThresholds = Field(default_factory=AuditThresholds)

    @model_validator(mode="after")
    def _check(self) -> AuditParams:
        if isinstance(self.classes, list):
            seen = [str(c) for c in self.classes]
            dup = sorted({c for c in seen if seen.count(c) > 1})
            if dup:
                raise ValueError(f"classes: each class at most once, repeated: {dup}")
        ids = self.images.image_ids
        if ids is not None and self.classes == "all":
            raise ValueError(
                "classes: list the classes to audit when the images are uploaded ids (the other "
                "classes ranked are those with ids)"
            )
        if ids is not None and isinstance(self.classes, list):
            missing = [str(c) for c in self.classes if str(c) not in ids]
            if missing:
                raise ValueError(
                    f"images.image_ids: no ids for the classes {missing} (keys must name the "
                    "classes as `classes` does)"
                )
        if self.reference is not None and self.reference == self.classifier:
            raise ValueError("reference: must differ from classifier")
        return self

    @model_validator(mode="before")
    @classmethod
    def _digits_guidance_defaults(cls, raw: Any) -> Any:
        """The follow-ups' guidance settings: the digits zoo's (for a digits diffusion model),
        then the named preset's, then the fields given; stored in full."""
        if not isinstance(raw, dict) or not isinstance(raw.get("guidance", {}), dict):
            return raw
        diffusion = raw.get("diffusion", DEFAULT_DIFFUSION)
        digits = isinstance(diffusion, str) and is_digits_diffusion(diffusion)
        base = asdict(digits_settings.DIGITS_GUIDANCE) if digits else None
        return {**raw, "guidance": apply_preset(raw.get("guidance", {}), base)}


# --- 1. the class steps -------------------------------------------------------------------------


def audit_classes(audit: AuditParams, class_names: Sequence[str] | None = None) -> list[ClassRef]:
    """The classes an audit covers: its list, or for 'all' every class of the classifier
    (`class_names` if given, else the class count the registry knows, as indices)."""
    if isinstance(audit.classes, list):
        return list(audit.classes)
    if class_names is not None:
        return list(range(len(class_names)))
    _, num_classes = classifier_facts(audit.classifier)
    if num_classes is None:
        raise ValueError(
            f"classes: 'all' needs the class count of {audit.classifier!r}, which the registry "
            "does not know; list the classes"
        )
    return list(range(num_classes))


def class_steps(
    audit: AuditParams, class_names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The `audit_class` params (normalised, JSON-ready) of every audited class, in order. Each
    step ranks the images of the other classes (every other class of the classifier for 'all'
    or a single class; the other audited classes of a list; the other classes with ids for
    uploaded images). The steps refer to the audit's images (`images: {"audit": true}`) and,
    where the others are not 'all', to its classes (`others: "audit"`) instead of copying them:
    an audit's image map is stored once, with the audit; `bind_step` resolves the references
    when a step runs."""
    classes = audit_classes(audit, class_names)
    others = "audit" if _other_refs(audit, classes[0]) != "all" else "all"
    template = AuditClassParams.model_validate(
        {
            "classifier": audit.classifier,
            "class": classes[0],
            "others": others,
            "images": {"audit": True},
            "components": audit.budget.components,
            "top_other": audit.budget.top_other,
            "shown": audit.budget.shown,
            "thresholds": audit.thresholds.model_dump(mode="json"),
        }
    ).model_dump(mode="json", by_alias=True)
    return [{**template, "class": k} for k in classes]  # ClassRef: validated with the audit


def _other_refs(audit: AuditParams, k: ClassRef) -> list[ClassRef] | Literal["all"]:
    """The classes whose images the step of class k ranks (see `class_steps`)."""
    ids = audit.images.image_ids
    if ids is not None:  # the classes with uploaded images
        return [key for key in ids if key != str(k)]
    if isinstance(audit.classes, list) and len(audit.classes) > 1:  # the other audited classes
        return [c for c in audit.classes if c != k]
    return "all"  # every other class of the classifier


def bind_step(step: AuditClassParams, audit: AuditParams | None) -> AuditClassParams:
    """The step with the audit its references resolve to (`others: "audit"`, `images:
    {"audit": true}`): the runner reads them through `step_images` and `step_others`, and the
    step's params (its `model_dump`, its result.json) keep the references. A step without
    references needs no audit; one with references and no audit is an error naming the field."""
    if audit is None:
        if step.others == "audit" or isinstance(step.images, AuditImagesRef):
            field = "others" if step.others == "audit" else "images"
            raise ValueError(
                f"{field}: refers to the audit this job is a step of (POST /v1/audits); give "
                "the images and the other classes explicitly to run one class on its own"
            )
        return step
    bound = step.model_copy()
    bound._audit = audit
    return bound


def step_images(step: AuditClassParams) -> AuditImages:
    """The step's images: its own, or its audit's (`bind_step`)."""
    if isinstance(step.images, AuditImages):
        return step.images
    bind_step(step, step._audit)  # raises when unbound
    return step._audit.images


def step_others(step: AuditClassParams) -> list[ClassRef] | Literal["all"]:
    """The classes the step ranks: its own list or 'all', or its audit's (`bind_step`)."""
    if step.others != "audit":
        return step.others
    bind_step(step, step._audit)  # raises when unbound
    return _other_refs(step._audit, step.class_)


def expanded_step(step: Mapping[str, Any], audit: AuditParams) -> dict[str, Any]:
    """A step's params with its references written out (what it ranks and loads, in full): for
    the cost estimate of `digin.core.limits`, and to run one class of an audit on its own."""
    params = bind_step(AuditClassParams.model_validate(step), audit)
    out = params.model_dump(mode="json", by_alias=True)
    out["images"] = step_images(params).model_dump(mode="json", exclude_none=True)
    out["others"] = step_others(params)
    return out


# --- 2. follow-ups ------------------------------------------------------------------------------


def _generation_fields(audit: AuditParams) -> dict[str, Any]:
    out: dict[str, Any] = {
        "diffusion": audit.diffusion,
        "images_per_class": audit.budget.images_per_component,
        "guidance": asdict(audit.guidance),
    }
    if audit.prompt is not None:
        out["prompt"] = audit.prompt
    return out


def follow_ups(audit: AuditParams, class_result: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """The jobs (kind, raw params) that a finished `audit_class` step asks for: one
    `pca_component` job visualising its flagged components, and with a reference classifier one
    `disagreement` job for the class if any component is flagged. None for an unflagged class."""
    flagged = [c["component"] for c in class_result["components"] if c["flagged"]]
    if not flagged:
        return []
    k = int(class_result["class_index"])
    out: list[tuple[str, dict]] = [
        (
            "pca_component",
            {
                **_generation_fields(audit),
                "pca": class_result["pca"],
                "components": flagged,
                "classifier": audit.classifier,
                "class": k,
                "keep_class": audit.keep_class,
            },
        )
    ]
    if audit.reference is not None:
        out.append(
            (
                "disagreement",
                {
                    **_generation_fields(audit),
                    "classifier1": audit.classifier,
                    "classifier2": audit.reference,
                    "classes": [k],
                },
            )
        )
    return out


# --- 3. the report ------------------------------------------------------------------------------


def _follow_up_class(record: StepRecord) -> int | None:
    params = record.get("params") or {}
    if record.get("kind") == "pca_component":
        k = params.get("class")
    else:
        k = (params.get("classes") or [None])[0]
    return int(k) if isinstance(k, int) else None


def _item_keys(record: StepRecord, component: int | None = None) -> list[str]:
    """The artifact keys of a generative follow-up's best images (of one component)."""
    keys = record.get("artifacts") or {}
    items = (record.get("result") or {}).get("items") or []
    names = [
        f"item_{it['index']:03d}.png"
        for it in items
        if component is None or it.get("component") == component
    ]
    return [keys.get(n, n) for n in names]


def _class_row(step: StepRecord, follow: list[StepRecord]) -> dict[str, Any]:
    result, keys = step["result"], step.get("artifacts") or {}
    components = []
    for c in result["components"]:
        row = {
            k: c[k]
            for k in (
                "component",
                "variance_share",
                "auc",
                "mean_p_class",
                "mean_p_top_other",
                "examined",
                "flagged",
                "top_other",
            )  # fmt: skip
        }
        row["top_other_image"] = keys.get(c["artifact"], c["artifact"])
        vis = [f for f in follow if f.get("kind") == "pca_component"]
        row["visualizations"] = [key for f in vis for key in _item_keys(f, c["component"])]
        components.append(row)
    flagged = [c for c in components if c["flagged"]]
    worst = min(flagged, key=lambda c: c["auc"]) if flagged else None
    disagreement = [key for f in follow if f.get("kind") == "disagreement" for key in _item_keys(f)]
    return {
        "class_index": result["class_index"],
        "class_name": result["class_name"],
        "flagged": worst is not None,
        "auc": None if worst is None else worst["auc"],
        "variance_share": None if worst is None else worst["variance_share"],
        "component": None if worst is None else worst["component"],
        "min_auc": min((c["auc"] for c in components if c["examined"]), default=None),
        "num_images": result["num_images"],
        "num_other_images": result["num_other_images"],
        "components": components,
        "disagreement": disagreement,
    }


def build_report(
    audit: AuditParams,
    class_results: Sequence[StepRecord],
    follow_up_results: Sequence[StepRecord] = (),
) -> dict[str, Any]:
    """The audit's table, JSON-ready: one row per class, flagged classes first (lowest AUC of a
    flagged component first, then the larger variance share), then the others by their lowest
    AUC. Each row names its components' figures and follow-up images by artifact key."""
    by_class: dict[int, list[StepRecord]] = {}
    for record in follow_up_results:
        k = _follow_up_class(record)
        if k is not None:
            by_class.setdefault(k, []).append(record)
    rows = [_class_row(s, by_class.get(int(s["result"]["class_index"]), [])) for s in class_results]

    def rank(row: dict[str, Any]) -> tuple:
        if row["flagged"]:
            return (0, row["auc"], -row["variance_share"], row["class_index"])
        low = row["min_auc"] if row["min_auc"] is not None else 1.0
        return (1, low, 0.0, row["class_index"])

    rows.sort(key=rank)
    for i, row in enumerate(rows):
        row["rank"] = i + 1
    return {
        "classifier": audit.classifier,
        "reference": audit.reference,
        "params": audit.model_dump(mode="json"),
        "flagged": [r["class_name"] for r in rows if r["flagged"]],
        "classes": rows,
        "metric_names": {
            "auc": "AUC of p(k|x) separating real class-k images from the other-class images "
            "that carry the component most (highest α_l): low = the feature alone triggers k",
            "variance_share": "the component's share of the variance of a ⊙ w_k over class k",
            "mean_p_top_other": "mean p(k|x) over those other-class images",
        },
    }


# --- the HTML file ------------------------------------------------------------------------------

_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
    "th{background:#f2f2f2}tr.flagged td{background:#fff1f0}img{image-rendering:pixelated;"
    "max-height:120px;margin:1px}img.item{width:64px;height:64px}.small{color:#666;font-size:85%}"
)


def _img(key: str, images: Mapping[str, bytes], alt: str, css: str = "") -> str:
    data = images.get(key)
    if data is None:
        return f'<span class="small">{html.escape(key)} (not included)</span>'
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img class="{css}" src="{uri}" alt="{html.escape(alt)}">'


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _component_cell(c: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    e = html.escape
    head = (
        f"<b>component {c['component']}</b> {'FLAGGED' if c['flagged'] else ''}<br>"
        f"<span class=small>AUC {_fmt(c['auc'])}, {100 * c['variance_share']:.1f} % variance, "
        f"mean p(k) of the others {_fmt(c['mean_p_top_other'])}</span><br>"
    )
    others = ", ".join(
        f"{e(str(o.get('class_name', '?')))} ({e(str(o['name']))}, p {_fmt(o.get('p'))})"
        for o in c["top_other"]
    )
    vis = "".join(_img(k, images, "visualisation", "item") for k in c["visualizations"])
    return (
        head
        + _img(c["top_other_image"], images, "top other-class images")
        + f"<br><span class=small>{others}</span>"
        + (f"<br>generated: {vis}" if vis else "")
    )


def render_html(report: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """The report as one self-contained HTML page: the ranked table, figures inline as data URIs
    (`images`: artifact key → PNG/JPEG bytes; a missing key is named instead), text escaped."""
    e = html.escape
    title = f"Audit of {report['classifier']}"
    flagged = ", ".join(e(n) for n in report["flagged"]) or "none"
    rows = []
    for r in report["classes"]:
        comps = "".join(f"<div>{_component_cell(c, images)}</div>" for c in r["components"])
        dis = "".join(_img(k, images, "disagreement", "item") for k in r["disagreement"]) or "–"
        rows.append(
            f'<tr class="{"flagged" if r["flagged"] else ""}"><td>{r["rank"]}</td>'
            f"<td>{e(str(r['class_name']))} ({r['class_index']})</td>"
            f"<td>{'yes' if r['flagged'] else 'no'}</td><td>{_fmt(r['auc'])}</td>"
            f"<td>{_fmt(r['min_auc'])}</td><td>{r['num_images']} / {r['num_other_images']}</td>"
            f"<td>{comps}</td><td>{dis}</td></tr>"
        )
    reference = e(str(report.get("reference"))) if report.get("reference") else "none"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{e(title)}</h1>"
        f"<p>Flagged classes (suspected spurious features): <b>{flagged}</b>. "
        f"Reference classifier: {reference}.</p>"
        f"<p class=small>{e(report['metric_names']['auc'])}.</p>"
        "<table><tr><th>rank</th><th>class</th><th>flagged</th><th>AUC (flagged)</th>"
        "<th>lowest AUC</th><th>images (class / others)</th><th>components</th>"
        f"<th>disagreement</th></tr>{''.join(rows)}</table></body></html>"
    )
