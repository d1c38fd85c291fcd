"""Rate limits on failed authentication (service/ratelimit.py), in memory and on the real Redis."""

from __future__ import annotations

import uuid

import pytest
import redis

from digin.service.ratelimit import AuthFailureLimiter
from tests.conftest import worker_redis_url

REDIS_URL = worker_redis_url("redis://127.0.0.1:6379/13")


@pytest.fixture(params=["memory", "redis"])
def storage_uri(request) -> str:
    if request.param == "memory":
        return "memory://"
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    return REDIS_URL


def test_failures_block_the_address_and_the_key_separately(storage_uri):
    limiter = AuthFailureLimiter(storage_uri, "3/minute")
    address, prefix = f"10.0.0.{uuid.uuid4().int % 250}", uuid.uuid4().hex[:8]
    for _ in range(3):
        assert limiter.check(address, prefix) is None
        limiter.failed(address, prefix)
    blocked = limiter.check(address, prefix)
    assert blocked is not None and 1 <= blocked.retry_after <= 60
    # the same key from anywhere else is blocked too; another key from another address is not
    other_address = f"{address}-other"
    by_key = limiter.check(other_address, prefix)
    assert by_key is not None and by_key.reason == "key"
    assert limiter.check(other_address, uuid.uuid4().hex[:8]) is None
    by_address = limiter.check(address, None)
    assert by_address is not None and by_address.reason == "client address"


def test_a_second_limiter_on_redis_shares_the_counts():
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    prefix = uuid.uuid4().hex[:8]
    first, second = (
        AuthFailureLimiter(REDIS_URL, "2/minute"),
        AuthFailureLimiter(REDIS_URL, "2/minute"),
    )
    first.failed(None, prefix)
    second.failed(None, prefix)
    assert first.check(None, prefix) is not None and second.check(None, prefix) is not None


def test_an_unreachable_store_fails_open():
    limiter = AuthFailureLimiter("redis://127.0.0.1:1/0", "1/minute")
    limiter.failed("10.9.9.9", "abcd1234")  # logged, not raised
    assert limiter.check("10.9.9.9", "abcd1234") is None


def test_the_api_answers_429_after_too_many_refused_keys(make_client, auth):
    client = make_client(auth_failure_rate="3/minute")
    good = auth("acme")
    prefix = good["Authorization"].split("_")[1]
    wrong = {"Authorization": f"Bearer dg_{prefix}_{'x' * 40}"}  # a guess at acme's secret
    for _ in range(3):
        response = client.get("/v1/jobs", headers=wrong)
        assert response.status_code == 401
    response = client.get("/v1/jobs", headers=wrong)
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.json()["type"].endswith("too_many_failed_authentications")
    # refused before the key is checked: even the right secret waits, from this address too
    assert client.get("/v1/jobs", headers=good).status_code == 429
    # the same limits hold on the polling path (its own dependency trip)
    assert client.get(f"/v1/jobs/{uuid.uuid4()}", headers=good).status_code == 429


def test_successful_authentications_are_never_counted(make_client, auth):
    client = make_client(auth_failure_rate="2/minute")
    good = auth("acme")
    for _ in range(10):
        assert client.get("/v1/jobs", headers=good).status_code == 200


def test_the_dashboard_login_answers_429_after_too_many_refused_keys(make_client, auth):
    client = make_client(auth_failure_rate="2/minute", secret_key="k" * 16 + "9" * 16 + "z")
    good = auth("acme")["Authorization"].removeprefix("Bearer ")
    statuses = []
    for secret in ["dg_nope_" + "y" * 40, "dg_nope_" + "z" * 40, good]:
        form = client.get("/ui/login").text
        csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        response = client.post(
            "/ui/login", data={"api_key": secret, "csrf": csrf}, follow_redirects=False
        )
        statuses.append(response.status_code)
    assert statuses == [401, 401, 429]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
