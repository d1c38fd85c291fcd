"""How generated images reach a classifier (docs/architecture.md §3.5).

Augmented path: `num_cutouts` random square crops per image, biased to large ones
(side = rand()**cut_power * (S − r) + r), resized to the classifier resolution r, plus Gaussian
noise. Clean path: a bilinear resize only (logging, selection, metrics).

Randomness is drawn *before* the (checkpointed) classifier call into a `CutoutPlan`, from each
item's own generators, so that recomputation in backward sees the same crops and a batched run
sees the same crops as B single runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ItemRNG:
    """The random streams of one item, seeded from its seed."""

    cpu: torch.Generator  # crop geometry (and z_T)
    device: torch.Generator  # augmentation noise, drawn where the images live

    @staticmethod
    def from_seed(seed: int, device: torch.device | str) -> ItemRNG:
        device = torch.device(device)
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        return ItemRNG(torch.Generator().manual_seed(seed), noise_gen)


@dataclass
class CutoutPlan:
    size: int  # r, classifier resolution
    boxes: list[list[tuple[int, int, int]]]  # per item, per cutout: (top, left, side)
    noise: Tensor | None  # (B, n, 3, r, r) or None when noise_sd == 0


def cutout_side(image_side: int, size: int, u: float, cut_power: float) -> int:
    """Side of one crop for a uniform draw u in [0, 1): large crops are more likely."""
    max_side = image_side
    min_side = min(image_side, size)
    return int(u**cut_power * (max_side - min_side) + min_side)


def sample_cutouts(
    rngs: list[ItemRNG],
    *,
    image_side: int,
    size: int,
    num: int,
    cut_power: float,
    noise_sd: float,
) -> CutoutPlan:
    boxes = []
    for rng in rngs:
        item = []
        for u in torch.rand(num, generator=rng.cpu).tolist():
            side = cutout_side(image_side, size, u, cut_power)
            top, left = torch.randint(0, image_side - side + 1, (2,), generator=rng.cpu).tolist()
            item.append((top, left, side))
        boxes.append(item)
    noise = None
    if noise_sd > 0:
        noise = (
            torch.stack(
                [
                    torch.randn(
                        (num, 3, size, size), generator=rng.device, device=rng.device.device
                    )
                    for rng in rngs
                ]
            )
            * noise_sd
        )  # (B, n, 3, r, r)
    return CutoutPlan(size, boxes, noise)


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] >= size:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def apply_cutouts(images: Tensor, plan: CutoutPlan) -> Tensor:
    """(B, 3, S, S) in [0, 1] → (B, n, 3, r, r) crops plus noise."""
    views = torch.stack(
        [
            torch.cat([_resize(img[None, :, t : t + s, l : l + s], plan.size) for t, l, s in item])
            for img, item in zip(images, plan.boxes, strict=True)
        ]
    )
    if plan.noise is not None:
        views = views + plan.noise.to(views.dtype)
    return views


def clean_view(images: Tensor, size: int) -> Tensor:
    """(B, 3, S, S) → (B, 1, 3, r, r): bilinear resize only."""
    if images.shape[-1] == size:
        return images[:, None]
    resized = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return resized[:, None]
