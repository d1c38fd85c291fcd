"""Classifier audits (docs/architecture.md §4.8): the `audit_class` kind and a local runner.

`audit_class` (one class k, `AuditClassParams`), in the notation of `digin.core.pca`:

    1. neural PCA of a ⊙ w_k over the class-k images; the top components v_l (by variance)
    2. the images of every other class through the same PCA: α_l of each, for class k
       (an image with a high α_l carries what component l encodes, without being class k)
    3. per component, the AUC of p(k|x) separating the class-k images (positives) from the
       `top_other` other-class images with the highest α_l (negatives): the Spurious ImageNet
       score (`digin.core.spurious.roc_auc`) on candidates the PCA chose
    4. a component with at least `min_variance_share` of the variance and an AUC below
       `thresholds.auc` is flagged: its feature alone makes the classifier say k

`run_audit` runs a whole audit (`digin.core.audit_params.AuditParams`) in this process: the class
steps, their follow-ups (`pca_component`, `disagreement`), then the report and its HTML; the
service runs the same steps as separate jobs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from digin.core.analysis import AnalysisResult, image_row, pca_data, run_pca_component
from digin.core.audit_params import (
    AuditParams,
    bind_step,
    build_report,
    class_steps,
    follow_ups,
    render_html,
    step_images,
    step_others,
)
from digin.core.classifiers import Classifier
from digin.core.context import RunContext, check_stop
from digin.core.digits.zoo import card_patch_plan, classifier_card, classifier_patch, patch_rate
from digin.core.imagesets import ImageSet, load_image_set
from digin.core.jobs import DEFAULT_CACHE, class_index, run_generative
from digin.core.output import Result
from digin.core.params import (
    AuditClassParams,
    AuditImages,
    ImageSetSpec,
    PatchPlan,
    validate_params,
)
from digin.core.pca import class_contributions, fit_neural_pca
from digin.core.spurious import roc_auc

# --- the images of one class ------------------------------------------------------------------


def audit_image_spec(images: AuditImages, clf: Classifier, k: int, field: str) -> ImageSetSpec:
    """The `ImageSetSpec` of class k's images: digits of label k (with a zoo classifier's
    planted feature at the rate of its training for class k, from its model card; seeded by
    k, so a class's images are the same in every step), the class's folder, or its ids."""
    if images.digits is not None:
        card = classifier_card(clf)
        plan = None
        if images.patch == "training" and card is not None and patch_rate(card, k) > 0:
            opacity = max(card_patch_plan(card)["opacity"])  # the plain patch
            plan = PatchPlan(rate=patch_rate(card, k), opacity=opacity, seed=k)
        return ImageSetSpec(digits=images.digits, labels="class", patch=plan,
                            limit=images.per_class)  # fmt: skip
    if images.folder is not None:
        return ImageSetSpec(folder=images.folder, limit=images.per_class)
    ids = images.image_ids or {}
    name = clf.class_names[k]
    found = ids.get(name, ids.get(str(k)))
    if found is None:
        raise ValueError(f"{field}.image_ids: no ids for class {name!r} ({k})")
    return ImageSetSpec(image_ids=found, limit=images.per_class)


def load_class_images(
    images: AuditImages, clf: Classifier, k: int, ctx: RunContext, field: str = "images"
) -> ImageSet:
    """Class k's images of an audit at the classifier's input size."""
    return load_image_set(
        audit_image_spec(images, clf, k, field), size=clf.input_size, class_index=k,
        class_name=clf.class_names[k], field=field, resolver=ctx.image_resolver,
        zoo_patch=classifier_patch(clf),
    )  # fmt: skip


# --- the ranking of the other classes' images ----------------------------------------------------


@dataclass
class Ranking:
    """The other-class images with the highest α_l of one component, best first."""

    keep: int  # how many to keep
    alpha: Tensor = field(default_factory=lambda: torch.empty(0))  # (n,)
    p: Tensor = field(default_factory=lambda: torch.empty(0))  # (n,) p(k|x)
    images: Tensor | None = None  # (n, 3, S, S)
    info: list[dict] = field(default_factory=list)  # per image: name, class, patched

    def add(self, alpha: Tensor, p: Tensor, images: Tensor, info: list[dict]) -> None:
        """Merge a class's images (α (N,), p (N,), images (N, 3, S, S)) into the top `keep`."""
        all_alpha = torch.cat([self.alpha, alpha])
        order = all_alpha.argsort(descending=True, stable=True)[: self.keep]
        all_images = images if self.images is None else torch.cat([self.images, images])
        all_info = self.info + info
        self.alpha, self.p = all_alpha[order], torch.cat([self.p, p])[order]
        self.images, self.info = all_images[order], [all_info[i] for i in order.tolist()]


def _image_info(images: ImageSet, j: int, name: str) -> list[dict]:
    out = []
    for i, image_name in enumerate(images.names):
        entry: dict[str, Any] = {"name": image_name, "class_index": j, "class_name": name}
        if images.patched is not None:
            entry["patched"] = bool(images.patched[i])
        out.append(entry)
    return out


def _other_classes(params: AuditClassParams, clf: Classifier, k: int) -> list[int]:
    refs = step_others(params)
    if refs == "all":
        return [j for j in range(clf.num_classes) if j != k]
    others = list(dict.fromkeys(class_index(ref, clf) for ref in refs))
    others = [j for j in others if j != k]
    if not others:
        raise ValueError(f"others: no class other than the audited class {k}")
    return others


@torch.no_grad()
def rank_other_images(params, clf, k, pca, ctx: RunContext) -> tuple[list[Ranking], int]:
    """Per component of `pca`, the top other-class images by α_l, one other class at a time
    (memory: one class's images and the rankings); and how many other images there were."""
    keep = max(params.top_other, params.shown)
    rankings = [Ranking(keep) for _ in range(len(pca.components))]
    others = _other_classes(params, clf, k)
    source = step_images(params)
    total = 0
    for step, j in enumerate(others):
        check_stop(ctx.should_stop)
        images = load_class_images(source, clf, j, ctx, field=f"images (class {j})")
        contrib, logits = class_contributions(clf, images.images, k, should_stop=ctx.should_stop)
        alpha = pca.values(contrib)  # (N, L)
        p = logits.softmax(-1)[:, k]  # (N,)
        info = _image_info(images, j, clf.class_names[j])
        for l, ranking in enumerate(rankings):
            ranking.add(alpha[:, l], p, images.images, info)
        total += len(images)
        if ctx.progress is not None:
            ctx.progress(step + 1, len(others), {"stage": "ranking", "class": clf.class_names[j]})
    return rankings, total


# --- audit_class ------------------------------------------------------------------------------


def run_audit_class(params: AuditClassParams, ctx: RunContext) -> AnalysisResult:
    """One class of an audit: PCA, rankings, AUCs, flags; a figure per component. A step that
    refers to its audit's images or classes must be bound to it (`bind_step`); its result keeps
    the params as given (the references, not the audit's image map)."""
    cache = ctx.cache or DEFAULT_CACHE
    t_start = time.perf_counter()

    # 1. the classifier, class k, the neural PCA of its images
    clf = cache.classifier(params.classifier, ctx.device, "openai")
    k = class_index(params.class_, clf)
    name = clf.class_names[k]
    own = load_class_images(step_images(params), clf, k, ctx)
    if len(own) < 2:
        raise ValueError(f"images: an audit needs at least 2 images of class {name!r}, got 1")
    contrib, logits = class_contributions(clf, own.images, k, should_stop=ctx.should_stop)
    pca = fit_neural_pca(contrib, k).truncated(params.components)
    share = pca.explained_variance_ratio  # (L,)
    p_class = logits.softmax(-1)[:, k].double().numpy()  # (N+,)
    t_pca = time.perf_counter()

    # 2. the other classes' images ranked by each component; 3. the AUCs; 4. the flags
    rankings, num_other = rank_other_images(params, clf, k, pca, ctx)
    components, figures = [], {}
    for l, ranking in enumerate(rankings):
        top = ranking.p[: params.top_other].double().numpy()
        auc = roc_auc(p_class, top)
        examined = float(share[l]) >= params.thresholds.min_variance_share
        artifact = f"component_{l}_top_other.png"
        shown = [
            {**ranking.info[i], "p": float(ranking.p[i]), "alpha": float(ranking.alpha[i])}
            for i in range(min(params.shown, len(ranking.info)))
        ]
        components.append({
            "component": l, "variance_share": float(share[l]), "auc": auc,
            "mean_p_class": float(p_class.mean()), "mean_p_top_other": float(top.mean()),
            "mean_alpha_top_other": float(ranking.alpha[: params.top_other].mean()),
            "examined": examined, "flagged": examined and auc < params.thresholds.auc,
            "artifact": artifact, "top_other": shown,
        })  # fmt: skip
        figures[artifact] = _ranking_figure(ranking, l, float(share[l]), auc, params.shown)
    data = {
        "class_index": k,
        "class_name": name,
        "num_images": len(own),
        "num_other_images": num_other,
        "pca": pca_data(pca, params.classifier, name),
        "components": components,
        "flagged": [c["component"] for c in components if c["flagged"]],
        "metric_names": {
            "auc": "AUC of p(k|x) separating the class-k images from the top_other other-class "
            "images with the highest α_l: low = the component's feature alone triggers k",
            "variance_share": "the component's share of the variance of a ⊙ w_k over class k",
            "mean_p_top_other": "mean p(k|x) over those other-class images",
        },
    }
    return AnalysisResult(
        kind="audit_class",
        params=params.model_dump(mode="json", by_alias=True),
        seed=ctx.seed,
        models={"classifier": params.classifier},
        device=ctx.device,
        data=data,
        figures=figures,
        timings={"pca_s": t_pca - t_start, "total_s": time.perf_counter() - t_start},
    )


def _ranking_figure(ranking: Ranking, l: int, share: float, auc: float, shown: int) -> Image.Image:
    """The top other-class images of component l, captioned with their class and p(k|x)."""
    assert ranking.images is not None  # every audit has other images
    n = min(shown, len(ranking.info))
    captions = [
        f"{ranking.info[i]['class_name'][:9]} p {float(ranking.p[i]):.2f}" for i in range(n)
    ]
    label = f"component {l}"
    return image_row(ranking.images[:n], captions, label, f"{100 * share:.1f} % AUC {auc:.2f}")


# --- the local runner -----------------------------------------------------------------------------


@dataclass
class AuditRun:
    """A finished audit: the report (JSON-ready), every step's files by artifact key, and the
    report as one HTML page."""

    report: dict[str, Any]
    files: dict[str, bytes]  # artifact key → bytes, e.g. 'audit_class_007/result.json'
    html: str

    def render_artifacts(self) -> dict[str, bytes]:
        """The files to write: every step's, report.json and report.html."""
        return {
            **self.files,
            "report.json": json.dumps(self.report, indent=2).encode(),
            "report.html": self.html.encode(),
        }


_RUNNERS: dict[str, Callable[[Any, RunContext], Result]] = {
    "audit_class": run_audit_class,
    "pca_component": run_pca_component,
    "disagreement": run_generative,
}


def _run_step(
    kind: str, raw: dict, ctx: RunContext, files: dict[str, bytes], audit: AuditParams
) -> dict[str, Any]:
    """Run one step (a class step bound to `audit`), store its files under
    '<kind>_<class>/<name>', return its record."""
    params = validate_params(kind, raw)
    if isinstance(params, AuditClassParams):
        params = bind_step(params, audit)
    result = _RUNNERS[kind](params, ctx)
    out = result.render_artifacts()
    summary = json.loads(out["result.json"])
    k = summary.get("class_index", raw.get("class", (raw.get("classes") or [0])[0]))
    prefix = f"{kind}_{int(k):03d}" if isinstance(k, int) else f"{kind}_{k}"
    keys = {name: f"{prefix}/{name}" for name in out}
    files.update({keys[name]: data for name, data in out.items()})
    return {"kind": kind, "params": raw, "result": summary, "artifacts": keys}


def run_audit(audit: AuditParams, ctx: RunContext) -> AuditRun:
    """An audit, step after step in this process: every class step, then the follow-ups of
    the flagged classes, then the report (the same steps the service runs as jobs)."""
    names = None
    if audit.classes == "all":  # the classifier's own class list
        cache = ctx.cache or DEFAULT_CACHE
        names = cache.classifier(audit.classifier, ctx.device, "openai").class_names
    files: dict[str, bytes] = {}
    class_records, follow_records = [], []
    for step in class_steps(audit, names):
        record = _run_step("audit_class", step, ctx, files, audit)
        class_records.append(record)
        for kind, raw in follow_ups(audit, record["result"]):
            check_stop(ctx.should_stop)
            follow_records.append(_run_step(kind, raw, ctx, files, audit))
    report = build_report(audit, class_records, follow_records)
    images = {key: data for key, data in files.items() if key.endswith(".png")}
    return AuditRun(report, files, render_html(report, images))
