"""Probe class 3: guessing a key's secret.

The API counts refused keys per client address and per key prefix (service/ratelimit.py, in
Redis) and answers 429 with `Retry-After` while either count is at DIGIN_AUTH_FAILURE_RATE (5 per
minute here) (api/deps.py; the dashboard's login form likewise). So, for a key prefix an
attacker knows:

- from one address: 5 refused guesses (401), then 429 for every further request from that
  address, the right key included (an exhausted address is refused before any key is checked);
- from ever new addresses: still 429 for every wrong secret (the prefix's own count), so
  spreading guesses over many machines does not speed them up; the key's owner, with the right
  secret, from an address of its own, is served as usual (a 256-bit secret is not guessed, so
  the prefix's count must not let anyone lock a key's owner out);
- behind the trusted proxy, a client-written first `X-Forwarded-For` entry changes nothing:
  uvicorn takes the right-most untrusted entry, the address the proxy saw;
- REST failures and login failures share the counts;
- another tenant's right key from another address is answered as usual.

Several campaigns run at once, each with its own target key and addresses.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.adversarial.instance import (
    AUTH_FAILURE_RATE,
    CSRF,
    Instance,
    ProbeClass,
    Tally,
    Tenant,
    brief,
    fresh_address,
    is_problem,
)

LIMIT = int(AUTH_FAILURE_RATE.split("/")[0])
GUESSES = 12  # per campaign and attack: LIMIT refused, then blocked
CAMPAIGNS = 4


def wrong_secret(prefix: str) -> str:
    return f"dg_{prefix}_{secrets.token_urlsafe(32)}"


def bearer(secret: str, address: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "X-Forwarded-For": address}


def blocked(response: httpx.Response) -> bool:
    retry = response.headers.get("retry-after", "")
    return is_problem(response, 429) and retry.isdigit() and 1 <= int(retry) <= 60


def refused(response: httpx.Response) -> bool:
    return is_problem(response, 401)


class Campaign:
    """One attacker, one target key."""

    def __init__(self, instance: Instance, probe: ProbeClass, n: int) -> None:
        self.instance, self.probe, self.n = instance, probe, n
        self.target = instance.new_key(f"adv-target-{n}")
        self.prefix = self.target.split("_")[1]
        self.other = instance.tenants["adv-beta"]

    def expect(self, what: str, response: httpx.Response, ok: bool) -> None:
        self.probe.record(None if ok else f"campaign {self.n}, {what}: {brief(response)}")

    def get(self, secret: str, address: str) -> httpx.Response:
        return self.instance.request("GET", "/v1/jobs", headers=bearer(secret, address))

    def run(self) -> None:
        # 1. One address guesses the target's secret: LIMIT refusals, then blocked.
        attacker = fresh_address()
        for i in range(GUESSES):
            response = self.get(wrong_secret(self.prefix), attacker)
            if i < LIMIT:
                self.expect(f"guess {i + 1}", response, refused(response))
            else:
                self.expect(f"guess {i + 1}", response, blocked(response))
        # the right key now: blocked from the attacker's address, served from another address
        response = self.get(self.target, attacker)
        self.expect("right key, attacker's address", response, blocked(response))
        response = self.get(self.target, fresh_address())
        self.expect("right key, another address", response, response.status_code == 200)
        # another tenant's right key: blocked from the attacker's address, fine elsewhere
        response = self.get(self.other.key, attacker)
        self.expect("another key, attacker's address", response, blocked(response))
        response = self.get(self.other.key, fresh_address())
        self.expect("another key, another address", response, response.status_code == 200)
        # 2. Guesses at the blocked prefix from ever new addresses stay blocked.
        for i in range(GUESSES):
            response = self.get(wrong_secret(self.prefix), fresh_address())
            self.expect(f"rotating address {i + 1}", response, blocked(response))
        # 3. Behind the proxy (the last X-Forwarded-For entry), a client-written first entry
        #    does not reset the count: unknown keys (fresh prefixes) from one proxied address.
        proxied = fresh_address()
        for i in range(GUESSES):
            address = f"{fresh_address()}, {proxied}"
            response = self.get(wrong_secret(secrets.token_hex(4)), address)
            ok = refused(response) if i < LIMIT else blocked(response)
            self.expect(f"spoofed first entry {i + 1}", response, ok)
        # 4. The dashboard's login form: LIMIT refusals, then 429, then the right key too.
        self.login_campaign()

    def login(self, key: str, address: str) -> httpx.Response:
        form = self.instance.request("GET", "/ui/login", headers={"X-Forwarded-For": address})
        cookie = form.cookies["digin_session"]
        match = CSRF.search(form.text)
        assert match is not None
        return self.instance.request(
            "POST", "/ui/login", data={"api_key": key, "csrf": match.group(1), "next": "/ui/jobs"},
            headers={"X-Forwarded-For": address, "Cookie": f"digin_session={cookie}"},
        )  # fmt: skip

    def login_campaign(self) -> None:
        target = self.instance.new_key(f"adv-target-{self.n}")
        prefix = target.split("_")[1]
        attacker = fresh_address()

        def login_blocked(response: httpx.Response) -> bool:  # the form again, no session
            retry = response.headers.get("retry-after", "")
            return (
                response.status_code == 429
                and retry.isdigit()
                and "location" not in (response.headers)
            )

        for i in range(GUESSES):
            response = self.login(wrong_secret(prefix), attacker)
            if i < LIMIT:
                self.expect(f"login guess {i + 1}", response, response.status_code == 401)
            else:
                self.expect(f"login guess {i + 1}", response, login_blocked(response))
        response = self.login(target, attacker)
        self.expect("login, right key, attacker's address", response, login_blocked(response))
        response = self.login(target, fresh_address())
        logged_in = response.status_code == 303 and response.headers.get("location") == "/ui/jobs"
        self.expect("login, right key, another address", response, logged_in)
        # the login's counts are the REST API's: the attacker's address is blocked there too
        response = self.get(self.other.key, attacker)
        self.expect("REST after login guesses", response, blocked(response))


def test_guessing_a_keys_secret_is_blocked_after_the_rate(instance: Instance, tally: Tally):
    probe = tally["3"]
    campaigns = [Campaign(instance, probe, n) for n in range(CAMPAIGNS)]
    with ThreadPoolExecutor(max_workers=CAMPAIGNS) as pool:
        list(pool.map(lambda c: c.run(), campaigns))
    assert probe.attempts >= CAMPAIGNS * (4 * GUESSES + 7)
    assert probe.passes == probe.attempts, probe.failures[:10]


def test_successful_keys_are_never_counted(instance: Instance, tally: Tally) -> None:
    """Many right keys from one address: never a 429 (only refusals count)."""
    probe = tally["3"]
    a: Tenant = instance.tenants["adv-alpha"]
    address = fresh_address()
    attempts: list[Callable[[], str | None]] = []
    for _ in range(4 * LIMIT):

        def attempt() -> str | None:
            response = instance.request("GET", "/v1/jobs", headers=a.headers(address))
            return None if response.status_code == 200 else brief(response)

        attempts.append(attempt)
    failures = probe.run(attempts, workers=2)
    assert not failures, failures[:5]
