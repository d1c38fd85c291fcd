"""Probe class 7: jobs and batches over the service's bounds on size and cost.

A job's cost grows with its image side, items, iterations and steps; a batch's with its items.
Their bounds are part of the params' schema (core/params.py, core/config.py, api/schemas.py) and
of the settings (DIGIN_MAX_ITEMS_PER_BATCH, 50 here; DIGIN_MAX_BODY_BYTES, 256 KiB here), and a
request over one of them must be refused when it is submitted, naming the field and the limit,
before anything is queued: a worker must never be handed a job it cannot finish. Each bound is
probed just above the limit and far above it (and with a huge number), for every kind that has
the field; a body over the byte limit is a 413 naming `body`.

Where the service bounds the resolution per diffusion model (a multiple of its native side,
`digin.core.registry.max_resolution`) and a job's estimated cost (DIGIN_MAX_JOB_COST, its
default here: `digin.core.limits`), those are probed too: a resolution just above the model's
bound, and jobs of every generative kind that stay within every field's bound but whose items x
passes x steps x pixels are far above the cap, as jobs, batch items and batch templates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.adversarial.instance import (
    MAX_BODY_BYTES,
    MAX_ITEMS_PER_BATCH,
    Instance,
    Tally,
    brief,
    fields_of,
    is_problem,
)

HUGE = 10**12


def over(limit: int) -> list[int]:
    return [limit + 1, limit * 4, HUGE]


GUIDED: dict[str, Any] = {"classes": [1]}
COUNTERFACTUAL: dict[str, Any] = {"image": "digits:test/0", "targets": [1]}
# (kind, params without the probed field, the field, its limit)
JOB_BOUNDS: list[tuple[str, dict[str, Any], str, int]] = [
    *[(kind, base, "resolution", 2048) for kind, base in
      (("guided", GUIDED), ("neuron", {"neurons": [1]}), ("disagreement", GUIDED),
       ("counterfactual", COUNTERFACTUAL))],
    *[(kind, base, "images_per_class", 64) for kind, base in
      (("guided", GUIDED), ("neuron", {"neurons": [1]}), ("disagreement", GUIDED))],
    *[("guided", GUIDED, f"guidance.{name}", limit) for name, limit in
      (("iterations", 500), ("ddim_steps", 100), ("loss_steps", 100), ("num_cutouts", 64),
       ("max_batch", 64))],
    *[("counterfactual", COUNTERFACTUAL, f"guidance.{name}", limit) for name, limit in
      (("iterations", 500), ("ddim_steps", 100))],
    ("neural_pca", {"class": 1}, "components", 4096),
    ("neural_pca", {"class": 1}, "top_images", 64),
    ("neural_pca", {"class": 1}, "grid_components", 64),
    ("neural_pca", {"class": 1}, "visualization.components", 16),
    ("neural_pca", {"class": 1}, "visualization.images_per_class", 64),
    ("neural_pca", {"class": 1, "images": {"digits": "train"}}, "images.limit", 10_000),
]  # fmt: skip
# (kind, params, field, limit): lists over their length limit
LIST_BOUNDS = [
    ("guided", {}, "classes", 1000),
    ("neuron", {}, "neurons", 1000),
    ("counterfactual", {"image": "digits:test/0", "targets": []}, "targets", 1000),
    ("spurious_score", {"spurious": "digits:test"}, "classes", 1000),
    ("pca_component", {"pca": "x.json"}, "components", 64),
]


def nested(field: str, value: Any) -> dict[str, Any]:
    head, _, rest = field.partition(".")
    return {head: nested(rest, value) if rest else value}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(out.get(key), dict) else value
    return out


def explicit(count: int) -> list[dict[str, Any]]:
    return [{"custom_id": str(i), "params": {"classes": [i % 10]}} for i in range(count)]


def cases() -> list[tuple[str, dict[str, Any], str, str]]:
    """(path, body, the field the problem must name, the limit its message must state)."""
    found = []
    for kind, base, field, limit in JOB_BOUNDS:
        for value in over(limit):
            params = merge(base, nested(field, value))
            found.append(("/v1/jobs", {"kind": kind, "params": params}, f"params.{field}",
                          str(limit)))  # fmt: skip
            if kind == "guided":  # the same bound in a batch's template and in an item
                found.append(("/v1/batches", {"kind": kind, "classes": [1], "params_template":
                              merge({}, nested(field, value))}, "", str(limit)))  # fmt: skip
                found.append(("/v1/batches", {"kind": kind, "items": [{"custom_id": "x",
                              "params": params}]}, "", str(limit)))  # fmt: skip
    for kind, base, field, limit in LIST_BOUNDS:
        for count in (limit + 1, limit * 3):
            params = base | {field: [i % 10 for i in range(count)]}
            named = "" if kind == "counterfactual" else f"params.{field}"  # (a union)
            found.append(("/v1/jobs", {"kind": kind, "params": params}, named, str(limit)))
    items = MAX_ITEMS_PER_BATCH
    batch: list[tuple[dict[str, Any], str, str]] = [
        ({"items": explicit(items + 1)}, "", str(items)),
        ({"items": explicit(items * 4)}, "", str(items)),
        ({"classes": {"start": 0, "stop": 10}, "seeds": list(range(items // 10 + 1))}, "",
         str(items)),
        ({"classes": "all", "classifiers": ["digits:cnn", "digits:mlp", "digits:judge"],
          "seeds": [1, 2]}, "", str(items)),
        ({"classes": [1], "seeds": list(range(1001))}, "seeds", "1000"),
        ({"classes": {"start": 0, "stop": 10_001}}, "", "10000"),
        ({"classes": list(range(10_001))}, "classes", "10000"),
        ({"classes": [1], "classifiers": [f"digits:cnn@/m/{i}" for i in range(101)]},
         "classifiers", "100"),
        ({"classes": [1], "images_per_class": 65}, "images_per_class", "64"),
        ({"classes": [1], "images_per_class": HUGE}, "images_per_class", "64"),
    ]  # fmt: skip
    for extra, field, limit in batch:
        found.append(("/v1/batches", {"kind": "guided"} | extra, field, limit))
    return found


def refused_naming(response: Any, field: str, limit: str) -> bool:
    """A 422 whose errors name `field` (any field when '') with a message stating `limit`."""
    if not is_problem(response, 422):
        return False
    errors = fields_of(response)
    if field:
        message = errors.get(field, "")
    else:
        message = " ".join(f"{k}: {v}" for k, v in errors.items())
    return f"{int(limit):,}" in message or limit in message


def test_bounds_are_422s_naming_the_field_and_the_limit(instance: Instance, tally: Tally):
    probe = tally["7"]
    a = instance.tenants["adv-alpha"]

    before = instance.rows_of(a.id)
    attempts: list[Callable[[], str | None]] = []
    for path, body, field, limit in cases():

        def attempt(path: str = path, body: dict = body, field: str = field,
                    limit: str = limit) -> str | None:  # fmt: skip
            response = instance.request("POST", path, json=body, headers=a.headers())
            if refused_naming(response, field, limit):
                return None
            return f"{path} {field or 'batch'} (limit {limit}): {brief(response)}"

        attempts.append(attempt)

    def oversized_body() -> str | None:
        body = {"kind": "guided", "params": {"classes": [1]}, "metadata": {"pad": "x" * 500},
                "padding": "y" * MAX_BODY_BYTES}  # fmt: skip
        response = instance.request("POST", "/v1/jobs", json=body, headers=a.headers())
        ok = is_problem(response, 413) and str(MAX_BODY_BYTES) in response.text
        return None if ok else f"oversized body: {brief(response)}"

    attempts += [oversized_body] * 3
    failures = probe.run(attempts, workers=4)
    after = instance.rows_of(a.id)
    probe.record(None if after == before else f"jobs, batches: {before} -> {after}")
    assert not failures, failures[:10]
    assert after == before
    assert probe.attempts >= 100, probe.attempts


def model_bound() -> Callable[[str], int] | None:
    """The largest resolution the service allows a diffusion model, where it bounds it per
    model (`digin.core.registry.max_resolution`), else None."""
    try:
        from digin.core.registry import max_resolution
    except ImportError:
        return None
    return lambda spec: int(max_resolution(spec).side)


def max_job_cost() -> int | None:
    """The instance's DIGIN_MAX_JOB_COST (its default: the instance does not set it), where the
    service has that setting, else None."""
    from digin.service.settings import Settings

    field = Settings.model_fields.get("max_job_cost")
    return None if field is None or not field.default else int(field.default)


@pytest.mark.skipif(model_bound() is None, reason="no resolution bound per model here")
def test_resolution_follows_the_diffusion_model(instance: Instance, tally: Tally) -> None:
    from digin.core.registry import list_models

    bound = model_bound()
    assert bound is not None
    probe = tally["7"]
    a = instance.tenants["adv-alpha"]
    root = instance.fixtures["layout"]["root"]
    specs = ["digits", f"digits@{root}/zoo"]
    specs += [m.spec for m in list_models() if m.kind == "diffusion" and m.spec not in specs]
    attempts: list[Callable[[], str | None]] = []
    for spec in specs:
        side = bound(spec)
        if side >= 2048:
            continue  # only the general bound: probed above
        for value in sorted({side + 1, min(2 * side, 2048), 2048}):
            bodies = [
                ("/v1/jobs", {"kind": "guided", "params": {"classes": [1], "diffusion": spec,
                                                           "resolution": value}}),
                ("/v1/jobs", {"kind": "counterfactual", "params": COUNTERFACTUAL | {
                    "diffusion": spec, "resolution": value}}),
                ("/v1/batches", {"kind": "guided", "classes": [1], "params_template": {
                    "diffusion": spec, "resolution": value}}),
            ]  # fmt: skip
            for path, body in bodies:
                field = "params.resolution" if path == "/v1/jobs" else ""

                def attempt(path: str = path, body: dict = body, field: str = field,
                            side: int = side) -> str | None:  # fmt: skip
                    response = instance.request("POST", path, json=body, headers=a.headers())
                    if refused_naming(response, field, str(side)):
                        return None
                    return f"{path} {body}: {brief(response)}"

                attempts.append(attempt)
    assert len(attempts) >= 12, specs
    failures = probe.run(attempts)
    assert not failures, failures[:10]


@pytest.mark.skipif(max_job_cost() is None, reason="no job cost cap here")
def test_jobs_over_the_cost_cap_are_refused(instance: Instance, tally: Tally) -> None:
    probe = tally["7"]
    a = instance.tenants["adv-alpha"]
    classes = list(range(10)) * 100  # 1000 class references (the params' limit)
    sd = "diffusers:stabilityai/stable-diffusion-2-1-base"
    heavy = {"iterations": 500, "ddim_steps": 100}
    jobs: list[tuple[str, dict[str, Any]]] = [
        ("guided", {"classes": classes, "images_per_class": 64, "guidance": {"iterations": 500}}),
        ("guided", {"classes": [1], "diffusion": sd, "resolution": 1024, "images_per_class": 64,
                    "guidance": heavy}),
        ("disagreement", {"classes": classes, "images_per_class": 64,
                          "guidance": {"iterations": 500, "ddim_steps": 100}}),
        ("neuron", {"neurons": list(range(1000)), "images_per_class": 64, "guidance": heavy}),
        ("counterfactual", COUNTERFACTUAL | {"targets": classes, "diffusion": sd,
                                             "resolution": 1024, "guidance": heavy}),
        ("neural_pca", {"class": 1, "visualization": {"components": 16, "images_per_class": 64,
                                                      "guidance": heavy}}),
    ]  # fmt: skip
    attempts: list[Callable[[], str | None]] = []
    for kind, params in jobs:
        bodies = [("/v1/jobs", {"kind": kind, "params": params}, "params")]
        if kind in ("guided", "neuron"):
            bodies += [
                ("/v1/batches", {"kind": kind, "items": [{"custom_id": "x", "params": params}]},
                 ""),
            ]  # fmt: skip
        if kind == "guided" and "diffusion" in params:  # each item of the axes over the cap
            template = {k: v for k, v in params.items() if k != "classes"}
            bodies += [("/v1/batches", {"kind": kind, "classes": [1, 2], "seeds": [1],
                                        "params_template": template}, "")]  # fmt: skip
        for path, body, field in bodies:

            def attempt(path: str = path, body: dict = body, field: str = field) -> str | None:
                response = instance.request("POST", path, json=body, headers=a.headers())
                errors = fields_of(response)
                named = errors.get(field, "") if field else " ".join(errors.values())
                if is_problem(response, 422) and "DIGIN_MAX_JOB_COST" in named:
                    return None
                return f"{path} {str(body)[:200]}: {brief(response)}"

            attempts.append(attempt)
    failures = probe.run(attempts)
    assert not failures, failures[:10]
