"""The counterfactual edit: DiG-IN's optimisation from an inverted image.

See docs/architecture.md §5.5–5.7.

Notation as in `digin.core.guidance` (z_T, C, ∅_i, ΔC, Δ∅, w, T, x̂0), plus:
    z0, x0      the original image's latent and pixels          (1, c, h, w), (1, 3, H, W)
    z_rec,i     latent entering step i of the reconstruction    templates (T, 1, c, h, w)
    m           foreground mask from the start-class tokens     latent (1, 1, h, w), pixel
    f_b         item b's prompt-to-prompt fraction: steps i with i/T < f_b get the stored maps
    g_b         item b's blend fraction: steps i with i/T < g_b blend the background in

The items of one call are the targets of one image: they share z_T, ∅_i, the masks and the
templates, and differ in the edited prompt C_b (start-class words → target class words), the
target class and the fractions f_b, g_b. Each step i of the chain:

    z ← b·z_rec,i + (1 − b)·z          for i/T < g_b, b = 1 − m (background)
    ε = ε(z, ∅_i + Δ∅[i]) + w·(ε(z, C_b + ΔC[i]) − ε(z, ∅_i + Δ∅[i]))   maps injected for i/T < f_b
    z, x̂0 ← DDIM step

Loss on x̂0 (the last `loss_steps` steps, weights (1..k)/Σ): CE(f(cutouts(x̂0)), target) plus the
weighted regularisers, distances of x̂0 to the original. Iteration 0 (no deltas, z_T as
inverted) is the prompt-to-prompt edit without optimisation; with the start class as target it
is the reconstruction. Before the optimisation each item's pair (f_b, g_b) is chosen from the
configured fractions (`p2p_fractions` × `blend_fraction` and `blend_search`) by the clean loss
of iteration 0, regularisers included (no gradients).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from digin.core import regularizers
from digin.core.augment import ItemRNG, clean_view
from digin.core.classifiers import Classifier
from digin.core.config import GuidanceConfig
from digin.core.counterfactual.attention import CrossAttentionControl
from digin.core.counterfactual.config import CounterfactualConfig
from digin.core.diffusion import DiffusionModel, TextEmbeddings
from digin.core.guidance import (
    Blend,
    DenoisingLoop,
    Evaluation,
    GuidanceResult,
    ObjectiveLoss,
    ProgressFn,
    StopFn,
    autocast,
    run,
    steps_before,
)
from digin.core.objectives import ClassObjective
from digin.core.regularizers import masked_l2 as masked_l2  # re-exported


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


class Regularizers(regularizers.Regularizers):
    """The edit's regularisers (docs/architecture.md §5.7): the config's weights, distances of x̂0
    (latent and decoded) to the original image, the background terms under its masks."""

    def __init__(
        self, config: CounterfactualConfig, start: EditStart, lpips_model: nn.Module | None = None
    ) -> None:
        weights = {n: getattr(config, n) for n in regularizers.NAMES}
        super().__init__(weights, start.x0.device, lpips_model)
        self.set_reference(start.z0, start.x0, start.latent_mask, start.pixel_mask)


# --- the chain -----------------------------------------------------------------------------------


class EditLoop(DenoisingLoop):
    """The DDIM chain of an edit: every item starts from the same inverted image, the
    unconditional embedding is the per-step ∅_i of the inversion, and each step first blends the
    reconstruction's background in (`blend`: item b at i < its blend steps) and tells the
    attention control which step it is (inside the checkpointed step, so that the recompute in
    backward sees it too)."""

    def __init__(
        self,
        model: DiffusionModel,
        config: GuidanceConfig,
        resolution: int,
        null_texts: TextEmbeddings,
        control: CrossAttentionControl,
        batch: int,
    ) -> None:
        nt = null_texts  # per-step ∅_i (T, 1, L, D), the same for every item
        pooled = None if nt.pooled is None else nt.pooled.expand(-1, batch, -1)
        uncond = TextEmbeddings(nt.hidden.expand(-1, batch, -1, -1), pooled)
        super().__init__(model, config, resolution, uncond)
        self.control = control

    def prepare(self, z: Tensor, i: int) -> Tensor:
        self.control.step = i
        return super().prepare(z, i)  # the background blend


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
        objective = ClassObjective(classifier, targets)
        super().__init__(model, objective, config, rngs, resolution, regularizers)
        self.classifier, self.targets, self.start_class = classifier, targets, start_class
        self.edit_regularizers = regularizers  # every distance is a metric, even at weight 0

    @torch.no_grad()
    def evaluate(self, x0: Tensor, images: Tensor | None) -> Evaluation:
        """The clean path on the final x̂0 (latent, (B, c, h, w)): selection, search, metrics."""
        images = (self.decode(x0) if images is None else images).detach().float()
        view = clean_view(images, self.classifier.input_size)[:, 0]
        logp = self.classifier(view).float().log_softmax(-1)
        ce = -logp.gather(1, self.targets.view(-1, 1))[:, 0]
        reg, parts = self.edit_regularizers(x0.float(), images)
        metrics = {"p": (-ce).exp(), "p_start": logp[:, self.start_class].exp(), "ce": ce}
        metrics.update({k: v.float() for k, v in parts.items()})
        return Evaluation(ce + reg, metrics, images)


# --- the optimisation ------------------------------------------------------------------------


@dataclass
class EditResult:
    guidance: GuidanceResult  # trajectory, clean losses, metrics (p, p_start, ce, regularisers)
    schedules: list[tuple[float, float]]  # (f_b, g_b): p2p and blend fractions chosen per item
    search: dict[tuple[float, float], list[float]]  # (f, g) → clean loss of iteration 0 per item
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
    loop = EditLoop(model, config, resolution, start.null_texts, control, b)
    loop.should_stop = should_stop  # the search's chains too (`run` sets it again)
    loss = EditLoss(model, classifier, targets, start_class, Regularizers(cf, start), config,
                    rngs, resolution)  # fmt: skip
    background = 1.0 - start.latent_mask  # (1, 1, h, w) where the reconstruction is kept

    def schedule(pairs: list[tuple[float, float]]) -> None:
        """Item b: maps injected at i/T < pairs[b][0], background blended at i/T < pairs[b][1]."""
        until = torch.tensor([steps_before(f, steps) for f, _ in pairs], device=device)
        control.inject(until, mixing)
        blend = [steps_before(g, steps) for _, g in pairs]
        loop.blend = Blend.make(start.templates, background, blend)

    # 2. Prompt-to-prompt fraction x blend fraction per item: the lowest clean loss (with the
    # regularisers) of the unoptimised edit, no gradients
    t0 = time.perf_counter()
    candidates = schedule_candidates(cf)
    search: dict[tuple[float, float], list[float]] = {}
    for pair in candidates:
        schedule([pair] * b)
        with torch.no_grad():
            x0 = loop(z_T, cond, None, keep_last=1)[-1]
        search[pair] = loss.evaluate(x0, None).loss.cpu().tolist()
    best = torch.tensor([search[c] for c in candidates]).argmin(0).tolist()  # (B,)
    chosen = [candidates[k] for k in best]
    schedule(chosen)
    t_search = time.perf_counter() - t0

    # 3. The optimisation (the engine of digin.core.guidance); iteration I only evaluates
    def progress_info(clean_loss: Tensor, metrics: dict[str, Tensor]) -> dict:
        info = {"stage": "optimizing", "clean_loss": clean_loss.tolist()}
        info.update({k: metrics[k].tolist() for k in ("p", "p_start")})
        return info

    result = run(model, loop, loss, z_T=z_T, cond=cond, config=config, progress=progress,
                 should_stop=should_stop, progress_info=progress_info)  # fmt: skip
    return EditResult(result, chosen, search, {"p2p_search_s": t_search})


def schedule_candidates(cf: CounterfactualConfig) -> list[tuple[float, float]]:
    """The (prompt-to-prompt fraction, blend fraction) pairs an edit searches, in order (ties go
    to the first): every p2p fraction (none: 0) with `blend_fraction`, then with each other
    fraction of `blend_search`."""
    blends = list(dict.fromkeys([cf.blend_fraction, *cf.blend_search]))
    return [(f, g) for g in blends for f in (list(cf.p2p_fractions) or [0.0])]
