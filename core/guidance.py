"""The DiG-IN optimisation, the one engine of every kind (docs/architecture.md §3).

Augustin, Neuhaus, Hein, "DiG-IN: Diffusion Guidance for Investigating Networks", CVPR 2024.

Notation (paper → code):
    z_T     z_T                 (B, c, h, w)  initial latent, optimised, L2 norm kept per item
    C       cond                TextEmbeddings, hidden (B, L, D) (+ pooled (B, P) for SDXL)
    ∅       uncond              TextEmbeddings; per step ∅_i for real images (hidden (T, B, L, D))
    ΔC[i]   deltas.cond[i]      (T, B, L, D), zero-initialised (T = 1 when shared by all steps)
    Δ∅[i]   deltas.uncond[i]    (T, B, L, D), zero-initialised
    w       config.guidance_scale
    T       config.ddim_steps
    x̂0_i    x0                  x0-prediction of DDIM step i, in latent space
    f       objective           classifier-derived loss per item, (B,)

One iteration: run the T DDIM steps with gradients through all of them (each step's UNet call is
checkpointed, so memory does not grow with T), decode the x0-predictions of the last `loss_steps`
steps, weight their losses by (1, …, k)/Σ, back-propagate, take an optimiser step, and re-project
z_T onto its initial norm. The trajectory keeps iteration 0 (the unoptimised sample).

The engine: `run` (the iterations), `DenoisingLoop` (the chain; subclasses add per-step work
through `prepare`), `ObjectiveLoss` (what is minimised, and its clean path), `descend` (the
update), `Recorder` (the bookkeeping, one host copy per iteration), `guided_eps` (CFG).
`optimize` is the entry of the generative kinds; counterfactual edits subclass the chain and the
loss (`digin.core.counterfactual.edit`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from digin.core.augment import ItemRNG, apply_cutouts, clean_view, sample_cutouts
from digin.core.config import GuidanceConfig
from digin.core.context import ProgressFn, StopFn, Stopped, check_stop
from digin.core.diffusion import DiffusionModel, TextEmbeddings
from digin.core.objectives import Objective, ObjectiveOutput
from digin.core.regularizers import Regularizers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision names


def loss_step_weights(loss_steps: int, schedule: str = "linear") -> Tensor:
    """Weights of the last k x0-predictions: `linear` (1, 2, …, k) / Σ, e.g. 1/6, 2/6, 3/6 (the
    least noisy weighs most), or `uniform` 1/k each."""
    if schedule == "uniform":
        return torch.full((loss_steps,), 1.0 / loss_steps)
    if schedule != "linear":
        raise ValueError(f"loss_steps_schedule must be 'linear' or 'uniform', got {schedule!r}")
    w = torch.arange(1, loss_steps + 1, dtype=torch.float32)
    return w / w.sum()


def steps_before(fraction: float, steps: int) -> int:
    """How many steps i satisfy i / T < fraction (the official schedules' test)."""
    return sum(1 for i in range(steps) if i / steps < fraction)


def autocast(device: torch.device, precision: str):
    """Autocast context of UNet and VAE calls (a no-op in fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def initial_latents(model: DiffusionModel, rngs: list[ItemRNG], resolution: int) -> Tensor:
    """z_T ~ N(0, I) per item from its own generator, drawn on the CPU: (B, c, h, w)."""
    shape = model.latent_shape(resolution)
    z = torch.stack([torch.randn(shape, generator=rng.cpu) for rng in rngs])
    return z.to(model.device) * model.make_scheduler(1).init_noise_sigma


@dataclass
class Deltas:
    """Optimised per-step embedding deltas ΔC and Δ∅ (pooled parts for SDXL)."""

    cond: Tensor  # (T', B, L, D), T' = T or 1
    uncond: Tensor  # (T'', B, L, D), T'' = T or 1
    cond_pooled: Tensor | None  # (T', B, P)
    uncond_pooled: Tensor | None  # (T'', B, P)

    @staticmethod
    def zeros(cond: TextEmbeddings, steps: int, uncond_steps: int | None = None) -> Deltas:
        """Zero deltas: ΔC with `steps` entries (T or 1), Δ∅ with `uncond_steps` (default the
        same)."""

        def z(x: Tensor, n: int) -> Tensor:
            return torch.zeros((n, *x.shape), device=x.device)

        def zp(x: Tensor | None, n: int) -> Tensor | None:
            return None if x is None else z(x, n)

        n_u = steps if uncond_steps is None else uncond_steps
        h, pooled = cond.hidden, cond.pooled
        return Deltas(z(h, steps), z(h, n_u), zp(pooled, steps), zp(pooled, n_u))

    def tensors(self) -> list[Tensor]:
        parts = (self.cond, self.uncond, self.cond_pooled, self.uncond_pooled)
        return [p for p in parts if p is not None]

    def at(self, i: int) -> tuple[TextEmbeddings, TextEmbeddings]:
        """(ΔC[i], Δ∅[i]); a delta shared by all steps is the one of every step."""

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[min(i, x.shape[0] - 1)]

        return (
            TextEmbeddings(pick(self.cond), pick(self.cond_pooled)),  # type: ignore[arg-type]
            TextEmbeddings(pick(self.uncond), pick(self.uncond_pooled)),  # type: ignore[arg-type]
        )


@dataclass
class Blend:
    """Latents blended into the chain (docs/architecture.md §3.11): at the start of step i, for
    the items with i < steps[b], z_b ← m_b · template_i,b + (1 − m_b) · z_b. Counterfactuals keep
    the reconstruction's background, neuron visualisations the unoptimised sample's foreground."""

    templates: Tensor  # (T, B or 1, c, h, w) latents entering each step of a reference chain
    mask: Tensor  # (B or 1, 1, h, w) in [0, 1]: where the templates are kept
    steps: Tensor  # (B,) long, on the device: item b is blended at steps i < steps[b]
    max_steps: int = 0  # max(steps), on the host (no step waits for the device)

    @staticmethod
    def make(templates: Tensor, mask: Tensor, steps: list[int]) -> Blend:
        device = templates.device
        return Blend(templates, mask, torch.tensor(steps, device=device), max(steps, default=0))

    def __call__(self, z: Tensor, i: int) -> Tensor:
        if i >= self.max_steps:
            return z
        on = (i < self.steps).to(z.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        w = self.mask * on
        return w * self.templates[i] + (1.0 - w) * z


@dataclass
class GuidanceResult:
    images: Tensor  # (B, 3, H, W) in [0, 1], the best iteration per item (clean loss)
    best_iteration: list[int]  # per item
    trajectory: Tensor  # (I + 1, B, 3, H, W) uint8, iteration 0 = the unoptimised sample
    clean_loss: Tensor  # (I + 1, B) objective on the clean path of the final x0
    metrics: dict[str, Tensor]  # name → (I + 1, B), clean-path metrics per iteration
    train_loss: Tensor  # (I, B) weighted augmented loss that was back-propagated
    latent_norms: Tensor  # (I + 1, B) ‖z_T‖ at every iteration (kept constant by re-projection)
    final_latents: Tensor  # (B, c, h, w) z_T after the last optimiser step
    iterations_done: int
    stopped: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def guided_eps(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ε(z, ∅) + w · (ε(z, C) − ε(z, ∅))."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


class DenoisingLoop:
    """The DDIM chain of one iteration, with gradients (and checkpointing) when asked.

    `should_stop` (set by `run`) is polled at every step, in the forward chain and in the
    backward pass (in its recompute with checkpointing, else by a gradient hook on each step's
    latent): a cancel takes effect within one step, whatever T and the image size, by raising
    `digin.core.context.Stopped` out of the iteration."""

    should_stop: StopFn | None = None

    def __init__(
        self,
        model: DiffusionModel,
        config: GuidanceConfig,
        resolution: int,
        uncond_base: TextEmbeddings,
    ) -> None:
        self.model = model
        self.config = config
        self.scheduler = model.make_scheduler(config.ddim_steps)
        self.uncond_base = uncond_base  # hidden (B, L, D) or per step (T, B, L, D)
        self.device = model.device
        self.resolution = resolution
        # The scheduler indexes its host-side tables with host timesteps; the UNet gets the same
        # timesteps copied to the device once here, so no step waits on a host-device copy.
        self.timesteps_device = self.scheduler.timesteps.to(self.device)
        self._time_ids: dict[int, Tensor | None] = {}
        self.dpm = dpm_tables(self.scheduler) if config.solver == "dpm" else None
        self.blend: Blend | None = None  # latents blended in at the first steps, if any

    def uncond_at(self, i: int) -> TextEmbeddings:
        u = self.uncond_base
        if u.hidden.dim() == 4:  # per-step ∅_i (null-text inversion)
            return TextEmbeddings(u.hidden[i], None if u.pooled is None else u.pooled[i])
        return u

    def time_ids(self, b: int) -> Tensor | None:
        """SDXL micro-conditioning of the CFG batch (2B, 6), made once per batch size."""
        if b not in self._time_ids:
            ids = self.model.time_ids(b, self.resolution)
            self._time_ids[b] = None if ids is None else torch.cat([ids, ids])
        return self._time_ids[b]

    def prepare(self, z: Tensor, i: int) -> Tensor:
        """What a chain adds at the start of step i, inside the (checkpointed) step so that the
        recompute in backward does it again: the `blend`, if any; counterfactual edits also set
        the step of the attention control (`digin.core.counterfactual.edit`)."""
        return z if self.blend is None else self.blend(z, i)

    def step(
        self,
        z: Tensor,
        i: int,
        text: TextEmbeddings,
        time_ids: Tensor | None,
        prev_x0: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Step i with classifier-free guidance: z_t → (z_{t-1}, x̂0). DDIM, or with
        `solver: dpm` DPM-Solver++(2M), which also takes the previous step's x̂0."""
        check_stop(self.should_stop)
        z = self.prepare(z, i)
        t = self.scheduler.timesteps[i]  # host copy, for the scheduler's tables
        with autocast(self.device, self.config.precision):
            eps = self.model.eps(torch.cat([z, z]), self.timesteps_device[i], text, time_ids)
        eps_uncond, eps_cond = eps.float().chunk(2)
        eps = guided_eps(eps_uncond, eps_cond, self.config.guidance_scale)
        if self.dpm is not None:
            return dpm_step(self.dpm, self.scheduler.config, i, z, eps, prev_x0)
        out = self.scheduler.step(eps, t, z, eta=0.0)
        return out.prev_sample, out.pred_original_sample

    def _poll(self, grad: Tensor) -> None:
        """A gradient hook: poll `should_stop` as the backward pass reaches a step."""
        check_stop(self.should_stop)

    def __call__(
        self, z: Tensor, cond: TextEmbeddings, deltas: Deltas | None, keep_last: int
    ) -> list[Tensor]:
        """Run the chain from z_T; return the x0-predictions of the last `keep_last` steps."""
        time_ids = self.time_ids(z.shape[0])
        steps = len(self.scheduler.timesteps)
        grad = torch.is_grad_enabled() and self.config.checkpointing
        x0s: list[Tensor] = []
        prev = None  # the previous step's x̂0 (DPM-Solver++(2M) only)
        # Nothing in this loop reads a device value on the host (no .item(), .cpu(), bool of a
        # device tensor): the steps queue up on the device without waiting for each other.
        for i in range(steps):
            c, u = cond, self.uncond_at(i)
            if deltas is not None:
                dc, du = deltas.at(i)
                c, u = c + dc, u + du
            text = TextEmbeddings.cat([u, c])  # (2B, L, D): unconditional half first
            if grad:
                z, x0 = checkpoint(self.step, z, i, text, time_ids, prev, use_reentrant=False)
            else:
                z, x0 = self.step(z, i, text, time_ids, prev)
                if self.should_stop is not None and z.requires_grad:  # no recompute: the
                    z.register_hook(self._poll)  # backward pass polls at each step's z
            if i >= steps - keep_last:
                x0s.append(x0)
            prev = x0 if self.dpm is not None else None
        return x0s


def dpm_tables(scheduler) -> list[tuple[float, float, float, float]]:
    """Per step i of a DDIM scheduler's timesteps: (α_s, σ_s, α_t, σ_t), √ᾱ and √(1 − ᾱ) at the
    step's timestep s and at the next, t = s − 1000/T (DDIM's `prev_timestep`; below 0 its
    `final_alpha_cumprod`), so that the first-order update is DDIM's."""
    ac = scheduler.alphas_cumprod.double()
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = float(scheduler.final_alpha_cumprod)
    rows = []
    for t in scheduler.timesteps.tolist():
        a_s = float(ac[t])
        a_t = float(ac[t - ratio]) if t - ratio >= 0 else final
        rows.append((a_s**0.5, (1 - a_s) ** 0.5, a_t**0.5, (1 - a_t) ** 0.5))
    return rows


def dpm_step(tables, config, i: int, z: Tensor, out: Tensor, prev_x0: Tensor | None):
    """DPM-Solver++(2M) step i (Lu et al. 2022, the midpoint form): x̂0 from the model output
    (ε, v or x0, as the scheduler's `prediction_type`; clipped like DDIM's when `clip_sample`),
    D = x̂0 + (x̂0 − x̂0_prev)·h/(2·h_prev) (first order, D = x̂0, at the first and the last
    step), z_t = (σ_t/σ_s)·z + α_t·(1 − e^(−h))·D with h = λ_t − λ_s, λ = log(α/σ)."""
    a_s, s_s, a_t, s_t = tables[i]
    kind = config.prediction_type
    if kind == "epsilon":
        x0 = (z - s_s * out) / a_s
    elif kind == "v_prediction":
        x0 = a_s * z - s_s * out
    elif kind == "sample":
        x0 = out
    else:
        raise ValueError(f"prediction_type {kind!r} is not supported by the dpm solver")
    if getattr(config, "clip_sample", False):
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    d = x0
    if prev_x0 is not None and 0 < i < len(tables) - 1:
        a_p, s_p = tables[i - 1][:2]
        h = math.log(a_t / s_t) - math.log(a_s / s_s)
        h_prev = math.log(a_s / s_s) - math.log(a_p / s_p)
        d = x0 + (x0 - prev_x0) * (h / (2 * h_prev))
    decay = (s_t * a_s) / (s_s * a_t)  # e^(−h); 0 when σ_t = 0
    return (s_t / s_s) * z + a_t * (1 - decay) * d, x0


def _clean_views(objective: Objective, images: Tensor) -> list[Tensor]:
    return [clean_view(images, clf.input_size) for clf in objective.classifiers]


@dataclass
class Evaluation:
    """The clean path of one iteration's final x̂0: what selects the best iteration."""

    loss: Tensor  # (B,) float32
    metrics: dict[str, Tensor]  # name → (B,)
    images: Tensor  # (B, 3, H, W) in [0, 1], float32


class ObjectiveLoss(torch.nn.Module):
    """What the engine minimises for the generative kinds: x̂0 latent → image → classifier views
    (`num_cutouts` crops per image, or the clean resize) → per-item objective, plus the weighted
    `regularizers` (distances to a reference, §3.12) if any; checkpointed as one unit.
    `evaluate` is the clean path (regularisers included). Counterfactual edits change the clean
    path's metrics (`digin.core.counterfactual.edit.EditLoss`)."""

    def __init__(
        self,
        model,
        objective: Objective,
        config: GuidanceConfig,
        rngs,
        resolution,
        regularizers: Regularizers | None = None,
    ):
        super().__init__()
        self.model, self.objective, self.config = model, objective, config
        self.rngs = rngs
        self.resolution = resolution
        self.regularizers = regularizers if regularizers else None  # None: no weight > 0

    @torch.no_grad()
    def begin(self, x0: Tensor) -> None:
        """Hears the final x̂0 of iteration 0 (the unoptimised sample, (B, c, h, w)) before its
        loss: regularisers without a reference take it and its image as theirs."""
        reg = self.regularizers
        if reg is not None and reg.z0 is None:
            reg.set_reference(x0.detach().float(), self.decode(x0.detach()).detach().float())

    def sample_plans(self) -> list:
        """The crops of one loss step, drawn outside the checkpoint from each item's streams."""
        cfg = self.config
        if cfg.num_cutouts == 0:
            return [None for _ in self.objective.classifiers]
        return [
            sample_cutouts(
                self.rngs,
                image_side=self.resolution,
                size=clf.input_size,
                num=cfg.num_cutouts,
                cut_power=cfg.cut_power,
                noise_sd=cfg.noise_sd,
            )
            for clf in self.objective.classifiers
        ]

    def decode(self, x0: Tensor) -> Tensor:
        with autocast(x0.device, self.config.precision):
            return self.model.decode(x0)  # (B, 3, H, W) in [0, 1], float32

    def forward(self, x0: Tensor, plans: list) -> tuple[Tensor, Tensor]:
        images = self.decode(x0)
        views = [
            clean_view(images, clf.input_size) if plan is None else apply_cutouts(images, plan)
            for clf, plan in zip(self.objective.classifiers, plans, strict=True)
        ]
        loss = self.objective(views).loss
        if self.regularizers is not None:
            loss = loss + self.regularizers(x0.float(), images)[0]
        return loss, images  # (B,), (B, 3, H, W)

    @torch.no_grad()
    def evaluate(self, x0: Tensor, images: Tensor | None) -> Evaluation:
        """The clean path on x̂0 (`images`: its decode, when the loss already made it); with
        regularisers, their weighted sum joins the loss and each distance the metrics."""
        images = (self.decode(x0) if images is None else images).detach().float()
        out: ObjectiveOutput = self.objective(_clean_views(self.objective, images))
        metrics = {k: v.detach().float() for k, v in out.metrics.items()}
        loss = out.loss.detach().float()
        if self.regularizers is not None:
            reg, parts = self.regularizers(x0.float(), images)
            loss = loss + reg
            metrics.update({k: v.float() for k, v in parts.items()})
        return Evaluation(loss, metrics, images)


def _clip_per_item(g: Tensor, item_dim: int, max_norm: float) -> None:
    """Per-variable inf-norm gradient clipping (of the gradient `g`, in place), separately for
    every item."""
    dims = [d for d in range(g.dim()) if d != item_dim]
    norm = g.abs().amax(dim=dims, keepdim=True)
    g.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))


def _normalize_per_item(g: Tensor, item_dim: int) -> None:
    """g_b ← g_b / ‖g_b‖₂ in place, separately for every item (a zero gradient stays zero)."""
    dims = [d for d in range(g.dim()) if d != item_dim]
    g.div_(torch.linalg.vector_norm(g, dim=dims, keepdim=True).clamp_min(1e-12))


def _item_view(mask: Tensor, p: Tensor, item_dim: int) -> Tensor:
    """(B,) → a shape that broadcasts along `p`'s item axis."""
    shape = [1] * p.dim()
    shape[item_dim] = -1
    return mask.view(shape)


def descend(
    total: Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    z_T: Tensor,
    norms: Tensor,
    deltas: Deltas,
    config: GuidanceConfig,
    frozen: Tensor | None = None,
) -> None:
    """One update from the per-item losses `total` (B,): the summed loss backpropagated (items
    are independent: each gets its own single-run gradient), per-item gradient clipping and
    normalisation, the optimiser and schedule steps, and z_T re-projected onto its initial
    norms. Items marked in `frozen` (B,) bool keep their variables as they were."""
    optimizer.zero_grad(set_to_none=True)
    total.sum().backward()
    variables = ((z_T, 0), *((d, 1) for d in deltas.tensors()))
    for p, item_dim in variables:
        if p.grad is not None and config.grad_clip is not None:
            _clip_per_item(p.grad, item_dim, config.grad_clip)
        if p.grad is not None and config.normalize_gradients:
            _normalize_per_item(p.grad, item_dim)
    before = [(p, p.detach().clone(), d) for p, d in variables] if frozen is not None else []
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    with torch.no_grad():
        z_T.mul_(norms / z_T.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        for p, old, item_dim in before:  # the frozen items' variables back as they were
            assert frozen is not None  # `before` is empty otherwise
            p.copy_(torch.where(_item_view(frozen, p, item_dim), old, p))


def make_optimizer(
    config: GuidanceConfig, z_T: Tensor, deltas: Deltas
) -> tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimiser over what the config optimises (z_T, prompt deltas, null-text deltas),
    each group at its own learning rate, and its learning-rate schedule (or None); None, None
    when nothing is optimised. Marks those tensors as requiring gradients."""
    groups: list[dict[str, Any]] = []
    if config.optimize_latents:
        groups.append({"params": [z_T], "lr": config.lr * config.latent_lr_factor})
    if config.optimize_conditioning:
        params = [p for p in (deltas.cond, deltas.cond_pooled) if p is not None]
        groups.append({"params": params, "lr": config.lr * config.conditioning_lr_factor})
    if config.optimize_uncond:
        params = [p for p in (deltas.uncond, deltas.uncond_pooled) if p is not None]
        groups.append({"params": params, "lr": config.lr * config.uncond_lr_factor})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    if not groups or not config.iterations:
        return None, None
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=config.lr)
    elif config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
    scheduler = None
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.iterations, eta_min=config.lr / 10
        )
    return optimizer, scheduler


def optimize(
    model: DiffusionModel,
    objective: Objective,
    *,
    cond: TextEmbeddings,
    uncond: TextEmbeddings,
    seeds: list[int],
    config: GuidanceConfig,
    resolution: int | None = None,
    latents: Tensor | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    regularizers: Regularizers | None = None,
    setup: Callable[[DenoisingLoop, Tensor], None] | None = None,
) -> GuidanceResult:
    """Optimise z_T, ΔC and Δ∅ of B independent items so that `objective` is minimised.

    `cond`/`uncond` hold B items (uncond may be per step, (T, B, L, D)); `seeds` give each item
    its own z_T (unless `latents` are given) and its own augmentation streams, so a batched run
    equals B single runs up to float tolerance. The model runs with the config's channels-last,
    compile and decoder-recompute settings for the duration of the call. `regularizers` without
    a reference take each item's unoptimised sample (§3.12); `setup(loop, z_T)` runs before the
    optimisation (e.g. to set the chain's `blend`).
    """
    b = len(seeds)
    if cond.hidden.shape[0] != b:
        raise ValueError(f"got {cond.hidden.shape[0]} prompt embeddings for {b} seeds")
    resolution = resolution or model.resolution
    rngs = [ItemRNG.from_seed(s, model.device) for s in seeds]
    z_T = initial_latents(model, rngs, resolution) if latents is None else latents
    loss = ObjectiveLoss(model, objective, config, rngs, resolution, regularizers)
    loop = DenoisingLoop(model, config, resolution, uncond)
    if setup is not None:
        setup(loop, z_T.to(model.device))
    return run(model, loop, loss, z_T=z_T, cond=cond, config=config, progress=progress,
               should_stop=should_stop)  # fmt: skip


def run(
    model: DiffusionModel,
    loop: DenoisingLoop,
    loss: ObjectiveLoss,
    *,
    z_T: Tensor,
    cond: TextEmbeddings,
    config: GuidanceConfig,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    progress_info: Callable[[Tensor, dict[str, Tensor]], dict] | None = None,
) -> GuidanceResult:
    """The optimisation every kind runs (the engine): from z_T (B items), `iterations` times
    the chain with gradients → the weighted augmented loss of the last `loss_steps` x̂0 →
    `descend`; every iteration's final x̂0 also goes through the clean path, which selects the
    best iteration; iteration I only evaluates. `loop` is the chain (a subclass adds per-step
    work), `loss` what is minimised and its clean path. `progress_info(clean_loss, metrics)`
    is what `progress` hears of an iteration (default: the clean loss and every metric)."""
    with model.runtime(
        channels_last=config.channels_last,
        compile_unet=config.compile_unet,
        checkpoint_decoder_blocks=config.checkpoint_decoder_blocks,
    ):
        return _run(loop, loss, z_T, cond, config, progress, should_stop, progress_info)


def _run(loop, loss, z_T, cond, config, progress, should_stop, progress_info) -> GuidanceResult:
    # 1. z_T (its norms kept after every step), deltas, optimiser with per-group learning rates
    device = loop.device
    z_T = z_T.to(device).detach().clone().requires_grad_(config.optimize_latents)
    b = z_T.shape[0]
    norms = z_T.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    steps = config.ddim_steps
    deltas = Deltas.zeros(cond, steps if config.per_step_deltas else 1,
                          steps if config.uncond_per_step else 1)  # fmt: skip
    optimizer, scheduler = make_optimizer(config, z_T, deltas)
    weights = loss_step_weights(config.loss_steps, config.loss_steps_schedule).tolist()
    record = Recorder(b, device, config.iterations + 1, progress, progress_info)
    loop.should_stop = should_stop  # polled at every DDIM step
    # early stopping: items whose training loss fell below the threshold take no more steps
    early = config.early_stopping_loss
    frozen = None if early is None else torch.zeros(b, dtype=torch.bool, device=device)

    # 2. Iterations; the last only evaluates. A stop inside an iteration drops that iteration
    # (its update is not taken); before the first one was recorded there is nothing to return.
    for it in range(config.iterations + 1):
        try:
            _iteration(it, loop, loss, z_T, cond, deltas, config, optimizer, scheduler, norms,
                       weights, record, frozen)  # fmt: skip
        except Stopped:
            if not record.trajectory:
                raise
            record.stopped = True
            break
        if early is not None and record.train_losses and it < config.iterations:
            record.below = record.below | (record.train_losses[-1] < early)  # host copy
            if bool(record.below.all()):  # every item has stopped: the run ends here
                break
        if should_stop is not None and it < config.iterations and should_stop():
            record.stopped = True
            break
    return record.result(z_T)


def _iteration(it, loop, loss, z_T, cond, deltas, config, optimizer, scheduler, norms, weights,
               record, frozen=None) -> None:  # fmt: skip
    """Iteration `it`: the chain, the augmented loss and the update (all but the last
    iteration), the clean path of its final x̂0 recorded. `frozen` (B,) bool, with early
    stopping: the items that take no more steps (updated here from this iteration's loss)."""
    b, device = z_T.shape[0], loop.device
    train = it < config.iterations and optimizer is not None
    record.start()
    norm = z_T.detach().flatten(1).norm(dim=1)  # (B,) ‖z_T‖ before this iteration's step
    with torch.set_grad_enabled(train):
        x0s = loop(z_T, cond, deltas, keep_last=config.loss_steps if train else 1)
    record.chain_done()
    if it == 0:
        loss.begin(x0s[-1])  # the unoptimised sample: the regularisers' reference, if needed

    # the augmented loss on the last k x̂0, weighted, back-propagated
    images, train_loss = None, None
    if train and optimizer is not None:  # train implies an optimiser; this narrows its type
        total = torch.zeros(b, device=device)
        for w, x0 in zip(weights, x0s, strict=True):
            plans = loss.sample_plans()
            if config.checkpointing:
                item_loss, images = checkpoint(loss, x0, plans, use_reentrant=False)
            else:
                item_loss, images = loss(x0, plans)
            total = total + w * item_loss
        train_loss = total.detach().float()
        if frozen is not None:  # the threshold is checked before the step, as officially
            frozen |= train_loss < config.early_stopping_loss
        descend(total, optimizer, scheduler, z_T, norms, deltas, config, frozen)

    # the clean path on the final x̂0 (before this iteration's update)
    record.iteration(it, norm, loss.evaluate(x0s[-1].detach(), images), train_loss)


class Recorder:
    """The bookkeeping of a run, apart from the loop: trajectory frames, clean losses and
    metrics, training losses, ‖z_T‖, the best image of every item (kept on the device), timings.
    Each iteration copies its frame and its numbers to the host once (one synchronisation)."""

    def __init__(self, b, device, total, progress, progress_info) -> None:
        self.b, self.device, self.total = b, device, total
        self.progress, self.progress_info = progress, progress_info
        self.trajectory: list[Tensor] = []
        self.clean_losses: list[Tensor] = []
        self.train_losses: list[Tensor] = []
        self.latent_norms: list[Tensor] = []
        self.metrics: dict[str, list[Tensor]] = {}
        self.best_loss = torch.full((b,), torch.inf, device=device)
        self.best_images: Tensor | None = None
        self.best_iteration = torch.zeros(b, dtype=torch.long, device=device)
        self.stopped = False
        self.below = torch.zeros(b, dtype=torch.bool)  # host: items below the early-stop loss
        self.t_chain = self.t_loss = 0.0
        self._t0 = self._t1 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def chain_done(self) -> None:
        self._t1 = time.perf_counter()

    def iteration(self, it: int, norm: Tensor, ev: Evaluation, train_loss: Tensor | None) -> None:
        b = self.b
        with torch.no_grad():
            improved = ev.loss < self.best_loss
            if self.best_images is None:
                self.best_images = ev.images.clone()
            self.best_images = torch.where(improved.view(-1, 1, 1, 1), ev.images, self.best_images)
            self.best_loss = torch.where(improved, ev.loss, self.best_loss)
            self.best_iteration = torch.where(improved, it, self.best_iteration)
            frame = (ev.images * 255).round().to(torch.uint8)  # (B, 3, H, W)
        # to the host: the image without waiting, then the numbers (the one synchronisation,
        # which also completes the image's copy: both are queued on the same stream)
        if self.device.type == "cuda":
            frame = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=True).copy_(
                frame, non_blocking=True
            )
        rows = [norm, ev.loss, *ev.metrics.values()]
        rows += [] if train_loss is None else [train_loss]
        stats = torch.stack([r.reshape(b) for r in rows]).cpu()  # (2 + metrics [+ 1], B)
        self.trajectory.append(frame)
        self.latent_norms.append(stats[0])
        self.clean_losses.append(stats[1])
        for j, name in enumerate(ev.metrics):
            self.metrics.setdefault(name, []).append(stats[2 + j])
        if train_loss is not None:
            self.train_losses.append(stats[-1])
        t2 = time.perf_counter()
        self.t_chain += self._t1 - self._t0
        self.t_loss += t2 - self._t1
        if self.progress is not None:
            metrics = {k: v[-1] for k, v in self.metrics.items()}
            if self.progress_info is None:
                info = {"clean_loss": stats[1].tolist()}
                info.update({k: v.tolist() for k, v in metrics.items()})
            else:
                info = self.progress_info(stats[1], metrics)
            self.progress(it + 1, self.total, info)

    def result(self, z_T: Tensor) -> GuidanceResult:
        assert self.best_images is not None
        return GuidanceResult(
            images=self.best_images.cpu(),
            best_iteration=self.best_iteration.tolist(),
            trajectory=torch.stack(self.trajectory),
            clean_loss=torch.stack(self.clean_losses),
            metrics={k: torch.stack(v) for k, v in self.metrics.items()},
            train_loss=torch.stack(self.train_losses)
            if self.train_losses
            else torch.zeros(0, self.b),
            latent_norms=torch.stack(self.latent_norms),
            final_latents=z_T.detach().cpu(),
            iterations_done=len(self.train_losses),
            stopped=self.stopped,
            # on a GPU the steps run asynchronously: the split between the two is approximate
            # (the chain's work finishes during the loss part), their sum is exact
            timings={"chain_s": self.t_chain, "loss_backward_s": self.t_loss},
        )


@torch.no_grad()
def sample(
    model: DiffusionModel,
    *,
    cond: TextEmbeddings,
    uncond: TextEmbeddings,
    latents: Tensor,
    config: GuidanceConfig,
    resolution: int | None = None,
) -> Tensor:
    """Plain DDIM sampling with classifier-free guidance (no deltas): images (B, 3, H, W)."""
    with model.runtime(channels_last=config.channels_last, compile_unet=config.compile_unet):
        loop = DenoisingLoop(model, config, resolution or model.resolution, uncond)
        x0 = loop(latents.to(model.device), cond, None, keep_last=1)[-1]
        with autocast(model.device, config.precision):
            return model.decode(x0)
