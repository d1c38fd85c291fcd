"""The counterfactual edit: DiG-IN's optimisation from an inverted image.

See docs/architecture.md §5.5–5.7.

Notation as in `digin.core.guidance` (z_T, C, ∅_i, ΔC, Δ∅, w, T, x̂0), plus:
    z0, x0      the original image's latent and pixels          (1, c, h, w), (1, 3, H, W)
    z_rec,i     latent entering step i of the reconstruction    templates (T, 1, c, h, w)
    m           foreground mask from the start-class tokens     latent (1, 1, h, w), pixel
    f_b         item b's prompt-to-prompt fraction: steps i with i/T < f_b get the stored maps

The items of one call are the targets of one image: they share z_T, ∅_i, the masks and the
templates, and differ in the edited prompt C_b (start-class words → target class words), the
target class and the fraction f_b. Each step i of the chain:

    z ← b·z_rec,i + (1 − b)·z          for i/T < blend_fraction, b = 1 − m (background)
    ε = ε(z, ∅_i + Δ∅[i]) + w·(ε(z, C_b + ΔC[i]) − ε(z, ∅_i + Δ∅[i]))   maps injected for i/T < f_b
    z, x̂0 ← DDIM step

Loss on x̂0 (the last `loss_steps` steps, weights (1..k)/Σ): CE(f(cutouts(x̂0)), target) plus the
weighted regularisers, distances of x̂0 to the original. Iteration 0 (no deltas, z_T as
inverted) is the prompt-to-prompt edit without optimisation; with the start class as target it
is the reconstruction. Before the optimisation each item's f_b is chosen from the configured
fractions by the clean loss of iteration 0 (no gradients).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from digin.core.augment import ItemRNG, clean_view
from digin.core.classifiers import Classifier
from digin.core.config import GuidanceConfig
from digin.core.counterfactual.attention import CrossAttentionControl
from digin.core.counterfactual.config import CounterfactualConfig
from digin.core.diffusion import DiffusionModel, TextEmbeddings
from digin.core.guidance import (
    DenoisingLoop,
    Evaluation,
    GuidanceResult,
    ObjectiveLoss,
    ProgressFn,
    StopFn,
    autocast,
    run,
)
from digin.core.objectives import ClassObjective

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # what lpips loads through torchvision


@dataclass
class EditStart:
    """What the edit of one image starts from (batch 1; items broadcast)."""

    z_T: Tensor  # (1, c, h, w) the inverted noise
    null_texts: TextEmbeddings  # ∅_1..T, hidden (T, 1, L, D)
    templates: Tensor  # (T, 1, c, h, w) z_rec,i: latents entering step i of the reconstruction
    z0: Tensor  # (1, c, h, w) the original's latent
    x0: Tensor  # (1, 3, H, W) the original image in [0, 1]
    latent_mask: Tensor  # (1, 1, h, w) foreground m in [0, 1]
    pixel_mask: Tensor  # (1, 1, H, W)


# --- regularisers -------------------------------------------------------------------------------


def masked_l2(x: Tensor, ref: Tensor, weight: Tensor | None = None) -> Tensor:
    """mean(weight · (x − ref)²) per item, (B, ...) → (B,); weight broadcasts, e.g. (1, 1, h, w)."""
    d = (x - ref) ** 2
    return (d if weight is None else weight * d).flatten(1).mean(1)


def masked_l1(x: Tensor, ref: Tensor, weight: Tensor | None = None) -> Tensor:
    d = (x - ref).abs()
    return (d if weight is None else weight * d).flatten(1).mean(1)


def load_lpips(device: torch.device) -> nn.Module:
    """LPIPS-Alex, only from weights already on this machine (nothing is downloaded)."""
    try:
        import lpips  # type: ignore[import-not-found, import-untyped, unused-ignore]  # optional
    except ImportError:
        msg = "the lpips regulariser needs the lpips package: pip install lpips"
        raise ValueError(msg) from None
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        raise ValueError(
            f"the lpips regulariser needs torchvision's AlexNet weights at {weights}; they are "
            "not downloaded at run time (set lpips to 0, or put the file there)"
        )
    return lpips.LPIPS(net="alex", verbose=False).to(device).eval().requires_grad_(False)


class Regularizers(nn.Module):
    """Weighted distances of x̂0 (latent and decoded) to the original (docs/architecture.md §5.7)."""

    def __init__(self, config: CounterfactualConfig, start: EditStart) -> None:
        super().__init__()
        self.z0, self.x0 = start.z0, start.x0
        self.latent_background = 1.0 - start.latent_mask  # (1, 1, h, w)
        self.pixel_background = 1.0 - start.pixel_mask  # (1, 1, H, W)
        names: tuple[str, ...] = ("latent_background_l2", "pixel_background_l2", "latent_l1")
        names += ("latent_l2", "pixel_l1", "pixel_l2", "lpips")
        self.weights = {n: getattr(config, n) for n in names if getattr(config, n) > 0}
        self.lpips = load_lpips(start.x0.device) if "lpips" in self.weights else None

    def parts(self, latents: Tensor, images: Tensor) -> dict[str, Tensor]:
        """name → (B,) unweighted; latents (B, c, h, w) = x̂0, images (B, 3, H, W) in [0, 1]."""
        out = {}
        for name in self.weights:
            if name == "latent_background_l2":
                out[name] = masked_l2(latents, self.z0, self.latent_background)
            elif name == "pixel_background_l2":
                out[name] = masked_l2(images, self.x0, self.pixel_background)
            elif name == "latent_l1":
                out[name] = masked_l1(latents, self.z0)
            elif name == "latent_l2":
                out[name] = masked_l2(latents, self.z0)
            elif name == "pixel_l1":
                out[name] = masked_l1(images, self.x0)
            elif name == "pixel_l2":
                out[name] = masked_l2(images, self.x0)
            else:  # lpips, on images in [-1, 1]
                assert self.lpips is not None  # loaded with a positive weight
                ref = self.x0.expand_as(images) * 2 - 1
                out[name] = self.lpips(images * 2 - 1, ref).flatten(1).mean(1)
        return out

    def forward(self, latents: Tensor, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        parts = self.parts(latents, images)
        total = torch.zeros(latents.shape[0], device=latents.device)
        for name, value in parts.items():
            total = total + self.weights[name] * value
        return total, parts


# --- the chain -----------------------------------------------------------------------------------


def steps_before(fraction: float, steps: int) -> int:
    """How many steps i satisfy i / T < fraction (the official schedules' test)."""
    return sum(1 for i in range(steps) if i / steps < fraction)


class EditLoop(DenoisingLoop):
    """The DDIM chain of an edit: every item starts from the same inverted image, the
    unconditional embedding is the per-step ∅_i of the inversion, and each step first blends the
    reconstruction's background in (i/T < blend_fraction) and tells the attention control which
    step it is (inside the checkpointed step, so that the recompute in backward sees it too)."""

    def __init__(
        self,
        model: DiffusionModel,
        config: GuidanceConfig,
        resolution: int,
        null_texts: TextEmbeddings,
        control: CrossAttentionControl,
        batch: int,
        templates: Tensor | None = None,
        background: Tensor | None = None,
        blend_steps: int = 0,
    ) -> None:
        nt = null_texts  # per-step ∅_i (T, 1, L, D), the same for every item
        pooled = None if nt.pooled is None else nt.pooled.expand(-1, batch, -1)
        uncond = TextEmbeddings(nt.hidden.expand(-1, batch, -1, -1), pooled)
        super().__init__(model, config, resolution, uncond)
        self.control = control
        self.templates = templates  # (T, 1, c, h, w) z_rec,i
        self.background = background  # (1, 1, h, w) 1 − m
        self.blend_steps = blend_steps if templates is not None else 0

    def prepare(self, z: Tensor, i: int) -> Tensor:
        self.control.step = i
        if i < self.blend_steps:
            background, templates = self.background, self.templates
            assert background is not None and templates is not None  # `edit` passes both
            z = background * templates[i] + (1.0 - background) * z
        return z


@torch.no_grad()
def reconstruct(
    model: DiffusionModel,
    *,
    z_T: Tensor,
    null_texts: TextEmbeddings,
    cond: TextEmbeddings,
    config: GuidanceConfig,
    control: CrossAttentionControl,
    store_steps: int,
    resolution: int,
) -> tuple[Tensor, Tensor]:
    """The reconstruction (caption C, ∅_i, z_T), storing the cross-attention maps of the steps
    i < store_steps: (image (1, 3, H, W) in [0, 1], templates z_rec,i (T, 1, c, h, w))."""
    loop = EditLoop(model, config, resolution, null_texts, control, batch=1)
    control.store(store_steps)
    templates, z = [], z_T
    for i in range(len(loop.scheduler.timesteps)):
        templates.append(z)
        z, x0 = loop.step(z, i, TextEmbeddings.cat([loop.uncond_at(i), cond]), loop.time_ids(1))
    control.off()
    with autocast(model.device, config.precision):
        image = model.decode(x0)
    return image.float(), torch.stack(templates)


# --- loss ----------------------------------------------------------------------------------------


class EditLoss(ObjectiveLoss):
    """x̂0 latent → image → CE over cutouts + the weighted regularisers, per item (checkpointed
    as one unit); the clean path adds the start class's probability and every regulariser."""

    def __init__(
        self,
        model: DiffusionModel,
        classifier: Classifier,
        targets: Tensor,
        start_class: int,
        regularizers: Regularizers,
        config: GuidanceConfig,
        rngs: list[ItemRNG],
        resolution: int,
    ) -> None:
        super().__init__(model, ClassObjective(classifier, targets), config, rngs, resolution)
        self.classifier, self.targets, self.start_class = classifier, targets, start_class
        self.regularizers = regularizers

    def forward(self, x0: Tensor, plans: list) -> tuple[Tensor, Tensor]:
        loss, images = super().forward(x0, plans)
        reg, _ = self.regularizers(x0.float(), images)
        return loss + reg, images

    @torch.no_grad()
    def evaluate(self, x0: Tensor, images: Tensor | None) -> Evaluation:
        """The clean path on the final x̂0 (latent, (B, c, h, w)): selection, search, metrics."""
        images = (self.decode(x0) if images is None else images).detach().float()
        view = clean_view(images, self.classifier.input_size)[:, 0]
        logp = self.classifier(view).float().log_softmax(-1)
        ce = -logp.gather(1, self.targets.view(-1, 1))[:, 0]
        reg, parts = self.regularizers(x0.float(), images)
        metrics = {"p": (-ce).exp(), "p_start": logp[:, self.start_class].exp(), "ce": ce}
        metrics.update({k: v.float() for k, v in parts.items()})
        return Evaluation(ce + reg, metrics, images)


# --- the optimisation ------------------------------------------------------------------------


@dataclass
class EditResult:
    guidance: GuidanceResult  # trajectory, clean losses, metrics (p, p_start, ce, regularisers)
    fractions: list[float]  # f_b, the prompt-to-prompt fraction chosen per item
    search: dict[float, list[float]]  # fraction → clean loss of iteration 0 per item
    timings: dict[str, float] = field(default_factory=dict)


def edit(
    model: DiffusionModel,
    classifier: Classifier,
    *,
    start: EditStart,
    cond: TextEmbeddings,
    targets: Tensor,
    start_class: int,
    seeds: list[int],
    mixing: Tensor,
    control: CrossAttentionControl,
    config: GuidanceConfig,
    cf: CounterfactualConfig,
    resolution: int,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> EditResult:
    """Counterfactuals of one image towards B targets (cond: the B edited prompts, targets (B,),
    mixing (B, L, L) token alignments), with the maps of `control` stored by `reconstruct`."""
    # 1. Inputs: every item starts from the inverted z_T
    b, device, steps = len(seeds), model.device, config.ddim_steps
    targets = targets.to(device)
    rngs = [ItemRNG.from_seed(s, device) for s in seeds]
    z_T = start.z_T.expand(b, -1, -1, -1)
    loop = EditLoop(
        model,
        config,
        resolution,
        start.null_texts,
        control,
        b,
        templates=start.templates,
        background=1.0 - start.latent_mask,
        blend_steps=steps_before(cf.blend_fraction, steps),
    )
    loop.should_stop = should_stop  # the search's chains too (`run` sets it again)
    loss = EditLoss(model, classifier, targets, start_class, Regularizers(cf, start), config,
                    rngs, resolution)  # fmt: skip

    # 2. Prompt-to-prompt fraction per item: the lowest clean loss of the unoptimised edit
    t0 = time.perf_counter()
    fractions = list(cf.p2p_fractions) or [0.0]
    search: dict[float, list[float]] = {}
    for f in fractions:
        until = torch.full((b,), steps_before(f, steps), device=device)
        control.inject(until, mixing)
        with torch.no_grad():
            x0 = loop(z_T, cond, None, keep_last=1)[-1]
        search[f] = loss.evaluate(x0, None).loss.cpu().tolist()
    best = torch.tensor([search[f] for f in fractions]).argmin(0).tolist()  # (B,)
    chosen = [fractions[k] for k in best]
    until = torch.tensor([steps_before(f, steps) for f in chosen], device=device)
    control.inject(until, mixing)
    t_search = time.perf_counter() - t0

    # 3. The optimisation (the engine of digin.core.guidance); iteration I only evaluates
    def progress_info(clean_loss: Tensor, metrics: dict[str, Tensor]) -> dict:
        info = {"stage": "optimizing", "clean_loss": clean_loss.tolist()}
        info.update({k: metrics[k].tolist() for k in ("p", "p_start")})
        return info

    result = run(model, loop, loss, z_T=z_T, cond=cond, config=config, progress=progress,
                 should_stop=should_stop, progress_info=progress_info)  # fmt: skip
    return EditResult(result, chosen, search, {"p2p_search_s": t_search})
