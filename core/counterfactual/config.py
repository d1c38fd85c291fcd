"""Hyperparameters of counterfactuals of real images, beside `GuidanceConfig`.

See docs/architecture.md §5.

Torch-free (the API validates params against it). Defaults follow the paper's official code:
`NullInversion` (10 inner Adam steps, lr 1e-2·(1 − i/100), early stop at MSE < 1e-5 + i·2e-5),
`UVCEP2P` (injection fractions 0.3/0.4/0.5), `UVCEBlend` (no background blend, or during the
first 30 % of steps; searched jointly with the fractions) and the README's regularisers
(latent/pixel background L2, 25/250).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

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
    # further blend fractions searched jointly with p2p_fractions (each pair: one chain per
    # item, the lowest clean loss with the regularisers wins); 0.0: no blending (official
    # `UVCEBlend`: none or the first 30 %); () = blend_fraction only
    blend_search: Annotated[tuple[Fraction, ...], Field(max_length=4)] = (0.0,)
    # SAM refinement, with a segmenter (`segmenter` param; official: SAM-HQ, 'point', 5, 0.35)
    sam_prompt: Literal["points", "box"] = "points"  # prompt SAM with points or one box
    sam_points: Annotated[int, Field(ge=1, le=64)] = 5  # points drawn where m > sam_threshold
    sam_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.35  # pixels of m that prompt SAM
    sam_box_quantile: Annotated[float, Field(ge=0.5, le=1.0)] = 0.97  # box: (1 − q, q) quantiles
    # post-processing of the pixel mask, always (official 'erosion_3', 'dilation_20',
    # 'blur_45_30'): kernel sizes in pixels of a 512 px image, scaled to the resolution; 0 = off
    mask_erosion: Annotated[int, Field(ge=0, le=512)] = 3  # flat square kernel, min filter
    mask_dilation: Annotated[int, Field(ge=0, le=512)] = 20  # flat square kernel, max filter
    mask_blur: Annotated[int, Field(ge=0, le=511)] = 45  # Gaussian kernel side (odd or 0)
    mask_blur_sigma: Annotated[float, Field(gt=0.0, le=512.0)] = 30.0  # its sd, pixels at 512
    # --- caption (step 2), with a captioner (`captioner` param) when no caption is given -----
    caption_max_tokens: Annotated[int, Field(ge=1, le=60)] = 20  # tokens after the prompt
    caption_beams: Annotated[int, Field(ge=1, le=8)] = 3  # beam search width
    # --- regularisers (step 6): weights of distances of x̂0 to the original, means per item ---
    latent_background_l2: Weight = 25.0  # mean((1 − m) · (ẑ0 − z0)²), latent mask m
    pixel_background_l2: Weight = 250.0  # mean((1 − m) · (x̂0 − x0)²), pixel mask m
    latent_l1: Weight = 0.0  # mean |ẑ0 − z0|
    latent_l2: Weight = 0.0  # mean (ẑ0 − z0)²
    pixel_l1: Weight = 0.0  # mean |x̂0 − x0|
    pixel_l2: Weight = 0.0  # mean (x̂0 − x0)²
    lpips: Weight = 0.0  # LPIPS-Alex(x̂0, x0); needs the lpips package and the AlexNet weights

    def __post_init__(self) -> None:
        if self.mask_blur % 2 == 0 and self.mask_blur != 0:
            raise ValueError(f"mask_blur must be odd (a kernel side) or 0, got {self.mask_blur}")
        if len(set(self.p2p_fractions)) != len(self.p2p_fractions):
            raise ValueError(f"p2p_fractions must be distinct, got {list(self.p2p_fractions)}")
        if len(set(self.blend_search)) != len(self.blend_search):
            raise ValueError(f"blend_search must be distinct, got {list(self.blend_search)}")
