"""Hyperparameters of counterfactuals of real images, beside `GuidanceConfig`.

See docs/architecture.md §5.

Torch-free (the API validates params against it). Defaults follow the paper's official code:
`NullInversion` (10 inner Adam steps, lr 1e-2·(1 − i/100), early stop at MSE < 1e-5 + i·2e-5),
`UVCEP2P` (injection fractions 0.3/0.4/0.5, searched), `UVCEBlend` (background blend during the
first 30 % of steps) and the README's regularisers (latent/pixel background L2, 25/250).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field

Weight = Annotated[float, Field(ge=0.0, le=1e6)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


@dataclass(frozen=True)
class CounterfactualConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")  # unknown keys are errors

    # --- inversion (step 3) -------------------------------------------------------------------
    null_text_steps: Annotated[int, Field(ge=0, le=100)] = 10  # Adam steps on ∅_i per DDIM step
    null_text_lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-2  # step i: lr · (1 − i/100)
    null_text_early_stop: Annotated[float, Field(ge=0.0, le=1.0)] = 1e-5  # MSE < this + i·2e-5
    # --- prompt-to-prompt (step 4) -----------------------------------------------------------
    # fractions of the steps (the first ones) that get the reconstruction's cross-attention
    # maps; each item takes the one with the lowest clean loss (no gradients); () = none
    p2p_fractions: Annotated[tuple[Fraction, ...], Field(max_length=8)] = (0.3, 0.4, 0.5)
    # --- mask and background blending (step 5) -----------------------------------------------
    mask_steps: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5  # maps of the first half of steps
    mask_cutoff: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.3  # m ← sqrt(clamp((m − c)/(1 − c)))
    blend_fraction: Fraction = 0.3  # z ← b·z_rec + (1 − b)·z, b = background, first 30 % of steps
    # --- regularisers (step 6): weights of distances of x̂0 to the original, means per item ---
    latent_background_l2: Weight = 25.0  # mean((1 − m) · (ẑ0 − z0)²), latent mask m
    pixel_background_l2: Weight = 250.0  # mean((1 − m) · (x̂0 − x0)²), pixel mask m
    latent_l1: Weight = 0.0  # mean |ẑ0 − z0|
    latent_l2: Weight = 0.0  # mean (ẑ0 − z0)²
    pixel_l1: Weight = 0.0  # mean |x̂0 − x0|
    pixel_l2: Weight = 0.0  # mean (x̂0 − x0)²
    lpips: Weight = 0.0  # LPIPS-Alex(x̂0, x0); needs the lpips package and the AlexNet weights

    def __post_init__(self) -> None:
        if len(set(self.p2p_fractions)) != len(self.p2p_fractions):
            raise ValueError(f"p2p_fractions must be distinct, got {list(self.p2p_fractions)}")
