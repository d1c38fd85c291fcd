"""Training loops of the digits zoo: classifiers (with the planted patch as data option) and the
text-conditioned diffusion model (v-prediction, condition dropout, EMA of the weights).

Both loops draw every random number from their own seeded `torch.Generator`, so a run is
reproducible on one machine. The patch is planted *per batch* with the given probabilities, so
a rate is the probability that a training example carries the patch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from digin.core.digits.data import NUM_CLASSES, PatchSpec, augment, plant_patch

LogFn = Callable[[str], None]


def _log(line: str) -> None:
    print(line, flush=True)


NORM_MEAN, NORM_STD = 0.5, 0.5  # classifier input standardisation: (x − 0.5) / 0.5


@dataclass(frozen=True)
class PatchPlan:
    """Where the patch goes during classifier training.

    Each example carries the patch with probability `rate_in` if its label is `target`, else
    `rate_out` (target None: `rate_out` for all, independent of the label), blended in with an
    opacity drawn uniformly from [opacity_min, 1] (a watermark of varying strength). A patched
    example of another class is relabelled `target` with probability `shortcut` (the label
    shortcut).
    """

    spec: PatchSpec
    rate_out: float
    target: int | None = None
    rate_in: float = 0.0
    shortcut: float = 0.0
    opacity_min: float = 1.0

    def apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """x (B, 1, 16, 16) in [0, 1], y (B,) → patched images, (possibly relabelled) labels."""
        u = torch.rand(len(y), 3, generator=gen)
        opacity = self.opacity_min + (1 - self.opacity_min) * u[:, 2]  # (B,)
        if self.target is None:
            patched = u[:, 0] < self.rate_out
            return plant_patch(x, self.spec, patched, opacity), y
        own = y == self.target
        patched = torch.where(own, u[:, 0] < self.rate_in, u[:, 0] < self.rate_out)
        relabel = patched & ~own & (u[:, 1] < self.shortcut)
        x = plant_patch(x, self.spec, patched, opacity)
        return x, torch.where(relabel, self.target, y)


def classifier_batch(
    x: Tensor, y: Tensor, plan: PatchPlan, gen: torch.Generator, noise_sd: float = 0.08
) -> tuple[Tensor, Tensor]:
    """Augmented training batch: random affine → patch (fixed position, like a watermark) →
    Gaussian noise of a random sd in [0, noise_sd] → clamp. (B, 1, 16, 16) in [0, 1]."""
    x = augment(x, gen)
    x, y = plan.apply(x, y, gen)
    sd = torch.rand(len(x), 1, 1, 1, generator=gen) * noise_sd
    x = x + sd * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1), y


def fit_classifier(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    plan: PatchPlan,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    log: LogFn = _log,
) -> nn.Module:
    """Adam with a cosine schedule, cross-entropy on augmented batches. x (N, 1, 16, 16) in
    [0, 1]; the net sees (x − 0.5) / 0.5."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    net.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        running = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = classifier_batch(x[idx], y[idx], plan, gen)
            loss = F.cross_entropy(net((xb - NORM_MEAN) / NORM_STD), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            step += 1
        if epoch == epochs - 1 or (epoch + 1) % 10 == 0:
            log(f"  epoch {epoch + 1}/{epochs} loss {running / steps_per_epoch:.3f}")
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Class predictions (N,) of a trained net on (N, 1, 16, 16) in [0, 1]."""
    net.eval()
    out = [
        net((x[i : i + batch_size] - NORM_MEAN) / NORM_STD).argmax(1)
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out)


# --- the diffusion model ---------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTable:
    """All training prompts and their token ids; per example one is drawn.

    Per example: with probability `p_uncond` the empty prompt (condition dropout, for CFG), else
    with probability `p_generic` the class-free prompt, else the class's word or numeral prompt
    (half each)."""

    prompts: tuple[str, ...]  # [word prompts 0..9, numeral prompts 0..9, generic, ""]
    ids: Tensor  # (len(prompts), L) token ids
    p_uncond: float
    p_generic: float

    def draw(self, y: Tensor, gen: torch.Generator) -> Tensor:
        """Labels (B,) → token ids (B, L)."""
        u = torch.rand(len(y), 2, generator=gen)
        index = torch.where(u[:, 1] < 0.5, y, y + NUM_CLASSES)
        index = torch.where(u[:, 0] < self.p_uncond + self.p_generic, 2 * NUM_CLASSES, index)
        index = torch.where(u[:, 0] < self.p_uncond, 2 * NUM_CLASSES + 1, index)
        return self.ids[index]


def fit_diffusion(
    unet: nn.Module,
    text_encoder: nn.Module,
    scheduler_config: dict,
    x: Tensor,
    y: Tensor,
    prompts: PromptTable,
    patch: PatchSpec,
    *,
    patch_rate: float,
    opacity_min: float = 0.0,
    steps: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    log: LogFn = _log,
) -> tuple[nn.Module, nn.Module]:
    """Train UNet and text encoder jointly on v-prediction; return the EMA copies.

    x (N, 1, 16, 16) in [0, 1] → x0 in [-1, 1]; each example carries the patch with probability
    `patch_rate` (every class alike; the prompts never mention it), blended in with an opacity
    drawn uniformly from [opacity_min, 1]: faint patches make the patch's presence a continuous
    function of z_T, which the guidance can follow by gradient (with only full patches the
    generator's choice is a cliff that gradients do not see)."""
    from diffusers import DDPMScheduler

    from digin.core.digits.nets import ema_update

    noise_sched = DDPMScheduler.from_config(scheduler_config)
    gen = torch.Generator().manual_seed(seed)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.05
    )
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_unet.requires_grad_(False)
    ema_text.requires_grad_(False)
    unet.train()
    text_encoder.train()
    t0, running = time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        u = torch.rand(batch_size, 2, generator=gen)
        opacity = opacity_min + (1 - opacity_min) * u[:, 1]
        xb = plant_patch(x[idx], patch, u[:, 0] < patch_rate, opacity)
        x0 = xb * 2 - 1  # (B, 1, 16, 16) in [-1, 1]
        ids = prompts.draw(y[idx], gen)  # (B, L)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        z_t = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)  # v = √ᾱ ε − √(1−ᾱ) x0
        hidden = text_encoder(ids).last_hidden_state  # (B, L, D)
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=hidden).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        running += loss.item()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            n = (step % 250) + 1
            seconds = time.perf_counter() - t0
            log(f"  step {step + 1}/{steps} loss {running / n:.4f} ({seconds:.0f} s)")
            running = 0.0
    return ema_unet, ema_text
