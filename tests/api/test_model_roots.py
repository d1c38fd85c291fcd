"""Model specs naming paths on the server, through the API's batch planning: with a wildcard
allow-list, a path outside the model roots (DIGIN_MODEL_ROOTS; in production by default none but
the bundled zoo) is refused at validation with one message, the same whether the path exists or
not, and nothing read from a file there (a zoo card's class names) reaches the answer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from digin.api.problems import ProblemError
from digin.api.schemas import BatchCreate
from digin.api.sweeps import class_names, plan_batch
from digin.core.registry import PATH_OUTSIDE_ROOTS, ZOO_DIR

WILDCARDS = ["digits", "digits:*", "timm:*", "open_clip:*", "diffusers:*"]
SECRET_NAMES = ["launch-code", "api-token", "zz-private"]
# production mode on the test's SQLite and filesystem broker: S3 artifacts (never reached here)
PRODUCTION = {
    "storage_url": "s3://digin-test",
    "s3_access_key": "AKIATESTKEY",
    "s3_secret_key": "a-real-looking-secret",
    "model_allow_list": WILDCARDS,
}


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """A model root holding a zoo; outside it a folder with a zoo card of secret class names; a
    link from inside the root to that folder."""
    root, secret = tmp_path / "models", tmp_path / "secret"
    (root / "zoo").mkdir(parents=True)
    secret.mkdir()
    card = json.loads((ZOO_DIR / "cnn.json").read_text())
    (root / "zoo" / "cnn.json").write_text(json.dumps({"class_names": card["class_names"]}))
    (secret / "cnn.json").write_text(json.dumps({"class_names": SECRET_NAMES}))
    (secret / "w.safetensors").write_bytes(b"not weights")
    (root / "escape").symlink_to(secret, target_is_directory=True)
    return {"root": root, "secret": secret, "tmp": tmp_path}


def outside(layout: dict[str, Path]) -> list[str]:
    root, secret, tmp = layout["root"], layout["secret"], layout["tmp"]
    return [
        f"digits:cnn@{secret}",  # exists, with a card
        f"digits:cnn@{tmp / 'no-such-folder'}",  # does not exist
        "digits:cnn@/etc",
        f"digits:cnn@{root}/../secret",  # '..' escape
        f"digits:cnn@{root}/escape",  # a link out of the root
        f"timm:resnet18@{secret}/w.safetensors",  # exists
        f"timm:resnet18@{secret}/none.safetensors",  # does not
        "timm:resnet18@/any/file.safetensors",
        f"open_clip:ViT-B-16/{secret}/w.safetensors",
    ]


def assert_refused_alike(response: Any, specs: list[str]) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    by_field = {e["field"]: e["message"] for e in body["errors"]}
    assert by_field == {f"classifiers[{i}]": PATH_OUTSIDE_ROOTS for i in range(len(specs))}
    for word in (*SECRET_NAMES, "not found", "No such file", "exist", "'all' needs"):
        assert word not in response.text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_production_refuses_paths_outside_the_roots_alike(
    make_client: Callable[..., Any], auth: Callable[[str], dict[str, str]], layout: dict[str, Path]
) -> None:
    client = make_client(**PRODUCTION)
    headers = auth("acme")
    specs = outside(layout)
    for classes in ([0, "seven"], ["launch-cod"], "all"):  # named, guessed from a card, all
        body = {"kind": "guided", "classes": classes, "classifiers": specs}
        assert_refused_alike(client.post("/v1/batches", json=body, headers=headers), specs)
    items = [{"custom_id": str(i), "params": {"classifier": s, "classes": ["launch-cod"]}}
             for i, s in enumerate(specs)]  # fmt: skip
    response = client.post("/v1/batches", json={"kind": "guided", "items": items}, headers=headers)
    assert response.status_code == 422
    assert {e["message"] for e in response.json()["errors"]} == {PATH_OUTSIDE_ROOTS}
    assert not any(word in response.text for word in SECRET_NAMES)
    # the bundled zoo is always allowed, by its path too
    body = {"kind": "guided", "classes": [7], "classifiers": [f"digits:cnn@{ZOO_DIR}"]}
    response = client.post("/v1/batches", json=body, headers=headers)
    assert response.status_code == 202, response.text


def plan(body: dict[str, Any], roots: list[Path] | None, *, allow_paths: bool = False) -> Any:
    return plan_batch(
        BatchCreate.model_validate(body), allow_list=WILDCARDS, allow_paths=allow_paths,
        max_items=1000, model_roots=roots,
    )  # fmt: skip


def test_paths_inside_a_configured_root_are_accepted(layout: dict[str, Path]) -> None:
    root = layout["root"]
    body = {"kind": "guided", "classes": "all", "classifiers": [f"digits:cnn@{root}/zoo"]}
    assert len(plan(body, [root]).items) == 10  # the card in the root was read
    body["classifiers"] = [f"timm:resnet18@{root}/zoo/w.safetensors", f"digits:cnn@{ZOO_DIR}"]
    body["classes"] = [3]
    assert len(plan(body, [root]).items) == 2
    with pytest.raises(ProblemError) as refused:
        plan(body, [])  # production's default: the bundled zoo only
    assert [e["field"] for e in refused.value.errors or []] == ["classifiers[0]"]


def test_outside_the_roots_the_card_is_never_read(layout: dict[str, Path]) -> None:
    spec = f"digits:cnn@{layout['secret']}"
    assert class_names(spec, [layout["root"]]) is None
    assert class_names(spec) == tuple(SECRET_NAMES)  # no roots: local use reads it
    for roots in ([layout["root"]], None):  # production default (None → the bundled zoo only)
        with pytest.raises(ProblemError) as refused:
            plan({"kind": "guided", "classes": "all", "classifiers": [spec]}, roots)
        assert refused.value.errors == [{"field": "classifiers[0]", "message": PATH_OUTSIDE_ROOTS}]


def test_embedded_mode_without_roots_keeps_local_paths(layout: dict[str, Path]) -> None:
    body = {"kind": "guided", "classes": "all", "classifiers": [f"digits:cnn@{layout['secret']}"]}
    assert len(plan(body, None, allow_paths=True).items) == len(SECRET_NAMES)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_jobs_refuse_paths_outside_the_roots_alike(
    make_client: Callable[..., Any], auth: Callable[[str], dict[str, str]], layout: dict[str, Path]
) -> None:
    root = layout["root"]
    client = make_client(**PRODUCTION, model_roots=[str(root)])
    headers = auth("acme")
    for spec in outside(layout):
        params = {"classifier": spec, "classes": ["launch-cod"]}
        response = client.post(
            "/v1/jobs", json={"kind": "guided", "params": params}, headers=headers
        )
        assert response.status_code == 422, (spec, response.text)
        assert response.json()["errors"] == [
            {"field": "params.classifier", "message": PATH_OUTSIDE_ROOTS}
        ]
        assert not any(word in response.text for word in SECRET_NAMES)
    for spec in (f"digits:cnn@{root}/zoo", f"digits:cnn@{ZOO_DIR}"):
        params = {"classifier": spec, "classes": [3]}
        response = client.post(
            "/v1/jobs", json={"kind": "guided", "params": params}, headers=headers
        )
        assert response.status_code == 202, response.text
