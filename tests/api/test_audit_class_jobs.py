"""An `audit_class` job outside an audit: accepted with explicit images and classes, refused at
submission (422 naming the field, nothing written) when it refers to an audit it is not part of
(`others: "audit"`, `images: {"audit": true}` resolve only for the steps of POST /v1/audits)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from tests.api.test_app_images import Auth
from tests.api.test_app_jobs import assert_problem, job_count


def test_an_explicit_audit_class_job_is_accepted(client: TestClient, auth: Auth):
    params = {"class": 7, "others": [1, 3], "images": {"digits": "test", "per_class": 10}}
    accepted = client.post(
        "/v1/jobs", json={"kind": "audit_class", "params": params}, headers=auth("acme")
    )
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["params"]["others"] == [1, 3]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"class": 7, "others": "audit"}, "params.others"),
        ({"class": 7, "images": {"audit": True}}, "params.images"),
    ],
)
def test_a_reference_to_an_audit_is_refused_outside_one(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session], params, field
):
    before = job_count(sessions)
    refused = client.post(
        "/v1/jobs", json={"kind": "audit_class", "params": params}, headers=auth("acme")
    )
    assert_problem(refused, 422, field, "POST /v1/audits")
    assert job_count(sessions) == before
