"""One explanation job, end to end: params → models → items → guidance → typed result.

`digin.core.kinds.run_job` (what the CLI and the workers call) runs the generative kinds here.
Models load once per process
through a `ModelCache`; a job's items (classes × images per class, or neurons × images) run as
batches of at most `max_batch` items, which gives the same images as running them one by one.
Item i is seeded with `seed + i`.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Generic, Protocol, TypeVar

import torch
from pydantic import BaseModel

from digin.core.batching import job_batch
from digin.core.classes import imagenet_classes, prompt_class_names, resolve_class
from digin.core.classifiers import Classifier, ClipTemplates
from digin.core.context import ProgressFn, RunContext, StopFn, Stopped
from digin.core.diffusion import DiffusionModel
from digin.core.foreground import class_tokens, foreground_blend
from digin.core.guidance import DTYPES, DenoisingLoop, GuidanceResult, optimize
from digin.core.limits import LRU
from digin.core.loaders import load_classifier, load_diffusion
from digin.core.noisebank import item_latents
from digin.core.objectives import ClassObjective, DisagreementObjective, NeuronObjective, Objective
from digin.core.output import render_generative
from digin.core.params import DisagreementParams, GuidedParams, NeuronParams, kind_of
from digin.core.registry import ModelRoots, check_model_roots
from digin.core.regularizers import Regularizers, load_lpips

DEFAULT_CACHED_MODELS = 8  # a job holds up to 4 entries: diffusion, 2 classifiers, inversions


class ModelCache:
    """Models loaded once per process (and device), keyed by spec and loader options: at most
    `max_models` of them (the least recently used is dropped first), since the keys are what
    clients send (specs, class-name lists of zero-shot classifiers). A job keeps the models it
    holds even when the cache drops them."""

    def __init__(
        self, model_roots: ModelRoots | None = None, max_models: int = DEFAULT_CACHED_MODELS
    ) -> None:
        self._models: LRU[tuple, Any] = LRU(max_models)
        # the folders that specs naming local paths must lie in (a worker: the settings'
        # model_path_roots); None: any path (digin run, the user's machine)
        self.model_roots = model_roots

    def check(self, spec: str) -> None:
        """ValueError (invalid params, never retried) for a spec outside the model roots,
        before anything is read from its path."""
        if (outside := check_model_roots(spec, self.model_roots)) is not None:
            raise ValueError(f"model {spec!r} {outside}")

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        return self._models.get_or_make(key, load)

    def diffusion(self, spec: str, device: str, weights: str = "fp32") -> DiffusionModel:
        """The model of `spec` on `device` with its weights stored in `weights` (fp32, bf16,
        fp16): one cached copy per dtype (a worker that runs both presets holds both)."""

        def load() -> DiffusionModel:
            model = load_diffusion(spec, device=device)
            if weights != "fp32":
                model.to(DTYPES[weights])
            return model

        if weights not in DTYPES:
            raise ValueError(f"weights must be one of {', '.join(DTYPES)}, got {weights!r}")
        self.check(spec)
        return self.get(("diffusion", spec, device, weights), load)

    def classifier(
        self,
        spec: str,
        device: str,
        templates: ClipTemplates,
        class_names: list[str] | None = None,
    ) -> Classifier:
        self.check(spec)
        key = ("classifier", spec, device, templates, tuple(class_names or ()))
        return self.get(
            key,
            lambda: load_classifier(
                spec, device=device, clip_templates=templates, class_names=class_names
            ),
        )


DEFAULT_CACHE = ModelCache()


@dataclass
class Item:
    index: int
    seed: int
    prompt: str
    class_index: int | None = None
    class_name: str | None = None
    neuron: int | None = None
    image_index: int = 0  # the item's number among its class's (or neuron's) images


ItemT = TypeVar("ItemT", bound=Item)
# the params of the kinds that `run_generative` runs
GenerativeParams = GuidedParams | DisagreementParams | NeuronParams


def generative_params(params: BaseModel) -> GenerativeParams:
    """`params` as the params of a kind that `run_generative` runs (TypeError otherwise)."""
    if not isinstance(params, GuidedParams | DisagreementParams | NeuronParams):
        raise TypeError(f"{type(params).__name__} are not the params of a generative kind")
    return params


@dataclass
class JobResult(Generic[ItemT]):
    kind: str
    params: dict
    seed: int
    models: dict[str, str]  # role → spec
    items: list[ItemT]
    guidance: GuidanceResult
    device: str
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """The JSON record of the job (result.json)."""
        g = self.guidance
        items = []
        for b, item in enumerate(self.items):
            best = g.best_iteration[b]
            items.append(
                {
                    **item.__dict__,
                    "best_iteration": best,
                    "best": {
                        "clean_loss": float(g.clean_loss[best, b]),
                        **{k: float(v[best, b]) for k, v in g.metrics.items()},
                    },
                    "clean_loss": g.clean_loss[:, b].tolist(),
                    "train_loss": g.train_loss[:, b].tolist(),
                    "metrics": {k: v[:, b].tolist() for k, v in g.metrics.items()},
                }
            )
        return {
            **record_header(self),
            "iterations_done": g.iterations_done,
            "stopped": g.stopped,
            "items": items,
            "metric_names": metric_descriptions(self.kind, self.models),
            "timings": {**self.timings, **g.timings},
            "versions": software_versions(),
        }

    def render_artifacts(self) -> dict[str, bytes]:
        """name → bytes: result.json, the best and the start image of every item, grid.png."""
        return render_generative(self)


def record_header(result: Any) -> dict[str, Any]:
    """The fields every result.json starts with (a JobResult's, an AnalysisResult's, a
    CounterfactualResult's): kind, normalised params, seed, model specs by role, device."""
    return {
        "kind": result.kind,
        "params": result.params,
        "seed": result.seed,
        "models": result.models,
        "device": result.device,
    }


def metric_descriptions(kind: str, models: dict[str, str]) -> dict[str, str]:
    if kind == "guided":
        return {"p": f"p(class | x) of {models['classifier']}"}
    if kind == "disagreement":
        return {
            "p1": f"p(class | x) of {models['classifier1']}",
            "p2": f"p(class | x) of {models['classifier2']}",
        }
    if kind == "pca_component":
        return {
            "alpha": f"α_l, the component's share of the class logit of {models['classifier']}",
            "p": f"p(class | x) of {models['classifier']}",
        }
    return {
        "activation": f"penultimate unit of {models['classifier']}",
        "p": f"p(class | x) of {models['classifier']} (keep modes)",
    }


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("digin", "torch", "diffusers", "transformers", "timm", "open_clip_torch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


def load_job_classifiers(
    specs: list[str], device: str, templates: ClipTemplates, cache: ModelCache
) -> list[Classifier]:
    """Zero-shot CLIP classifiers take the class names of the job's other classifier (so a
    disagreement between a digits model and CLIP is over the digit names); alone, ImageNet's."""
    fixed = [s for s in specs if not s.startswith("open_clip:")]
    clfs = {s: cache.classifier(s, device, templates) for s in fixed}
    names = clfs[fixed[0]].class_names if fixed else None
    for s in specs:
        if s not in clfs:
            clfs[s] = cache.classifier(s, device, templates, names)
    return [clfs[s] for s in specs]


def class_index(ref: int | str, classifier: Classifier) -> int:
    names = classifier.class_names
    wnids = None
    if len(names) == 1000:
        wnids = [c.wnid for c in imagenet_classes()]
    return resolve_class(ref, names, wnids)


def expand_items(params: GenerativeParams, classifier: Classifier, seed: int) -> list[Item]:
    items: list[Item] = []
    # the names prompts use: ours, or the official code's (`class_names`, docs/differences.md)
    prompt_names = prompt_class_names(classifier.class_names, params.class_names)

    def add(class_index: int | None, neuron: int | None = None) -> None:
        name = None if class_index is None else classifier.class_names[class_index]
        prompt = params.prompt_for(None if class_index is None else prompt_names[class_index])
        for j in range(params.images_per_class):
            i = len(items)
            items.append(Item(i, seed + i, prompt, class_index, name, neuron, j))

    if isinstance(params, NeuronParams):
        classes: Sequence[int | str | None] = params.classes or [None]
        for n, neuron in enumerate(params.neurons):
            ref = classes[0] if len(classes) == 1 else classes[n]
            add(None if ref is None else class_index(ref, classifier), neuron)
    else:
        for ref in params.classes:
            add(class_index(ref, classifier))
    return items


def make_objective(
    params: GenerativeParams, clfs: list[Classifier], items: list[Item]
) -> Objective:
    device = next(clfs[0].parameters()).device
    classes = torch.tensor([it.class_index or 0 for it in items], device=device)
    if isinstance(params, GuidedParams):
        return ClassObjective(clfs[0], classes, params.loss)
    if isinstance(params, DisagreementParams):
        # the same classes in classifier2's numbering, found by name
        names = [it.class_name for it in items if it.class_name is not None]
        if len(names) != len(items):
            raise ValueError("every disagreement item needs a class")
        targets2 = torch.tensor([class_index(name, clfs[1]) for name in names], device=device)
        return DisagreementObjective(clfs[0], clfs[1], classes, params.loss, targets2)
    neurons = torch.tensor([it.neuron for it in items], device=device)
    n_feats = clfs[0].last_layer_weight.shape[1]
    if int(neurons.max()) >= n_feats:
        raise ValueError(f"neurons must be < {n_feats} (penultimate features of the classifier)")
    has_class = items[0].class_index is not None
    return NeuronObjective(clfs[0], neurons, params.mode, classes if has_class else None)


def run_generative(params: GenerativeParams, ctx: RunContext) -> JobResult[Item]:
    """Run one `guided`, `disagreement` or `neuron` job; `progress(step, total, info)` counts
    iterations of all batches. Every kind goes through `digin.core.kinds.run_job`."""
    kind = kind_of(params)
    seed, device, max_batch = ctx.seed, ctx.device, ctx.max_batch
    cache, progress, should_stop = ctx.cache or DEFAULT_CACHE, ctx.progress, ctx.should_stop
    t_start = time.perf_counter()
    max_batch = job_batch(max_batch, params.guidance)  # e.g. 1 for the `reference` preset

    # 1. models, loaded once per process
    model = cache.diffusion(params.diffusion, device, params.guidance.weights_precision)
    roles = ["classifier1", "classifier2"] if kind == "disagreement" else ["classifier"]
    specs = {role: getattr(params, role) for role in roles}
    clfs = load_job_classifiers([specs[r] for r in roles], device, params.clip_templates, cache)
    t_loaded = time.perf_counter()

    # 2. items and their prompt embeddings
    items = expand_items(params, clfs[0], seed)
    resolution = params.resolution or model.resolution
    model.latent_shape(resolution)  # fail early on a bad resolution

    # 3. the optimisation, in batches of at most max_batch items
    items, guidance = optimize_in_batches(
        model, items, lambda chunk: make_objective(params, clfs, chunk), params,
        resolution=resolution, max_batch=max_batch, progress=progress, should_stop=should_stop,
    )  # fmt: skip

    return JobResult(
        kind=kind,
        params=params.model_dump(mode="json"),
        seed=seed,
        models={"diffusion": params.diffusion, **specs},
        items=items,
        guidance=guidance,
        device=device,
        timings={"load_s": t_loaded - t_start, "total_s": time.perf_counter() - t_start},
    )


def optimize_in_batches(
    model: DiffusionModel,
    items: list[ItemT],
    objective_for: Callable[[list[ItemT]], Objective],
    params: Any,
    *,
    resolution: int,
    max_batch: int,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> tuple[list[ItemT], GuidanceResult]:
    """Optimise `items` (each with `.index`, `.seed`, `.prompt`) in batches of at most
    `max_batch`, each batch with `objective_for(batch)` and the params' guidance settings,
    prompt, negative prompt, regularisers and (neuron) foreground blend (`run_batches`).
    Returns the items that ran and their joined result."""
    weights = params.regularizers.active() if hasattr(params, "regularizers") else {}
    lpips_model = load_lpips(model.device) if "lpips" in weights else None  # once per job
    fraction = getattr(params, "foreground_blend", 0.0)

    def run_batch(chunk: list[ItemT], chunk_progress: ProgressFn) -> GuidanceResult:
        cond = model.encode_text([it.prompt for it in chunk])
        setup = None
        if fraction > 0:
            template = params.prompt or ""
            tokens = [class_tokens(model.tokenizers[0], template, it.prompt) for it in chunk]

            def setup(loop: DenoisingLoop, z_T: torch.Tensor) -> None:
                loop.blend = foreground_blend(loop, z_T, cond, tokens, fraction)

        return optimize(
            model,
            objective_for(chunk),
            cond=cond,
            uncond=model.null_text(len(chunk), params.negative_prompt),
            seeds=[it.seed for it in chunk],
            latents=item_latents(model, chunk, params, resolution),
            config=params.guidance,
            resolution=resolution,
            progress=chunk_progress,
            should_stop=should_stop,
            regularizers=Regularizers(weights, model.device, lpips_model) if weights else None,
            setup=setup,
        )

    ran, results = run_batches(items, max_batch, params.guidance.iterations, progress, run_batch)
    return ran, concat_results(results)


class Indexed(Protocol):
    index: int  # the item's index in its job


BatchItem = TypeVar("BatchItem", bound=Indexed)


def run_batches(
    items: list[BatchItem],
    max_batch: int,
    iterations: int,
    progress: ProgressFn | None,
    run_batch: Callable[[list[BatchItem], ProgressFn], GuidanceResult],
) -> tuple[list[BatchItem], list[GuidanceResult]]:
    """The batch loop of every optimisation of a job's items (each with an `.index`):
    `run_batch(batch, progress)` optimises one batch of at most `max_batch` items and reports
    its (iterations + 1) steps, which reach `progress` counted over the whole job, with the
    batch's item indices. Returns the items that ran and the batches' results: a stop ends the
    loop after the batch that saw it (that batch's iterations so far are kept); a stop inside
    the first iteration of a batch (`Stopped`) drops that batch, and is raised when it is the
    first one (there is nothing to return)."""
    steps = iterations + 1
    total = steps * -(-len(items) // max_batch)
    results: list[GuidanceResult] = []
    for start in range(0, len(items), max_batch):
        chunk = items[start : start + max_batch]
        indices = [it.index for it in chunk]

        def chunk_progress(
            step: int, _total: int, info: dict, _done: int = len(results) * steps,
            _indices: list[int] = indices,
        ) -> None:  # fmt: skip
            if progress is not None:
                progress(_done + step, total, {"items": _indices, **info})

        try:
            result = run_batch(chunk, chunk_progress)
        except Stopped:
            if not results:
                raise
            return items[:start], results
        results.append(result)
        if result.stopped:
            return items[: start + len(chunk)], results
    return items, results


def concat_results(results: list[GuidanceResult]) -> GuidanceResult:
    """Join the results of consecutive batches along the item axis. A batch that was stopped
    early has a shorter trajectory: its last iteration is repeated to the common length."""
    if len(results) == 1:
        return results[0]
    n = max(r.iterations_done for r in results)

    def pad(x: torch.Tensor, length: int) -> torch.Tensor:
        if len(x) == 0:
            return torch.full((length, *x.shape[1:]), float("nan"))
        return torch.cat([x, x[-1:].expand(length - len(x), *x.shape[1:])])

    def join(parts: list[torch.Tensor], length: int) -> torch.Tensor:
        return torch.cat([pad(x, length) for x in parts], dim=1)

    return GuidanceResult(
        images=torch.cat([r.images for r in results]),
        best_iteration=[i for r in results for i in r.best_iteration],
        trajectory=join([r.trajectory for r in results], n + 1),
        clean_loss=join([r.clean_loss for r in results], n + 1),
        metrics={k: join([r.metrics[k] for r in results], n + 1) for k in results[0].metrics},
        train_loss=join([r.train_loss for r in results], n),
        latent_norms=join([r.latent_norms for r in results], n + 1),
        final_latents=torch.cat([r.final_latents for r in results]),
        iterations_done=min(r.iterations_done for r in results),
        stopped=any(r.stopped for r in results),
        timings={k: sum(r.timings.get(k, 0.0) for r in results) for k in results[0].timings},
    )
