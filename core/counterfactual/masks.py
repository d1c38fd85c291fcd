"""The foreground mask of a counterfactual: refinement with SAM and post-processing
(docs/architecture.md §5.6).

After the paper's code (`foreground_segmentation.py`), from the squashed cross-attention mask m
of the start-class words at the pixel side:

1. SAM (optional, a `sam:` segmenter): prompted with points sampled from the pixels where
   m > `sam_threshold` (weighted by m and, after the first, by the distance to the points
   already taken) or with the box of their `sam_box_quantile` quantiles; SAM's binary mask of
   the image replaces m. The official code uses SAM-HQ ViT-H with 5 points.
2. Post-processing (always): erosion, dilation (flat square kernels) and a Gaussian blur of
   the pixel mask; sizes are given in pixels of a 512 px image (the official code's
   `erosion_3`, `dilation_20`, `blur_45_30`) and scaled to the job's resolution.
3. The latent mask is the pixel mask resized to the latent side (bilinear, antialiased).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from digin.core.counterfactual.attention import foreground_masks
from digin.core.counterfactual.config import CounterfactualConfig

REFERENCE_SIDE = 512  # the image side the post-processing sizes are given at


@dataclass(eq=False)
class Segmenter:
    """A Segment Anything model: `SamModel` or `SamHQModel` and its processor."""

    spec: str
    model: nn.Module
    processor: Any
    hq: bool  # SAM-HQ: the mask of its high-quality output token alone, as the official code

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def segment(
        self, image: Tensor, *, points: Tensor | None = None, box: Tensor | None = None
    ) -> Tensor:
        """SAM's single mask of `image` (1, 3, H, W) in [0, 1] → (1, 1, H, W) in {0, 1}, prompted
        with foreground `points` (P, 2) as (x, y) pixels and/or a `box` (4,) as x0, y0, x1, y1."""
        if points is None and box is None:
            raise ValueError("SAM needs points or a box")
        pixels = (image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        prompt: dict[str, Any] = {}
        if points is not None:
            prompt["input_points"] = [[points.tolist()]]  # (image, prompt, points, 2)
            prompt["input_labels"] = [[[1] * len(points)]]  # all foreground
        if box is not None:
            prompt["input_boxes"] = [[box.tolist()]]  # (image, boxes, 4)
        inputs = self.processor(images=pixels, return_tensors="pt", **prompt).to(self.device)
        extra = {"hq_token_only": True} if self.hq else {}
        out = self.model(**inputs, multimask_output=False, **extra)
        masks = self.processor.post_process_masks(
            out.pred_masks.cpu(),
            inputs["original_sizes"].cpu(),
            inputs["reshaped_input_sizes"].cpu(),
            binarize=True,
        )[0]  # (prompts, masks, H, W) bool
        return masks[:1, :1].float()


# --- prompts from the cross-attention mask ---------------------------------------------------


def sam_points(mask: Tensor, n: int, threshold: float, generator: torch.Generator) -> Tensor | None:
    """`n` distinct (x, y) pixels of `mask` (1, 1, H, W) where it exceeds `threshold`: the first
    drawn with probability ∝ m, each next one ∝ m/Σm + d/Σd, d its distance to the nearest point
    taken (spread over the object). None when no pixel exceeds the threshold."""
    m = mask[0, 0].detach().float().cpu()
    ys, xs = torch.nonzero(m > threshold, as_tuple=True)
    if len(ys) == 0:
        return None
    coords = torch.stack([xs, ys], dim=1).float()  # (N, 2)
    weights = m[ys, xs] / m[ys, xs].sum()
    chosen: list[int] = []
    for _ in range(min(n, len(coords))):
        prob = weights.clone()
        if chosen:
            dist = torch.cdist(coords, coords[chosen]).min(dim=1).values + 1e-5
            prob = 0.5 * weights + 0.5 * dist / dist.sum()
        prob[chosen] = 0.0  # distinct points
        chosen.append(int(torch.multinomial(prob, 1, generator=generator)))
    return coords[chosen]


def sam_box(mask: Tensor, threshold: float, quantile: float) -> Tensor | None:
    """The box (x0, y0, x1, y1) between the (1 − q) and q quantiles of the x and y coordinates
    of the pixels of `mask` (1, 1, H, W) above `threshold`; None when there are none."""
    ys, xs = torch.nonzero(mask[0, 0].detach().cpu() > threshold, as_tuple=True)
    if len(ys) == 0:
        return None
    q = torch.tensor([1.0 - quantile, quantile])
    x0, x1 = torch.quantile(xs.float(), q).tolist()
    y0, y1 = torch.quantile(ys.float(), q).tolist()
    return torch.tensor([x0, y0, x1, y1])


def refine_with_sam(
    segmenter: Segmenter,
    image: Tensor,
    mask: Tensor,
    cf: CounterfactualConfig,
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, Any]]:
    """(the pixel mask after SAM, what was done). The cross-attention mask stays when no pixel
    exceeds `sam_threshold` or SAM's mask is empty (recorded under 'kept_attention')."""
    info: dict[str, Any] = {"spec": segmenter.spec, "prompt": cf.sam_prompt}
    if cf.sam_prompt == "points":
        points = sam_points(mask, cf.sam_points, cf.sam_threshold, generator)
        prompt = None if points is None else {"points": points}
    else:
        box = sam_box(mask, cf.sam_threshold, cf.sam_box_quantile)
        prompt = None if box is None else {"box": box}
    if prompt is None:
        return mask, {**info, "kept_attention": f"no pixel above {cf.sam_threshold}"}
    info.update({k: v.round(decimals=1).tolist() for k, v in prompt.items()})
    refined = segmenter.segment(image, **prompt).to(mask.device, mask.dtype)
    if not refined.any():
        return mask, {**info, "kept_attention": "SAM's mask is empty"}
    return refined, {**info, "kept_attention": None}


# --- post-processing ---------------------------------------------------------------------------


def scaled_size(size: float, side: int) -> float:
    """A size given at REFERENCE_SIDE, at an image side of `side` pixels."""
    return size * side / REFERENCE_SIDE


def dilate(mask: Tensor, k: int) -> Tensor:
    """Max over a flat k × k window (origin at k // 2); pixels outside the image do not count."""
    if k <= 1:
        return mask
    before, after = k // 2, k - 1 - k // 2
    padded = F.pad(mask, (before, after, before, after), value=-math.inf)
    return F.max_pool2d(padded, k, stride=1)


def erode(mask: Tensor, k: int) -> Tensor:
    """Min over a flat k × k window; pixels outside the image do not count."""
    return -dilate(-mask, k)


def gaussian_blur(mask: Tensor, k: int, sigma: float) -> Tensor:
    """A separable k × k Gaussian blur (k odd), reflecting at the borders."""
    if k <= 1 or sigma <= 0:
        return mask
    side = min(mask.shape[-2:])
    k = min(k, 2 * side - 1)  # reflection needs a padding below the side
    x = torch.arange(k, dtype=mask.dtype, device=mask.device) - (k - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pad = k // 2
    out = F.pad(mask, (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, k))
    return F.conv2d(out, kernel.view(1, 1, k, 1))


def postprocess(mask: Tensor, cf: CounterfactualConfig) -> tuple[Tensor, dict[str, float]]:
    """(erosion → dilation → blur of the pixel mask (1, 1, S, S), the sizes used at side S)."""
    side = mask.shape[-1]
    erosion = _odd_or_round(scaled_size(cf.mask_erosion, side), odd=False)
    dilation = _odd_or_round(scaled_size(cf.mask_dilation, side), odd=False)
    blur = _odd_or_round(scaled_size(cf.mask_blur, side), odd=True)
    sigma = scaled_size(cf.mask_blur_sigma, side)
    out = gaussian_blur(dilate(erode(mask, erosion), dilation), blur, sigma)
    sizes = {"erosion": erosion, "dilation": dilation, "blur": blur, "blur_sigma": sigma}
    return out.clamp(0, 1), sizes


def _odd_or_round(size: float, *, odd: bool) -> int:
    """A kernel size ≥ 1 (1 = off): rounded half up, or the nearest odd number."""
    if odd:
        return max(1, 2 * math.floor(size / 2) + 1)
    return max(1, math.floor(size + 0.5))


def latent_mask(pixel_mask: Tensor, latent_side: int) -> Tensor:
    """The pixel mask (1, 1, S, S) resized to the latent side (bilinear, antialiased)."""
    if pixel_mask.shape[-1] == latent_side:
        return pixel_mask.clone()
    size = (latent_side, latent_side)
    out = F.interpolate(pixel_mask, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(0, 1)


def foreground_mask(
    attention: Tensor,
    image: Tensor,
    cf: CounterfactualConfig,
    *,
    latent_side: int,
    segmenter: Segmenter | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(latent mask (1, 1, h, w), pixel mask (1, 1, S, S), a record of the steps) from the
    start-class attention (s, s) and the original `image` (1, 3, S, S) in [0, 1]: the squashed
    attention at the pixel side, SAM (with a segmenter), post-processing, resize (module doc)."""
    _, pixel = foreground_masks(
        attention, latent_side=latent_side, pixel_side=image.shape[-1], cutoff=cf.mask_cutoff
    )
    record: dict[str, Any] = {}
    if segmenter is not None:
        t0 = time.perf_counter()
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        pixel, record["segmenter"] = refine_with_sam(segmenter, image, pixel, cf, gen)
        record["segmenter"]["seconds"] = time.perf_counter() - t0
    pixel, record["postprocessing"] = postprocess(pixel, cf)
    return latent_mask(pixel, latent_side), pixel, record
