"""Image sets of the analysis kinds (`neural_pca`, `spurious_score`): `ImageSetSpec` → tensors.

Sources (exactly one per spec, validated in `digin.core.params.ImageSetSpec`):

    digits      a split of the bundled digits data (`digin.core.digits.data`), filtered by label
                ('class': the job's class k, 'other': every other digit, 'all', or a list), the
                first `limit`, and the zoo's patch planted into a seeded share (`PatchPlan`)
    folder      image files (.png .jpg .jpeg .bmp .webp) in name order; '{class}' / '{index}'
                in the path are replaced by the class name / index (one folder per class)
    image_ids   uploaded images: the service resolves ids to bytes (`resolver`); the core
                alone cannot, and says so

Every image is brought to the classifier's input: RGB, short side resized to `size` and centre
cropped (digits: bilinear from 16x16), (N, 3, size, size) float32 in [0, 1].
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from digin.core.context import ImageResolver
from digin.core.digits.data import PatchSpec
from digin.core.params import ImageSetSpec, PatchPlan

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
MAX_PIXELS = 50_000_000  # per image file; larger ones are refused (decompression bombs)


@dataclass
class ImageSet:
    images: Tensor  # (N, 3, S, S) float32 in [0, 1]
    names: list[str]  # per image: 'digits:<split>/<index>', a file name, or an image id
    labels: Tensor | None = None  # (N,) digit labels (digits source only)
    patched: Tensor | None = None  # (N,) bool, carries the planted patch (digits source only)

    def __len__(self) -> int:
        return len(self.names)


def load_image_set(
    spec: ImageSetSpec,
    *,
    size: int,
    class_index: int,
    class_name: str,
    field: str = "images",
    resolver: ImageResolver | None = None,
    zoo_patch: PatchSpec | None = None,
) -> ImageSet:
    """The images of `spec` for class k at the classifier's input size. `field` names the
    params field in error messages; `zoo_patch` is the planted feature of the classifier's zoo
    folder (`digin.core.digits.zoo.classifier_patch`), which fills in the patch fields that the
    spec leaves out (None: the default square)."""
    if spec.digits is not None:
        out = _digits(spec, class_index, field, zoo_patch or PatchSpec())
        out.images = _resize_square(out.images.expand(-1, 3, -1, -1), size)
        return out
    if spec.folder is not None:
        path = spec.folder.replace("{class}", class_name).replace("{index}", str(class_index))
        return _folder(Path(path), spec.limit, size, field)
    if resolver is None:
        raise ValueError(
            f"{field}.image_ids: uploaded image ids are resolved by the service; run the job "
            "through the service, or give a folder (or digits) instead"
        )
    ids = (spec.image_ids or [])[: spec.limit]
    images = [_decode(resolver(i), f"{field}.image_ids: image {i!r}") for i in ids]
    return ImageSet(torch.stack([_to_tensor(im, size) for im in images]), list(ids))


@cache
def _digits_data():
    """The bundled digits (1797, 1, 16, 16) in [0, 1], labels (1797,), and the zoo's splits;
    read once per process."""
    from digin.core.digits.data import load_images, make_splits

    x, y = load_images()
    return x, y, make_splits(y)


def _digits(spec: ImageSetSpec, class_index: int, field: str, zoo_patch: PatchSpec) -> ImageSet:
    from digin.core.digits.data import plant_patch

    assert spec.digits is not None  # the caller dispatches on it
    x, y, splits = _digits_data()
    index = torch.as_tensor(getattr(splits, spec.digits))
    labels = spec.labels or "class"
    if labels == "class":
        keep = y[index] == class_index
    elif labels == "other":
        keep = y[index] != class_index
    elif labels == "all":
        keep = torch.ones(len(index), dtype=torch.bool)
    else:
        keep = torch.isin(y[index], torch.tensor(labels))
    index = index[keep][: spec.limit]
    if len(index) == 0:
        raise ValueError(f"{field}: no digits with labels {labels!r} in split {spec.digits!r}")
    x, y = x[index], y[index]
    patched = torch.zeros(len(index), dtype=torch.bool)
    if spec.patch is not None:
        plan = spec.patch
        n = round(plan.rate * len(index))
        gen = torch.Generator().manual_seed(plan.seed)
        patched[torch.randperm(len(index), generator=gen)[:n]] = True
        x = plant_patch(x, planted_patch(plan, zoo_patch, field), patched, plan.opacity)
    names = [f"digits:{spec.digits}/{int(i)}" for i in index]
    return ImageSet(x, names, y, patched)


def planted_patch(plan: PatchPlan, zoo_patch: PatchSpec, field: str = "images") -> PatchSpec:
    """The patch a `PatchPlan` plants: its fields, the zoo folder's patch where it gives none."""
    given = {n: getattr(plan, n) for n in ("top", "left", "size", "intensity")}
    fields = {n: v for n, v in given.items() if v is not None}
    threshold = min(zoo_patch.threshold, 0.5 * fields.get("intensity", zoo_patch.intensity))
    try:
        return replace(zoo_patch, **fields, threshold=threshold)
    except ValueError as exc:
        raise ValueError(f"{field}.patch: {exc}") from None


def _folder(folder: Path, limit: int | None, size: int, field: str) -> ImageSet:
    from digin.core.params import MAX_SET_IMAGES

    if not folder.is_dir():
        raise ValueError(f"{field}.folder: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{field}.folder: no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    if limit is None and len(files) > MAX_SET_IMAGES:
        raise ValueError(
            f"{field}.folder: {len(files)} images in {folder}, more than {MAX_SET_IMAGES}; "
            "set limit"
        )
    files = files[:limit]
    images = [_decode(p.read_bytes(), f"{field}.folder: {p.name}") for p in files]
    return ImageSet(torch.stack([_to_tensor(im, size) for im in images]), [p.name for p in files])


def _decode(data: bytes, what: str) -> Image.Image:
    """Bytes → RGB image; refuses other formats and decompression bombs, naming the image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in IMAGE_FORMATS:
                raise ValueError(f"format {image.format} is not one of {IMAGE_FORMATS}")
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"{image.width}x{image.height} is over {MAX_PIXELS} pixels")
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ValueError(f"{what}: cannot read the image ({e})") from None


def _to_tensor(image: Image.Image, size: int) -> Tensor:
    """RGB image → (3, size, size) in [0, 1]: short side resized to `size`, centre crop."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize(
        (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC
    )
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _resize_square(x: Tensor, size: int) -> Tensor:
    """(N, 3, s, s) → (N, 3, size, size) bilinear (antialiased when shrinking), in [0, 1]."""
    if x.shape[-1] == size:
        return x.contiguous()
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
