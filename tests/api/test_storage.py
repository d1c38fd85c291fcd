"""Storage: a local directory, and S3 through the real minio client against moto's server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from minio.error import S3Error

from digin.service.settings import fresh_settings
from digin.service.storage import (
    ArtifactNotFound,
    LocalStorage,
    S3Storage,
    Storage,
    StorageUnavailable,
    artifact_key,
    check_key,
    image_key,
    storage_from_settings,
)

BAD_KEYS = ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", ".hidden", "a/.tmp",
            "a\\b", "a/b\x00", "x" * 1025, "a/b/"]  # fmt: skip

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")


def test_keys():
    job = uuid.UUID(int=1)
    assert artifact_key("t1", job, "grid.png") == f"t1/jobs/{job}/grid.png"
    assert artifact_key("t1", job, "trajectory/003.png").endswith("/trajectory/003.png")
    assert image_key("t1", "ab" * 32, "PNG") == f"t1/images/{'ab' * 32}.png"
    assert check_key("t1/jobs/", prefix=True) == "t1/jobs/" and check_key("", prefix=True) == ""
    for bad in BAD_KEYS:
        with pytest.raises(ValueError, match="storage key"):
            check_key(bad)
    with pytest.raises(ValueError, match="storage key"):
        artifact_key("t1", job, "../../other/jobs/x")


def round_trip(storage: Storage) -> None:
    storage.ensure_bucket()
    storage.check()
    job_a, job_b = "t1/jobs/a/", "t1/jobs/b/"
    storage.put(job_a + "grid.png", b"\x89PNG old", "image/png")
    storage.put(job_a + "grid.png", b"\x89PNG new", "image/png")  # a retry overwrites
    storage.put(job_a + "metrics.json", b"{}", "application/json")
    storage.put(job_b + "grid.png", b"b", "image/png")
    assert storage.get(job_a + "grid.png") == b"\x89PNG new"
    assert storage.exists(job_a + "metrics.json") and not storage.exists(job_a + "nope.png")
    assert storage.list(job_a) == [job_a + "grid.png", job_a + "metrics.json"]
    assert storage.list("t1/jobs/") == [*storage.list(job_a), job_b + "grid.png"]
    assert storage.list("t2/") == []
    with pytest.raises(ArtifactNotFound, match="nope.png"):
        storage.get(job_a + "nope.png")
    assert storage.delete_prefix(job_a) == 2
    assert storage.list("t1/") == [job_b + "grid.png"]
    with pytest.raises(ValueError, match="refusing to delete everything"):
        storage.delete_prefix("")
    for bad in BAD_KEYS:
        with pytest.raises(ValueError):
            storage.put(bad, b"x")
        with pytest.raises(ValueError):
            storage.get(bad)


# --- local ---------------------------------------------------------------------------------------
def test_local_round_trip(tmp_path: Path):
    storage = LocalStorage(tmp_path / "artifacts")
    round_trip(storage)
    assert storage.url("t1/jobs/b/grid.png", expires=60) is None  # the API streams it
    assert storage.path("t1/jobs/b/grid.png").read_bytes() == b"b"
    leftovers = [p for p in (tmp_path / "artifacts").rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # temp files were renamed into place
    assert not (tmp_path / "etc").exists()


def test_local_refuses_symlinks_out_of_the_root(tmp_path: Path):
    storage = LocalStorage(tmp_path / "artifacts")
    storage.ensure_bucket()
    (tmp_path / "outside").mkdir()
    (tmp_path / "artifacts" / "t1").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="leaves the storage root"):
        storage.put("t1/x.png", b"x")


def test_local_check_fails_when_the_root_is_missing(tmp_path: Path):
    with pytest.raises(StorageUnavailable, match="missing or not writable"):
        LocalStorage(tmp_path / "absent").check()


# --- S3 through moto ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


def s3(endpoint: str, bucket: str, **kwargs: object) -> S3Storage:
    return S3Storage(endpoint=endpoint, access_key="test-key", secret_key="test-secret",
                     bucket=bucket, secure=False, **kwargs)  # type: ignore[arg-type]  # fmt: skip


def test_s3_round_trip_creates_the_bucket(moto_endpoint: str):
    storage = s3(moto_endpoint, f"b-{uuid.uuid4().hex[:8]}")
    assert not storage.client.bucket_exists(storage.bucket)
    with pytest.raises(StorageUnavailable, match="is missing"):
        storage.check()
    round_trip(storage)
    storage.ensure_bucket()  # again: nothing to do
    stat = storage.client.stat_object(storage.bucket, "t1/jobs/b/grid.png")
    assert stat.content_type == "image/png"


def test_s3_presigned_url_reads_the_object(moto_endpoint: str):
    port = moto_endpoint.rsplit(":", 1)[1]
    storage = s3(moto_endpoint, "presign", public_endpoint=f"http://localhost:{port}")
    storage.ensure_bucket()
    storage.put("t1/jobs/j/grid.png", b"grid bytes", "image/png")
    url = storage.url("t1/jobs/j/grid.png", expires=900)
    assert url is not None
    parts = urlsplit(url)
    assert parts.netloc == f"localhost:{port}"  # signed for the public endpoint
    assert parse_qs(parts.query)["X-Amz-Expires"] == ["900"]
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"grid bytes"
    # the bucket is private: no policy, and an unsigned read is refused
    anonymous = httpx.get(f"http://{moto_endpoint}/presign/t1/jobs/j/grid.png")
    assert anonymous.status_code == 403
    with pytest.raises(S3Error, match="NoSuchBucketPolicy"):
        storage.client.get_bucket_policy("presign")


def test_s3_check_fails_clearly_when_the_server_is_gone():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    storage = s3(f"{host}:{port}", "gone")
    storage.ensure_bucket()
    storage.check()
    server.stop()
    with pytest.raises(StorageUnavailable, match=f"S3 storage at {host}:{port}.*unreachable"):
        storage.check()


def test_storage_from_settings(tmp_path: Path, moto_endpoint: str):
    local = storage_from_settings(fresh_settings(data_dir=tmp_path))
    assert isinstance(local, LocalStorage) and local.root == tmp_path.resolve() / "artifacts"
    settings = fresh_settings(storage_url="s3://from-settings", s3_endpoint=f"http://{moto_endpoint}",
                              s3_access_key="k1", s3_secret_key="s3cr3t")  # fmt: skip
    remote = storage_from_settings(settings)
    assert isinstance(remote, S3Storage) and remote.bucket == "from-settings"
    remote.ensure_bucket()
    remote.check()
