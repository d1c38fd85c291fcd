"""DDIM inversion and null-text inversion of a real image (docs/architecture.md §5.4).

Mokady et al., "Null-text Inversion for Editing Real Images", CVPR 2023, as used by DiG-IN's
official code (`NullInversion`):

1. DDIM inversion (eta = 0) with the caption C alone (no guidance): z0 → z_1 → … → z_T, each
   step using the model's noise estimate at the current latent and the next timestep.
2. Null-text optimisation, step i = 0 … T−1 in sampling order: starting from the previous step's
   ∅, up to `null_text_steps` Adam steps (lr `null_text_lr · (1 − i/100)`) on ∅_i so that the
   guided DDIM step (scale w) from the current latent lands on the inversion's latent of that
   level; early stop when the latent MSE is below `null_text_early_stop + i · 2e-5`. The guided
   step with the final ∅_i gives the next current latent.

The result (z_T, ∅_1..T) reconstructs the image under guidance w: `sample(cond=C, uncond=∅_t,
latents=z_T)`. The model's prediction type (epsilon, v, sample) is read from its scheduler.
Inversions are cached per process by image hash, model, resolution, T, w, caption and settings.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from digin.core.config import GuidanceConfig
from digin.core.context import StopFn, check_stop
from digin.core.counterfactual.config import CounterfactualConfig
from digin.core.diffusion import DiffusionModel, TextEmbeddings
from digin.core.guidance import DenoisingLoop, autocast, guided_eps

EARLY_STOP_SLOPE = 2e-5  # the early-stop threshold grows by this per DDIM step (official code)


@dataclass
class Inversion:
    z0: Tensor  # (1, c, h, w) latent of the image: the autoencoder's posterior mean, scaled
    z_T: Tensor  # (1, c, h, w) the DDIM-inverted noise
    null_texts: TextEmbeddings  # ∅_1..T: hidden (T, 1, L, D), pooled (T, 1, P) or None
    reconstruction: Tensor  # (1, 3, H, W) in [0, 1]: sample(C, ∅_t, z_T)
    # MSE to the original of the reconstruction's x̂0 (latent: the inversion's own error) and of
    # its decoded image (pixel: plus the autoencoder's), for null-text and plain DDIM inversion
    errors: dict[str, float]
    inner_steps: list[int]  # Adam steps taken on ∅_i at each DDIM step (early stop)
    seconds: float
    key: tuple = field(default=())

    def describe(self) -> dict:
        return {**self.errors, "inner_steps": self.inner_steps, "seconds": self.seconds}


def _alphas(scheduler, t: Tensor) -> tuple[Tensor, Tensor]:
    """(ᾱ_t, ᾱ_prev) of the DDIM step at timestep t, as `DDIMScheduler.step` computes them."""
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev = int(t) - stride
    a_t = scheduler.alphas_cumprod[int(t)]
    a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return a_t, a_prev


def _eps(output: Tensor, z: Tensor, alpha: Tensor, prediction_type: str) -> Tensor:
    """The noise estimate ε from the model output at latent z and noise level ᾱ."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha.sqrt() * output + (1 - alpha).sqrt() * z
    if prediction_type == "sample":
        return (z - alpha.sqrt() * output) / (1 - alpha).sqrt()
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


@torch.no_grad()
def ddim_inversion(
    model: DiffusionModel, z0: Tensor, cond: TextEmbeddings, steps: int, precision: str = "fp32"
) -> list[Tensor]:
    """[z_0, z_1, …, z_T]: deterministic DDIM inversion with the caption only (no guidance)."""
    scheduler = model.make_scheduler(steps)
    kind = scheduler.config.prediction_type
    time_ids = model.time_ids(1, z0.shape[-1] * model.vae_scale_factor)
    latents, z = [z0], z0
    for t in reversed(scheduler.timesteps):  # increasing noise
        a_t, a_prev = _alphas(scheduler, t)
        with autocast(model.device, precision):
            out = model.eps(z, t, cond, time_ids).float()
        eps = _eps(out, z, a_t, kind)
        x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        z = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        latents.append(z)
    return latents


def null_text_inversion(
    model: DiffusionModel,
    latents: list[Tensor],
    cond: TextEmbeddings,
    uncond: TextEmbeddings,
    *,
    guidance_scale: float,
    config: CounterfactualConfig,
    precision: str = "fp32",
    should_stop: StopFn | None = None,
) -> tuple[TextEmbeddings, list[int]]:
    """Per-step ∅_i (hidden (T, 1, L, D), pooled (T, 1, P)) and the Adam steps taken at each."""
    steps = len(latents) - 1
    scheduler = model.make_scheduler(steps)
    time_ids = model.time_ids(1, latents[0].shape[-1] * model.vae_scale_factor)
    hidden, pooled = uncond.hidden.detach().clone(), uncond.pooled
    pooled = None if pooled is None else pooled.detach().clone()
    per_step_hidden, per_step_pooled, inner = [], [], []
    z = latents[-1]
    for i, t in enumerate(scheduler.timesteps):
        check_stop(should_stop)
        target = latents[steps - i - 1]  # the inversion's latent one level less noisy
        with torch.no_grad(), autocast(model.device, precision):
            out_cond = model.eps(z, t, cond, time_ids).float()
        variables = [v.requires_grad_(True) for v in (hidden, pooled) if v is not None]
        optimizer = torch.optim.Adam(variables, lr=config.null_text_lr * (1.0 - i / 100.0))
        threshold = config.null_text_early_stop + i * EARLY_STOP_SLOPE
        done = 0
        for _ in range(config.null_text_steps):
            check_stop(should_stop)  # each inner step is a UNet call forward and backward
            with autocast(model.device, precision):
                out_uncond = model.eps(z, t, TextEmbeddings(hidden, pooled), time_ids).float()
            out = guided_eps(out_uncond, out_cond, guidance_scale)
            loss = F.mse_loss(scheduler.step(out, t, z, eta=0.0).prev_sample, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if loss.item() < threshold:
                break
        hidden = hidden.detach()
        pooled = None if pooled is None else pooled.detach()
        per_step_hidden.append(hidden.clone())
        if pooled is not None:
            per_step_pooled.append(pooled.clone())
        inner.append(done)
        with torch.no_grad(), autocast(model.device, precision):
            out_uncond = model.eps(z, t, TextEmbeddings(hidden, pooled), time_ids).float()
            out = guided_eps(out_uncond, out_cond, guidance_scale)
            z = scheduler.step(out, t, z, eta=0.0).prev_sample
    stacked = TextEmbeddings(
        torch.stack(per_step_hidden), torch.stack(per_step_pooled) if per_step_pooled else None
    )
    return stacked, inner


def per_step(uncond: TextEmbeddings, steps: int) -> TextEmbeddings:
    """The same ∅ at every step: hidden (T, B, L, D), pooled (T, B, P)."""
    pooled = None if uncond.pooled is None else uncond.pooled.expand(steps, *uncond.pooled.shape)
    return TextEmbeddings(uncond.hidden.expand(steps, *uncond.hidden.shape), pooled)


def invert(
    model: DiffusionModel,
    pixels: Tensor,
    cond: TextEmbeddings,
    uncond: TextEmbeddings,
    *,
    guidance: GuidanceConfig,
    config: CounterfactualConfig,
    should_stop: StopFn | None = None,
) -> Inversion:
    """Invert one image (1, 3, S, S) in [0, 1] under its caption's embedding `cond` (batch 1).

    Also measures the reconstruction error of the result and, for comparison, of plain DDIM
    inversion (z_T with the unoptimised ∅ at every step): latent MSE of x̂0 against z0, pixel MSE
    of the decoded image against the original."""
    t0 = time.perf_counter()
    steps, w = guidance.ddim_steps, guidance.guidance_scale
    pixels = pixels.to(model.device)
    resolution = pixels.shape[-1]
    with torch.no_grad(), autocast(model.device, guidance.precision):
        z0 = model.encode(pixels).float()  # (1, c, h, w)
    latents = ddim_inversion(model, z0, cond, steps, guidance.precision)
    null_texts, inner = null_text_inversion(
        model,
        latents,
        cond,
        uncond,
        guidance_scale=w,
        config=config,
        precision=guidance.precision,
        should_stop=should_stop,
    )
    z_T = latents[-1]
    errors, recon = {}, None
    for name, nulls in (("ddim", per_step(uncond, steps)), ("null_text", null_texts)):
        loop = DenoisingLoop(model, guidance, resolution, nulls)
        with torch.no_grad():
            x0 = loop(z_T, cond, None, keep_last=1)[-1].float()  # x̂0 of the last step
            with autocast(model.device, guidance.precision):
                recon = model.decode(x0).float()
        errors[f"{name}_latent_mse"] = float(F.mse_loss(x0, z0))  # the inversion alone
        errors[f"{name}_pixel_mse"] = float(F.mse_loss(recon, pixels))  # + the autoencoder's
    assert recon is not None  # the loop above ran
    return Inversion(
        z0=z0,
        z_T=z_T,
        null_texts=null_texts,
        reconstruction=recon.detach(),
        errors=errors,
        inner_steps=inner,
        seconds=time.perf_counter() - t0,
    )


class InversionCache:
    """Inversions of this process, least recently used first out. One job with several targets
    inverts its image once; a later job on the same image, model, T, w and caption hits."""

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Inversion] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_invert(self, key: tuple, compute: Callable[[], Inversion]) -> tuple[Inversion, bool]:
        """(inversion, whether it came from the cache)."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key], True
        self.misses += 1
        inversion = compute()
        inversion.key = key
        self._entries[key] = inversion
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return inversion, False


def cache_key(
    *,
    image_sha256: str,
    model: DiffusionModel,
    caption: str,
    negative_prompt: str,
    guidance: GuidanceConfig,
    config: CounterfactualConfig,
) -> tuple:
    """What an inversion depends on: image (hash of the preprocessed pixels, so also the
    resolution), model, T, w, caption, ∅'s prompt, null-text settings and precision."""
    return (
        image_sha256,
        model.spec,
        str(model.device),
        guidance.ddim_steps,
        guidance.guidance_scale,
        guidance.precision,
        caption,
        negative_prompt,
        config.null_text_steps,
        config.null_text_lr,
        config.null_text_early_stop,
    )
