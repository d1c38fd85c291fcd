"""Algorithm hyperparameters of the DiG-IN guidance loop (DESIGN §3.1).

Torch-free on purpose: the API validates job parameters against these dataclasses without
importing torch. Each field is annotated with its bounds, so pydantic (which validates stdlib
dataclasses directly) rejects out-of-range values with an error naming the field and the limit.
Defaults follow the paper's official code (``OptimParams`` / ``CommonArguments``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class GuidanceConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")  # unknown keys are errors, not ignored

    # --- sampler -----------------------------------------------------------------------------
    ddim_steps: Annotated[int, Field(ge=1, le=100)] = 20  # T, DDIM steps (eta = 0)
    guidance_scale: Annotated[float, Field(ge=1.0, le=30.0)] = 3.0  # w, classifier-free guidance
    # --- what is optimised ---------------------------------------------------------------------
    optimize_latents: bool = True  # z_T, re-projected onto its initial L2 norm after every step
    optimize_conditioning: bool = True  # ΔC, per-step deltas of the prompt embedding
    optimize_uncond: bool = True  # Δ∅, per-step deltas of the null-text embedding
    per_step_deltas: bool = True  # False: one delta shared by all T steps
    # --- optimiser -----------------------------------------------------------------------------
    iterations: Annotated[int, Field(ge=0, le=500)] = 20  # optimiser steps; trajectory has +1
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # sgd uses momentum 0.9
    lr: Annotated[float, Field(ge=0.0, le=10.0)] = 0.01  # base learning rate
    latent_lr_factor: Annotated[float, Field(ge=0.0, le=100.0)] = 0.1  # z_T lr = lr * this
    conditioning_lr_factor: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0  # ΔC lr factor
    uncond_lr_factor: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0  # Δ∅ lr factor
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine anneals to lr / 10
    grad_clip: Annotated[float, Field(gt=0.0)] | None = None  # per-variable inf-norm clip, per item
    # --- loss ----------------------------------------------------------------------------------
    loss_steps: Annotated[int, Field(ge=1, le=100)] = 3  # last k x0-predictions, weights (1..k)/Σ
    num_cutouts: Annotated[int, Field(ge=0, le=64)] = 16  # 0: the clean path (resize only)
    cut_power: Annotated[float, Field(gt=0.0, le=4.0)] = 0.3  # side = rand()**p * (S - r) + r
    noise_sd: Annotated[float, Field(ge=0.0, le=1.0)] = 0.005  # Gaussian noise on the cutouts
    # --- numerics ------------------------------------------------------------------------------
    precision: Precision = "fp32"  # autocast dtype of UNet and VAE; classifier losses stay fp32
    checkpointing: bool = True  # recompute each UNet call, VAE decode and classifier in backward

    def __post_init__(self) -> None:
        if self.loss_steps > self.ddim_steps:
            raise ValueError(
                f"loss_steps ({self.loss_steps}) must be at most ddim_steps ({self.ddim_steps})"
            )
