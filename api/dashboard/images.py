"""Artifact images for the dashboard, read with the session cookie (the REST artifact route
takes a bearer key, which the browser does not hold): the stored PNG, or a small thumbnail made
with Pillow on first request and kept in a bounded in-memory cache.

A succeeded job's artifacts never change, so each response carries a strong ETag (of the storage
key, the stored size and the job's finish time) and may be cached privately by the browser; a
request with a matching `If-None-Match` is answered 304 without reading storage.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from typing import Any

from PIL import Image

THUMB_SIDE = 128  # thumbnails fit in THUMB_SIDE x THUMB_SIDE (never enlarged)
CACHE_BYTES = 32 * 2**20  # thumbnails kept in memory, per API process
MAX_SOURCE_PIXELS = 64 * 2**20  # a stored PNG larger than this is not thumbnailed
CACHE_CONTROL = "private, max-age=86400"


def etag(entry: dict[str, Any], finished: object, variant: str) -> str:
    raw = f"{entry.get('key')}|{entry.get('size')}|{finished}|{variant}".encode()
    return '"' + hashlib.sha256(raw).hexdigest()[:32] + '"'


def matches(if_none_match: str | None, tag: str) -> bool:
    if not if_none_match:
        return False
    return tag in {t.strip().removeprefix("W/") for t in if_none_match.split(",")}


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """The PNG `data` scaled down to fit in side x side (kept as is when smaller)."""
    with Image.open(io.BytesIO(data)) as source:
        if source.width * source.height > MAX_SOURCE_PIXELS:
            raise ValueError(f"image of {source.width}x{source.height} pixels is too large")
        source.load()
        image: Image.Image = source
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA")
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="PNG")
    return out.getvalue()


class ThumbCache:
    """Thumbnails by ETag, least recently used dropped first, at most `limit` bytes."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit, self.size = limit, 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tag: str) -> bytes | None:
        with self._lock:
            data = self._items.get(tag)
            if data is not None:
                self._items.move_to_end(tag)
            return data

    def put(self, tag: str, data: bytes) -> None:
        with self._lock:
            if tag in self._items or len(data) > self.limit:
                return
            self._items[tag] = data
            self.size += len(data)
            while self.size > self.limit:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)
