"""Artifact storage (docs/architecture.md §9.8): one small interface, a local directory or S3/MinIO.

Keys are relative paths of plain segments (`{tenant}/jobs/{job}/{name}`, see `artifact_key`),
checked against traversal before any use. S3 buckets stay private: clients get presigned GET
URLs minted per read, signed for the public endpoint when one is set. Local storage has no URLs;
the API streams its files.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from digin.service.settings import Settings

MAX_KEY_LENGTH = 1024
_SEGMENT = re.compile(r"^[A-Za-z0-9_=-][A-Za-z0-9._=-]*$")  # no leading dot: no '..', no temp


class StorageError(Exception):
    pass


class ArtifactNotFound(StorageError, KeyError):
    def __str__(self) -> str:
        return f"no object at key {self.args[0]!r}"


class StorageUnavailable(StorageError):
    """The storage cannot be reached or used (readiness fails)."""


def check_key(key: str, *, prefix: bool = False) -> str:
    """`key` if it is a safe relative key (a prefix may be '' or end with '/'), else ValueError."""
    body = key[:-1] if prefix and key.endswith("/") else key
    if prefix and body == "":
        return key
    segments = body.split("/")
    if len(key) > MAX_KEY_LENGTH or not all(_SEGMENT.match(s) for s in segments):
        raise ValueError(
            f"storage key {key[:80]!r}: '/'-separated segments of A-Z a-z 0-9 . _ = -, none "
            f"empty or starting with '.', at most {MAX_KEY_LENGTH} characters"
        )
    return key


def artifact_key(tenant: str | uuid.UUID, job_id: str | uuid.UUID, name: str) -> str:
    """The deterministic key of a job's artifact: a retried job overwrites, never duplicates."""
    return check_key(f"{tenant}/jobs/{job_id}/{name}")


def image_key(tenant: str | uuid.UUID, sha256: str, extension: str) -> str:
    """The key of an uploaded start image (content-addressed: re-uploads land on the same key)."""
    return check_key(f"{tenant}/images/{sha256}.{extension.lower()}")


class Storage(ABC):
    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write (or overwrite) the object at `key`; readers never see a partial object."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ArtifactNotFound if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Sorted keys that start with `prefix` (use a trailing '/' for a folder)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` (not ''); returns how many."""

    @abstractmethod
    def url(self, key: str, *, expires: int) -> str | None:
        """A URL that reads the object for `expires` seconds, or None (stream it instead)."""

    @abstractmethod
    def check(self) -> None:
        """Raise StorageUnavailable with the reason if the storage cannot be used."""

    @abstractmethod
    def ensure_bucket(self) -> None:
        """Create the bucket (directory) if missing."""

    def _delete_prefix_arg(self, prefix: str) -> str:
        if not prefix.strip("/"):
            raise ValueError("delete_prefix: refusing to delete everything (empty prefix)")
        return check_key(prefix, prefix=True)


class LocalStorage(Storage):
    """Objects as files under `root`; writes go to a temp file then are renamed into place."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def path(self, key: str) -> Path:
        """The file of `key` (for streaming); checked to lie under the root."""
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} leaves the storage root")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        check_key(prefix, prefix=True)
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and "/." not in f"/{k}")

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(self._delete_prefix_arg(prefix))
        for key in keys:
            self.path(key).unlink(missing_ok=True)
        return len(keys)

    def url(self, key: str, *, expires: int) -> str | None:
        check_key(key)
        return None

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"local storage {self.root} is missing or not writable")

    def ensure_bucket(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


def _endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """'host:port' and whether to use https, from 'host:port' or 'http(s)://host:port'."""
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in {"http", "https"} or parts.path.strip("/"):
            raise ValueError(f"S3 endpoint {endpoint!r}: http(s)://host[:port], no path")
        return parts.netloc, parts.scheme == "https"
    return endpoint, secure


class S3Storage(Storage):
    """Objects in a private S3/MinIO bucket through the `minio` SDK."""

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        bucket: str,
        secure: bool = True,
        region: str = "us-east-1",
        public_endpoint: str | None = None,
    ) -> None:
        from minio import Minio
        from urllib3 import PoolManager, Retry, Timeout

        def client(endpoint: str) -> Any:
            host, https = _endpoint(endpoint, secure)
            # Few quick retries: an unreachable server fails readiness in about a second.
            http = PoolManager(
                timeout=Timeout(connect=3, read=60),
                retries=Retry(total=2, backoff_factor=0.1, status_forcelist=[500, 502, 503, 504]),
            )
            # region given: presigning needs no network round trip (minio-py#940)
            return Minio(
                host,
                access_key=access_key,
                secret_key=secret_key,
                secure=https,
                region=region,
                http_client=http,
            )

        self.bucket, self.region = bucket, region
        self.endpoint = endpoint
        self.client = client(endpoint)
        # Presigned URLs carry the signing host: sign for the one clients can reach.
        self.public = client(public_endpoint) if public_endpoint else self.client

    def _not_found(self, exc: Exception) -> bool:
        from minio.error import S3Error

        return isinstance(exc, S3Error) and exc.code in {"NoSuchKey", "NotFound", "NoSuchObject"}

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        check_key(key)
        self.client.put_object(
            self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
        )

    def get(self, key: str) -> bytes:
        check_key(key)
        try:
            response = self.client.get_object(self.bucket, key)
        except Exception as exc:
            if self._not_found(exc):
                raise ArtifactNotFound(key) from None
            raise
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        check_key(key)
        try:
            self.client.stat_object(self.bucket, key)
        except Exception as exc:
            if self._not_found(exc):
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        check_key(prefix, prefix=True)
        objects = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
        return sorted(obj.object_name for obj in objects)

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        keys = self.list(self._delete_prefix_arg(prefix))
        errors = list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
        if errors:
            raise StorageError(
                f"could not delete {len(errors)} objects under {prefix!r}: {errors[0]}"
            )
        return len(keys)

    def url(self, key: str, *, expires: int) -> str | None:
        check_key(key)
        url: str = self.public.presigned_get_object(
            self.bucket, key, expires=timedelta(seconds=expires)
        )
        return url

    def check(self) -> None:
        try:
            found = self.client.bucket_exists(self.bucket)
        except Exception as exc:
            raise StorageUnavailable(
                f"S3 storage at {self.endpoint} (bucket {self.bucket!r}) is unreachable: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not found:
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} at {self.endpoint} is missing")

    def ensure_bucket(self) -> None:
        from minio.error import S3Error

        if self.client.bucket_exists(self.bucket):
            return
        try:
            self.client.make_bucket(self.bucket, location=self.region)
        except S3Error as exc:  # another process made it first
            if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise


def storage_from_settings(settings: Settings) -> Storage:
    """The storage the settings name (`DIGIN_STORAGE_URL`)."""
    if settings.storage_backend == "local":
        return LocalStorage(settings.storage_root)
    secret = (settings.s3_access_key, settings.s3_secret_key)
    access_key, secret_key = (s.get_secret_value() if s else None for s in secret)
    return S3Storage(
        endpoint=settings.s3_endpoint,
        access_key=access_key,
        secret_key=secret_key,
        bucket=settings.s3_bucket,
        secure=settings.s3_secure,
        region=settings.s3_region,
        public_endpoint=settings.s3_public_endpoint,
    )
