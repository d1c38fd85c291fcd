"""Regularisers: weighted distances of x̂0 to a reference (docs/architecture.md §3.12, §5.7).

The loss of an item adds Σ_name w_name · d_name(x̂0, reference), on the latent x̂0 (B, c, h, w)
and on its decoded image (B, 3, H, W) in [0, 1]. The reference is the original image for a
counterfactual (`digin.core.counterfactual.edit`), the item's unoptimised sample for the
text-to-image kinds (`digin.core.guidance.ObjectiveLoss.begin` sets it from iteration 0). Every
distance is a mean per item, so an item's regulariser does not depend on the other items.

    latent_background_l2   mean((1 − m) · (ẑ0 − z_ref)²), m the latent foreground mask
    pixel_background_l2    mean((1 − m) · (x̂0 − x_ref)²), m the pixel foreground mask
    latent_l1, latent_l2   mean |ẑ0 − z_ref|, mean (ẑ0 − z_ref)²
    pixel_l1, pixel_l2     mean |x̂0 − x_ref|, mean (x̂0 − x_ref)²
    lpips                  LPIPS-Alex(x̂0, x_ref), images in [−1, 1]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # what lpips loads through torchvision
NAMES = ("latent_background_l2", "pixel_background_l2", "latent_l1", "latent_l2", "pixel_l1",
         "pixel_l2", "lpips")  # fmt: skip
MASKED = ("latent_background_l2", "pixel_background_l2")  # need a foreground mask


def masked_l2(x: Tensor, ref: Tensor, weight: Tensor | None = None) -> Tensor:
    """mean(weight · (x − ref)²) per item, (B, ...) → (B,); weight broadcasts, e.g. (1, 1, h, w)."""
    d = (x - ref) ** 2
    return (d if weight is None else weight * d).flatten(1).mean(1)


def masked_l1(x: Tensor, ref: Tensor, weight: Tensor | None = None) -> Tensor:
    d = (x - ref).abs()
    return (d if weight is None else weight * d).flatten(1).mean(1)


def load_lpips(device: torch.device) -> nn.Module:
    """LPIPS-Alex, only from weights already on this machine (nothing is downloaded)."""
    try:
        import lpips  # type: ignore[import-not-found, import-untyped, unused-ignore]  # optional
    except ImportError:
        msg = "the lpips regulariser needs the lpips package: pip install lpips"
        raise ValueError(msg) from None
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        raise ValueError(
            f"the lpips regulariser needs torchvision's AlexNet weights at {weights}; they are "
            "not downloaded at run time (set lpips to 0, or put the file there)"
        )
    return lpips.LPIPS(net="alex", verbose=False).to(device).eval().requires_grad_(False)


class Regularizers(nn.Module):
    """The weighted distances of x̂0 to a reference; `weights` maps names (module docstring) to
    weights, those ≤ 0 are dropped. `lpips_model` replaces the LPIPS network that a positive
    `lpips` weight otherwise loads (`load_lpips`). The reference is set once, by
    `set_reference`, before the first call."""

    def __init__(
        self,
        weights: Mapping[str, float],
        device: torch.device | str = "cpu",
        lpips_model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(weights) - set(NAMES))
        if unknown:
            raise ValueError(f"unknown regularisers {unknown}; known: {list(NAMES)}")
        self.weights = {n: float(w) for n, w in weights.items() if w > 0}
        self.lpips = None
        if "lpips" in self.weights:
            self.lpips = (
                lpips_model if lpips_model is not None else load_lpips(torch.device(device))
            )
        self.z0: Tensor | None = None  # (B or 1, c, h, w) reference latent
        self.x0: Tensor | None = None  # (B or 1, 3, H, W) reference image in [0, 1]
        self.latent_background: Tensor | None = None  # (B or 1, 1, h, w) 1 − m
        self.pixel_background: Tensor | None = None  # (B or 1, 1, H, W)

    def __bool__(self) -> bool:
        return bool(self.weights)

    def set_reference(
        self,
        z0: Tensor,
        x0: Tensor,
        latent_mask: Tensor | None = None,
        pixel_mask: Tensor | None = None,
    ) -> None:
        """The reference latent and image (and foreground masks, for the masked distances)."""
        missing = [n for n in MASKED if n in self.weights] if latent_mask is None else []
        if missing or (pixel_mask is None and "pixel_background_l2" in self.weights):
            raise ValueError(f"the regularisers {list(MASKED)} need a foreground mask")
        self.z0, self.x0 = z0, x0
        self.latent_background = None if latent_mask is None else 1.0 - latent_mask
        self.pixel_background = None if pixel_mask is None else 1.0 - pixel_mask

    def parts(self, latents: Tensor, images: Tensor) -> dict[str, Tensor]:
        """name → (B,) unweighted; latents (B, c, h, w) = x̂0, images (B, 3, H, W) in [0, 1]."""
        z0, x0 = self.z0, self.x0
        if z0 is None or x0 is None:
            raise ValueError("the regularisers have no reference yet (set_reference)")
        out = {}
        for name in self.weights:
            if name == "latent_background_l2":
                out[name] = masked_l2(latents, z0, self.latent_background)
            elif name == "pixel_background_l2":
                out[name] = masked_l2(images, x0, self.pixel_background)
            elif name == "latent_l1":
                out[name] = masked_l1(latents, z0)
            elif name == "latent_l2":
                out[name] = masked_l2(latents, z0)
            elif name == "pixel_l1":
                out[name] = masked_l1(images, x0)
            elif name == "pixel_l2":
                out[name] = masked_l2(images, x0)
            else:  # lpips, on images in [-1, 1]
                assert self.lpips is not None  # loaded with a positive weight
                ref = x0.expand_as(images) * 2 - 1
                out[name] = self.lpips(images * 2 - 1, ref).flatten(1).mean(1)
        return out

    def forward(self, latents: Tensor, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(Σ weight · distance (B,), the unweighted distances by name)."""
        parts = self.parts(latents, images)
        total = torch.zeros(latents.shape[0], device=latents.device)
        for name, value in parts.items():
            total = total + self.weights[name] * value
        return total, parts
