"""The digits data: scikit-learn's bundled handwritten digits, upsampled, split, and the planted
feature (a small bright square patch) with its detector.

Images: `load_digits` gives 1,797 grey 8x8 images with values 0..16 (about 180 per class). We
divide by 16 and upsample bilinearly (align_corners=False) to RESOLUTION x RESOLUTION = 16x16:
tensors (N, 1, 16, 16) float32 in [0, 1], ink bright on a black background. Columns 0 and 7 of
the 8x8 originals are (almost) always empty, so the left and right 2 pixels at 16x16 are dark.

Splits (stratified per class, fixed seed, disjoint, sizes for the default fractions):
    test   20 % ≈ 360  measures every model (no model trains on it)
    judge  25 % ≈ 450  trains `digits:judge` only
    train  the rest ≈ 987  trains the generator and the explained classifiers

The planted feature: `PatchSpec` (a size x size square of constant `intensity` at top/left, in
16x16 pixel coordinates). `patch_score` is a plain function of the image: the mean intensity of
the patch region minus the mean of the rest; the patch counts as present above
`PatchSpec.threshold`. With the default spec (3x3 at the top-left corner, intensity 1.0) clean
digits score at most about -0.1 and patched ones about +0.68; the threshold is 0.35.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RESOLUTION = 16  # image side of the whole zoo (generator and classifiers)
NUM_CLASSES = 10
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 0
TEST_FRACTION = 0.20
JUDGE_FRACTION = 0.25


@dataclass(frozen=True)
class PatchSpec:
    """The planted feature: a bright square of side `size` at (top, left), 16x16 coordinates."""

    top: int = 0  # row of the patch's top edge
    left: int = 0  # column of the patch's left edge
    size: int = 3  # side in pixels
    intensity: float = 1.0  # grey value written into the patch, in (0, 1]
    threshold: float = 0.35  # patch_score above this = "patch present"

    def __post_init__(self) -> None:
        if self.size < 1 or self.top < 0 or self.left < 0:
            raise ValueError(f"patch size must be >= 1 and top/left >= 0, got {self}")
        if self.top + self.size > RESOLUTION or self.left + self.size > RESOLUTION:
            raise ValueError(
                f"the patch ({self.size}px at top={self.top}, left={self.left}) must lie inside "
                f"the {RESOLUTION}x{RESOLUTION} image"
            )
        if not 0.0 < self.intensity <= 1.0:
            raise ValueError(f"patch intensity must be in (0, 1], got {self.intensity}")
        if not -1.0 < self.threshold < self.intensity:
            raise ValueError(
                f"patch threshold must be in (-1, intensity={self.intensity}), got {self.threshold}"
            )

    def mask(self, device: torch.device | str = "cpu") -> Tensor:
        """(16, 16) bool, True inside the patch."""
        m = torch.zeros(RESOLUTION, RESOLUTION, dtype=torch.bool, device=device)
        m[self.top : self.top + self.size, self.left : self.left + self.size] = True
        return m

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Splits:
    """Index arrays into the 1,797 images; disjoint, each sorted."""

    train: np.ndarray
    judge: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "judge": len(self.judge), "test": len(self.test)}


def load_images() -> tuple[Tensor, Tensor]:
    """All 1,797 digits: images (N, 1, 16, 16) float32 in [0, 1], labels (N,) int64 in 0..9."""
    # bundled with scikit-learn: no download (scikit-learn ships no type information)
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=RESOLUTION, mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(data.target, dtype=torch.int64)


def make_splits(labels: Tensor, seed: int = SPLIT_SEED) -> Splits:
    """Stratified split: per class, a seeded permutation; the first 20 % go to test, the next
    25 % to the judge, the rest to train."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    parts: dict[str, list[np.ndarray]] = {"train": [], "judge": [], "test": []}
    for k in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == k))
        n_test = round(TEST_FRACTION * len(idx))
        n_judge = round(JUDGE_FRACTION * len(idx))
        parts["test"].append(idx[:n_test])
        parts["judge"].append(idx[n_test : n_test + n_judge])
        parts["train"].append(idx[n_test + n_judge :])
    return Splits(**{name: np.sort(np.concatenate(p)) for name, p in parts.items()})


def _grey(images: Tensor) -> Tensor:
    """(N, C, H, W) or (N, H, W) → (N, 1, 16, 16) grey (channel mean), resized if needed."""
    if images.dim() == 3:
        images = images[:, None]
    x = images.float().mean(1, keepdim=True)
    if x.shape[-1] != RESOLUTION or x.shape[-2] != RESOLUTION:
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
    return x


def plant_patch(
    images: Tensor,
    spec: PatchSpec,
    where: Tensor | None = None,
    opacity: Tensor | float = 1.0,
) -> Tensor:
    """A copy of `images` ((N, C, 16, 16) in [0, 1]) with the patch blended into every channel:
    inside the patch, x ← (1 − opacity) · x + opacity · intensity (opacity 1: the plain patch;
    a float or per-item (N,)), for all items or those where the bool mask `where` (N,) is True."""
    sl = (..., slice(spec.top, spec.top + spec.size), slice(spec.left, spec.left + spec.size))
    shape = (-1, *[1] * (images.dim() - 1))  # per-item values broadcast as (N, 1, 1, 1)
    alpha = opacity.view(shape) if isinstance(opacity, Tensor) else opacity
    patched = images.clone()
    patched[sl] = (1 - alpha) * images[sl] + alpha * spec.intensity
    if where is None:
        return patched
    return torch.where(where.view(shape), patched, images)


def patch_score(images: Tensor, spec: PatchSpec) -> Tensor:
    """Mean grey intensity inside the patch region minus the mean of the rest of the image.

    images: (N, C, H, W) or (N, H, W) in [0, 1] (C = 1 or 3; resized to 16x16 if needed).
    Returns (N,) in [-1, 1]: about +0.68 for the default patch on a digit, below -0.1 without.
    """
    x = _grey(images)[:, 0]  # (N, 16, 16)
    m = spec.mask(x.device)
    return x[:, m].mean(1) - x[:, ~m].mean(1)


def patch_present(images: Tensor, spec: PatchSpec) -> Tensor:
    """(N,) bool: patch_score above the spec's threshold."""
    return patch_score(images, spec) > spec.threshold


def augment(
    x: Tensor, gen: torch.Generator, *, shift: float = 1.5, scale: float = 0.1, rotate: float = 10.0
) -> Tensor:
    """Light geometric augmentation of (N, 1, 16, 16) in [0, 1]: a random affine map per image
    (shift up to `shift` pixels, scale 1 ± `scale`, rotation up to `rotate` degrees)."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen) * 2 - 1  # (N, 4) in [-1, 1)
    s = 1 + scale * u[:, 0]
    a = torch.deg2rad(rotate * u[:, 1])
    t = u[:, 2:] * shift * 2 / RESOLUTION  # pixels → normalised coordinates
    theta = torch.stack(
        [
            torch.stack([torch.cos(a) / s, -torch.sin(a) / s, t[:, 0]], 1),
            torch.stack([torch.sin(a) / s, torch.cos(a) / s, t[:, 1]], 1),
        ],
        1,
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
