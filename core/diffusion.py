"""Text-to-image diffusion models behind one small interface.

A `DiffusionModel` is the frozen UNet, the autoencoder (or none, for pixel-space models), the text
encoder(s) with their tokenizers, and a DDIM scheduler built from the pipeline's own scheduler
config (DiG-IN always samples with DDIM, eta = 0). `digin.core.loaders.load_diffusion` builds one
from a spec (Stable Diffusion 1.x/2.x and SDXL from a hub id or a local folder, safetensors only;
the digits zoo).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    # the defining modules: `from diffusers import …` gives type checkers diffusers' placeholder
    # classes (diffusers.utils.dummy_pt_objects), which have none of the models' attributes
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel


@dataclass
class TextEmbeddings:
    """Conditioning of the UNet for a batch of prompts."""

    hidden: Tensor  # (B, L, D) cross-attention states (C or ∅)
    pooled: Tensor | None = None  # (B, P) SDXL pooled text embeddings, else None

    def __add__(self, delta: TextEmbeddings) -> TextEmbeddings:
        pooled = self.pooled
        if pooled is not None:
            if delta.pooled is None:
                raise ValueError("pooled (SDXL) embeddings plus a delta without a pooled part")
            pooled = pooled + delta.pooled
        return TextEmbeddings(self.hidden + delta.hidden, pooled)

    @staticmethod
    def cat(items: list[TextEmbeddings]) -> TextEmbeddings:
        pooled = None
        if items[0].pooled is not None:
            parts = [e.pooled for e in items if e.pooled is not None]
            if len(parts) != len(items):
                raise ValueError("cannot join embeddings with and without pooled (SDXL) parts")
            pooled = torch.cat(parts)
        return TextEmbeddings(torch.cat([e.hidden for e in items]), pooled)

    def zeros_like(self) -> TextEmbeddings:
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return TextEmbeddings(torch.zeros_like(self.hidden), pooled)


class DiffusionModel(torch.nn.Module):
    """A frozen latent (or pixel-space) text-to-image diffusion model."""

    _compiled_unet: Callable[..., Any] | None  # set with object.__setattr__: not a submodule

    def __init__(
        self,
        *,
        spec: str,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL | None,
        text_encoders: list[torch.nn.Module],
        tokenizers: list,
        scheduler_config: dict,
        resolution: int,
        is_sdxl: bool = False,
        force_zeros_for_empty_prompt: bool = False,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.unet = unet
        self.vae = vae
        self.text_encoders = torch.nn.ModuleList(text_encoders)
        self.tokenizers = tokenizers
        self.scheduler_config = dict(scheduler_config)
        self.resolution = resolution
        self.is_sdxl = is_sdxl
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.requires_grad_(False)
        self.eval()
        # runtime settings of the current job (see `runtime`); the compiled UNet is kept in a
        # plain attribute, not as a submodule, so that it never shows up in `state_dict`
        self._channels_last = False
        self._use_compiled = False
        self._decoder_checkpointing = False
        object.__setattr__(self, "_compiled_unet", None)

    # --- runtime settings ------------------------------------------------------------------------
    @contextlib.contextmanager
    def runtime(
        self,
        *,
        channels_last: bool = False,
        compile_unet: bool = False,
        checkpoint_decoder_blocks: bool = False,
    ) -> Iterator[None]:
        """Run the calls inside the block with UNet and VAE in channels-last memory format, the
        UNet compiled by `torch.compile` (compiled once per process, on first use; every new
        input shape or grad mode compiles again), and/or the VAE decoder recomputed block by
        block when gradients flow through it. The previous settings come back afterwards: the
        model is shared by the jobs of a worker process."""
        before = (self._channels_last, self._use_compiled, self._decoder_checkpointing)
        try:
            self._set_channels_last(channels_last)
            self._use_compiled = compile_unet
            self._set_decoder_checkpointing(checkpoint_decoder_blocks)
            yield
        finally:
            self._set_channels_last(before[0])
            self._use_compiled = before[1]
            self._set_decoder_checkpointing(before[2])

    def _set_decoder_checkpointing(self, on: bool) -> None:
        if on == self._decoder_checkpointing:
            return
        vae = self.vae
        if vae is None or not getattr(vae, "_supports_gradient_checkpointing", False):
            return  # nothing to recompute block by block (pixel space, or a custom autoencoder)
        if on:
            vae.enable_gradient_checkpointing()  # diffusers: non-reentrant, per decoder block
        else:
            vae.disable_gradient_checkpointing()
        self._decoder_checkpointing = on

    def _set_channels_last(self, on: bool) -> None:
        if on == self._channels_last:
            return
        fmt = torch.channels_last if on else torch.contiguous_format
        nets: tuple[torch.nn.Module | None, ...] = (self.unet, self.vae)
        for net in nets:  # (as nn.Module: diffusers' wrapped `to` is mistyped as a method)
            if net is not None:
                net.to(memory_format=fmt)
        self._channels_last = on

    def _unet_fn(self) -> Callable[..., Any]:
        if not self._use_compiled:
            return self.unet
        compiled = self._compiled_unet
        if compiled is None:
            compiled = torch.compile(self.unet)
            object.__setattr__(self, "_compiled_unet", compiled)
        return compiled

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet's (and VAE's) weights are stored in."""
        return next(self.unet.parameters()).dtype

    def native(self):
        """Weights stored in a reduced precision (`weights` bf16/fp16) run in it, inside or
        outside an autocast region: no per-call weight casts, norms and softmax in that dtype
        (they accumulate in fp32 internally). fp32 weights follow the caller's autocast."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def _format(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    # --- geometry ------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config["in_channels"]

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        side = resolution or self.resolution
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config["block_out_channels"]) - 1)
        if side % multiple:
            raise ValueError(f"resolution must be divisible by {multiple}, got {side}")
        return (self.latent_channels, side // self.vae_scale_factor, side // self.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def make_scheduler(self, steps: int):
        """A fresh DDIM scheduler (eta = 0) with `steps` inference steps."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        return scheduler

    # --- text ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextEmbeddings:
        """Prompt embeddings C: last hidden states (SD 1.x/2.x), or for SDXL the penultimate
        hidden states of both encoders concatenated plus the second encoder's pooled output."""
        device = self.device
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)  # (B, L)
            out = encoder(ids, output_hidden_states=self.is_sdxl)
            if self.is_sdxl:
                hidden_states.append(out.hidden_states[-2])
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds  # (B, P) from the projection encoder
            else:
                hidden_states.append(out.last_hidden_state)
        hidden = torch.cat(hidden_states, dim=-1).float()  # fp32 whatever the weights' dtype
        return TextEmbeddings(hidden, None if pooled is None else pooled.float())

    def null_text(self, batch: int, negative_prompt: str = "") -> TextEmbeddings:
        """The unconditional embedding ∅ for `batch` items (zeros where SDXL asks for them)."""
        emb = self.encode_text([negative_prompt] * batch)
        if self.is_sdxl and self.force_zeros_for_empty_prompt and not negative_prompt:
            emb = emb.zeros_like()
        return emb

    def time_ids(self, batch: int, resolution: int | None = None) -> Tensor | None:
        """SDXL micro-conditioning: (original size, crop top-left, target size) per item."""
        if not self.is_sdxl:
            return None
        side = resolution or self.resolution
        ids = torch.tensor([side, side, 0, 0, side, side], dtype=torch.float32)
        return ids.repeat(batch, 1).to(self.device)  # (B, 6)

    # --- networks --------------------------------------------------------------------------------
    def eps(self, z: Tensor, t: Tensor, text: TextEmbeddings, time_ids: Tensor | None) -> Tensor:
        """One UNet call: noise prediction ε(z, t, text). A timestep on another device than z is
        copied without waiting for the device (no host-device synchronisation per step)."""
        dtype = self.dtype
        added = None
        if self.is_sdxl:
            if text.pooled is None or time_ids is None:
                raise ValueError("an SDXL UNet call needs pooled text embeddings and time ids")
            added = {"text_embeds": text.pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        if t.device != z.device:
            t = t.to(z.device, non_blocking=True)
        unet = self._unet_fn()
        z = self._format(z.to(dtype))
        with self.native():
            return unet(
                z, t, encoder_hidden_states=text.hidden.to(dtype), added_cond_kwargs=added
            ).sample

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, c, h, w) → images (B, 3, H, W) in [0, 1]. Pixel-space models (no
        autoencoder) with one channel are grey images, repeated to RGB."""
        if self.vae is None:
            x = z.expand(-1, 3, -1, -1) if z.shape[1] == 1 else z
        else:
            z = self._format((z / self.vae.config["scaling_factor"]).to(self.dtype))
            with self.native():
                x = self.vae.decode(z).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] → latents: the autoencoder's posterior mean, scaled."""
        x = x * 2 - 1
        if self.vae is None:
            return x.mean(1, keepdim=True) if self.latent_channels == 1 else x
        with self.native():
            mean = self.vae.encode(x.to(self.dtype)).latent_dist.mean
        return mean.float() * self.vae.config["scaling_factor"]
