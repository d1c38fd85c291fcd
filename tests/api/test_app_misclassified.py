"""The `misclassified` kind through the API: accepted with its estimate, its uploaded images
checked like every kind's, its folder found as a server path, bad labels a 422 naming the field."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from digin.api.schemas import server_paths
from tests.api.test_app_images import Auth, png, upload
from tests.api.test_app_jobs import assert_problem, job_count


def test_a_misclassified_job_is_accepted_with_its_cost_and_normalised_params(
    client: TestClient, auth: Auth
):
    body = {"kind": "misclassified", "params": {"max_images": 2}}
    accepted = client.post("/v1/jobs", json=body, headers=auth("acme"))
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert job["kind"] == "misclassified"
    assert (
        job["params"]["images"]["digits"] == "test" and job["params"]["images"]["labels"] == "all"
    )
    assert job["params"]["classifier"] == "digits:cnn" and job["params"]["max_images"] == 2


def test_uploads_must_be_the_tenants_and_labels_one_per_image(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session]
):
    mine = [upload(client, auth("acme"), png(seed=s)).json()["id"] for s in (0, 1)]
    theirs = upload(client, auth("globex"), png(seed=2)).json()["id"]
    params = {"images": {"image_ids": mine}, "labels": ["three", 7]}
    accepted = client.post(
        "/v1/jobs", json={"kind": "misclassified", "params": params}, headers=auth("acme")
    )
    assert accepted.status_code == 202, accepted.text
    before = job_count(sessions)
    params = {"images": {"image_ids": [mine[0], theirs]}, "labels": [3, 7]}
    refused = client.post(
        "/v1/jobs", json={"kind": "misclassified", "params": params}, headers=auth("acme")
    )
    assert_problem(refused, 422, "params.images.image_ids.1", "no uploaded image")
    params = {"images": {"image_ids": mine}, "labels": [3]}
    refused = client.post(
        "/v1/jobs", json={"kind": "misclassified", "params": params}, headers=auth("acme")
    )
    assert_problem(refused, 422, None, "one class per image id")
    assert job_count(sessions) == before


def test_the_image_folder_is_a_server_path():
    params = {"images": {"folder": "/data/{class}"}, "classes": [1, 2]}
    assert server_paths(params) == ["params.images.folder"]
