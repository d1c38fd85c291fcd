"""Jobs and batch items the API refuses before anything is written (docs/architecture.md §9.7):
a resolution above the diffusion model's bound, and an estimated cost above DIGIN_MAX_JOB_COST,
each a 422 naming the field, the limit and (for the cost) the job's estimate."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from digin.service.db import Job
from tests.api.conftest import AppFactory, Broker
from tests.api.test_app_jobs import Auth, assert_problem

SD15 = "diffusers:stable-diffusion-v1-5/stable-diffusion-v1-5"


def job_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_a_resolution_above_the_models_bound_is_a_422_naming_model_and_bound(
    client: TestClient, auth: Auth, broker: Broker, sessions: sessionmaker[Session]
):
    headers = auth("acme")
    # 2048 is inside the params' own limit, 128x the digits model's 16 px
    body = {"kind": "guided", "params": {"classes": [3], "resolution": 2048}}
    assert_problem(client.post("/v1/jobs", json=body, headers=headers), 422,
                   "params.resolution", "'digits'", "above 64", "native 16")  # fmt: skip
    sd = {"kind": "guided", "params": {"classes": [3], "diffusion": SD15, "resolution": 1536,
                                       "classifier": "timm:resnet50.a1_in1k"}}  # fmt: skip
    assert_problem(client.post("/v1/jobs", json=sd, headers=headers), 422,
                   "params.resolution", SD15, "above 1024", "native 512")  # fmt: skip
    vis = {"kind": "neural_pca", "params": {"class": 3, "visualization": {"resolution": 80}}}
    assert_problem(client.post("/v1/jobs", json=vis, headers=headers), 422,
                   "params.visualization.resolution", "above 64")  # fmt: skip
    assert job_count(sessions) == 0 and broker.job_ids() == []
    ok = {"kind": "guided", "params": {"classes": [3], "resolution": 64}}
    assert client.post("/v1/jobs", json=ok, headers=headers).status_code == 202


def test_a_job_above_the_cost_cap_is_a_422_naming_the_cap_and_its_estimate(
    make_client: AppFactory, auth: Auth, broker: Broker, sessions: sessionmaker[Session]
):
    # 10 classes x 2 images x (10 + 1) iterations x 5 DDIM steps x 16² pixels = 281,600
    client = make_client(max_job_cost=281_600)
    headers = auth("acme")
    body = {"kind": "guided", "params": {"classes": list(range(10)), "images_per_class": 2}}
    accepted = client.post("/v1/jobs", json=body, headers=headers)
    assert accepted.status_code == 202 and accepted.json()["cost"] == 281_600
    job = client.get(accepted.headers["Location"], headers=headers).json()
    assert job["cost"] == 281_600  # shown with the job, from its stored params
    body["params"]["images_per_class"] = 3
    problem = assert_problem(
        client.post("/v1/jobs", json=body, headers=headers), 422, "params",
        "DIGIN_MAX_JOB_COST", "2.82e+05", "4.22e+05", "30 items x 11 passes x 5 DDIM steps",
    )  # fmt: skip
    assert problem["type"].endswith("invalid-params")
    assert job_count(sessions) == 1 and len(broker.job_ids()) == 1
    # 0: no cap; the setting reads '1e10' too
    assert make_client(max_job_cost="1e10").app.state.services.settings.max_job_cost == 10**10
    uncapped = make_client(max_job_cost=0)
    assert uncapped.post("/v1/jobs", json=body, headers=headers).status_code == 202


def test_the_default_cap_refuses_a_huge_job_inside_every_params_bound(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session]
):
    """1000 classes x 64 images x 100 DDIM steps on the digits model: 1.8e10 pixel-steps."""
    params = {"classes": list(range(10)) * 100, "images_per_class": 64,
              "guidance": {"ddim_steps": 100}}  # fmt: skip
    body = {"kind": "guided", "params": params}
    assert_problem(client.post("/v1/jobs", json=body, headers=auth("acme")), 422, "params",
                   "64000 items", "1e+10")  # fmt: skip
    assert job_count(sessions) == 0


def test_every_batch_item_is_checked_against_the_cap(
    make_client: AppFactory, auth: Auth, broker: Broker, sessions: sessionmaker[Session]
):
    client = make_client(max_job_cost=281_600)  # 20 digits items of 11 x 5 steps
    headers = auth("acme")
    template = {"images_per_class": 2}
    items = [
        {"custom_id": "small", "params": {"classes": list(range(10))}},
        {"custom_id": "large", "params": {"classes": list(range(10)), "images_per_class": 4}},
    ]
    batch = {"kind": "guided", "params_template": template, "items": items}
    response = client.post("/v1/batches", headers=headers, json=batch)
    body = assert_problem(response, 422, "items[1].params", "DIGIN_MAX_JOB_COST", "40 items")
    assert [e["field"] for e in body["errors"]] == ["items[1].params"]
    # axes: every item has one class; the template's images and iterations make it too costly
    axes = {"kind": "guided", "classes": [1, 2], "images_per_class": 64,
            "params_template": {"guidance": {"iterations": 100}}}  # fmt: skip
    body = assert_problem(client.post("/v1/batches", json=axes, headers=headers), 422,
                          "params_template", "64 items x 101 passes")  # fmt: skip
    assert len(body["errors"]) == 1  # reported once, not per class
    assert job_count(sessions) == 0 and broker.job_ids("sweep") == []
    axes |= {"images_per_class": 8, "params_template": {"guidance": {"iterations": 10}}}
    assert client.post("/v1/batches", json=axes, headers=headers).status_code == 202
