"""The DiG-IN optimisation: classifier guidance through the whole DDIM chain (DESIGN §3.1).

Augustin, Neuhaus, Hein, "DiG-IN: Diffusion Guidance for Investigating Networks", CVPR 2024.

Notation (paper → code):
    z_T     latents_T           (B, c, h, w)  initial latent, optimised, L2 norm kept per item
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
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from core.augment import ItemRNG, apply_cutouts, clean_view, sample_cutouts
from core.config import GuidanceConfig
from core.diffusion import DiffusionModel, TextEmbeddings
from core.objectives import Objective, ObjectiveOutput

ProgressFn = Callable[[int, int, dict], None]
StopFn = Callable[[], bool]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def loss_step_weights(loss_steps: int) -> Tensor:
    """Linear weights of the last k x0-predictions: (1, 2, …, k) / Σ, e.g. 1/6, 2/6, 3/6."""
    w = torch.arange(1, loss_steps + 1, dtype=torch.float32)
    return w / w.sum()


def autocast(device: torch.device, precision: str):
    """Autocast context of UNet and VAE calls (a no-op in fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def initial_latents(model: DiffusionModel, rngs: list[ItemRNG], resolution: int) -> Tensor:
    """z_T ~ N(0, I) per item from its own generator, drawn on the CPU: (B, c, h, w)."""
    shape = model.latent_shape(resolution)
    z = torch.stack([torch.randn(shape, generator=rng.cpu) for rng in rngs])
    return z.to(model.device) * model.make_scheduler(1).init_noise_sigma


@dataclass
class Deltas:
    """Optimised per-step embedding deltas ΔC and Δ∅ (pooled parts for SDXL)."""

    cond: Tensor  # (T', B, L, D), T' = T or 1
    uncond: Tensor  # (T', B, L, D)
    cond_pooled: Tensor | None  # (T', B, P)
    uncond_pooled: Tensor | None

    @staticmethod
    def zeros(cond: TextEmbeddings, steps: int) -> Deltas:
        def z(x: Tensor | None) -> Tensor | None:
            return None if x is None else torch.zeros((steps, *x.shape), device=x.device)

        return Deltas(z(cond.hidden), z(cond.hidden), z(cond.pooled), z(cond.pooled))

    def tensors(self) -> list[Tensor]:
        parts = (self.cond, self.uncond, self.cond_pooled, self.uncond_pooled)
        return [p for p in parts if p is not None]

    def at(self, i: int) -> tuple[TextEmbeddings, TextEmbeddings]:
        i = min(i, self.cond.shape[0] - 1)

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[i]

        return (
            TextEmbeddings(self.cond[i], pick(self.cond_pooled)),
            TextEmbeddings(self.uncond[i], pick(self.uncond_pooled)),
        )


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


class DenoisingLoop:
    """The DDIM chain of one iteration, with gradients (and checkpointing) when asked."""

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

    def step(
        self, z: Tensor, i: int, text: TextEmbeddings, time_ids: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """DDIM step i with classifier-free guidance: z_t → (z_{t-1}, x̂0)."""
        t = self.scheduler.timesteps[i]  # host copy, for the scheduler's tables
        with autocast(self.device, self.config.precision):
            eps = self.model.eps(torch.cat([z, z]), self.timesteps_device[i], text, time_ids)
        eps_uncond, eps_cond = eps.float().chunk(2)
        eps = eps_uncond + self.config.guidance_scale * (eps_cond - eps_uncond)
        out = self.scheduler.step(eps, t, z, eta=0.0)
        return out.prev_sample, out.pred_original_sample

    def __call__(
        self, z: Tensor, cond: TextEmbeddings, deltas: Deltas | None, keep_last: int
    ) -> list[Tensor]:
        """Run the chain from z_T; return the x0-predictions of the last `keep_last` steps."""
        time_ids = self.time_ids(z.shape[0])
        steps = len(self.scheduler.timesteps)
        grad = torch.is_grad_enabled() and self.config.checkpointing
        x0s = []
        # Nothing in this loop reads a device value on the host (no .item(), .cpu(), bool of a
        # device tensor): the steps queue up on the device without waiting for each other.
        for i in range(steps):
            c, u = cond, self.uncond_at(i)
            if deltas is not None:
                dc, du = deltas.at(i)
                c, u = c + dc, u + du
            text = TextEmbeddings.cat([u, c])  # (2B, L, D): unconditional half first
            if grad:
                z, x0 = checkpoint(self.step, z, i, text, time_ids, use_reentrant=False)
            else:
                z, x0 = self.step(z, i, text, time_ids)
            if i >= steps - keep_last:
                x0s.append(x0)
        return x0s


def _clean_views(objective: Objective, images: Tensor) -> list[Tensor]:
    return [clean_view(images, clf.input_size) for clf in objective.classifiers]


class _DecodeAndLoss(torch.nn.Module):
    """x̂0 latent → image → classifier views → per-item loss; checkpointed as one unit."""

    def __init__(self, model, objective, config, rngs) -> None:
        super().__init__()
        self.model, self.objective, self.config = model, objective, config
        self.plans: list = []
        self.rngs = rngs

    def sample_plans(self, image_side: int) -> list:
        cfg = self.config
        if cfg.num_cutouts == 0:
            return [None for _ in self.objective.classifiers]
        return [
            sample_cutouts(
                self.rngs,
                image_side=image_side,
                size=clf.input_size,
                num=cfg.num_cutouts,
                cut_power=cfg.cut_power,
                noise_sd=cfg.noise_sd,
            )
            for clf in self.objective.classifiers
        ]

    def forward(self, x0: Tensor, plans: list) -> tuple[Tensor, Tensor]:
        with autocast(x0.device, self.config.precision):
            images = self.model.decode(x0)  # (B, 3, H, W) in [0, 1], float32
        views = [
            clean_view(images, clf.input_size) if plan is None else apply_cutouts(images, plan)
            for clf, plan in zip(self.objective.classifiers, plans, strict=True)
        ]
        return self.objective(views).loss, images  # (B,), (B, 3, H, W)


def _clip_per_item(param: Tensor, item_dim: int, max_norm: float) -> None:
    """Per-variable inf-norm gradient clipping, separately for every item."""
    g = param.grad
    dims = [d for d in range(g.dim()) if d != item_dim]
    norm = g.abs().amax(dim=dims, keepdim=True)
    g.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))


def descend(
    total: Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    z_T: Tensor,
    norms: Tensor,
    deltas: Deltas,
    config: GuidanceConfig,
) -> None:
    """One update from the per-item losses `total` (B,): the summed loss backpropagated (items
    are independent: each gets its own single-run gradient), per-item gradient clipping, the
    optimiser and schedule steps, and z_T re-projected onto its initial norms."""
    optimizer.zero_grad(set_to_none=True)
    total.sum().backward()
    if config.grad_clip is not None:
        for p, item_dim in ((z_T, 0), *((d, 1) for d in deltas.tensors())):
            if p.grad is not None:
                _clip_per_item(p, item_dim, config.grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    with torch.no_grad():
        z_T.mul_(norms / z_T.flatten(1).norm(dim=1).view(-1, 1, 1, 1))


def make_optimizer(
    config: GuidanceConfig, z_T: Tensor, deltas: Deltas
) -> tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimiser over what the config optimises (z_T, prompt deltas, null-text deltas),
    each group at its own learning rate, and its learning-rate schedule (or None); None, None
    when nothing is optimised. Marks those tensors as requiring gradients."""
    groups = []
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
) -> GuidanceResult:
    """Optimise z_T, ΔC and Δ∅ of B independent items so that `objective` is minimised.

    `cond`/`uncond` hold B items (uncond may be per step, (T, B, L, D)); `seeds` give each item
    its own z_T (unless `latents` are given) and its own augmentation streams, so a batched run
    equals B single runs up to float tolerance. The model runs with the config's channels-last
    and compile settings for the duration of the call.
    """
    with model.runtime(
        channels_last=config.channels_last,
        compile_unet=config.compile_unet,
        checkpoint_decoder_blocks=config.checkpoint_decoder_blocks,
    ):
        return _optimize(
            model, objective, cond=cond, uncond=uncond, seeds=seeds, config=config,
            resolution=resolution, latents=latents, progress=progress, should_stop=should_stop,
        )  # fmt: skip


def _optimize(
    model: DiffusionModel,
    objective: Objective,
    *,
    cond: TextEmbeddings,
    uncond: TextEmbeddings,
    seeds: list[int],
    config: GuidanceConfig,
    resolution: int | None,
    latents: Tensor | None,
    progress: ProgressFn | None,
    should_stop: StopFn | None,
) -> GuidanceResult:
    # 1. Check inputs
    b = len(seeds)
    if cond.hidden.shape[0] != b:
        raise ValueError(f"got {cond.hidden.shape[0]} prompt embeddings for {b} seeds")
    resolution = resolution or model.resolution
    device = model.device
    rngs = [ItemRNG.from_seed(s, device) for s in seeds]

    # 2. Initial latents z_T and their norms (kept after every step)
    z_init = initial_latents(model, rngs, resolution) if latents is None else latents.to(device)
    z_T = z_init.detach().clone().requires_grad_(config.optimize_latents)
    norms = z_T.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    # 3. Deltas and optimiser with per-group learning rates
    steps = config.ddim_steps if config.per_step_deltas else 1
    deltas = Deltas.zeros(cond, steps)
    optimizer, scheduler = make_optimizer(config, z_T, deltas)

    loop = DenoisingLoop(model, config, resolution, uncond)
    decode_loss = _DecodeAndLoss(model, objective, config, rngs)
    weights = loss_step_weights(config.loss_steps).tolist()

    # 4. Optimisation loop; iteration I only evaluates. The per-item bests stay on the device;
    # each iteration copies its image and its numbers to the host once (one synchronisation).
    pinned = device.type == "cuda"
    trajectory, clean_losses, train_losses, latent_norms = [], [], [], []
    metrics: dict[str, list[Tensor]] = {}
    best_loss = torch.full((b,), torch.inf, device=device)
    best_images: Tensor | None = None
    best_iteration = torch.zeros(b, dtype=torch.long, device=device)
    stopped = False
    t_chain = t_loss = 0.0
    for it in range(config.iterations + 1):
        train = it < config.iterations and optimizer is not None
        t0 = time.perf_counter()
        norm = z_T.detach().flatten(1).norm(dim=1)  # (B,) ‖z_T‖ before this iteration's step
        with torch.set_grad_enabled(train):
            x0s = loop(z_T, cond, deltas, keep_last=config.loss_steps if train else 1)
        t1 = time.perf_counter()

        # 4a. augmented loss on the last k x̂0, weighted, back-propagated
        final, train_loss = None, None
        if train:
            total = torch.zeros(b, device=device)
            for w, x0 in zip(weights, x0s, strict=True):
                plans = decode_loss.sample_plans(resolution)
                if config.checkpointing:
                    loss, final = checkpoint(decode_loss, x0, plans, use_reentrant=False)
                else:
                    loss, final = decode_loss(x0, plans)
                total = total + w * loss
            train_loss = total.detach().float()
            descend(total, optimizer, scheduler, z_T, norms, deltas, config)

        # 4b. clean path on the final x̂0 (before this step's update): trajectory, selection
        with torch.no_grad():
            if final is None:
                with autocast(device, config.precision):
                    final = model.decode(x0s[-1])  # (B, 3, H, W) in [0, 1]
            final = final.detach().float()
            clean: ObjectiveOutput = objective(_clean_views(objective, final))
            clean_loss = clean.loss.detach().float()  # (B,)
            improved = clean_loss < best_loss
            if best_images is None:
                best_images = final.clone()
            best_images = torch.where(improved.view(-1, 1, 1, 1), final, best_images)
            best_loss = torch.where(improved, clean_loss, best_loss)
            best_iteration = torch.where(improved, it, best_iteration)
            frame = (final * 255).round().to(torch.uint8)  # (B, 3, H, W)

        # 4c. to the host: the image without waiting, then the numbers (the one synchronisation,
        # which also completes the image's copy: both are queued on the same stream)
        if pinned:
            frame = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=True).copy_(
                frame, non_blocking=True
            )
        rows = [norm, clean_loss, *(v.detach().float() for v in clean.metrics.values())]
        stats = torch.stack([r.reshape(b) for r in [*rows, *([train_loss] if train else [])]])
        stats = stats.cpu()  # (2 + metrics [+ 1], B)
        trajectory.append(frame)
        latent_norms.append(stats[0])
        clean_losses.append(stats[1])
        for j, name in enumerate(clean.metrics):
            metrics.setdefault(name, []).append(stats[2 + j])
        if train:
            train_losses.append(stats[-1])
        t2 = time.perf_counter()
        t_chain += t1 - t0
        t_loss += t2 - t1

        if progress is not None:
            info = {"clean_loss": stats[1].tolist()}
            info.update({k: v[-1].tolist() for k, v in metrics.items()})
            progress(it + 1, config.iterations + 1, info)
        if should_stop is not None and it < config.iterations and should_stop():
            stopped = True
            break

    return GuidanceResult(
        images=best_images.cpu(),
        best_iteration=best_iteration.tolist(),
        trajectory=torch.stack(trajectory),
        clean_loss=torch.stack(clean_losses),
        metrics={k: torch.stack(v) for k, v in metrics.items()},
        train_loss=torch.stack(train_losses) if train_losses else torch.zeros(0, b),
        latent_norms=torch.stack(latent_norms),
        final_latents=z_T.detach().cpu(),
        iterations_done=len(train_losses),
        stopped=stopped,
        # on a GPU the steps run asynchronously: the split between the two is approximate (the
        # chain's work finishes during the loss part), their sum is exact
        timings={"chain_s": t_chain, "loss_backward_s": t_loss},
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
