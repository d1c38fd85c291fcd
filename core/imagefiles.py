"""Untrusted image bytes, opened safely (torch-free: the API's upload check, `digin.api.images`,
and the start image of a counterfactual, `digin.core.counterfactual.images`, share it).

The format is read from the magic bytes, never from a name or a content type, and the bytes are
decoded only by the Pillow plugin of that format. The pixel count is checked from the header
before any pixel is decoded; Pillow's DecompressionBombWarning is an error; animations are
refused; every pixel is loaded, so truncated and corrupt files fail here. Each caller words the
refusal its own way (`ImageRefused.reason`).
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable, Collection
from typing import Literal, TypeVar

from PIL import Image

T = TypeVar("T")
Reason = Literal["pixels", "bomb", "animated", "corrupt"]

# Magic bytes of the formats recognised (Pillow's format names); WEBP is read from its RIFF header.
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# warnings.catch_warnings changes process-wide state: one decode at a time keeps the "bomb
# warnings are errors" filter from leaking between threads.
_DECODE_LOCK = threading.Lock()


class ImageRefused(ValueError):
    """Bytes of the sniffed format that are no acceptable image. `reason`: "pixels" (more than
    the limit; `what` is "the image is W x H = N pixels"), "bomb" (Pillow's decompression-bomb
    check; `what` is "a decompression bomb: …"), "animated" (`frames` frames) or "corrupt"
    (`what` is "<exception type>: <message>")."""

    def __init__(self, reason: Reason, what: str, frames: int = 1) -> None:
        super().__init__(what)
        self.reason, self.what, self.frames = reason, what, frames


def sniff_format(data: bytes, known: Collection[str] | None = None) -> str | None:
    """The image format the bytes start with (Pillow's name), or None; `known`: the formats to
    recognise (default: every one of SIGNATURES, and WEBP)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt: str | None = "WEBP"
    else:
        fmt = next((name for magic, name in SIGNATURES if data.startswith(magic)), None)
    return fmt if known is None or fmt in known else None


def decode(data: bytes, fmt: str, *, max_pixels: int, convert: Callable[[Image.Image], T]) -> T:
    """`convert` of the image `data` holds, decoded by the Pillow plugin of `fmt` alone after
    the checks above (`convert` runs on the open, fully loaded image); ImageRefused otherwise."""
    with _DECODE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:
                width, height = image.size
                if width * height > max_pixels:
                    what = f"the image is {width} x {height} = {width * height} pixels"
                    raise ImageRefused("pixels", what)
                frames = int(getattr(image, "n_frames", 1))
                if frames > 1:
                    raise ImageRefused("animated", f"an animated {fmt}", frames)
                image.load()  # truncated and corrupt files fail here
                return convert(image)
        except ImageRefused:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageRefused("bomb", f"a decompression bomb: {exc}") from None
        except Exception as exc:  # Pillow raises many types on hostile input
            raise ImageRefused("corrupt", f"{type(exc).__name__}: {exc}") from None
