"""Validation of uploaded start images: size, format allow-list by content, pixel limit,
decompression bombs, animations, truncated or corrupt files (docs/architecture.md §9.7).

The format is read from the file's magic bytes, never from its name or content type, and the
file is decoded only by the Pillow plugin of that format (a file that claims to be a PNG is
decoded as a PNG or refused). The image size is checked from the header before any pixel is
decoded; Pillow's DecompressionBombWarning is an error here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image

from digin.api.problems import ProblemError, field_problem
from digin.core.imagefiles import ImageRefused, decode, sniff_format

FIELD = "file"  # the multipart field of POST /v1/images

_EXTENSIONS = {
    "PNG": "png",
    "JPEG": "jpg",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    sha256: str
    format: str  # Pillow's name: PNG, JPEG, WEBP, …
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return Image.MIME.get(self.format, "application/octet-stream")

    @property
    def extension(self) -> str:
        return _EXTENSIONS.get(self.format, self.format.lower())


def too_large(size: int | None, limit: int) -> ProblemError:
    got = f"is {size} bytes" if size is not None else "is larger"
    return field_problem(
        413,
        "image-too-large",
        FIELD,
        f"the upload {got}; the limit is max_image_bytes={limit} (DIGIN_MAX_IMAGE_BYTES)",
        limit=limit,
    )


def check_image(
    data: bytes, *, max_bytes: int, max_pixels: int, formats: list[str]
) -> CheckedImage:
    """`data` as a validated image, or a ProblemError naming the field `file` and the limit."""
    # 1. Size and format, from the bytes alone
    if len(data) > max_bytes:
        raise too_large(len(data), max_bytes)
    if not data:
        raise field_problem(422, "invalid-image", FIELD, "the upload is empty")
    allowed = ", ".join(formats)
    fmt = sniff_format(data)
    if fmt is None:
        raise field_problem(
            422, "invalid-image", FIELD,
            f"not an image: the content matches none of the accepted formats ({allowed})",
        )  # fmt: skip
    if fmt not in formats:
        raise field_problem(
            415, "image-format-not-allowed", FIELD,
            f"{fmt} images are not accepted; allowed formats (DIGIN_IMAGE_FORMATS): {allowed}",
        )  # fmt: skip

    # 2. The header: pixel count before decoding; bombs are errors. 3. Every pixel decoded:
    #    truncated and corrupt files fail (digin.core.imagefiles)
    try:
        width, height = decode(data, fmt, max_pixels=max_pixels, convert=lambda image: image.size)
    except ImageRefused as exc:
        raise _refused(exc, fmt, max_pixels) from None
    digest = hashlib.sha256(data).hexdigest()
    return CheckedImage(data=data, sha256=digest, format=fmt, width=width, height=height)


def _refused(exc: ImageRefused, fmt: str, max_pixels: int) -> ProblemError:
    if exc.reason in ("pixels", "bomb"):
        return _too_many_pixels(exc.what, max_pixels)
    if exc.reason == "animated":
        message = f"an animated {fmt} ({exc.frames} frames); send one still image"
    else:
        message = f"not a valid {fmt} image (truncated or corrupt): {exc.what}"
    return field_problem(422, "invalid-image", FIELD, message)


def _too_many_pixels(what: str, limit: int) -> ProblemError:
    return field_problem(
        422, "image-too-many-pixels", FIELD,
        f"{what}; the limit is max_image_pixels={limit} (DIGIN_MAX_IMAGE_PIXELS)",
        limit=limit,
    )  # fmt: skip
