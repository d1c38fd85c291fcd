"""API keys (docs/architecture.md §9.6): `dg_<prefix>_<random>` bearer secrets, stored as
SHA-256 only.

The prefix (8 lowercase hex characters) is stored in clear for lookup and display; the random
part carries 256 bits, so a plain SHA-256 is a sound verifier (no slow hash is needed for a
secret that cannot be guessed) and comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_SCHEME = "dg"
_KEY = re.compile(r"^dg_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")


def generate_api_key() -> tuple[str, str]:
    """A new (prefix, secret) pair; the secret is shown once and never stored."""
    prefix = secrets.token_hex(4)
    return prefix, f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"


def key_prefix(secret: str) -> str | None:
    """The prefix of a well-formed secret, else None."""
    match = _KEY.match(secret)
    return match.group(1) if match else None


def hash_api_key(secret: str) -> str:
    """Hex SHA-256 of the whole secret: what the database stores."""
    return hashlib.sha256(secret.encode()).hexdigest()


def verify_api_key(secret: str, stored_hash: str) -> bool:
    """Constant-time check of `secret` against a stored hash."""
    return hmac.compare_digest(hash_api_key(secret), stored_hash)
