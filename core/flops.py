"""Floating-point operations of one guidance iteration, counted on the model itself.

Speed on a GPU is judged against the device's matrix rate: achieved FLOP/s = FLOPs of an
iteration / seconds per iteration. The FLOPs come from `torch.utils.flop_counter` run over the
model's own modules (so they follow the architecture config: channels, attention heads, token
counts, resolution), one UNet call and one decode-and-loss call at a time:

- UNet: one DDIM step, a classifier-free-guidance call on the doubled batch, as the training
  chain runs it (u): forward, recompute in backward when checkpointed, and backward with respect
  to its inputs (latents and text embeddings; the weights are frozen, so no weight gradients),
- decode + loss: the VAE decode of one x̂0, the cutouts and the classifier, likewise (d; with
  the decoder's block-by-block recompute when the config asks for it), and
- the clean-path classifier call that selects the best iteration (c).

One training iteration of T DDIM steps with `loss_steps` = k costs T · u + k · d + c. The
forward-only costs of the UNet call and of the decode are kept as well: with checkpointing, u is
about the forward twice plus a backward that costs about as much as the forward.
Matrix products, convolutions and attention are counted; element-wise work is not (it moves bytes,
it is no matrix work). Everything is linear in the batch: the counts are per item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from digin.core.augment import ItemRNG
from digin.core.config import GuidanceConfig
from digin.core.diffusion import DiffusionModel, TextEmbeddings
from digin.core.guidance import DenoisingLoop, ObjectiveLoss
from digin.core.objectives import Objective


@dataclass(frozen=True)
class IterationFlops:
    """FLOPs of one item's guidance iteration and of its parts."""

    unet_forward: int  # one CFG call (2 UNet evaluations: unconditional and conditional)
    unet_train: int  # the same call as a training step runs it: forward, recompute, backward
    decode_forward: int  # VAE decode + cutouts + classifier of one x̂0
    decode_train: int  # as a training step runs it (with the decoder's block recompute if set)
    clean_forward: int  # the clean-path objective on the final image
    ddim_steps: int
    loss_steps: int

    @property
    def per_iteration(self) -> int:
        """One training iteration of one item."""
        chain = self.ddim_steps * self.unet_train
        return chain + self.loss_steps * self.decode_train + self.clean_forward

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
    `objective` scores one item) by running each part once as the loop runs it: forward alone,
    and forward and backward under the config's checkpointing and precision."""
    resolution = resolution or model.resolution
    device = model.device
    if cond.hidden.shape[0] != 1:
        raise ValueError(f"count with one item, got {cond.hidden.shape[0]}")
    loop = DenoisingLoop(model, config, resolution, uncond)
    text = TextEmbeddings.cat([loop.uncond_at(0), cond])
    time_ids = loop.time_ids(1)
    z = torch.randn((1, *model.latent_shape(resolution)), device=device)
    text_grad = config.optimize_conditioning or config.optimize_uncond

    def unet(train: bool) -> None:
        zz = z.detach().requires_grad_(train)
        hidden = text.hidden.detach().requires_grad_(train and text_grad)
        pooled = None if text.pooled is None else text.pooled.detach()
        if pooled is not None:
            pooled.requires_grad_(train and text_grad)
        emb = TextEmbeddings(hidden, pooled)
        with torch.set_grad_enabled(train):
            if train and config.checkpointing:
                out, x0 = checkpoint(loop.step, zz, 0, emb, time_ids, use_reentrant=False)
            else:
                out, x0 = loop.step(zz, 0, emb, time_ids)
        if train:
            (out.sum() + x0.sum()).backward()

    decode_loss = ObjectiveLoss(
        model, objective, config, [ItemRNG.from_seed(0, device)], resolution
    )
    plans = decode_loss.sample_plans()

    def decode(train: bool) -> None:
        x0 = z.detach().requires_grad_(train)
        with torch.set_grad_enabled(train):
            if train and config.checkpointing:
                loss, _ = checkpoint(decode_loss, x0, plans, use_reentrant=False)
            else:
                loss, _ = decode_loss(x0, plans)
        if train:
            loss.sum().backward()

    images = decode_loss.evaluate(z, None).images

    def clean() -> None:
        decode_loss.evaluate(z, images)

    with model.runtime(
        channels_last=config.channels_last,
        checkpoint_decoder_blocks=config.checkpoint_decoder_blocks,
    ):
        return IterationFlops(
            unet_forward=_count(lambda: unet(False)),
            unet_train=_count(lambda: unet(True)),
            decode_forward=_count(lambda: decode(False)),
            decode_train=_count(lambda: decode(True)),
            clean_forward=_count(clean),
            ddim_steps=config.ddim_steps,
            loss_steps=config.loss_steps,
        )
