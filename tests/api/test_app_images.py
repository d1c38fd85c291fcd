"""POST /v1/images: valid uploads are stored and recorded; every refusal is a clear 4xx naming
the field `file` and the limit, and leaves no row and no stored object."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from digin.service.db import Image, Job
from tests.api.conftest import AppFactory
from tests.api.test_app_jobs import assert_problem

Auth = Callable[[str], dict[str, str]]


def encode(image: PILImage.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png(width: int = 16, height: int = 16, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(PILImage.fromarray(pixels), "PNG")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))  # fmt: skip


def upload(client: TestClient, headers: dict[str, str], data: bytes, name: str = "x.png"):
    return client.post("/v1/images", files={"file": (name, data, "image/png")}, headers=headers)


def nothing_written(sessions: sessionmaker[Session], root: Path) -> None:
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 0
    assert [p for p in root.rglob("*") if p.is_file()] == []


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    return tmp_path / "data" / "artifacts"


def test_a_valid_png_is_stored_and_recorded_once(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session], artifacts: Path
):
    headers = auth("acme")
    data = png(24, 16)
    response = upload(client, headers, data, name="evil/../name.gif")  # name and type ignored
    assert response.status_code == 201, response.text
    image = response.json()
    assert (image["format"], image["width"], image["height"]) == ("PNG", 24, 16)
    assert image["size_bytes"] == len(data) and len(image["sha256"]) == 64
    assert response.headers["Location"] == f"/v1/images/{image['id']}"
    stored = artifacts / "acme" / "images" / f"{image['sha256']}.png"
    assert stored.read_bytes() == data
    again = upload(client, headers, data)
    assert again.status_code == 200 and again.json()["id"] == image["id"]
    assert client.get(f"/v1/images/{image['id']}", headers=headers).json() == image
    assert_problem(client.get(f"/v1/images/{image['id']}", headers=auth("globex")), 404)
    jpeg = encode(PILImage.new("RGB", (8, 8), "red"), "JPEG")
    assert upload(client, headers, jpeg).json()["format"] == "JPEG"
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 2


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda: b"hello, this is not an image at all", 422, ["not an image", "PNG, JPEG, WEBP"]),
        (lambda: b"", 422, ["empty"]),
        (lambda: encode(PILImage.new("RGB", (8, 8)), "GIF"), 415, ["GIF", "PNG, JPEG, WEBP"]),
        (lambda: encode(PILImage.new("RGB", (8, 8)), "BMP"), 415, ["BMP", "DIGIN_IMAGE_FORMATS"]),
        (lambda: png(64, 64)[:300], 422, ["truncated or corrupt"]),
        (lambda: png_claiming(100_000, 100_000), 422, ["decompression bomb", "max_image_pixels"]),
        (lambda: png_claiming(10_000, 10_000), 422, ["decompression bomb", "max_image_pixels"]),
        (lambda: png_claiming(5_000, 5_000), 422, ["5000 x 5000", "max_image_pixels=16777216"]),
    ],
    ids=["text", "empty", "gif", "bmp", "truncated", "bomb-error", "bomb-warning", "pixels"],
)
def test_bad_uploads_are_refused_and_nothing_is_written(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session], artifacts: Path,
    make: Callable[[], bytes], status: int, words: list[str],
):  # fmt: skip
    response = upload(client, auth("acme"), make())
    assert_problem(response, status, "file", *words)
    nothing_written(sessions, artifacts)


def test_limits_from_the_settings(
    make_client: AppFactory, auth: Auth, sessions: sessionmaker[Session], artifacts: Path
):
    client = make_client(max_image_bytes=2048, max_image_pixels=4096, image_formats="PNG,GIF")
    headers = auth("acme")
    assert upload(client, headers, png(8, 8)).status_code == 201
    # over the pixel limit (100 x 100 > 4096)
    small_file = encode(PILImage.new("L", (100, 100)), "PNG")
    assert len(small_file) < 2048
    assert_problem(upload(client, headers, small_file), 422, "file", "max_image_pixels=4096")
    # over the byte limit, within the multipart slack: read, then refused
    body = assert_problem(upload(client, headers, png(30, 30)), 413, "file", "max_image_bytes=2048")
    assert body["limit"] == 2048
    # far over it: refused from the Content-Length, before it is read
    huge = png(400, 400)
    assert_problem(upload(client, headers, huge), 413, "file", "max_image_bytes=2048")
    # streamed without a Content-Length: counted as it arrives
    part = (b'--b0\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + huge + b"\r\n--b0--\r\n")  # fmt: skip
    chunks = iter([part[i : i + 8192] for i in range(0, len(part), 8192)])
    multipart = {"Content-Type": "multipart/form-data; boundary=b0"}
    streamed = client.post("/v1/images", content=chunks, headers=headers | multipart)
    assert_problem(streamed, 413, "file", "max_image_bytes=2048")
    # animated GIFs are not start images
    frames = [PILImage.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert_problem(upload(client, headers, gif), 422, "file", "animated", "3 frames")
    # a WEBP is refused here: this service's allow-list is PNG and GIF
    webp = encode(PILImage.new("RGB", (8, 8)), "WEBP")
    assert_problem(upload(client, headers, webp), 415, "file", "WEBP", "PNG, GIF")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 1
    assert len([p for p in artifacts.rglob("*") if p.is_file()]) == 1


def test_missing_file_field_is_a_422(client: TestClient, auth: Auth):
    response = client.post("/v1/images", files={"image": ("x.png", png(), "image/png")},
                           headers=auth("acme"))  # fmt: skip
    assert_problem(response, 422, "file", "required")


def test_jobs_may_name_only_the_tenants_own_uploads(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session]
):
    mine = upload(client, auth("acme"), png()).json()["id"]
    theirs = upload(client, auth("globex"), png(seed=1)).json()["id"]
    body = {"kind": "counterfactual", "params": {"image_id": mine, "targets": ["one"]}}
    accepted = client.post("/v1/jobs", json=body, headers=auth("acme"))
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["params"]["image_id"] == mine
    for bad in (theirs, "not-a-uuid", "00000000-0000-4000-8000-000000000000"):
        body["params"]["image_id"] = bad
        refused = client.post("/v1/jobs", json=body, headers=auth("acme"))
        assert_problem(refused, 422, "params.image_id", "no uploaded image", bad)
    body = {"kind": "neural_pca",
            "params": {"class": "seven", "images": {"image_ids": [mine, theirs]}}}  # fmt: skip
    refused = client.post("/v1/jobs", json=body, headers=auth("acme"))
    assert_problem(refused, 422, "params.images.image_ids.1", "no uploaded image")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_batches_may_name_only_the_tenants_own_uploads(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session]
):
    """Checked at the API for every item (one query for the batch), not by the worker later."""
    mine = upload(client, auth("acme"), png()).json()["id"]
    theirs = upload(client, auth("globex"), png(seed=1)).json()["id"]
    items = [{"custom_id": f"i{n}", "params": {"image_id": mine}} for n in range(3)]
    body = {"kind": "counterfactual", "params_template": {"targets": ["one"]}, "items": items}
    accepted = client.post("/v1/batches", json=body, headers=auth("acme"))
    assert accepted.status_code == 202, accepted.text
    for bad in (theirs, "00000000-0000-4000-8000-000000000000"):
        items = [*items[:2], {"custom_id": "bad", "params": {"image_id": bad}}]
        body["items"] = items
        refused = client.post("/v1/batches", json=body, headers=auth("acme"))
        assert_problem(refused, 422, "items.2.params.image_id", "no uploaded image", bad)
    sets = {"kind": "neural_pca", "params_template": {"images": {"image_ids": [mine, theirs]}},
            "items": [{"custom_id": "k", "params": {"class": "seven"}}]}  # fmt: skip
    refused = client.post("/v1/batches", json=sets, headers=auth("acme"))
    assert_problem(refused, 422, "items.0.params.images.image_ids.1", "no uploaded image", theirs)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 3  # the first batch only
