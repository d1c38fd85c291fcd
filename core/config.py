"""Algorithm hyperparameters of the DiG-IN guidance loop (docs/architecture.md §3, presets §7.1).

Torch-free on purpose: the API validates job parameters against these dataclasses without
importing torch. Each field is annotated with its bounds, so pydantic (which validates stdlib
dataclasses directly) rejects out-of-range values with an error naming the field and the limit.
Defaults follow the paper's official code (``OptimParams`` / ``CommonArguments``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

Precision = Literal["fp32", "bf16", "fp16"]
Preset = Literal["reference", "optimised"]
Weight = Annotated[float, Field(ge=0.0, le=1e6)]


@dataclass(frozen=True)
class GuidanceConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")  # unknown keys are errors, not ignored

    # --- sampler -----------------------------------------------------------------------------
    ddim_steps: Annotated[int, Field(ge=1, le=100)] = 20  # T, DDIM steps (eta = 0)
    # the sampler of the chain: ddim (eta = 0), or dpm: DPM-Solver++(2M), deterministic, second
    # order but at the first and last step, on the same T timesteps (docs/architecture.md §3.3)
    solver: Literal["ddim", "dpm"] = "ddim"
    guidance_scale: Annotated[float, Field(ge=1.0, le=30.0)] = 3.0  # w, classifier-free guidance
    # --- what is optimised ---------------------------------------------------------------------
    optimize_latents: bool = True  # z_T, re-projected onto its initial L2 norm after every step
    optimize_conditioning: bool = True  # ΔC, per-step deltas of the prompt embedding
    optimize_uncond: bool = True  # Δ∅, per-step deltas of the null-text embedding
    per_step_deltas: bool = True  # False: one ΔC shared by all T steps (and one Δ∅, see below)
    # Δ∅ per step (True) or one shared by all steps (False); None: as `per_step_deltas`
    per_step_uncond_deltas: bool | None = None
    # --- optimiser -----------------------------------------------------------------------------
    iterations: Annotated[int, Field(ge=0, le=500)] = 20  # optimiser steps; trajectory has +1
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # sgd uses momentum 0.9
    lr: Annotated[float, Field(ge=0.0, le=10.0)] = 0.01  # base learning rate
    latent_lr_factor: Annotated[float, Field(ge=0.0, le=100.0)] = 0.1  # z_T lr = lr * this
    conditioning_lr_factor: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0  # ΔC lr factor
    uncond_lr_factor: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0  # Δ∅ lr factor
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine anneals to lr / 10
    grad_clip: Annotated[float, Field(gt=0.0)] | None = None  # per-variable inf-norm clip, per item
    normalize_gradients: bool = False  # per variable and item, g ← g / ‖g‖₂ (after the clip)
    # an item whose training loss (augmented, regularisers included) falls below this takes no
    # more steps; the run ends when every item has stopped. None: never
    early_stopping_loss: float | None = None
    # --- loss ----------------------------------------------------------------------------------
    loss_steps: Annotated[int, Field(ge=1, le=100)] = 3  # last k x0-predictions
    loss_steps_schedule: Literal["linear", "uniform"] = "linear"  # weights (1..k)/Σ, or 1/k each
    num_cutouts: Annotated[int, Field(ge=0, le=64)] = 16  # 0: the clean path (resize only)
    cut_power: Annotated[float, Field(gt=0.0, le=4.0)] = 0.3  # side = rand()**p * (S - r) + r
    noise_sd: Annotated[float, Field(ge=0.0, le=1.0)] = 0.005  # Gaussian noise on the cutouts
    # --- numerics and speed (the presets below set these) --------------------------------------
    precision: Precision = "fp32"  # autocast dtype of UNet and VAE; classifier losses stay fp32
    # storage dtype of the diffusion model's weights; None: the same as `precision`. bf16/fp16 run
    # UNet and VAE natively in it (no per-call weight casts, norms in that dtype); fp32 weights
    # with a bf16/fp16 precision run under autocast instead
    weights: Precision | None = None
    checkpointing: bool = True  # recompute each UNet call, VAE decode and classifier in backward
    # also recompute the VAE decoder block by block in backward: the decode's activations are
    # not all alive at once (less memory per item), one more decoder forward per loss step
    checkpoint_decoder_blocks: bool = False
    channels_last: bool = False  # UNet + VAE in channels-last memory format (CPU: slower, measured)
    compile_unet: bool = False  # torch.compile the UNet; the first calls compile (minutes)
    max_batch: Annotated[int, Field(ge=1, le=64)] | None = None  # items per run; None: runner's
    preset: Preset | None = None  # the preset these fields started from (record only; see PRESETS)

    def __post_init__(self) -> None:
        if self.weights not in (None, "fp32", self.precision):
            raise ValueError(
                f"weights ({self.weights}) must be fp32 or equal precision ({self.precision})"
            )
        if self.loss_steps > self.ddim_steps:
            raise ValueError(
                f"loss_steps ({self.loss_steps}) must be at most ddim_steps ({self.ddim_steps})"
            )

    @property
    def uncond_per_step(self) -> bool:
        """Whether Δ∅ has one delta per DDIM step."""
        return (
            self.per_step_deltas
            if self.per_step_uncond_deltas is None
            else self.per_step_uncond_deltas
        )

    @property
    def weights_precision(self) -> Precision:
        """The dtype the diffusion model's weights are stored in for this job."""
        return self.weights or self.precision

    @classmethod
    def from_preset(cls, name: Preset, **fields: Any) -> GuidanceConfig:
        """The named preset's settings, with `fields` on top."""
        return cls(**apply_preset({"preset": name, **fields}))


@dataclass(frozen=True)
class RegularizerWeights:
    """Weights of distances of each loss step's x̂0 to the item's unoptimised sample (the final
    x̂0 of iteration 0 and its image), added to the loss of the text-to-image kinds
    (docs/architecture.md §3.12); all 0 by default (no regulariser)."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    latent_l1: Weight = 0.0  # mean |ẑ0 − ẑ0_ref| over the latent
    latent_l2: Weight = 0.0  # mean (ẑ0 − ẑ0_ref)²
    pixel_l1: Weight = 0.0  # mean |x̂0 − x_ref| over pixels and channels, images in [0, 1]
    pixel_l2: Weight = 0.0  # mean (x̂0 − x_ref)²
    lpips: Weight = 0.0  # LPIPS-Alex(x̂0, x_ref); needs the lpips package and AlexNet's weights

    def active(self) -> dict[str, float]:
        """name → weight of the regularisers in use (weight > 0)."""
        return {k: v for k, v in asdict(self).items() if v > 0}


# Named settings of the numerics and speed fields. `reference` is what the paper's code does:
# fp32, one item per run, 16 cutouts, every UNet call and the VAE + classifier checkpointed.
# `optimised` is the GPU path: UNet and VAE stored and run in bf16 (classifier losses stay fp32;
# z_T and the embedding deltas are optimised in fp32), the VAE decoder recomputed block by block
# in backward (less memory per item, so more items per run), as many items per run as the
# runner's batch limit allows (`digin.core.batching` fits it to a memory budget), same algorithm.
# Channels-last and torch.compile stay off: on an H200 channels-last was slower at B = 1
# (BENCHMARKS.md) and compiling costs minutes; bench/gpu.py measures both.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {
        "precision": "fp32",
        "checkpointing": True,
        "checkpoint_decoder_blocks": False,
        "channels_last": False,
        "compile_unet": False,
        "max_batch": 1,
        "num_cutouts": 16,
    },
    "optimised": {
        "precision": "bf16",
        "checkpointing": True,
        "checkpoint_decoder_blocks": True,
        "channels_last": False,
        "compile_unet": False,
        "max_batch": None,
    },
}


def apply_preset(guidance: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Raw guidance params → the fields to validate: `base` (e.g. the digits zoo's settings),
    then the values of the preset that `guidance` names (if any), then the fields it gives. An
    unknown preset name is left for validation to reject."""
    name = guidance.get("preset")
    preset = PRESETS.get(name, {}) if isinstance(name, str) else {}
    return {**(base or {}), **preset, **guidance}
