"""Probe class 10: refused requests leave nothing behind in the API process.

Every request below is refused and each is different from all the others (a new key, a new
unstorable value, a new model path, a new webhook host, a new id, a new unknown path), so that
anything the API kept per request (a cache keyed by what clients send, a counter per key, a
metrics label per path) would grow with them. After a warm-up, the resident memory of the API
process (psutil) must stay within TOLERANCE of where it was while thousands more are refused.
The refused keys are counted in Redis, not in the process; the caches of batch planning are
bounded (api/sweeps.py); metrics are labelled by route template, never by raw path.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from tests.adversarial.instance import Instance, Tally, brief, fresh_address

WARM_UP = 600
REQUESTS = 3000
TOLERANCE = 24 * 2**20  # bytes of resident memory the process may gain after the warm-up
_n = itertools.count()


def refused_request(instance: Instance) -> Callable[[], str | None]:
    """One request, different from every other one, that must be refused (4xx)."""
    n = next(_n)
    a, b = instance.tenants["adv-alpha"], instance.tenants["adv-beta"]
    unique = uuid.uuid4().hex
    kind = n % 7
    headers = a.headers(fresh_address())
    method, path, kwargs = "POST", "/v1/jobs", {}
    if kind == 0:  # an unknown key
        headers = {"Authorization": f"Bearer dg_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}",
                   "X-Forwarded-For": fresh_address()}  # fmt: skip
        method, path = "GET", "/v1/jobs"
    elif kind == 1:  # an unstorable value
        text = json.dumps({"kind": "guided", "params": {"classes": [1]},
                           "metadata": {unique: f"{unique}\x00"}})  # fmt: skip
        kwargs = {"content": text.encode(), "headers": {"Content-Type": "application/json"}}
    elif kind == 2:  # a model path outside the roots, in a job and in a batch
        spec = f"digits:cnn@/srv/models/{unique}"
        if n % 2:
            kwargs = {"json": {"kind": "guided", "params": {"classes": [1], "classifier": spec}}}
        else:
            path = "/v1/batches"
            kwargs = {"json": {"kind": "guided", "classes": [unique[:8]], "classifiers": [spec]}}
    elif kind == 3:  # a webhook host that must not be resolved
        url = f"https://{unique}.internal/hook" if n % 2 else f"https://10.{n % 250}.0.1/{unique}"
        kwargs = {"json": {"kind": "guided", "params": {"classes": [1]}, "webhook": {"url": url}}}
    elif kind == 4:  # another tenant's (or nobody's) id
        headers = b.headers(fresh_address())
        method, path = "GET", f"/v1/jobs/{uuid.uuid4()}"
    elif kind == 5:  # a path no route has
        method, path = "GET", f"/v1/{unique}/{n}"
    else:  # an unknown class name (a 422 from batch planning)
        path = "/v1/batches"
        kwargs = {"json": {"kind": "guided", "classes": [f"class-{unique}"]}}
    if "headers" in kwargs:
        headers = headers | kwargs.pop("headers")  # type: ignore[operator]

    def attempt() -> str | None:
        response = instance.request(method, path, headers=headers, **kwargs)
        if 400 <= response.status_code < 500 and response.status_code != 429:
            return None
        return f"{method} {path}: {brief(response)}"

    return attempt


def test_refused_requests_keep_the_api_process_flat(instance: Instance, tally: Tally) -> None:
    probe = tally["10"]
    warm = probe.run([refused_request(instance) for _ in range(WARM_UP)], workers=6)
    assert not warm, warm[:5]
    time.sleep(0.5)
    start = instance.rss()
    samples: list[dict[str, Any]] = []
    for _ in range(4):
        failures = probe.run([refused_request(instance) for _ in range(REQUESTS // 4)], workers=6)
        assert not failures, failures[:5]
        samples.append({"requests": probe.attempts, "rss_mib": round(instance.rss() / 2**20, 1)})
    grown = instance.rss() - start
    probe.record(None if grown <= TOLERANCE else f"RSS grew by {grown / 2**20:.1f} MiB")
    print(f"API RSS after warm-up {start / 2**20:.1f} MiB, then {samples}")
    tally.instance.setdefault("memory", {}).update(
        {
            "rss_after_warm_up_mib": round(start / 2**20, 1),
            "samples": samples,
            "tolerance_mib": TOLERANCE / 2**20,
        }  # fmt: skip
    )
    assert grown <= TOLERANCE, (start, samples)
