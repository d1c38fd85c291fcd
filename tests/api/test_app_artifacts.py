"""Artifacts of a succeeded job: listed with fresh URLs on every read and downloaded, from a
local directory (streamed by the API) and from S3 (moto's server, the real minio client:
a 307 to a presigned URL)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.storage import artifact_key
from tests.api.conftest import AppFactory
from tests.api.test_app_jobs import GUIDED, assert_problem

Auth = Callable[[str], dict[str, str]]
moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")

FILES = {
    "grid.png": (b"\x89PNG grid bytes", "image/png"),
    "item_000.png": (b"\x89PNG item 0", "image/png"),
    "result.json": (b'{"items": []}', "application/json"),
}


def succeeded_job(client: TestClient, headers: dict[str, str], sessions: sessionmaker[Session],
                  tenant: str = "acme") -> str:  # fmt: skip
    """A job run as the worker would: claimed, its files stored under the artifact keys, and
    finished with `result = {summary, artifacts}`."""
    job_id = uuid.UUID(client.post("/v1/jobs", json=GUIDED, headers=headers).json()["id"])
    storage = client.app.state.services.storage  # type: ignore[attr-defined]
    artifacts = []
    for name, (data, content_type) in FILES.items():
        key = artifact_key(tenant, job_id, name)
        storage.put(key, data, content_type)
        artifacts.append({"name": name, "key": key, "content_type": content_type,
                          "size": len(data)})  # fmt: skip
    with sessions() as session:
        assert repo.claim_job(session, job_id=job_id, worker={"host": "w1"}) is not None
        result = {"summary": {"items": [{"p": 0.97}]}, "artifacts": artifacts}
        assert repo.finish_job(session, job_id=job_id, attempt=1, result=result)
        session.commit()
    return str(job_id)


def test_local_artifacts_are_listed_and_streamed(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session]
):
    headers = auth("acme")
    pending = client.post("/v1/jobs", json=GUIDED, headers=headers).json()["id"]
    listing = client.get(f"/v1/jobs/{pending}/artifacts", headers=headers).json()
    assert (listing["status"], listing["data"]) == ("queued", [])
    assert_problem(client.get(f"/v1/jobs/{pending}/artifacts/grid.png", headers=headers), 404)

    job_id = succeeded_job(client, headers, sessions)
    listing = client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers)
    assert listing.status_code == 200
    data = {a["name"]: a for a in listing.json()["data"]}
    assert set(data) == set(FILES)
    grid = data["grid.png"]
    assert grid["url"] == f"/v1/jobs/{job_id}/artifacts/grid.png" and grid["expires_at"] is None
    assert (grid["content_type"], grid["size"]) == ("image/png", len(FILES["grid.png"][0]))
    for name, (content, content_type) in FILES.items():
        response = client.get(data[name]["url"], headers=headers)
        assert response.status_code == 200 and response.content == content
        assert response.headers["content-type"].startswith(content_type)
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/nope.png", headers=headers), 404)
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/..%2F..%2Fx", headers=headers), 404)
    other = auth("globex")
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts", headers=other), 404)
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/grid.png", headers=other), 404)


def test_keys_outside_the_jobs_folder_are_never_served(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session]
):
    headers = auth("acme")
    victim = succeeded_job(client, auth("globex"), sessions, tenant="globex")
    job_id = uuid.UUID(client.post("/v1/jobs", json=GUIDED, headers=headers).json()["id"])
    stolen = {"name": "grid.png", "key": artifact_key("globex", victim, "grid.png"),
              "content_type": "image/png", "size": 1}  # fmt: skip
    with sessions() as session:
        repo.claim_job(session, job_id=job_id, worker={"host": "w1"})
        repo.finish_job(
            session, job_id=job_id, attempt=1, result={"summary": {}, "artifacts": [stolen]}
        )
        session.commit()
    assert client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()["data"] == []
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/grid.png", headers=headers), 404)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


def s3_settings(endpoint: str, bucket: str) -> dict[str, object]:
    return {"storage_url": f"s3://{bucket}", "s3_endpoint": f"http://{endpoint}",
            "s3_access_key": "test-key", "s3_secret_key": "test-secret"}  # fmt: skip


def test_s3_artifacts_get_fresh_presigned_urls_and_redirects(
    make_client: AppFactory, auth: Auth, sessions: sessionmaker[Session], moto_endpoint: str
):
    bucket = f"art-{uuid.uuid4().hex[:8]}"
    client = make_client(**s3_settings(moto_endpoint, bucket), url_expiry_seconds=120)
    client.app.state.services.storage.ensure_bucket()  # type: ignore[attr-defined]
    headers = auth("acme")
    job_id = succeeded_job(client, headers, sessions)
    first = client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()["data"]
    grid = next(a for a in first if a["name"] == "grid.png")
    parts = urlsplit(grid["url"])
    assert parts.netloc == moto_endpoint and parts.path == f"/{bucket}/acme/jobs/{job_id}/grid.png"
    assert parse_qs(parts.query)["X-Amz-Expires"] == ["120"] and grid["expires_at"] is not None
    assert httpx.get(grid["url"]).content == FILES["grid.png"][0]
    # minted per read from the stored keys: no URL is ever stored
    later = client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()["data"]
    assert {a["name"] for a in later} == set(FILES)
    with sessions() as session:
        job = repo.get_job(session, tenant_id=repo.get_tenant(session, name="acme").id,
                           job_id=uuid.UUID(job_id))  # fmt: skip
        assert job is not None and "X-Amz" not in str(job.result)
    # the download route redirects to a presigned URL; following it gives the bytes
    response = client.get(f"/v1/jobs/{job_id}/artifacts/item_000.png", headers=headers,
                          follow_redirects=False)  # fmt: skip
    assert response.status_code == 307 and response.headers["Cache-Control"] == "no-store"
    location = response.headers["Location"]
    assert "X-Amz-Signature" in location
    fetched = httpx.get(location)
    assert fetched.status_code == 200 and fetched.content == FILES["item_000.png"][0]
    assert fetched.headers["content-type"] == "image/png"
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth("globex")), 404)
