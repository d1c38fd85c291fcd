"""Probe class 9: jobs and batches of tenant B naming tenant A's uploaded image.

An uploaded image's id is only meaningful to its tenant: B's job naming A's id must be refused
when it is submitted (a 4xx naming the field), exactly like an id that does not exist, so that
nothing is queued that can only fail and the answer does not tell whether the id is someone
else's. Jobs and batches check this (api/routes/jobs.py, api/routes/batches.py); batches are
probed with the same fields in their template and in explicit items, in the forms that B's own
upload makes valid. Behind the API, workers resolve ids per tenant too (worker/runner.py,
`image_resolver`), so not even an accepted id could read A's bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from tests.adversarial.instance import (
    Instance,
    Tally,
    brief,
    fields_of,
    is_problem,
    png,
)


def job_params(image_id: str) -> list[tuple[str, dict[str, Any], str]]:
    """(kind, params, the field its problem must name) naming `image_id`."""
    return [
        ("counterfactual", {"image_id": image_id, "targets": [1]}, "params.image_id"),
        ("neural_pca", {"class": 1, "images": {"image_ids": [image_id]}},
         "params.images.image_ids.0"),
        ("spurious_score", {"classes": [1], "spurious": {"image_ids": [image_id]}},
         "params.spurious.image_ids.0"),
        ("spurious_score", {"classes": [1], "spurious": "digits:test",
                            "class_images": {"image_ids": [image_id]}},
         "params.class_images.image_ids.0"),
    ]  # fmt: skip


def batch_body(image_id: str, form: int) -> dict[str, Any]:
    """Batch form `form`: the params of `job_params` in a template (even forms, over a classes
    axis where the kind has classes) or in an explicit item (odd forms)."""
    kind, params, _ = job_params(image_id)[form // 2]
    if form % 2:
        return {"kind": kind, "items": [{"custom_id": "x", "params": params}]}
    template = {k: v for k, v in params.items() if k != "classes"}
    body: dict[str, Any] = {"kind": kind, "params_template": template}
    if "classes" in params:
        body["classes"] = params["classes"]
    return body


def foreign_ids(instance: Instance) -> list[str]:
    """A's upload, in its spellings, and an id no tenant has."""
    image = uuid.UUID(instance.fixtures["image_id"])
    return [str(image), str(image).upper(), image.hex, str(uuid.uuid4())]


def test_jobs_naming_another_tenants_image_are_refused(instance: Instance, tally: Tally):
    probe = tally["9"]
    b = instance.tenants["adv-beta"]
    own = instance.request("POST", "/v1/images", headers=b.headers(),
                           files={"file": ("b.png", png(9), "image/png")})  # fmt: skip
    assert own.status_code == 201, own.text
    # control: B's own upload is accepted in the same fields
    for kind, params, _ in job_params(own.json()["id"]):
        response = instance.request("POST", "/v1/jobs", json={"kind": kind, "params": params},
                                    headers=b.headers())  # fmt: skip
        assert response.status_code == 202, (kind, response.text)
    before = instance.rows_of(b.id)
    attempts: list[Callable[[], str | None]] = []
    for image_id in foreign_ids(instance):
        for kind, params, field in job_params(image_id):

            def attempt(kind: str = kind, params: dict = params, field: str = field) -> str | None:
                body = {"kind": kind, "params": params}
                response = instance.request("POST", "/v1/jobs", json=body, headers=b.headers())
                if is_problem(response, 422) and field in fields_of(response):
                    return None
                return f"job {kind} {field}: {brief(response)}"

            attempts.append(attempt)
    failures = probe.run(attempts)
    after = instance.rows_of(b.id)
    probe.record(None if after == before else f"B's rows: {before} -> {after}")
    assert not failures and after == before, failures[:10]


def test_batches_naming_another_tenants_image_are_refused(instance: Instance, tally: Tally):
    probe = tally["9"]
    b = instance.tenants["adv-beta"]
    own = instance.request("POST", "/v1/images", headers=b.headers(),
                           files={"file": ("b.png", png(9), "image/png")})  # fmt: skip
    # the batch forms that B's own upload makes valid (the control): only those are probed
    forms = [form for form in range(2 * len(job_params(""))) if instance.request(
        "POST", "/v1/batches", json=batch_body(own.json()["id"], form), headers=b.headers()
    ).status_code == 202]  # fmt: skip
    assert len(forms) >= 6, forms
    before = instance.rows_of(b.id)
    attempts: list[Callable[[], str | None]] = []
    for image_id in foreign_ids(instance):
        for form in forms:
            body = batch_body(image_id, form)

            def attempt(body: dict = body) -> str | None:
                response = instance.request("POST", "/v1/batches", json=body, headers=b.headers())
                named = [f for f in fields_of(response) if "image_id" in f]
                if is_problem(response, 422) and named:
                    return None
                return f"batch {body}: {brief(response)}"

            attempts.append(attempt)
    failures = probe.run(attempts)
    after = instance.rows_of(b.id)
    probe.record(None if after == before else f"B's rows: {before} -> {after}")
    assert not failures and after == before, failures[:10]
