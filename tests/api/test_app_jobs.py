"""/v1/jobs over HTTP, on PostgreSQL + Redis and on SQLite + the filesystem broker: submit,
idempotency, bad input, caps, reading, pages, cancel, tenant isolation and auth."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from digin.service import repo
from digin.service.db import Job
from tests.api.conftest import AppFactory, Broker

Auth = Callable[[str], dict[str, str]]
GUIDED = {"kind": "guided", "params": {"classes": [3]}}


def job_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def assert_problem(response, status: int, field: str | None = None, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["type"].startswith("urn:digin:problem:")
    if field is not None:
        fields = [e["field"] for e in body["errors"]]
        assert field in fields, body
        message = next(e["message"] for e in body["errors"] if e["field"] == field)
        for word in words:
            assert word in message, message
    return body


# --- submit ---------------------------------------------------------------------------------------
def test_submit_stores_normalised_params_and_enqueues(
    client: TestClient, auth: Auth, broker: Broker, sessions: sessionmaker[Session]
):
    response = client.post(
        "/v1/jobs", json=GUIDED | {"metadata": {"run": "a1"}}, headers=auth("acme")
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}" == job["urls"]["self"]
    assert int(response.headers["Retry-After"]) > 0
    assert (job["status"], job["queue"], job["attempts"], job["metadata"]) == (
        "queued", "interactive", 0, {"run": "a1"})  # fmt: skip
    assert isinstance(job["seed"], int) and job["enqueued_at"] is not None
    assert "celery" not in response.text.lower() and "task_id" not in job
    # defaults filled in: the stored params say exactly what will run
    params = job["params"]
    assert params["classes"] == [3] and params["classifier"] == "digits:cnn"
    assert params["diffusion"] == "digits" and "iterations" in params["guidance"]
    with sessions() as session:
        row = session.get_one(Job, uuid.UUID(job["id"]))
        assert row.params == params and row.seed == job["seed"] and row.enqueued_at is not None
    # the message reached the broker's queue, after the commit
    assert broker.job_ids("interactive") == [job["id"]]
    if broker.redis is not None:
        assert broker.redis.llen("interactive") == 1
    else:
        assert len(list(broker.folder.glob("*.interactive.msg"))) == 1


def test_given_seed_is_kept_and_default_seeds_differ(client: TestClient, auth: Auth):
    headers = auth("acme")
    given = client.post("/v1/jobs", json=GUIDED | {"seed": 1234}, headers=headers).json()
    assert given["seed"] == 1234
    seeds = {client.post("/v1/jobs", json=GUIDED, headers=headers).json()["seed"] for _ in range(3)}
    assert len(seeds) == 3


def test_idempotency_key_replays_the_job_or_conflicts(
    client: TestClient, auth: Auth, broker: Broker, sessions: sessionmaker[Session]
):
    headers = auth("acme") | {"Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json=GUIDED, headers=headers)
    again = client.post("/v1/jobs", json=GUIDED, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["seed"] == first.json()["seed"]
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    # the same request spelled with its defaults is the same request
    spelled = {"kind": "guided", "params": first.json()["params"]}
    assert client.post("/v1/jobs", json=spelled, headers=headers).json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json=GUIDED | {"priority": 5}, headers=headers)
    assert_problem(other, 422, "Idempotency-Key", "order-42", "different request")
    too_long = auth("acme") | {"Idempotency-Key": "k" * 256}
    assert_problem(client.post("/v1/jobs", json=GUIDED, headers=too_long), 422, "Idempotency-Key")
    assert job_count(sessions) == 1 and len(broker.job_ids()) == 1  # one row, one message


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (GUIDED | {"params": {"classes": [3], "guidance": {"iterations": 501}}},
         "params.guidance.iterations", ["500"]),
        (GUIDED | {"params": {"classes": [3], "classifier": "nosuch:model"}},
         "params.classifier", ["unknown scheme", "nosuch"]),
        (GUIDED | {"params": {"classes": [3], "classifier": "digits"}},
         "params.classifier", ["diffusion model", "takes a classifier"]),
        (GUIDED | {"params": {"classes": [3], "resolution": 4096}}, "params.resolution", ["2048"]),
        (GUIDED | {"params": {}}, "params.classes", ["required"]),
        (GUIDED | {"params": {"classes": [3], "extra": 1}}, "params.extra", ["not permitted"]),
        ({"kind": "vce", "params": {}}, "kind", ["guided", "neuron"]),
        (GUIDED | {"seed": -1}, "seed", ["greater than or equal to 0"]),
        (GUIDED | {"priority": 10}, "priority", ["9"]),
        (GUIDED | {"webhook": "https://example.com"}, "webhook", ["valid dictionary"]),
        (GUIDED | {"metadata": {"k" * 65: 1}}, f"metadata.{'k' * 65}.[key]", ["64"]),
        (b'{"kind": "guided", "params": {"classes": [3]}, "metadata": {"score": NaN}}',
         "metadata.score", ["finite"]),
        (GUIDED | {"metadata": {"note": "x" * 501}}, "metadata.note", ["at most 500"]),
        (GUIDED | {"metadata": {"tags": ["a"]}}, "metadata.tags", ["a string, a number"]),
    ],
)  # fmt: skip
def test_bad_input_is_a_422_naming_the_field_and_writes_nothing(
    client: TestClient, auth: Auth, broker: Broker, sessions: sessionmaker[Session],
    body: dict | bytes, field: str, words: list[str],
):  # fmt: skip
    if isinstance(body, bytes):  # not JSON that httpx would write
        headers = auth("acme") | {"Content-Type": "application/json"}
        response = client.post("/v1/jobs", content=body, headers=headers)
    else:
        response = client.post("/v1/jobs", json=body, headers=auth("acme"))
    assert_problem(response, 422, field, *words)
    assert job_count(sessions) == 0 and broker.job_ids() == []


def test_models_off_the_allow_list_are_refused(
    make_client: AppFactory, auth: Auth, sessions: sessionmaker[Session]
):
    client = make_client(model_allow_list=["digits", "digits:cnn"])
    headers = auth("acme")
    assert client.post("/v1/jobs", json=GUIDED, headers=headers).status_code == 202
    body = GUIDED | {"params": {"classes": [3], "classifier": "timm:resnet50.a1_in1k"}}
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert_problem(response, 422, "params.classifier", "timm:resnet50.a1_in1k", "allow-list")
    disagreement = {"kind": "disagreement", "params": {"classes": [1]}}  # classifier1 default
    response = client.post("/v1/jobs", json=disagreement, headers=headers)
    assert_problem(response, 422, "params.classifier1", "digits:cnn-spurious")
    assert job_count(sessions) == 1
    models = client.get("/v1/models", headers=headers).json()
    allowed = {m["spec"]: m["allowed"] for m in models["models"]}
    assert allowed["digits:cnn"] and not allowed["digits:cnn-spurious"]


def test_oversized_body_is_a_413_before_anything_is_written(
    make_client: AppFactory, auth: Auth, broker: Broker, sessions: sessionmaker[Session]
):
    client = make_client(max_body_bytes=4096)
    big = GUIDED | {"metadata": {"note": "x" * 500}, "params": {"classes": [3] * 2000}}
    response = client.post("/v1/jobs", json=big, headers=auth("acme"))
    body = assert_problem(response, 413, "body", "4096", "max_body_bytes")
    assert body["limit"] == 4096
    # streamed without a Content-Length: counted as it arrives
    chunks = (b'{"kind": "guided", "params": {"classes": [' + b"3," * 3000 + b"3]}}",)
    response = client.post("/v1/jobs", content=iter(chunks),
                           headers=auth("acme") | {"Content-Type": "application/json"})  # fmt: skip
    assert_problem(response, 413, "body", "max_body_bytes")
    assert job_count(sessions) == 0 and broker.job_ids() == []


def test_queued_cap_is_a_429_with_retry_after(
    make_client: AppFactory, auth: Auth, sessions: sessionmaker[Session]
):
    client = make_client(max_queued_per_tenant=2)
    headers = auth("acme")
    for _ in range(2):
        assert client.post("/v1/jobs", json=GUIDED, headers=headers).status_code == 202
    response = client.post("/v1/jobs", json=GUIDED, headers=headers)
    body = assert_problem(response, 429)
    assert "max_queued_per_tenant=2" in body["detail"] and body["limit"] == 2
    assert int(response.headers["Retry-After"]) > 0
    assert client.post("/v1/jobs", json=GUIDED, headers=auth("globex")).status_code == 202
    assert job_count(sessions) == 3


def test_a_broker_that_is_down_still_gets_a_202_and_leaves_the_job_queued(
    make_client: AppFactory, auth: Auth, sessions: sessionmaker[Session]
):
    client = make_client(broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    response = client.post("/v1/jobs", json=GUIDED, headers=auth("acme"))
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued" and job["enqueued_at"] is None  # the reaper re-sends it
    with sessions() as session:
        assert session.get_one(Job, uuid.UUID(job["id"])).enqueued_at is None
    metrics = client.get("/metrics").text
    assert 'digin_enqueue_failures_total{queue="interactive"} 1.0' in metrics


# --- read, list, cancel ---------------------------------------------------------------------------
def test_get_and_list_with_cursor_pages_and_filters(client: TestClient, auth: Auth):
    headers = auth("acme")
    ids = [client.post("/v1/jobs", json=GUIDED, headers=headers).json()["id"] for _ in range(5)]
    neuron = {"kind": "neuron", "params": {"neurons": [0]}}
    ids.append(client.post("/v1/jobs", json=neuron, headers=headers).json()["id"])
    got = client.get(f"/v1/jobs/{ids[0]}", headers=headers)
    assert got.status_code == 200 and got.json()["id"] == ids[0]
    assert got.headers["Retry-After"]  # not finished: poll again later
    seen, url, pages = [], "/v1/jobs?limit=2", 0
    while url:
        page = client.get(url, headers=headers)
        assert page.status_code == 200
        body = page.json()
        seen += [j["id"] for j in body["data"]]
        pages += 1
        if body["next_cursor"]:
            assert f"cursor={body['next_cursor']}" in page.headers["Link"]
            assert page.headers["Link"].endswith('rel="next"')
            url = f"/v1/jobs?limit=2&cursor={body['next_cursor']}"
        else:
            assert "Link" not in page.headers
            url = ""
    assert seen == ids[::-1] and pages == 3  # newest first, no gaps or duplicates
    kinds = client.get("/v1/jobs?kind=neuron", headers=headers).json()["data"]
    assert [j["id"] for j in kinds] == [ids[-1]]
    client.post(f"/v1/jobs/{ids[1]}/cancel", headers=headers)
    canceled = client.get("/v1/jobs?status=canceled&status=running", headers=headers).json()
    assert [j["id"] for j in canceled["data"]] == [ids[1]]
    assert client.get(f"/v1/jobs?batch_id={uuid.uuid4()}", headers=headers).json()["data"] == []
    assert_problem(client.get("/v1/jobs?status=done", headers=headers), 422, "status.0")
    assert_problem(client.get("/v1/jobs?kind=vce", headers=headers), 422, "kind")
    assert_problem(client.get("/v1/jobs?limit=501", headers=headers), 422, "limit", "500")
    assert_problem(client.get("/v1/jobs?cursor=garbage", headers=headers), 422, "cursor")
    assert_problem(client.get(f"/v1/jobs/{uuid.uuid4()}", headers=headers), 404)
    assert_problem(client.get("/v1/jobs/not-a-uuid", headers=headers), 422, "job_id")


def test_cancel_queued_and_running_jobs(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session]
):
    headers = auth("acme")
    queued = client.post("/v1/jobs", json=GUIDED, headers=headers).json()
    response = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=headers)
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["cancel_requested"]) == ("canceled", True)
    assert response.json()["finished_at"] is not None
    running = client.post("/v1/jobs", json=GUIDED, headers=headers).json()
    with sessions() as session:
        claimed = repo.claim_job(session, job_id=uuid.UUID(running["id"]), worker={"host": "w1"})
        assert claimed is not None
        session.commit()
    response = client.post(f"/v1/jobs/{running['id']}/cancel", headers=headers)
    assert response.json()["status"] == "canceling" and response.json()["worker"]["host"] == "w1"
    again = client.post(f"/v1/jobs/{running['id']}/cancel", headers=headers)  # idempotent
    assert again.status_code == 200 and again.json()["status"] == "canceling"
    assert_problem(client.post(f"/v1/jobs/{uuid.uuid4()}/cancel", headers=headers), 404)


def test_a_job_shows_progress_error_and_result_without_storage_keys(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session]
):
    headers = auth("acme")
    job_id = uuid.UUID(client.post("/v1/jobs", json=GUIDED, headers=headers).json()["id"])
    with sessions() as session:
        job = repo.claim_job(session, job_id=job_id, worker={"host": "w1", "gpu": "H100"})
        assert job is not None
        repo.heartbeat(session, job_id=job_id, attempt=1,
                       progress={"step": 3, "total": 10, "stage": "guiding"})  # fmt: skip
        session.commit()
    body = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert body["status"] == "running" and body["progress"] == {
        "step": 3, "total": 10, "stage": "guiding"}  # fmt: skip
    assert body["worker"] == {"host": "w1", "gpu": "H100"} and body["attempts"] == 1
    result = {"summary": {"items": [{"p": 0.9}]}, "artifacts": [
        {"name": "grid.png", "key": f"acme/jobs/{job_id}/grid.png", "content_type": "image/png",
         "size": 10}]}  # fmt: skip
    with sessions() as session:
        assert repo.finish_job(session, job_id=job_id, attempt=1, result=result)
        session.commit()
    response = client.get(f"/v1/jobs/{job_id}", headers=headers)
    body = response.json()
    assert body["status"] == "succeeded" and "Retry-After" not in response.headers
    assert body["result"] == {"summary": {"items": [{"p": 0.9}]}, "artifacts": [
        {"name": "grid.png", "content_type": "image/png", "size": 10}]}  # fmt: skip
    assert "acme/jobs" not in response.text  # storage keys stay inside
    failed_id = uuid.UUID(client.post("/v1/jobs", json=GUIDED, headers=headers).json()["id"])
    with sessions() as session:
        repo.claim_job(session, job_id=failed_id, worker={"host": "w1"})
        repo.fail_job(session, job_id=failed_id, attempt=1,
                      error=repo.job_error("gpu_oom", "CUDA out of memory"))  # fmt: skip
        session.commit()
    failed = client.get(f"/v1/jobs/{failed_id}", headers=headers).json()
    assert failed["error"] == {
        "code": "gpu_oom",
        "message": "CUDA out of memory",
        "retryable": False,
    }


# --- tenants and auth -----------------------------------------------------------------------------
def test_another_tenants_job_is_a_404_and_absent_from_lists(client: TestClient, auth: Auth):
    acme, globex = auth("acme"), auth("globex")
    job = client.post("/v1/jobs", json=GUIDED, headers=acme).json()
    for method, path in [("get", f"/v1/jobs/{job['id']}"), ("post", f"/v1/jobs/{job['id']}/cancel"),
                         ("get", f"/v1/jobs/{job['id']}/artifacts"),
                         ("get", f"/v1/jobs/{job['id']}/artifacts/grid.png")]:  # fmt: skip
        assert_problem(client.request(method, path, headers=globex), 404)
    assert client.get("/v1/jobs", headers=globex).json()["data"] == []
    assert client.get(f"/v1/jobs/{job['id']}", headers=acme).json()["status"] == "queued"
    # the same idempotency key in two tenants makes two jobs
    key = {"Idempotency-Key": "shared"}
    a = client.post("/v1/jobs", json=GUIDED, headers=acme | key).json()["id"]
    b = client.post("/v1/jobs", json=GUIDED, headers=globex | key).json()["id"]
    assert a != b


def test_missing_invalid_and_revoked_keys_are_401(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session]
):
    headers = auth("acme")
    prefix = headers["Authorization"].split("_")[1]
    cases = {
        "missing": {},
        "not bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
        "malformed": {"Authorization": "Bearer nope"},
        "unknown": {"Authorization": f"Bearer dg_{prefix}_{'A' * 43}"},
    }
    for name, bad in cases.items():
        response = client.get("/v1/jobs", headers=bad)
        assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), name
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    with sessions() as session:
        assert repo.revoke_api_key(session, prefix=prefix)
        session.commit()
    response = client.post("/v1/jobs", json=GUIDED, headers=headers)
    body = assert_problem(response, 401)
    assert "revoked" in body["detail"] and 'error="invalid_token"' in response.headers[
        "WWW-Authenticate"]  # fmt: skip
    assert job_count(sessions) == 0
    for path in ("/v1/models", "/v1/images/" + str(uuid.uuid4())):
        assert_problem(client.get(path), 401)


def test_server_path_specs_need_the_allow_list_in_production():
    from digin.api.schemas import check_model_spec

    spec = "digits:cnn@/etc"
    assert check_model_spec(spec, "classifier", None) is None  # embedded mode: the user's machine
    message = check_model_spec(spec, "classifier", None, allow_paths=False)
    assert message and "path on the server" in message and "DIGIN_MODEL_ALLOW_LIST" in message
    assert check_model_spec(spec, "classifier", ["digits:*"], allow_paths=False) is None
    assert check_model_spec("digits:cnn", "classifier", None, allow_paths=False) is None


def test_nested_model_specs_and_server_paths_are_found():
    from digin.api.schemas import model_specs, server_paths

    params = {
        "classifier": "digits:cnn",
        "visualization": {"diffusion": "diffusers:/srv/sd", "classifiers": ["timm:a", "timm:b"]},
        "images": {"folder": "/etc/{class}"},
        "spurious": "digits:test",
        "class_images": "/data/sevens",
        "pca": "/tmp/result.json",
    }
    assert model_specs(params) == [
        ("params.classifier", "digits:cnn", "classifier"),
        ("params.visualization.diffusion", "diffusers:/srv/sd", "diffusion"),
        ("params.visualization.classifiers.0", "timm:a", "classifier"),
        ("params.visualization.classifiers.1", "timm:b", "classifier"),
    ]
    assert server_paths(params) == ["params.images.folder", "params.class_images", "params.pca"]
