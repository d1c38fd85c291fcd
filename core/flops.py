"""Floating-point operations of one guidance iteration, counted on the model itself.

Speed on a GPU is judged against the device's matrix rate: achieved FLOP/s = FLOPs of an
iteration / seconds per iteration. The FLOPs come from `torch.utils.flop_counter` run over the
model's own modules (so they follow the architecture config: channels, attention heads, token
counts, resolution), one UNet call and one decode-and-loss call at a time:

- UNet: one classifier-free-guidance call on the doubled batch, forward (f_u) and backward (b_u)
  with respect to its inputs (latents and text embeddings; the weights are frozen, so no weight
  gradients), and
- decode + loss: the VAE decode of one x̂0, the cutouts and the classifier, forward (f_d) and
  backward (b_d), plus the clean-path classifier call that selects the best iteration (f_c).

One training iteration of T DDIM steps with `loss_steps` = k costs

    T · (f_u · r + b_u) + k · (f_d · r + b_d) + f_c,     r = 2 with checkpointing, else 1

(checkpointing runs every forward twice: once in the chain, once when backward recomputes it).
Matrix products, convolutions and attention are counted; element-wise work is not (it moves bytes,
it is no matrix work). Everything is linear in the batch: the counts are per item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.augment import ItemRNG
from core.config import GuidanceConfig
from core.diffusion import DiffusionModel, TextEmbeddings
from core.guidance import DenoisingLoop, _clean_views, _DecodeAndLoss, autocast
from core.objectives import Objective


@dataclass(frozen=True)
class IterationFlops:
    """FLOPs of one item's guidance iteration and of its parts."""

    unet_forward: int  # one CFG call (2 UNet evaluations: unconditional and conditional)
    unet_backward: int  # its backward to the inputs
    decode_forward: int  # VAE decode + cutouts + classifier of one x̂0
    decode_backward: int
    clean_forward: int  # the clean-path objective on the final image
    ddim_steps: int
    loss_steps: int
    checkpointing: bool

    @property
    def per_iteration(self) -> int:
        """One training iteration of one item."""
        r = 2 if self.checkpointing else 1
        chain = self.ddim_steps * (r * self.unet_forward + self.unet_backward)
        loss = self.loss_steps * (r * self.decode_forward + self.decode_backward)
        return chain + loss + self.clean_forward

    def as_dict(self) -> dict:
        return {**asdict(self), "per_iteration": self.per_iteration}


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def iteration_flops(
    model: DiffusionModel,
    objective: Objective,
    config: GuidanceConfig,
    cond: TextEmbeddings,
    uncond: TextEmbeddings,
    resolution: int | None = None,
) -> IterationFlops:
    """Count the FLOPs of one training iteration of one item (`cond`/`uncond` hold one item,
    `objective` scores one item) by running each part once, forward alone and forward with
    backward, under the config's precision."""
    resolution = resolution or model.resolution
    device = model.device
    if cond.hidden.shape[0] != 1:
        raise ValueError(f"count with one item, got {cond.hidden.shape[0]}")
    loop = DenoisingLoop(model, config, resolution, uncond)
    text = TextEmbeddings.cat([loop.uncond_at(0), cond])
    time_ids = loop.time_ids(1)
    z = torch.randn((1, *model.latent_shape(resolution)), device=device)

    def unet(backward: bool) -> None:
        zz = z.detach().requires_grad_(backward)
        text_grad = backward and (config.optimize_conditioning or config.optimize_uncond)
        hidden = text.hidden.detach().requires_grad_(text_grad)
        pooled = None if text.pooled is None else text.pooled.detach().requires_grad_(text_grad)
        with torch.set_grad_enabled(backward), autocast(device, config.precision):
            eps = model.eps(torch.cat([zz, zz]), loop.timesteps_device[0],
                            TextEmbeddings(hidden, pooled), time_ids)  # fmt: skip
        if backward:
            eps.float().sum().backward()

    decode_loss = _DecodeAndLoss(model, objective, config, [ItemRNG.from_seed(0, device)])
    plans = decode_loss.sample_plans(resolution)

    def decode(backward: bool) -> None:
        x0 = z.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            loss, _ = decode_loss(x0, plans)
        if backward:
            loss.sum().backward()

    with torch.no_grad(), autocast(device, config.precision):
        images = model.decode(z)

    def clean() -> None:
        with torch.no_grad():
            objective(_clean_views(objective, images))

    f_u, f_d = _count(lambda: unet(False)), _count(lambda: decode(False))
    return IterationFlops(
        unet_forward=f_u,
        unet_backward=_count(lambda: unet(True)) - f_u,
        decode_forward=f_d,
        decode_backward=_count(lambda: decode(True)) - f_d,
        clean_forward=_count(clean),
        ddim_steps=config.ddim_steps,
        loss_steps=config.loss_steps,
        checkpointing=config.checkpointing,
    )
