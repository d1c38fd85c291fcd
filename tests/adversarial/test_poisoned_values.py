"""Probe class 4: values the database cannot store, in every place of a request body.

Three complete bodies (a job with every kind of field, a batch over axes, a batch of explicit
items) are accepted as they are (the controls); then each of their string values, object keys
and numbers in turn is replaced by a poisoned one, the rest left valid:

- strings and keys: a NUL character (PostgreSQL's text and jsonb refuse it) at the start, in the
  middle or at the end, and a lone UTF-16 surrogate (`\\ud800`, `\\udfff`: not Unicode text), as
  the JSON escapes a client may send;
- numbers: NaN, Infinity, -Infinity, 1e999 and -1e999 (not JSON, but Python's parser reads
  them; the database and every client would choke on them).

Each must be a 422 problem naming exactly that place (`params.guidance.lr`, `metadata.a\\u0000b`,
`items.1.params.classes.0`): the body's values are checked after the key and before anything
else (api/deps.py, `unstorable`). A NUL in `Idempotency-Key` (sent raw: clients refuse to)
is refused by the HTTP parser (400) or named by the API (422). Meanwhile the other tenant
submits valid jobs, which must all be accepted (202, never a 500: one tenant's bad row must not
fail another's submission written in the same group), and nothing of the poisoner is written.
"""

from __future__ import annotations

import copy
import json
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tests.adversarial.instance import (
    PUBLIC_HOOK,
    Instance,
    Tally,
    brief,
    fields_of,
    fresh_address,
    is_problem,
)

BIG = "\x01BIG\x01"  # replaced by a number literal too large for a float
JOB: dict[str, Any] = {
    "kind": "guided",
    "params": {
        "classes": ["seven", 3],
        "classifier": "digits:cnn",
        "diffusion": "digits",
        "prompt": "a handwritten digit {class}",
        "negative_prompt": "blurry",
        "images_per_class": 1,
        "clip_templates": "openai",
        "guidance": {"iterations": 1, "lr": 0.01, "guidance_scale": 3.0, "noise_sd": 0.005},
    },
    "seed": 7,
    "priority": 1,
    "metadata": {"run": "r1", "n": 3, "x": 1.5, "ok": True, "none": None},
    "webhook": {"url": PUBLIC_HOOK, "events": ["succeeded", "failed"]},
}
AXES: dict[str, Any] = {
    "kind": "guided",
    "params_template": {"prompt": "a digit {class}", "guidance": {"iterations": 1, "lr": 0.02}},
    "classes": ["seven", 2],
    "classifiers": ["digits:cnn", "digits:mlp"],
    "seeds": [1, 2],
    "images_per_class": 1,
    "priority": 5,
    "metadata": {"sweep": "s", "k": 2.5},
    "webhook": {"url": PUBLIC_HOOK, "events": ["batch.completed", "failed"]},
}
ITEMS: dict[str, Any] = {
    "kind": "guided",
    "params_template": {"guidance": {"iterations": 1}},
    "items": [
        {"custom_id": "a", "params": {"classes": ["seven"], "prompt": "p {class}"}, "seed": 3},
        {"custom_id": "b", "params": {"classes": [2], "guidance": {"lr": 0.05}}},
    ],
    "metadata": {"k": "v", "n": 1},
    "webhook": {"url": PUBLIC_HOOK},
}
STRINGS = ["\x00{}", "{}\x00", "{0}\x00{1}", "\ud800{}", "{}\udfff", "\udc00"]
NUMBERS = [math.nan, math.inf, -math.inf, BIG, "-" + BIG]
KEYS = ["{}\x00", "\x00{}", "{}\ud83d"]


def escaped(key: str) -> str:
    """A key as the problem names it: JSON escapes for what cannot be stored."""
    return json.dumps(key)[1:-1] if any(c == "\x00" or 0xD800 <= ord(c) <= 0xDFFF for c in key) \
        else key  # fmt: skip


def poison(text: str, value: str) -> str:
    half = len(value) // 2
    return text.replace("{0}", value[:half]).replace("{1}", value[half:]).replace("{}", value)


def variants(body: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[Any, str]]:
    """(a copy of `body` with one place poisoned, that place's field name), for every place."""
    if isinstance(body, dict):
        for key, value in body.items():
            for pattern in KEYS:
                bad_key = poison(pattern, key)
                poisoned = {(bad_key if k == key else k): v for k, v in body.items()}
                yield poisoned, ".".join((*path, escaped(bad_key)))
            for inner, field in variants(value, (*path, key)):
                yield {**body, key: inner}, field
    elif isinstance(body, list):
        for i, value in enumerate(body):
            for inner, field in variants(value, (*path, str(i))):
                yield [*body[:i], inner, *body[i + 1 :]], field
    elif isinstance(body, str):
        for pattern in STRINGS:
            yield poison(pattern, body), ".".join(path)
    elif isinstance(body, int | float) and not isinstance(body, bool):
        for number in NUMBERS:
            yield number, ".".join(path)


def as_json(body: Any) -> str:
    """JSON text as a careless client writes it: NaN and Infinity literals, escapes for NUL and
    surrogates, and 1e999 for BIG."""
    text = json.dumps(body, ensure_ascii=True, allow_nan=True)
    return text.replace(f'"-{json.dumps(BIG)[1:-1]}"', "-1e999").replace(json.dumps(BIG), "1e999")


def test_unstorable_values_are_422s_naming_the_field(instance: Instance, tally: Tally) -> None:
    probe = tally["4"]
    a, b = instance.tenants["adv-alpha"], instance.tenants["adv-beta"]
    for path, body in (("/v1/jobs", JOB), ("/v1/batches", AXES), ("/v1/batches", ITEMS)):
        control = instance.request("POST", path, json=body, headers=a.headers())
        assert control.status_code == 202, (path, control.text)
    before_a, before_b = instance.rows_of(a.id), instance.rows_of(b.id)

    attempts: list[Callable[[], str | None]] = []
    for path, template in (("/v1/jobs", JOB), ("/v1/batches", AXES), ("/v1/batches", ITEMS)):
        for poisoned, field in variants(copy.deepcopy(template)):

            def attempt(path: str = path, text: str = as_json(poisoned), field: str = field,
                        ) -> str | None:  # fmt: skip
                headers = a.headers() | {"Content-Type": "application/json"}
                response = instance.request("POST", path, content=text.encode(), headers=headers)
                if is_problem(response, 422) and field in fields_of(response):
                    return None
                return f"{path} {field}: {brief(response)} for {text[:200]}"

            attempts.append(attempt)
    for key in ("\x00", "key\x00", "\x00key", "a\x00b" * 50):
        attempts.append(lambda key=key: idempotency_key(instance, key))

    # meanwhile tenant B submits valid jobs
    stop, answers = threading.Event(), []

    def tenant_b() -> None:
        seed = 0
        while not stop.is_set() or seed < 20:
            body = {"kind": "guided", "params": {"classes": [seed % 10]}, "seed": seed}
            answers.append(instance.request("POST", "/v1/jobs", json=body, headers=b.headers()))
            seed += 1

    threads = [threading.Thread(target=tenant_b) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        failures = probe.run(attempts, workers=6)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    for response in answers:
        probe.record(None if response.status_code == 202 else f"tenant B: {brief(response)}")
    after_a, after_b = instance.rows_of(a.id), instance.rows_of(b.id)
    probe.record(None if after_a == before_a else f"A's rows: {before_a} -> {after_a}")
    assert not failures, failures[:10]
    assert all(r.status_code == 202 for r in answers), [brief(r) for r in answers][:5]
    assert after_a == before_a and after_b[0] == before_b[0] + len(answers)
    assert len(attempts) >= 350, len(attempts)


def idempotency_key(instance: Instance, key: str) -> str | None:
    a = instance.tenants["adv-alpha"]
    body = json.dumps({"kind": "guided", "params": {"classes": [3]}}).encode()
    request = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {a.key}\r\n"
        f"X-Forwarded-For: {fresh_address()}\r\nIdempotency-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1") + body
    answer = instance.raw(request)
    status = answer.split(b"\r\n", 1)[0].split()[1:2]
    if status == [b"400"] or (status == [b"422"] and b"Idempotency-Key" in answer):
        return None
    return f"Idempotency-Key {key!r}: {answer[:300]!r}"
