"""Bad input that tries to reach outside a tenant's artifacts: artifact names with
path traversal, in every encoding a client can send, on a succeeded job with real files beside
it; none reads a file (404 problem, never a 200, a redirect or a 500). Plain `..` segments are
resolved by HTTP clients before they send (RFC 3986), so they go percent-encoded here. The other
tenant, key and upload cases live in test_app_jobs.py, test_app_artifacts.py and
test_app_images.py; the fuzz over the whole OpenAPI document in test_fuzz.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from tests.api.test_app_artifacts import FILES, succeeded_job

Auth = Callable[[str], dict[str, str]]

TRAVERSALS = [
    "../grid.png",
    "..%2Fgrid.png",
    "%2e%2e%2fgrid.png",
    "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "..%5c..%5cgrid.png",
    "....//grid.png",
    "item_000.png%00.json",
    "%2Fetc%2Fpasswd",
    ".hidden",
    "grid.png%2F..%2F..%2Fresult.json",
    "%252e%252e%252fgrid.png",  # double-encoded
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_artifact_names_with_path_traversal_read_nothing(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session], name: str
):
    acme = auth("acme")
    victim = succeeded_job(client, auth("globex"), sessions, tenant="globex")
    job_id = succeeded_job(client, acme, sessions)
    assert client.get(f"/v1/jobs/{job_id}/artifacts/grid.png", headers=acme).status_code == 200
    for path in (f"/v1/jobs/{job_id}/artifacts/{name}", f"/v1/jobs/{victim}/artifacts/{name}"):
        response = client.get(path, headers=acme, follow_redirects=False)
        assert response.status_code in (404, 422), (path, response.status_code)
        assert response.headers["content-type"] == "application/problem+json"
        assert all(data not in response.content for data, _ in FILES.values())
