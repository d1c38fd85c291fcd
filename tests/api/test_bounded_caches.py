"""Caches the API fills from what clients send stay bounded: hundreds of refused batches and jobs,
each naming new classes and new model specs, through the real app, leave every cache within its
size and the process's memory flat once the caches are full."""

from __future__ import annotations

import gc
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

from digin.api import sweeps
from digin.api.problems import ProblemError
from digin.api.schemas import BatchCreate
from digin.core import classes, config, params, registry
from digin.service import settings

# the modules a request reaches that may cache (the API's torch-free core, the service layer)
MODULES = (sweeps, registry, classes, params, config, settings)
RSS_TOLERANCE_MB = 12  # allocator noise; today's unbounded caches grew by > 100 MB here
WARM_UP, MEASURED = 150, 300  # requests before the first reading, and between the readings


def caches(module: ModuleType) -> dict[str, Any]:
    """The functools caches of a module's functions (module-level, by name)."""
    return {
        name: value
        for name, value in vars(module).items()
        if callable(value) and hasattr(value, "cache_info") and value.__module__ == module.__name__
    }


def assert_bounded(found: dict[str, Any]) -> None:
    for name, fn in found.items():
        info = fn.cache_info()
        takes_arguments = bool(inspect.signature(fn.__wrapped__).parameters)
        if takes_arguments:  # keyed by arguments: needs a size
            assert info.maxsize is not None, f"{name}: cache without a size"
        if info.maxsize is not None:
            assert info.currsize <= info.maxsize, f"{name}: {info}"
        else:
            assert info.currsize <= 1, f"{name}: {info}"


def rss_mb() -> float:
    gc.collect()
    return float(psutil.Process().memory_info().rss) / 2**20


def zoo(tmp_path: Path, n: int) -> str:
    """A zoo folder of its own whose cnn card names the ten digits (as the bundled one)."""
    folder = tmp_path / "zoos" / f"z{n}"
    folder.mkdir(parents=True)
    card = json.loads((registry.ZOO_DIR / "cnn.json").read_text())
    (folder / "cnn.json").write_text(json.dumps({"class_names": card["class_names"]}))
    return str(folder)


def refused_requests(tmp_path: Path, r: int) -> list[tuple[str, dict[str, Any]]]:
    """Request number `r`: four bodies, each refused (422), each with names and specs of its own."""
    bad = {"guidance": {"iterations": -1}}
    return [
        (  # classes no classifier has, over classifiers whose classes are known
            "/v1/batches",
            {
                "kind": "guided",
                "classes": [f"class-{r}-{i}" for i in range(300)],
                "classifiers": [f"digits:cnn@{zoo(tmp_path, r)}", "digits:cnn"],
            },
        ),
        (  # 'all' over classifiers whose classes are unknown
            "/v1/batches",
            {
                "kind": "guided",
                "classes": "all",
                "classifiers": [f"timm:a_{r}_{j}" for j in range(5)],
            },
        ),
        (  # explicit items with new classes of new classifiers, the last item invalid
            "/v1/batches",
            {
                "kind": "guided",
                "items": [
                    {
                        "custom_id": f"i{i}",
                        "params": {
                            "classifier": f"timm:model_{r}_{i}",
                            "classes": [f"name-{r}-{i}-{k}" for k in range(100)],
                        },
                    }
                    for i in range(5)
                ]
                + [{"custom_id": "bad", "params": {"classes": [0], **bad}}],
            },
        ),
        (  # a job with a new classifier and class, invalid params
            "/v1/jobs",
            {"kind": "guided", "params": {"classifier": f"timm:j{r}", "classes": [f"j{r}"], **bad}},
        ),
    ]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_refused_requests_leave_caches_bounded_and_memory_flat(
    make_client: Callable[..., Any], tmp_path: Path
) -> None:
    client = make_client(auth="off", broker_url="filesystem://")
    found = {f"{m.__name__}.{n}": fn for m in MODULES for n, fn in caches(m).items()}
    assert found  # (the planner's class look-ups at least)

    def send(rounds: range) -> None:
        for r in rounds:
            for path, body in refused_requests(tmp_path, r):
                response = client.post(path, json=body)
                assert response.status_code == 422, (path, response.text[:500])

    send(range(WARM_UP))  # fills the bounded caches (and the allocator's pools)
    assert_bounded(found)
    before = rss_mb()
    send(range(WARM_UP, WARM_UP + MEASURED))
    after = rss_mb()
    assert_bounded(found)
    assert after - before < RSS_TOLERANCE_MB, (
        f"RSS grew from {before:.0f} to {after:.0f} MB over {MEASURED} rounds of refused requests"
    )


def plan(body: dict[str, Any]) -> list[dict[str, str]]:
    """The errors of planning `body` (embedded: any path, no allow-list)."""
    try:
        sweeps.plan_batch(
            BatchCreate.model_validate(body), allow_list=None, allow_paths=True, max_items=1000
        )
    except ProblemError as exc:
        return list(exc.errors or [])
    return []


def test_class_references_that_are_no_cache_keys_are_refused_not_crashing():
    """A class reference is checked before it becomes a cache key: a JSON object or list (not
    hashable) is a 422 like any bad reference, and True is not class 1 (equal as keys)."""
    for ref in ({"a": 1}, [1], True, 1.0, "x" * 201):
        body = {"kind": "guided", "items": [{"custom_id": "a", "params": {"classes": [1, ref]}}]}
        assert [e["field"] for e in plan(body)] == ["items[0].params.classes.1"], ref
    sweeps.class_error(1, "digits:cnn")  # cached as the integer 1
    assert sweeps.class_error(True, "digits:cnn") is not None


def test_a_malformed_spec_with_all_classes_is_a_422_naming_it():
    errors = plan({"kind": "guided", "classes": "all", "params_template": {"classifier": "nope"}})
    assert [e["field"] for e in errors] == ["params_template.classifier"]
    assert "invalid model spec 'nope'" in errors[0]["message"]
    long = "timm:" + "x" * 5000
    errors = plan({"kind": "guided", "classes": "all", "params_template": {"classifier": long}})
    assert [e["field"] for e in errors] == ["params_template.classifier"]
    assert sweeps.class_names(long) is None  # never a cache key


def test_planning_stops_at_the_error_limit():
    """A batch whose every item is bad is refused after MAX_ERRORS of them, not after all."""
    body = {"kind": "guided", "classes": [f"no-{i}" for i in range(5000)],
            "classifiers": [f"digits:cnn@{registry.ZOO_DIR}", "digits:cnn"]}  # fmt: skip
    before = sweeps._class_error.cache_info().misses
    errors = plan(body)
    assert len(errors) == sweeps.MAX_ERRORS
    assert sweeps._class_error.cache_info().misses - before <= sweeps.MAX_ERRORS
