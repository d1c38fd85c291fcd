"""The neural PCA and spurious-feature kinds (docs/architecture.md §4.4, §4.5), end to end.

    neural_pca      PCA of a ⊙ w_k over a set of class-k images (digin.core.pca): mean, components,
                    explained variance, each image's α values, the top images per component,
                    and a `pca_component` visualisation of the top-m components
    pca_component   guidance towards one component: loss −α_l − keep_class · log p(k|x)
                    (digin.core.objectives.ComponentObjective); a generative job → `JobResult`
    spurious_score  per class, the AUC of p(k|x) separating real class-k images from spurious
                    ones (digin.core.spurious), and the mean over classes

`digin.core.kinds` runs them with `run_pca_component`, `run_neural_pca` and `run_spurious_score`
(each `run(params, ctx)`). The non-generative ones return an
`AnalysisResult`, which has the same two faces as a `JobResult`: `summary()` (result.json) and
`render_artifacts()` (name → bytes).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError

from digin.core.batching import job_batch
from digin.core.classifiers import Classifier
from digin.core.context import RunContext, StopFn, check_stop
from digin.core.digits.zoo import classifier_patch
from digin.core.imagesets import ImageSet, load_image_set
from digin.core.jobs import (
    DEFAULT_CACHE,
    Item,
    JobResult,
    class_index,
    optimize_in_batches,
    record_header,
    software_versions,
)
from digin.core.objectives import ComponentObjective
from digin.core.output import png_bytes, to_pil, trajectory_grid
from digin.core.params import (
    NeuralPcaParams,
    PcaComponentParams,
    PcaData,
    SpuriousScoreParams,
)
from digin.core.pca import NeuralPCA, class_contributions, fit_neural_pca
from digin.core.spurious import SpuriousScore, roc_plot

TILE = 96  # pixels per image tile in the figures (small images are upscaled, nearest)
CAPTION_H = 26


@dataclass
class ComponentItem(Item):
    """An item of a `pca_component` job: one image towards component `component` of class k."""

    component: int | None = None


@dataclass
class AnalysisResult:
    """The result of a non-generative kind: JSON figures, PNG figures, and sub-jobs."""

    kind: str
    params: dict
    seed: int
    models: dict[str, str]  # role → spec
    device: str
    data: dict  # the kind's figures, JSON-ready
    figures: dict[str, Image.Image] = field(default_factory=dict)  # artifact name → image
    jobs: dict[str, JobResult] = field(default_factory=dict)  # e.g. neural_pca's visualisation
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """The JSON record of the job (result.json)."""
        jobs = {}
        for name, job in self.jobs.items():
            s = job.summary()
            jobs[name] = {k: v for k, v in s.items() if k not in ("params", "versions")}
        return {
            **record_header(self),
            **self.data,
            **({"jobs": jobs} if jobs else {}),
            "timings": self.timings,
            "versions": software_versions(),
        }

    def render_artifacts(self) -> dict[str, bytes]:
        """name → bytes: result.json, the figures, and per sub-job its best images
        (<job>_item_XXX.png) and trajectory grid (<job>_trajectories.png)."""
        out = {name: png_bytes(img) for name, img in self.figures.items()}
        for name, job in self.jobs.items():
            for b, item in enumerate(job.items):
                out[f"{name}_item_{item.index:03d}.png"] = png_bytes(to_pil(job.guidance.images[b]))
            out[f"{name}_trajectories.png"] = png_bytes(trajectory_grid(job))
        summary = self.summary()
        summary["artifacts"] = sorted([*out, "result.json"])
        out["result.json"] = json.dumps(summary, indent=2).encode()
        return out


# --- neural_pca -------------------------------------------------------------------------------


def run_neural_pca(params: NeuralPcaParams, ctx: RunContext) -> AnalysisResult:
    """The PCA of class k's contributions over an image set, its top images, and a
    `pca_component` visualisation of the first components (in the same context)."""
    seed, device, should_stop = ctx.seed, ctx.device, ctx.should_stop
    cache, resolver = ctx.cache or DEFAULT_CACHE, ctx.image_resolver
    t_start = time.perf_counter()

    # 1. classifier, class k, and the class-k images at its input size
    clf = cache.classifier(params.classifier, device, "openai")
    k = class_index(params.class_, clf)
    name = clf.class_names[k]
    images = load_image_set(
        params.images, size=clf.input_size, class_index=k, class_name=name, resolver=resolver,
        zoo_patch=classifier_patch(clf),
    )  # fmt: skip
    if len(images) < 2:
        raise ValueError(f"images: neural PCA needs at least 2 images, got {len(images)}")
    t_loaded = time.perf_counter()

    # 2. contributions a ⊙ w_k, their PCA (all F components), the α values
    data, pca, alpha, top = _neural_pca_record(params, clf, images, k, should_stop)
    t_pca = time.perf_counter()
    figures = {"top_images.png": top_images_grid(images, alpha, top, pca, params.grid_components)}

    # 3. the visualisation: a pca_component job for the top-m components
    jobs = {}
    vis = params.visualization
    if vis.components > 0 and not (should_stop is not None and should_stop()):
        sub = PcaComponentParams.model_validate(
            {
                **vis.model_dump(exclude={"components"}),
                "pca": data["pca"],
                "components": list(range(min(vis.components, len(pca.components)))),
                "classifier": params.classifier,
                "class": k,
            }
        )
        job = run_pca_component(sub, ctx)
        jobs["visualization"] = job
        figures["visualizations.png"] = component_grid(job)
    models = {"classifier": params.classifier}
    if jobs:
        models["diffusion"] = vis.diffusion
    return AnalysisResult(
        kind="neural_pca",
        params=params.model_dump(mode="json"),
        seed=seed,
        models=models,
        device=device,
        data=data,
        figures=figures,
        jobs=jobs,
        timings={
            "load_s": t_loaded - t_start,
            "pca_s": t_pca - t_loaded,
            "total_s": time.perf_counter() - t_start,
        },
    )


def _neural_pca_record(params: NeuralPcaParams, clf: Classifier, images: ImageSet, k: int,
                       should_stop: StopFn | None = None):  # fmt: skip
    """The PCA of class k's contributions a ⊙ w_k over `images` and the record of it
    (result.json's data): (data, the PCA kept, α (N, L), the top images per component)."""
    name = clf.class_names[k]
    contrib, logits = class_contributions(clf, images.images, k, should_stop=should_stop)
    full = fit_neural_pca(contrib, k)
    pca = full.truncated(params.components)
    alpha = pca.values(contrib)  # (N, L)
    bias = 0.0 if clf.last_layer_bias is None else float(clf.last_layer_bias[k])
    # logit − b_k − 1·μ = Σ over all F components; the part of the components not kept:
    residual = logits[:, k] - bias - float(pca.mean.sum()) - alpha.sum(1)  # (N,)
    p_k = logits.softmax(-1)[:, k]
    top = alpha.argsort(0, descending=True)[: params.top_images].T  # (L, top) image indices

    data: dict[str, Any] = {
        "class_index": k,
        "class_name": name,
        "num_images": len(images),
        "pca": pca_data(pca, params.classifier, name),
        "bias": bias,
        "images": [
            {
                "name": images.names[i],
                **_digits_fields(images, i),
                "logit": float(logits[i, k]),
                "p": float(p_k[i]),
                "alpha": alpha[i].tolist(),
                "residual": float(residual[i]),
            }
            for i in range(len(images))
        ],
        "top_images": top.tolist(),
        "metric_names": {
            "alpha": "α_l = ((a ⊙ w_k − μ)·v_l)(1·v_l), component l's share of the class-k logit",
            "residual": "logit − bias − 1·μ − Σ_l α_l over the components kept (0 if all are)",
            "p": f"p(class | x) of {params.classifier}",
        },
    }
    if images.patched is not None and 0 < int(images.patched.sum()) < len(images):
        data["patch_correlation"] = _correlations(alpha, images.patched.float()).tolist()
        data["metric_names"]["patch_correlation"] = (
            "per component: Pearson r of α_l with the planted patch (1: patched, 0: not)"
        )
    return data, pca, alpha, top


def pca_data(pca: NeuralPCA, classifier: str, class_name: str) -> dict:
    """The PCA as JSON: the 'pca' block of result.json, which `pca_component` takes."""
    return PcaData(
        classifier=classifier,
        class_index=pca.class_index,
        class_name=class_name,
        mean=pca.mean.tolist(),
        components=pca.components.tolist(),
        explained_variance=pca.explained_variance.tolist(),
        explained_variance_ratio=pca.explained_variance_ratio.tolist(),
        num_images=pca.num_images,
    ).model_dump(mode="json")


def _digits_fields(images: ImageSet, i: int) -> dict:
    out = {}
    if images.labels is not None:
        out["label"] = int(images.labels[i])
    if images.patched is not None:
        out["patched"] = bool(images.patched[i])
    return out


def _correlations(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson r of every column of values (N, L) with target (N,); 0 for a constant column."""
    v = values.double() - values.double().mean(0)
    t = target.double() - target.double().mean()
    denom = v.norm(dim=0) * t.norm()
    return torch.where(denom > 0, (v * t[:, None]).sum(0) / denom.clamp(min=1e-300), 0.0).float()


# --- pca_component ----------------------------------------------------------------------------


def load_pca(source: str | PcaData) -> PcaData:
    """The PCA of a `pca_component` job: inline data, or the result.json of a neural_pca job
    (its 'pca' block) or a file holding just that block."""
    if isinstance(source, PcaData):
        return source
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"pca: {path} not found (give a neural_pca result.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return PcaData.model_validate(raw.get("pca", raw) if isinstance(raw, dict) else raw)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"pca: {path} is not a neural_pca result: {exc}") from None


def run_pca_component(params: PcaComponentParams, ctx: RunContext) -> JobResult[ComponentItem]:
    """Guidance towards neural PCA components: item i (component l, image j) seeded seed + i."""
    seed, device, max_batch = ctx.seed, ctx.device, ctx.max_batch
    cache, progress, should_stop = ctx.cache or DEFAULT_CACHE, ctx.progress, ctx.should_stop
    t_start = time.perf_counter()
    max_batch = job_batch(max_batch, params.guidance)

    # 1. the PCA, its classifier and class k (the params' if given, which must agree)
    pca = load_pca(params.pca)
    spec = params.classifier or pca.classifier
    if spec is None:
        raise ValueError("classifier: the PCA names no classifier; give one")
    clf = cache.classifier(spec, device, params.clip_templates)
    k = _pca_class(params, pca, clf)
    n_feats = clf.last_layer_weight.shape[1]
    if len(pca.mean) != n_feats:
        raise ValueError(
            f"pca: the PCA has {len(pca.mean)} features, {spec} has {n_feats} penultimate features"
        )
    if max(params.components) >= len(pca.components):
        raise ValueError(
            f"components: must be < {len(pca.components)} (the components of the PCA), "
            f"got {max(params.components)}"
        )
    model = cache.diffusion(params.diffusion, device, params.guidance.weights_precision)
    mean = torch.tensor(pca.mean, device=model.device)  # (F,) μ
    directions = torch.tensor(pca.components, device=model.device)  # (L, F) v_l
    t_loaded = time.perf_counter()

    # 2. items: images_per_class images per component
    name = clf.class_names[k]
    items: list[ComponentItem] = []
    for comp in params.components:
        for _ in range(params.images_per_class):
            i = len(items)
            items.append(
                ComponentItem(i, seed + i, params.prompt_for(name), k, name, component=comp)
            )
    resolution = params.resolution or model.resolution
    model.latent_shape(resolution)  # fail early on a bad resolution

    # 3. the optimisation, in batches of at most max_batch items (as run_job)
    def objective_for(chunk: list[ComponentItem]) -> ComponentObjective:
        return ComponentObjective(
            clf,
            torch.full((len(chunk),), k, device=model.device),
            mean,
            directions[[it.component for it in chunk]],
            params.keep_class,
        )

    items, guidance = optimize_in_batches(
        model, items, objective_for, params, resolution=resolution, max_batch=max_batch,
        progress=progress, should_stop=should_stop,
    )  # fmt: skip

    return JobResult(
        kind="pca_component",
        params=params.model_dump(mode="json"),
        seed=seed,
        models={"diffusion": params.diffusion, "classifier": spec},
        items=items,
        guidance=guidance,
        device=device,
        timings={"load_s": t_loaded - t_start, "total_s": time.perf_counter() - t_start},
    )


def _pca_class(params: PcaComponentParams, pca: PcaData, clf: Classifier) -> int:
    if params.class_ is None:
        if pca.class_index is None:
            raise ValueError("class: the PCA names no class; give one")
        if pca.class_index >= clf.num_classes:
            raise ValueError(f"pca: class {pca.class_index} is not a class of {clf.spec}")
        return pca.class_index
    k = class_index(params.class_, clf)
    if pca.class_index is not None and pca.class_index != k:
        raise ValueError(
            f"class: {params.class_!r} is class {k}, but the PCA is of class {pca.class_index}"
        )
    return k


# --- spurious_score ---------------------------------------------------------------------------


def run_spurious_score(params: SpuriousScoreParams, ctx: RunContext) -> AnalysisResult:
    """Per class, its two image sets through the classifier in mini-batches (`should_stop`
    polled before each) and the AUC of p(k|x)."""
    seed, device, should_stop = ctx.seed, ctx.device, ctx.should_stop
    cache, resolver = ctx.cache or DEFAULT_CACHE, ctx.image_resolver
    t_start = time.perf_counter()
    clf = cache.classifier(params.classifier, device, "openai")
    scores: list[SpuriousScore] = []
    for ref in params.classes:
        k = class_index(ref, clf)
        name = clf.class_names[k]
        sets = {
            role: load_image_set(
                getattr(params, role),
                size=clf.input_size,
                class_index=k,
                class_name=name,
                field=role,
                resolver=resolver,
                zoo_patch=classifier_patch(clf),
            )
            for role in ("class_images", "spurious")
        }
        p = {role: _probabilities(clf, s.images, k, should_stop) for role, s in sets.items()}
        scores.append(SpuriousScore.of(k, name, p["class_images"], p["spurious"]))
    aucs = [s.auc for s in scores]
    data = {
        "mean_auc": float(np.mean(aucs)),
        "classes": [s.to_json() for s in scores],
        "metric_names": {
            "auc": "AUC of p(k|x) separating class-k images (positives) from spurious images: "
            "1.0 perfectly separated (no reliance on the feature), 0.5 the feature alone "
            "triggers the class as strongly as the object",
            "mean_p_class": "mean p(k|x) over the class-k images",
            "mean_p_spurious": "mean p(k|x) over the spurious images",
        },
    }
    title = f"{params.classifier}: mean AUC {data['mean_auc']:.3f}"
    return AnalysisResult(
        kind="spurious_score",
        params=params.model_dump(mode="json"),
        seed=seed,
        models={"classifier": params.classifier},
        device=device,
        data=data,
        figures={"roc.png": roc_plot(scores, title)},
        timings={"total_s": time.perf_counter() - t_start},
    )


@torch.no_grad()
def _probabilities(
    clf: Classifier, images: torch.Tensor, k: int, should_stop: StopFn | None, batch: int = 256
) -> np.ndarray:
    device = next(clf.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        check_stop(should_stop)
        out.append(clf(images[i : i + batch].to(device)).softmax(-1)[:, k].cpu())
    return torch.cat(out).double().numpy()


# --- figures ----------------------------------------------------------------------------------


def _tile(image: torch.Tensor, tile: int = TILE) -> Image.Image:
    img = to_pil(image)
    small = img.width < tile
    return img.resize((tile, tile), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)


def image_row(
    images: torch.Tensor, captions: list[str], label: str, sublabel: str = ""
) -> Image.Image:
    """One labelled row of images (N, 3, S, S) in [0, 1], each captioned."""
    label_w, font = 96, ImageFont.load_default(size=11)
    row = Image.new("RGB", (label_w + max(len(images), 1) * TILE, TILE + CAPTION_H), "white")
    draw = ImageDraw.Draw(row)
    draw.text((4, 4), label, fill="black", font=font)
    draw.text((4, 18), sublabel, fill="gray", font=font)
    for j, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x = label_w + j * TILE
        row.paste(_tile(image), (x, 0))
        draw.text((x + 2, TILE + 2), caption, fill="black", font=font)
    return row


def top_images_grid(
    images: ImageSet, alpha: torch.Tensor, top: torch.Tensor, pca: NeuralPCA, rows: int
) -> Image.Image:
    """Rows: the top components (explained variance share); columns: their top images,
    captioned with α_l."""
    rows = min(rows, len(top))
    label_w, font = 96, ImageFont.load_default(size=11)
    grid = Image.new("RGB", (label_w + top.shape[1] * TILE, rows * (TILE + CAPTION_H)), "white")
    draw = ImageDraw.Draw(grid)
    ratio = pca.explained_variance_ratio
    for l in range(rows):
        y = l * (TILE + CAPTION_H)
        draw.text((4, y + 4), f"component {l}", fill="black", font=font)
        draw.text((4, y + 18), f"{100 * float(ratio[l]):.1f} % var", fill="gray", font=font)
        for j, i in enumerate(top[l].tolist()):
            x = label_w + j * TILE
            grid.paste(_tile(images.images[i]), (x, y))
            draw.text((x + 2, y + TILE + 2), f"pc {float(alpha[i, l]):.2f}", fill="black",
                      font=font)  # fmt: skip
    return grid


def component_grid(job: JobResult[ComponentItem]) -> Image.Image:
    """A `pca_component` job's best images: one row per component, captioned α_l and p(k)."""
    comps = list(dict.fromkeys(it.component for it in job.items))
    per_row = max(sum(it.component == c for it in job.items) for c in comps)
    label_w, font = 96, ImageFont.load_default(size=11)
    grid = Image.new("RGB", (label_w + per_row * TILE, len(comps) * (TILE + CAPTION_H)), "white")
    draw = ImageDraw.Draw(grid)
    g = job.guidance
    for r, comp in enumerate(comps):
        y = r * (TILE + CAPTION_H)
        draw.text((4, y + 4), f"component {comp}", fill="black", font=font)
        row = [b for b, it in enumerate(job.items) if it.component == comp]
        for j, b in enumerate(row):
            x = label_w + j * TILE
            grid.paste(_tile(g.images[b]), (x, y))
            alpha, p = (float(g.metrics[m][g.best_iteration[b], b]) for m in ("alpha", "p"))
            draw.text((x + 2, y + TILE + 2), f"pc {alpha:.1f} p {p:.2f}", fill="black", font=font)
    return grid
