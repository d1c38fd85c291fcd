"""Rate limits on failed authentication (docs/architecture.md §9.6): bearer keys on the REST
API and pasted keys on the dashboard's login.

Failures are counted per client address and per key prefix (the public part of a key, so that
guessing the secret of one known key is slowed wherever it comes from) in a moving window with
the `limits` library: in Redis when the service runs on Redis (every API process shares the
counts), in process memory otherwise (embedded mode runs one API process). While a client
address's count is exhausted, its requests are answered 429 with `Retry-After` before any key is
checked. While a key prefix's count is exhausted, a wrong secret for it is answered 429 instead of
401 from anywhere, but the right secret is still served: secrets carry 256 bits, so the prefix's
count must never let whoever knows a prefix lock the key's owner out. A successful
authentication is never counted. A counter store that cannot be
reached fails open (logged): it never locks every client out.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger(__name__)

NAMESPACE = "digin-auth-failures"


@dataclass(frozen=True)
class Blocked:
    """A request refused before its key was checked: wait `retry_after` seconds."""

    retry_after: int
    reason: str  # "client address" or "key"


class AuthFailureLimiter:
    """`check(address, prefix)` before authenticating, `failed(address, prefix)` after a
    refused key. `rate` is a `limits` rate string, e.g. "20/minute"."""

    def __init__(self, storage_uri: str, rate: str) -> None:
        self.rate: RateLimitItem = parse(rate)
        self.storage_uri = storage_uri
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))

    @staticmethod
    def _keys(address: str | None, prefix: str | None) -> Iterable[tuple[str, str]]:
        if address:
            yield "client address", f"addr:{address}"
        if prefix:
            yield "key", f"key:{prefix}"

    def check(self, address: str | None, prefix: str | None) -> Blocked | None:
        """None if the request may try its key, else how long it must wait."""
        try:
            for reason, key in self._keys(address, prefix):
                if not self.limiter.test(self.rate, NAMESPACE, key):
                    reset, _ = self.limiter.get_window_stats(self.rate, NAMESPACE, key)
                    return Blocked(max(1, math.ceil(reset - time.time())), reason)
        except Exception as exc:  # the counter store is down: fail open, never lock everyone out
            log.warning("auth rate limit: cannot read %s: %s", self.storage_uri, exc)
        return None

    def failed(self, address: str | None, prefix: str | None) -> None:
        """Count one refused key against the address and the prefix."""
        try:
            for _, key in self._keys(address, prefix):
                self.limiter.hit(self.rate, NAMESPACE, key)
        except Exception as exc:
            log.warning("auth rate limit: cannot count at %s: %s", self.storage_uri, exc)
