"""Validation of uploaded start images: size, format allow-list by content, pixel limit,
decompression bombs, animations, truncated or corrupt files (docs/architecture.md §9.7).

The format is read from the file's magic bytes, never from its name or content type, and the
file is decoded only by the Pillow plugin of that format (a file that claims to be a PNG is
decoded as a PNG or refused). The image size is checked from the header before any pixel is
decoded; Pillow's DecompressionBombWarning is an error here.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from dataclasses import dataclass

from PIL import Image

from digin.api.problems import ProblemError, field_problem

FIELD = "file"  # the multipart field of POST /v1/images

# Magic bytes of the formats `DIGIN_IMAGE_FORMATS` may name (Pillow format names).
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_EXTENSIONS = {
    "PNG": "png",
    "JPEG": "jpg",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}
# warnings.catch_warnings changes process-wide state: one decode at a time keeps the
# "bomb warnings are errors" filter from leaking between threads of the API's pool.
_DECODE_LOCK = threading.Lock()


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


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes start with, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


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

    # 2. The header: pixel count before decoding; bombs are errors
    with _DECODE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise _too_many_pixels(
                        f"the image is {width} x {height} = {width * height} pixels", max_pixels
                    )
                frames = int(getattr(image, "n_frames", 1))
                if frames > 1:
                    raise field_problem(
                        422, "invalid-image", FIELD,
                        f"an animated {fmt} ({frames} frames); send one still image",
                    )  # fmt: skip
                # 3. Decode every pixel: truncated and corrupt files fail here
                image.load()
        except ProblemError:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise _too_many_pixels(f"a decompression bomb: {exc}", max_pixels) from None
        except Exception as exc:  # Pillow raises many types on hostile input
            raise field_problem(
                422, "invalid-image", FIELD,
                f"not a valid {fmt} image (truncated or corrupt): {type(exc).__name__}: {exc}",
            ) from None  # fmt: skip
    digest = hashlib.sha256(data).hexdigest()
    return CheckedImage(data=data, sha256=digest, format=fmt, width=width, height=height)


def _too_many_pixels(what: str, limit: int) -> ProblemError:
    return field_problem(
        422, "image-too-many-pixels", FIELD,
        f"{what}; the limit is max_image_pixels={limit} (DIGIN_MAX_IMAGE_PIXELS)",
        limit=limit,
    )  # fmt: skip
