"""One `counterfactual` job, end to end: params → typed `CounterfactualResult`.

See docs/architecture.md §5.

1. Models (once per process) and the start image at the model resolution.
2. Start class (given, or the classifier's prediction) and the caption naming it (given, or
   the prompt with the start class, continued by the captioner when there is one).
3. Inversion: DDIM + null-text, from the process's inversion cache when the same image, model,
   T, w and caption were inverted before (several targets of one job invert once).
4. The reconstruction with cross-attention storage: templates for background blending, maps
   for prompt-to-prompt and the foreground mask of the start-class tokens (refined by SAM when
   there is a segmenter; post-processed).
5. The edits: all targets of the image as batches of at most `max_batch` items (item i has seed
   `seed + i` for its cutouts), each with its edited prompt and token alignment.
6. Metrics: p(target), p(start) of the original, the reconstruction and the counterfactual,
   flips, L1/L2 distances to the original, the inversion's reconstruction errors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from digin.core.batching import job_batch
from digin.core.classes import prompt_class_names
from digin.core.classifiers import Classifier
from digin.core.context import ProgressFn, RunContext, Stopped
from digin.core.counterfactual.attention import (
    CrossAttentionControl,
    attention_map,
    controlled_cross_attention,
    find_words,
    prompt_alignment,
    replace_words,
    token_span,
)
from digin.core.counterfactual.captions import Captioner
from digin.core.counterfactual.edit import EditStart, edit, reconstruct, steps_before
from digin.core.counterfactual.images import StartImage, load_start_image
from digin.core.counterfactual.inversion import Inversion, InversionCache, cache_key, invert
from digin.core.counterfactual.masks import foreground_mask
from digin.core.counterfactual.output import render_counterfactual
from digin.core.guidance import GuidanceResult
from digin.core.jobs import (
    DEFAULT_CACHE,
    ModelCache,
    class_index,
    concat_results,
    record_header,
    run_batches,
    software_versions,
)
from digin.core.loaders import load_captioner, load_segmenter
from digin.core.params import CounterfactualParams
from digin.core.wordnet import wordnet_targets

KIND = "counterfactual"
_INVERSIONS = ("counterfactual", "inversions")  # the ModelCache key of the inversion cache


@dataclass
class CounterfactualItem:
    """One target of the image."""

    index: int
    seed: int
    target_index: int
    target_name: str
    prompt: str  # the caption with the start-class words replaced by the target's
    p2p_fraction: float = 0.0  # chosen share of steps with injected cross-attention maps
    blend_fraction: float = 0.0  # chosen share of steps with the background blended in
    # the schedule search: fraction → the lowest clean loss over the other fraction's choices
    p2p_search: dict[str, float] = field(default_factory=dict)
    blend_search: dict[str, float] = field(default_factory=dict)


@dataclass
class CounterfactualResult:
    kind: str
    params: dict
    seed: int
    models: dict[str, str]  # role → spec
    device: str
    image: StartImage
    start_index: int
    start_name: str
    start_given: bool  # False: the classifier's prediction
    caption: str
    caption_source: str  # 'given', 'prompt' or 'captioner' (the prompt continued by it)
    original: Tensor  # (1, 3, H, W) in [0, 1]
    items: list[CounterfactualItem]
    guidance: GuidanceResult | None  # None when stopped during the inversion
    inversion: Inversion | None = None
    inversion_cached: bool = False
    reconstruction: Tensor | None = None  # (1, 3, H, W) through the edit's attention path
    attention: Tensor | None = None  # (s, s) start-class attention, max-normalised
    latent_mask: Tensor | None = None  # (1, 1, h, w) foreground
    pixel_mask: Tensor | None = None  # (1, 1, H, W)
    mask_steps: dict[str, Any] = field(default_factory=dict)  # SAM and post-processing record
    probs: dict[str, Tensor] = field(default_factory=dict)  # original / reconstruction → (K,)
    stopped: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def item_metrics(self, b: int) -> dict:
        """p(target), p(start) before (original), of the reconstruction, of the unoptimised
        edit (iteration 0) and after; flip; L1 / L2 distances of the counterfactual."""
        g, item = self._optimised(), self.items[b]
        best = g.best_iteration[b]
        before, recon = self.probs["original"], self.probs.get("reconstruction")
        after = {k: float(v[best, b]) for k, v in g.metrics.items()}
        return {
            "before": {
                "p_target": float(before[item.target_index]),
                "p_start": float(before[self.start_index]),
            },
            "reconstruction": None
            if recon is None
            else {
                "p_target": float(recon[item.target_index]),
                "p_start": float(recon[self.start_index]),
            },
            "edit": {
                "p_target": float(g.metrics["p"][0, b]),
                "p_start": float(g.metrics["p_start"][0, b]),
            },
            "after": {
                "p_target": after["p"],
                "p_start": after["p_start"],
                "prediction": int(self.probs["after"][b].argmax()),
            },
            "flip": int(self.probs["after"][b].argmax()) == item.target_index,
            "l1_distance": float(self.distances["l1"][b]),
            "l2_distance": float(self.distances["l2"][b]),
            "best_losses": {k: v for k, v in after.items() if k not in ("p", "p_start")},
        }

    @property
    def distances(self) -> dict[str, Tensor]:
        """Per item: mean |x − x0| (l1) and sqrt(mean (x − x0)²) (l2), over pixels and
        channels of [0, 1] images: independent of the resolution."""
        diff = self._optimised().images.float() - self.original.cpu().float()
        return {"l1": diff.abs().flatten(1).mean(1), "l2": diff.pow(2).flatten(1).mean(1).sqrt()}

    def _optimised(self) -> GuidanceResult:
        if self.guidance is None:
            raise ValueError("the job stopped before the optimisation: no per-item results")
        return self.guidance

    def render_artifacts(self) -> dict[str, bytes]:
        """name → bytes (see `digin.core.counterfactual.output`); `digin.core.output` calls this."""
        return render_counterfactual(self)

    def summary(self) -> dict:
        """The JSON record of the job (result.json)."""
        g = self.guidance
        items = []
        for b, item in enumerate(self.items):
            record = {**item.__dict__}
            if g is not None:
                record.update(self.item_metrics(b))
                record.update(
                    best_iteration=g.best_iteration[b],
                    clean_loss=g.clean_loss[:, b].tolist(),
                    train_loss=g.train_loss[:, b].tolist(),
                    metrics={k: v[:, b].tolist() for k, v in g.metrics.items()},
                )
            items.append(record)
        flips = [it["flip"] for it in items if "flip" in it]
        inversion = None
        if self.inversion is not None:
            inversion = {**self.inversion.describe(), "cached": self.inversion_cached}
        return {
            **record_header(self),
            "image": self.image.describe(),
            "start_class": {
                "index": self.start_index,
                "name": self.start_name,
                "given": self.start_given,
            },
            "caption": self.caption,
            "caption_source": self.caption_source,
            "inversion": inversion,
            "mask": None
            if self.pixel_mask is None
            else {"foreground_share": float(self.pixel_mask.mean()), **self.mask_steps},
            "iterations_done": 0 if g is None else g.iterations_done,
            "stopped": self.stopped,
            "flip_rate": sum(flips) / len(flips) if flips else None,
            "items": items,
            "metric_names": metric_descriptions(self.models),
            "timings": {**self.timings, **({} if g is None else g.timings)},
            "versions": software_versions(),
        }


def metric_descriptions(models: dict[str, str]) -> dict[str, str]:
    clf = models["classifier"]
    return {
        "p": f"p(target | x) of {clf}",
        "p_start": f"p(start class | x) of {clf}",
        "ce": "cross-entropy of the target (clean path)",
        "latent_background_l2": "mean((1 − m)·(ẑ0 − z0)²), latent foreground mask m",
        "pixel_background_l2": "mean((1 − m)·(x̂0 − x0)²), pixel foreground mask m",
        "l1_distance": "mean |x − x0| over pixels and channels, images in [0, 1]",
        "l2_distance": "sqrt(mean (x − x0)²) over pixels and channels, images in [0, 1]",
        "flip": f"argmax of {clf} on the counterfactual == target",
        "inversion": "pixel/latent MSE of the reconstruction: null-text and plain DDIM inversion",
    }


@torch.no_grad()
def class_probs(classifier: Classifier, images: Tensor) -> Tensor:
    """(N, 3, H, W) in [0, 1] → softmax (N, K) on the clean path (bilinear resize)."""
    from digin.core.augment import clean_view

    device = next(classifier.parameters()).device
    views = clean_view(images.to(device).float(), classifier.input_size)[:, 0]
    return classifier(views).float().softmax(-1).cpu()


def run_counterfactual(params: CounterfactualParams, ctx: RunContext) -> CounterfactualResult:
    """Counterfactuals of one image towards every target; see the module docstring."""
    seed, device, max_batch = ctx.seed, ctx.device, ctx.max_batch
    cache, progress, should_stop = ctx.cache or DEFAULT_CACHE, ctx.progress, ctx.should_stop
    image_resolver = ctx.image_resolver
    t_start = time.perf_counter()
    guidance = params.guidance
    max_batch = job_batch(max_batch, guidance)  # e.g. 1 for the `reference` preset

    # 1. models and the image
    model = cache.diffusion(params.diffusion, device, guidance.weights_precision)
    classifier = cache.classifier(params.classifier, device, params.clip_templates)
    captioner = None
    if params.caption is None and params.captioner is not None:
        captioner = _extra_model(cache, "captioner", params.captioner, device, load_captioner)
    segmenter = None
    if params.segmenter is not None:
        segmenter = _extra_model(cache, "segmenter", params.segmenter, device, load_segmenter)
    resolution = params.resolution or model.resolution
    model.latent_shape(resolution)  # fail early on a bad resolution
    image = load_start_image(
        params.image, image_id=params.image_id, resolution=resolution, resolver=image_resolver
    )
    original = image.pixels.to(model.device)  # (1, 3, S, S) in [0, 1]
    probs = {"original": class_probs(classifier, original)[0]}
    t_loaded = time.perf_counter()

    # 2. start class, caption and targets
    plan = _plan(params, classifier, model, probs["original"], seed, captioner, original)
    t_planned = time.perf_counter()
    result = CounterfactualResult(
        kind=KIND,
        params=params.model_dump(mode="json"),
        seed=seed,
        models={
            "diffusion": params.diffusion,
            "classifier": params.classifier,
            **({} if captioner is None else {"captioner": captioner.spec}),
            **({} if segmenter is None else {"segmenter": segmenter.spec}),
        },
        device=device,
        image=image,
        start_index=plan.start,
        start_name=classifier.class_names[plan.start],
        start_given=params.start_class is not None,
        caption=plan.caption,
        caption_source=plan.caption_source,
        original=original.cpu(),
        items=plan.items,
        guidance=None,
        probs=probs,
    )
    if progress is not None:
        total = math.ceil(len(plan.items) / max_batch) * (guidance.iterations + 1)
        progress(0, total, {"stage": "inverting", "clean_loss": []})

    # 3. inversion, cached per process; 4. reconstruction with stored cross-attention maps →
    # templates and masks; 5. the edits. A stop before the first edit iteration was recorded
    # (during the inversion, or inside that iteration) leaves no counterfactual to show.
    cond = model.encode_text([plan.caption])
    t0 = time.perf_counter()
    try:
        inversion, cached = _inversion(
            params, model, cache, image, original, plan.caption, cond, should_stop
        )
        t_inverted = time.perf_counter()
        result.inversion, result.inversion_cached = inversion, cached
        control = CrossAttentionControl()
        with controlled_cross_attention(model.unet, control):
            start_point = _edit_start(params, model, classifier, inversion, original, cond, plan,
                                      control, result, resolution, segmenter)  # fmt: skip
            t_masked = time.perf_counter()
            results, search_s = _edit_in_batches(
                params, model, classifier, start_point, cond, plan, control, result, resolution,
                max_batch, progress, should_stop,
            )  # fmt: skip
    except Stopped:
        result.stopped = True
        result.items = []
        result.timings = {"total_s": time.perf_counter() - t_start}
        return result

    # 6. the result
    result.guidance = concat_results(results)
    result.probs["after"] = class_probs(classifier, result.guidance.images)
    t_end = time.perf_counter()
    result.timings = {
        "load_s": t_loaded - t_start,
        "caption_s": t_planned - t_loaded,
        "inversion_s": t_inverted - t0,
        "reconstruction_mask_s": t_masked - t_inverted,
        "edit_s": t_end - t_masked,
        **({"p2p_search_s": search_s} if results else {}),
        "total_s": t_end - t_start,
    }
    return result


@dataclass
class _Plan:
    """What the edits of one image are: the start class, the caption naming it, the words of
    the caption that name it (and their tokens), and one item per target."""

    start: int
    caption: str
    caption_source: str  # 'given', 'prompt' or 'captioner'
    words: tuple[int, int]
    source: Any  # token span of the start-class words in the caption
    items: list[CounterfactualItem]


def _extra_model(cache: ModelCache, role: str, spec: str, device: str, load) -> Any:
    """The captioner or segmenter of `spec` from the process's model cache."""
    cache.check(spec)
    return cache.get((role, spec, device), lambda: load(spec, device=device))


def _caption(params, start_name: str, captioner: Captioner | None, original: Tensor | None):
    """(the caption, where it came from): given, the prompt with the start class, or that
    prompt continued by the captioner on the original (docs/architecture.md §5.3)."""
    if params.caption is not None:
        return params.caption, "given"
    prompt = params.prompt_for(start_name)
    if captioner is None:
        return prompt, "prompt"
    if original is None:
        raise ValueError("the captioner needs the original image")
    cf = params.counterfactual
    caption = captioner.continue_caption(
        original, prompt, max_new_tokens=cf.caption_max_tokens, num_beams=cf.caption_beams
    )
    return caption, "captioner"


def _plan(params, classifier: Classifier, model, original_probs: Tensor, seed: int,
          captioner: Captioner | None = None, original: Tensor | None = None) -> _Plan:  # fmt: skip
    if params.start_class is None:
        start = int(original_probs.argmax())
    else:
        start = class_index(params.start_class, classifier)
    names = prompt_class_names(classifier.class_names, params.class_names)  # as prompts say them
    start_name = names[start]
    caption, caption_source = _caption(params, start_name, captioner, original)
    words = find_words(caption, start_name)
    if words is None:
        made = ""
        if captioner is not None and caption_source == "captioner":
            made = f" (made by the captioner {captioner.spec})"
        raise ValueError(
            f"the caption {caption!r}{made} does not name the start class {start_name!r}; "
            "prompt-to-prompt replaces those words by the target class"
        )
    if params.targets == "others":
        targets = [k for k in range(classifier.num_classes) if k != start]
    elif isinstance(params.targets, str):  # 'wordnet[:<n>]': the start class's siblings
        targets = wordnet_targets(params.targets, start, classifier.class_names)
    else:
        targets = [class_index(ref, classifier) for ref in params.targets]
    source = token_span(model.tokenizers[0], caption, words)
    items = []
    for i, k in enumerate(targets):
        name = names[k]
        items.append(CounterfactualItem(i, seed + i, k, name, replace_words(caption, words, name)))
    return _Plan(start, caption, caption_source, words, source, items)


def _inversion(params, model, cache, image, original, caption, cond, should_stop):
    """The image's inversion under its caption: (Inversion, whether it came from the cache)."""
    guidance, cf = params.guidance, params.counterfactual
    uncond = model.null_text(1, params.negative_prompt)
    inversions: InversionCache = cache.get(_INVERSIONS, InversionCache)
    key = cache_key(
        image_sha256=image.sha256,
        model=model,
        caption=caption,
        negative_prompt=params.negative_prompt,
        guidance=guidance,
        config=cf,
    )
    return inversions.get_or_invert(
        key,
        lambda: invert(
            model, original, cond, uncond, guidance=guidance, config=cf, should_stop=should_stop
        ),
    )


def _edit_start(params, model, classifier, inversion, original, cond, plan, control, result,
                resolution, segmenter=None) -> EditStart:  # fmt: skip
    """The reconstruction (storing the cross-attention maps), the foreground masks from the
    start-class tokens' maps (refined by the segmenter if any, post-processed), and what every
    edit starts from; records them in `result`."""
    guidance, cf = params.guidance, params.counterfactual
    steps = guidance.ddim_steps
    store_steps = max(
        [math.ceil(cf.mask_steps * steps)] + [steps_before(f, steps) for f in cf.p2p_fractions]
    )
    latent_side = model.latent_shape(resolution)[-1]
    recon, templates = reconstruct(
        model,
        z_T=inversion.z_T,
        null_texts=inversion.null_texts,
        cond=cond,
        config=guidance,
        control=control,
        store_steps=store_steps,
        resolution=resolution,
    )
    attention = attention_map(control, plan.source, math.ceil(cf.mask_steps * steps), latent_side)
    latent_mask, pixel_mask, result.mask_steps = foreground_mask(
        attention,
        original,
        cf,
        latent_side=latent_side,
        segmenter=segmenter,
        generator=torch.Generator().manual_seed(result.seed),
    )
    result.reconstruction = recon.cpu()
    result.attention = attention.cpu()
    result.latent_mask, result.pixel_mask = latent_mask.cpu(), pixel_mask.cpu()
    result.probs["reconstruction"] = class_probs(classifier, recon)[0]
    return EditStart(
        z_T=inversion.z_T,
        null_texts=inversion.null_texts,
        templates=templates,
        z0=inversion.z0,
        x0=original,
        latent_mask=latent_mask,
        pixel_mask=pixel_mask,
    )


def _edit_in_batches(params, model, classifier, start_point, cond, plan, control, result,
                     resolution, max_batch, progress, should_stop):  # fmt: skip
    """The edits, in batches of at most `max_batch` targets (`digin.core.jobs.run_batches`):
    (their GuidanceResults, seconds of the prompt-to-prompt fraction search). A stop keeps the
    items done so far."""
    guidance = params.guidance
    tokenizer, word = model.tokenizers[0], plan.words[0]
    search_s = 0.0

    def run_batch(chunk: list[CounterfactualItem], chunk_progress: ProgressFn) -> GuidanceResult:
        nonlocal search_s
        prompts = model.encode_text([it.prompt for it in chunk])
        mixing = torch.stack(
            [
                prompt_alignment(
                    tokenizer,
                    plan.caption,
                    plan.words,
                    cond.hidden[0],
                    it.prompt,
                    (word, word + len(it.target_name)),
                    prompts.hidden[b],
                )
                for b, it in enumerate(chunk)
            ]
        ).to(model.device)
        out = edit(
            model,
            classifier,
            start=start_point,
            cond=prompts,
            targets=torch.tensor([it.target_index for it in chunk]),
            start_class=plan.start,
            seeds=[it.seed for it in chunk],
            mixing=mixing,
            control=control,
            config=guidance,
            cf=params.counterfactual,
            resolution=resolution,
            progress=chunk_progress,
            should_stop=should_stop,
        )
        for b, it in enumerate(chunk):
            it.p2p_fraction, it.blend_fraction = out.schedules[b]
            for (f, g), losses in out.search.items():
                it.p2p_search[str(f)] = min(it.p2p_search.get(str(f), math.inf), losses[b])
                it.blend_search[str(g)] = min(it.blend_search.get(str(g), math.inf), losses[b])
        search_s += out.timings["p2p_search_s"]
        return out.guidance

    items, results = run_batches(plan.items, max_batch, guidance.iterations, progress, run_batch)
    if len(items) < len(plan.items) or results[-1].stopped:
        result.items, result.stopped = items, True
    return results, search_s
