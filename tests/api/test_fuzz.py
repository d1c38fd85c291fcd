"""Schemathesis against the API's own OpenAPI document: for every operation, requests
generated from the schema (valid and invalid ones, with a valid API key, and without one) must
never get a 5xx, and every 4xx must be an `application/problem+json` problem with `type`,
`title`, `status` equal to the HTTP status. Runs on PostgreSQL + Redis and on SQLite + the
filesystem broker; `DIGIN_FUZZ_EXAMPLES` sets the examples per operation and mode."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

EXAMPLES = int(os.environ.get("DIGIN_FUZZ_EXAMPLES", "10"))
Auth = Callable[[str], dict[str, str]]


def check_response(response, counts: Counter[int]) -> None:
    counts[response.status_code] += 1
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        content_type = response.headers.get("content-type") or [""]  # schemathesis: lists
        assert content_type[0] == "application/problem+json", response.text
        body = response.json()
        assert body["status"] == response.status_code and body["type"] and body["title"], body


def test_fuzzed_requests_get_no_5xx_and_only_problem_errors(client: TestClient, auth: Auth):
    app = client.app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = auth("fuzz")
    counts: Counter[int] = Counter()
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=strategy)
            def run(case) -> None:
                for extra in (headers, {}):  # with a key, and without one (401)
                    response = case.call(headers={**(case.headers or {}), **extra})
                    check_response(response, counts)

            try:
                run()
            except Unsatisfiable:  # nothing to break (e.g. GET /healthz has no inputs)
                assert mode == GenerationMode.NEGATIVE, operation.label
    assert operations >= 10
    assert counts[401] > 0 and sum(n for s, n in counts.items() if s < 300) > 0
    print(f"\nfuzz: {operations} operations, {sum(counts.values())} requests, {dict(counts)}")
