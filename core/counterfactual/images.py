"""The start image of a counterfactual (docs/architecture.md §5.2): loaded, validated, preprocessed.

Sources (one per job):
    a file path           'photos/cat.png' (the CLI; a service must not accept server paths)
    an uploaded image id  resolved to bytes by the caller's `resolver` (the service's job)
    a bundled digit       'digits:<split>/<n>': image n of a split (train, judge, test) of the
                          digits data (docs/architecture.md §6.4), so that tests and demos
                          run offline

Bytes are checked before any pixel is decoded: size, format by magic bytes against an allow-list
(decoded only by that format's Pillow plugin), pixel count from the header; Pillow's
decompression-bomb warning is an error; animations are refused. The image is then turned upright
(EXIF), converted to RGB, its short side resized to the model resolution and centre-cropped.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from digin.core.context import ImageResolver
from digin.core.imagefiles import ImageRefused, decode, sniff_format

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
DIGITS_PREFIX = "digits:"
_DIGIT_REF = re.compile(r"digits:(train|judge|test)/(\d+)")


class ImageError(ValueError):
    """A start image that cannot be used; the message names the limit or what to do."""


@dataclass
class StartImage:
    pixels: Tensor  # (1, 3, S, S) float32 in [0, 1], at the model resolution S
    source: str  # the path, 'id:<image id>' or 'digits:<split>/<n>'
    sha256: str  # of the preprocessed pixels (and S): the inversion cache's image key
    size: tuple[int, int]  # (width, height) before preprocessing
    format: str  # PNG, JPEG, … or 'digits'
    label: int | None = None  # the true class of a bundled digit, else None

    def describe(self) -> dict:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "size": list(self.size),
            "format": self.format,
            "label": self.label,
        }


def decode_image(
    data: bytes,
    *,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Image.Image, str]:
    """Validated bytes → (RGB image, format); ImageError otherwise."""
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes; the limit is {max_bytes} bytes")
    fmt = sniff_format(data, known=ALLOWED_FORMATS)
    if fmt is None or fmt not in formats:
        what = "not an image" if fmt is None else f"a {fmt} image"
        raise ImageError(f"{what}: the accepted formats are {', '.join(formats)}")
    try:
        rgb = decode(data, fmt, max_pixels=max_pixels, convert=_upright_rgb)
    except ImageRefused as exc:
        message = {
            "pixels": f"{exc.what}; the limit is {max_pixels} pixels",
            "bomb": f"refused as {exc.what}",
            "animated": f"an animated {fmt}; give one still image",
            "corrupt": f"not a valid {fmt} image: {exc.what}",
        }[exc.reason]
        raise ImageError(message) from None
    return rgb, fmt


def _upright_rgb(image: Image.Image) -> Image.Image:
    return ImageOps.exif_transpose(image).convert("RGB")


def preprocess(image: Image.Image, resolution: int) -> Tensor:
    """Resize the short side to `resolution` (bicubic, antialiased), centre-crop the square:
    (1, 3, S, S) float32 in [0, 1]."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255


def bundled_digit(ref: str) -> tuple[Image.Image, int]:
    """'digits:<split>/<n>' → (the 16x16 digit as an RGB image, its label)."""
    from digin.core.digits.data import load_images, make_splits

    match = _DIGIT_REF.fullmatch(ref)
    if match is None:
        raise ImageError(
            f"bundled digit {ref!r}: write 'digits:<split>/<n>' with split train, judge or test"
        )
    x, y = load_images()
    indices = getattr(make_splits(y), match.group(1))
    n = int(match.group(2))
    if n >= len(indices):
        raise ImageError(
            f"bundled digit {ref!r}: the {match.group(1)} split has {len(indices)} digits "
            f"(0 … {len(indices) - 1})"
        )
    grey = (x[indices[n], 0] * 255).round().to(torch.uint8).numpy()  # (16, 16)
    return Image.fromarray(grey).convert("RGB"), int(y[indices[n]])


def _pixel_hash(pixels: Tensor) -> str:
    data = (pixels * 255).round().to(torch.uint8).contiguous().numpy().tobytes()
    return hashlib.sha256(str(tuple(pixels.shape)).encode() + data).hexdigest()


def load_start_image(
    image: str | None,
    *,
    image_id: str | None = None,
    resolution: int,
    resolver: ImageResolver | None = None,
) -> StartImage:
    """The job's start image at the model resolution, from exactly one of `image` (a path or
    'digits:<split>/<n>') and `image_id` (needs `resolver`)."""
    if (image is None) == (image_id is None):
        raise ImageError("give exactly one of image (a path or 'digits:<split>/<n>') and image_id")
    label = None
    if image_id is not None:
        if resolver is None:
            raise ImageError(
                f"image_id {image_id!r} names an uploaded image, which only the service can "
                "resolve; locally, give the file as image (a path)"
            )
        pil, fmt = decode_image(resolver(image_id))
        source = f"id:{image_id}"
    else:
        assert image is not None  # exactly one of the two (checked above)
        if image.startswith(DIGITS_PREFIX):
            pil, label = bundled_digit(image)
            fmt, source = "digits", image
        else:
            path = Path(image).expanduser()
            if not path.is_file():
                raise ImageError(f"image {image!r}: no such file")
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise ImageError(
                    f"image {image!r} is {path.stat().st_size} bytes; "
                    f"the limit is {MAX_IMAGE_BYTES}"
                )
            pil, fmt = decode_image(path.read_bytes())
            source = str(path)
    pixels = preprocess(pil, resolution)
    return StartImage(pixels, source, _pixel_hash(pixels), pil.size, fmt, label)
