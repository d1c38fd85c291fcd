"""Health, readiness (database, broker, storage), metrics, OpenAPI, embedded mode, and the
problem+json shape of errors the routes never raise themselves (404, 405, 500)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from digin.api.app import create_app
from digin.service.db import migrate
from digin.service.settings import fresh_settings
from tests.api.conftest import AppFactory
from tests.api.test_app_jobs import GUIDED, assert_problem

Auth = Callable[[str], dict[str, str]]
moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")


def test_healthz_and_readyz(client: TestClient):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_names_a_broker_that_is_down(make_client: AppFactory):
    client = make_client(broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    response = client.get("/readyz")
    body = assert_problem(response, 503)
    assert "broker" in body["detail"] and "database" not in body["detail"]
    assert body["checks"]["database"] == body["checks"]["storage"] == "ok"
    assert "127.0.0.1:1" in body["checks"]["broker"]
    assert response.headers["Retry-After"]


def test_readyz_names_a_storage_that_is_down(make_client: AppFactory):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = make_client(storage_url="s3://ready", s3_endpoint=f"http://{host}:{port}",
                         s3_access_key="test-key", s3_secret_key="test-secret")  # fmt: skip
    client.app.state.services.storage.ensure_bucket()  # type: ignore[attr-defined]
    assert client.get("/readyz").status_code == 200
    server.stop()
    body = assert_problem(client.get("/readyz"), 503)
    assert "storage" in body["detail"] and "unreachable" in body["checks"]["storage"]
    assert body["checks"]["database"] == body["checks"]["broker"] == "ok"


def test_metrics_count_jobs_queues_and_requests(client: TestClient, auth: Auth):
    headers = auth("acme")
    job_id = client.post("/v1/jobs", json=GUIDED, headers=headers).json()["id"]
    client.get(f"/v1/jobs/{job_id}", headers=headers)
    client.post(f"/v1/jobs/{uuid.uuid4()}/cancel", headers=headers)
    client.post("/v1/jobs", json=GUIDED, headers=headers)
    client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in [
        'digin_jobs{kind="guided",status="queued"} 1.0',
        'digin_jobs{kind="guided",status="canceled"} 1.0',
        'digin_jobs{kind="neuron",status="running"} 0.0',
        'digin_queue_depth{queue="interactive"} 1.0',
        'digin_queue_depth{queue="sweep"} 0.0',
        "digin_jobs_scrape_ok 1.0",
        'digin_jobs_created_total{kind="guided"} 2.0',
        'digin_http_requests_total{method="POST",route="/v1/jobs",status="202"} 2.0',
        'digin_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0',
        'requests_total{method="POST",route="/v1/jobs/{job_id}/cancel",status="404"} 1.0',
    ]:
        assert line in text, line
    assert (
        'digin_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/jobs"}'
        in text
    )
    assert job_id not in text  # labels are route templates, never raw paths


def test_openapi_lists_the_routes_and_the_problem_schema(client: TestClient):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path, methods in {
        "/v1/jobs": {"get", "post"},
        "/v1/jobs/{job_id}": {"get"},
        "/v1/jobs/{job_id}/cancel": {"post"},
        "/v1/jobs/{job_id}/artifacts": {"get"},
        "/v1/jobs/{job_id}/artifacts/{name}": {"get"},
        "/v1/images": {"post"},
        "/v1/images/{image_id}": {"get"},
        "/v1/models": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/metrics": {"get"},
    }.items():
        assert methods <= set(paths[path]), path
    create = paths["/v1/jobs"]["post"]
    assert create["operationId"] == "jobs-create_job"
    assert {"202", "401", "413", "422", "429"} <= set(create["responses"])
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for status in ("401", "413", "422", "429"):
        assert create["responses"][status]["content"] == problem
    ok = create["responses"]["202"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/JobPublic"}
    headers = [p for p in create["parameters"] if p["in"] == "header"]
    assert [p["name"] for p in headers] == ["Idempotency-Key"]
    components = schema["components"]
    assert {"type", "title", "status", "detail", "errors"} <= set(
        components["schemas"]["Problem"]["properties"])  # fmt: skip
    assert "HTTPValidationError" not in components["schemas"]
    assert components["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    statuses = components["schemas"]["JobPublic"]["properties"]["status"]["enum"]
    assert statuses == ["queued", "running", "canceling", "succeeded", "failed", "canceled"]
    assert "enum" in components["schemas"]["JobCreate"]["properties"]["kind"]
    assert paths["/v1/images"]["post"]["responses"]["415"]["content"] == problem
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_unknown_routes_and_methods_are_problems(client: TestClient, auth: Auth):
    body = assert_problem(client.get("/v2/jobs"), 404)
    assert body["detail"] == "no route GET /v2/jobs"
    response = client.delete("/v1/jobs")
    body = assert_problem(response, 405)
    assert response.headers["Allow"] in body["detail"]
    headers = auth("acme") | {"Content-Type": "application/json"}
    bad_json = client.post("/v1/jobs", content=b'{"kind": ', headers=headers)
    assert_problem(bad_json, 422, "body", "invalid JSON at position 9")


def test_embedded_mode_acts_as_the_local_tenant(make_client: AppFactory, db_url: str):
    if not db_url.startswith("sqlite"):
        pytest.skip("embedded mode (auth off) is SQLite + the filesystem broker")
    client = make_client(auth="off")
    response = client.post("/v1/jobs", json=GUIDED)
    assert response.status_code == 202
    assert [j["id"] for j in client.get("/v1/jobs").json()["data"]] == [response.json()["id"]]
    assert client.get("/v1/models").status_code == 200


def test_auth_off_refuses_a_non_loopback_host(tmp_path: Path):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        create_app(fresh_settings(data_dir=tmp_path, host=host))
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.com"):
        with pytest.raises(ValueError, match="loopback"):
            create_app(fresh_settings(data_dir=tmp_path, host=host))
    create_app(fresh_settings(data_dir=tmp_path, host="0.0.0.0", auth="on"))


def test_unexpected_errors_are_a_500_problem_without_a_trace(tmp_path: Path):
    settings = fresh_settings(data_dir=tmp_path)  # a database that was never migrated
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.get("/v1/jobs")
    body = assert_problem(response, 500)
    assert body["detail"] == "an unexpected error occurred; it was logged on the server"
    assert "Traceback" not in response.text and "sqlite" not in response.text.lower()
    migrate(settings.database_url)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/jobs").json() == {"data": [], "next_cursor": None}
