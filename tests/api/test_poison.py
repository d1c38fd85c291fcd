"""Values PostgreSQL cannot store (a NUL character, a lone UTF-16 surrogate, a number that is
not finite) are a 422 naming the field on every route that writes a JSON body, checked after
the key and before anything else; and no tenant's bad value ever fails another tenant's
submission written in the same group (api/submissions.py). On PostgreSQL + Redis and SQLite +
the filesystem broker."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from digin.api.schemas import unstorable
from digin.api.submissions import JobWriter
from digin.service import repo
from digin.service.db import Batch, Job
from tests.api.conftest import AppFactory, Broker
from tests.api.helpers import refusing_jobs
from tests.api.test_app_jobs import assert_problem

Auth = Callable[[str], dict[str, str]]
JSON = {"Content-Type": "application/json"}
NUL, SURROGATE, NOT_FINITE = "NUL character", "lone UTF-16 surrogate", "finite number"

# (route, the body as JSON text: escapes and literals exactly as a client may send them, the
# field the problem names, what its message says)
JOB = '{"kind": "guided", "params": {"classes": [3]%s}%s}'
BATCH = '{"kind": "guided", %s}'
CASES = [
    ("/v1/jobs", '{"kind": "guided\\u0000"}', "kind", NUL),
    ("/v1/jobs", JOB % (', "classifier": "digits:cnn\\u0000"', ""), "params.classifier", NUL),
    ("/v1/jobs", '{"kind": "guided", "params": {"classes": ["cat\\u0000"]}}',
     "params.classes.0", NUL),
    ("/v1/jobs", '{"kind": "guided", "params": {"classes": ["\\ud800"]}}',
     "params.classes.0", SURROGATE),
    ("/v1/jobs", JOB % (', "guidance": {"grad_clip": Infinity}', ""),
     "params.guidance.grad_clip", NOT_FINITE),
    ("/v1/jobs", JOB % (', "guidance": {"grad_clip": NaN}', ""),
     "params.guidance.grad_clip", NOT_FINITE),
    ("/v1/jobs", JOB % (', "guidance": {"lr": -Infinity}', ""),
     "params.guidance.lr", NOT_FINITE),
    ("/v1/jobs", JOB % (', "guidance": {"lr": 1e999}', ""), "params.guidance.lr", NOT_FINITE),
    ("/v1/jobs", JOB % ("", ', "metadata": {"a\\u0000b": 1}'), "metadata.a\\u0000b", NUL),
    ("/v1/jobs", JOB % ("", ', "metadata": {"run": "x\\udc00"}'), "metadata.run", SURROGATE),
    ("/v1/jobs", JOB % ("", ', "metadata": {"score": NaN}'), "metadata.score", NOT_FINITE),
    ("/v1/jobs", JOB % ("", ', "metadata": {"\\ud83d": true}'), "metadata.\\ud83d", SURROGATE),
    ("/v1/jobs", JOB % ("", ', "webhook": {"url": "https://example.com/\\u0000"}'),
     "webhook.url", NUL),
    ("/v1/jobs", JOB % ("", ', "webhook": {"url": "https://example.com/", "events": '
                            '["failed\\ud800"]}'), "webhook.events.0", SURROGATE),
    ("/v1/batches", BATCH % '"items": [{"custom_id": "a\\u0000"}]', "items.0.custom_id", NUL),
    ("/v1/batches", BATCH % '"items": [{"custom_id": "a"}, {"custom_id": "b", "params": '
                            '{"classes": ["\\udfff"]}}]', "items.1.params.classes.0", SURROGATE),
    ("/v1/batches", BATCH % '"items": [{"custom_id": "a", "seed": Infinity}]',
     "items.0.seed", NOT_FINITE),
    ("/v1/batches", BATCH % '"classes": [1], "params_template": {"guidance": {"grad_clip": NaN}}',
     "params_template.guidance.grad_clip", NOT_FINITE),
    ("/v1/batches", BATCH % '"classes": [1], "classifiers": ["digits:cnn\\u0000"]',
     "classifiers.0", NUL),
    ("/v1/batches", BATCH % '"classes": ["zero\\u0000"]', "classes.0", NUL),
    ("/v1/batches", BATCH % '"classes": [1], "seeds": [-Infinity]', "seeds.0", NOT_FINITE),
    ("/v1/batches", BATCH % '"classes": [1], "metadata": {"k": "\\ud800"}', "metadata.k",
     SURROGATE),
    ("/v1/batches", BATCH % '"classes": [1], "webhook": {"url": "https://example.com/\\u0000"}',
     "webhook.url", NUL),
]  # fmt: skip


def count(sessions: sessionmaker[Session], model: type[Any]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_the_check_names_every_place_and_passes_what_can_be_stored():
    assert unstorable({"a": ["ok", 1, 2.5, None, True, {"é": "😀 \\u0000 is text"}]}) == []
    errors = unstorable(
        {"a": {"b\x00": [float("nan"), "\ud800", {"k": float("-inf")}]}, "c": float("inf")}
    )
    assert [e["field"] for e in errors] == ["a.b\\u0000", "a.b\\u0000.0", "a.b\\u0000.1",
                                            "a.b\\u0000.2.k", "c"]  # fmt: skip
    assert unstorable("\x00")[0]["field"] == "body"
    assert len(unstorable(["\x00"] * 1000)) == 20  # a problem names the first 20


@pytest.mark.parametrize(("path", "text", "field", "words"), CASES)
def test_each_unstorable_value_is_a_422_naming_its_field_and_writes_nothing(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session], path, text, field, words
):
    response = client.post(path, content=text.encode(), headers=auth("acme") | JSON)
    body = assert_problem(response, 422, field, words)
    assert len(body["errors"]) == 1, body
    assert count(sessions, Job) == count(sessions, Batch) == 0


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches"])
def test_an_idempotency_key_with_a_nul_is_a_422_naming_the_header(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session], path: str
):
    body = {"kind": "guided", "params": {"classes": [3]}} if path == "/v1/jobs" else {
        "kind": "guided", "classes": [1]}  # fmt: skip
    headers = auth("acme") | {"Idempotency-Key": "key\x00"}
    assert_problem(client.post(path, json=body, headers=headers), 422, "Idempotency-Key", NUL)
    assert count(sessions, Job) == 0


def test_every_route_with_a_json_body_checks_its_values_after_the_key(
    client: TestClient, auth: Auth
):
    """Found from the OpenAPI document, so that a route added later is held to it too."""
    operations = [
        (path, method)
        for path, item in client.app.openapi()["paths"].items()
        for method, operation in item.items()
        if "application/json" in operation.get("requestBody", {}).get("content", {})
    ]
    assert ("/v1/jobs", "post") in operations and ("/v1/batches", "post") in operations
    for path, method in operations:
        bad_key = {"Authorization": "Bearer dg_00000000_" + "A" * 43}
        response = client.request(method, path, content=b'{"x": "\\u0000"}', headers=bad_key | JSON)
        assert_problem(response, 401)
        response = client.request(method, path, content=b'{"x": "\\u0000"}',
                                  headers=auth("acme") | JSON)  # fmt: skip
        assert_problem(response, 422, "x", NUL)


# --- the key first --------------------------------------------------------------------------------
ORACLE = "dns-oracle.example.com"


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The host names the API looks up of ORACLE's domain (answered: no such host)."""
    seen: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(ORACLE):
            seen.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches"])
def test_a_bad_key_is_a_401_before_the_body_is_validated_or_any_host_resolved(
    client: TestClient, auth: Auth, sessions: sessionmaker[Session], lookups: list[str], path
):
    good = auth("acme")
    revoked = auth("acme")
    with sessions() as session:
        assert repo.revoke_api_key(session, prefix=revoked["Authorization"].split("_")[1])
        session.commit()
    prefix = good["Authorization"].split("_")[1]
    keys = {
        "missing": {},
        "malformed": {"Authorization": "Bearer nope"},
        "unknown": {"Authorization": f"Bearer dg_{prefix}_{'A' * 43}"},
        "revoked": revoked,
    }
    webhook = {"url": f"https://probe.{ORACLE}/hook"}
    valid = {"kind": "guided", "params": {"classes": [3]}} if path == "/v1/jobs" else {
        "kind": "guided", "classes": [1]}  # fmt: skip
    bodies = {
        "resolves a host": valid | {"webhook": webhook},
        "invalid": {"kind": "nope", "seed": -1, "webhook": webhook},
        "unstorable": valid | {"webhook": webhook, "metadata": {"k": "\x00"}},
    }
    for key_name, key in keys.items():
        for body_name, body in bodies.items():
            response = client.post(path, json=body, headers=key)
            assert response.status_code == 401, (key_name, body_name, response.text)
    assert lookups == []
    assert count(sessions, Job) == count(sessions, Batch) == 0
    # with a good key the same body is validated: the host is looked up (and does not resolve)
    response = client.post(path, json=bodies["resolves a host"], headers=good)
    assert_problem(response, 422, "webhook.url")
    assert lookups == [f"probe.{ORACLE}"]


# --- one group, many tenants ----------------------------------------------------------------------
def post_as_one_group(
    client: TestClient, requests: list[tuple[dict[str, str], Any]]
) -> tuple[list[httpx.Response], list[int]]:
    """POST /v1/jobs for every (headers, body: a dict, or JSON text) at once, while the writer
    is held on a first valid request until every other one is either answered or waiting for
    the writer: those that reach it are written as ONE group. The responses in order, and the
    sizes of the groups written."""
    writer: JobWriter = client.app.state.services.writer
    held, groups = threading.Event(), []

    def on_group(size: int) -> None:
        groups.append(size)
        if len(groups) == 1:
            held.wait(30)

    writer.on_group = on_group
    plug: list[httpx.Response] = []
    first = threading.Thread(target=lambda: plug.append(post(client, *requests[0])))
    first.start()
    wait_for(lambda: groups == [1])
    answers: dict[int, httpx.Response] = {}
    threads = [threading.Thread(target=lambda i=i, r=r: answers.update({i: post(client, *r)}))
               for i, r in enumerate(requests[1:], 1)]  # fmt: skip
    for thread in threads:
        thread.start()
    wait_for(lambda: writer._queue.qsize() + len(answers) == len(threads))
    held.set()
    for thread in [first, *threads]:
        thread.join(60)
    return [plug[0], *(answers[i] for i in range(1, len(requests)))], groups


def post(client: TestClient, headers: dict[str, str], body: Any) -> httpx.Response:
    if isinstance(body, str):
        return client.post("/v1/jobs", content=body.encode(), headers=headers | JSON)
    return client.post("/v1/jobs", json=body, headers=headers)


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def job(seed: int) -> dict[str, Any]:
    return {"kind": "guided", "params": {"classes": [3]}, "seed": seed}


POISONED = [
    JOB % (', "guidance": {"grad_clip": Infinity}', ""),
    JOB % ("", ', "metadata": {"run": "\\u0000"}'),
    JOB % ("", ', "metadata": {"run": "\\ud800"}'),
    JOB % (', "guidance": {"lr": NaN}', ""),
    '{"kind": "guided", "params": {"classes": ["cat\\u0000"]}}',
    JOB % ("", ', "webhook": {"url": "https://example.com/\\u0000"}'),
]


def test_one_tenants_unstorable_values_never_fail_another_tenants_submissions(
    make_client: AppFactory, auth: Auth, sessions: sessionmaker[Session], broker: Broker, db_url
):
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite stores these values; PostgreSQL refuses them")
    client = make_client()
    acme, globex = auth("acme"), auth("globex")
    valid = [(acme if i % 2 else globex, job(i)) for i in range(10)]
    poisoned = [(globex if i % 2 else acme, text) for i, text in enumerate(POISONED)]
    mixed = [valid[0], *(x for pair in zip(valid[1:], poisoned, strict=False) for x in pair),
             *valid[len(poisoned) + 1 :]]  # fmt: skip
    responses, groups = post_as_one_group(client, mixed)
    by_seed = {}
    for (_, body), response in zip(mixed, responses, strict=True):
        if isinstance(body, dict):
            assert response.status_code == 202, response.text
            by_seed[body["seed"]] = response.json()
        else:
            assert_problem(response, 422)
    assert groups == [1, len(valid) - 1]  # every valid one after the first: one group
    with sessions() as session:
        assert sorted(session.scalars(select(Job.seed))) == sorted(by_seed)
    assert sorted(broker.job_ids()) == sorted(j["id"] for j in by_seed.values())


def test_a_row_the_database_refuses_is_a_500_for_its_request_only(
    make_client: AppFactory, auth: Auth, sessions: sessionmaker[Session], engine: Engine
):
    started = make_client()  # (the same app; this client answers a 500 instead of raising)
    client = TestClient(started.app, raise_server_exceptions=False)
    acme, globex = auth("acme"), auth("globex")
    requests = [(acme, job(1)), (acme, job(2)), (globex, job(666)), (globex, job(3)),
                (acme, job(4))]  # fmt: skip
    with refusing_jobs(engine, seed=666):
        responses, groups = post_as_one_group(client, requests)
    assert groups == [1, 4]
    assert [r.status_code for r in responses] == [202, 202, 500, 202, 202]
    assert_problem(responses[2], 500)
    with sessions() as session:
        assert sorted(session.scalars(select(Job.seed))) == [1, 2, 3, 4]
