"""A bounded, short-lived cache of successful API-key checks (docs/architecture.md §9.6), used
by the polling path (`GET /v1/jobs/{id}`) and the event streams' checks at each heartbeat;
every other route checks the key on every request.

A poll would otherwise read the key and its tenant from the database and the refused-key
counters from Redis. A secret that passed the check is remembered for `ttl`
seconds, keyed by its SHA-256 (the secret itself is not kept), with a copy of its tenant that no
session holds. A cached secret is served without reading the database or the refused-key
counters: it is a key that passed, not a guess. Only successful checks are cached; a wrong
secret always takes the full check (and is counted).

Revocation: `digin keys revoke` (or any UPDATE of `api_keys.revoked_at`) fires a NOTIFY on
PostgreSQL (migration 0005) that every API process's event listener turns into `revoke(prefix)`,
so a revoked key stops working at once; while the listener is not connected, and on SQLite,
a revoked key keeps working for at most `ttl` seconds. `ttl` 0 turns the cache off.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from typing import NamedTuple

from sqlalchemy import inspect
from sqlalchemy.orm import make_transient_to_detached

from digin.service.db import Tenant


class _Entry(NamedTuple):
    tenant: Tenant
    prefix: str
    expires: float


def detached_copy(tenant: Tenant) -> Tenant:
    """A copy of `tenant`'s column values that belongs to no session (safe to share)."""
    columns = {c.key: getattr(tenant, c.key) for c in inspect(Tenant).column_attrs}
    copy = Tenant(**columns)
    make_transient_to_detached(copy)
    return copy


class KeyCache:
    """secret → tenant for `ttl` seconds, at most `size` entries (least recently used first
    out). Thread-safe: the API checks keys in its thread pool."""

    def __init__(self, ttl: float, size: int = 10_000) -> None:
        if ttl < 0 or size < 1:
            raise ValueError(f"key cache: ttl {ttl} must be >= 0 and size {size} >= 1")
        self.ttl, self.size = ttl, size
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _digest(secret: str) -> bytes:
        return hashlib.sha256(secret.encode()).digest()

    def get(self, secret: str) -> Tenant | None:
        """The tenant of `secret` if it passed the check less than `ttl` seconds ago."""
        if not self.ttl:
            return None
        digest = self._digest(secret)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry.expires <= time.monotonic():
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return entry.tenant

    def put(self, secret: str, prefix: str, tenant: Tenant) -> None:
        """Remember a secret that just passed the check."""
        if not self.ttl:
            return
        entry = _Entry(detached_copy(tenant), prefix, time.monotonic() + self.ttl)
        with self._lock:
            self._entries[self._digest(secret)] = entry
            self._entries.move_to_end(self._digest(secret))
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def revoke(self, prefix: str) -> None:
        """Forget the key with this prefix ("" forgets every key)."""
        with self._lock:
            if not prefix:
                self._entries.clear()
                return
            for digest in [d for d, e in self._entries.items() if e.prefix == prefix]:
                del self._entries[digest]

    def __len__(self) -> int:
        return len(self._entries)
