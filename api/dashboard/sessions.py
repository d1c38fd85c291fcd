"""Dashboard sessions: a signed, expiring cookie in place of the API key (which never appears
in a URL and is never stored by the browser).

POST /ui/login checks the pasted key (`repo.authenticate`) and sets the cookie

    digin_session = v1.<payload>.<signature>
    payload   = base64url(JSON {k: key prefix or null, t: tenant id, e: expiry (unix s), n: nonce})
    signature = base64url(HMAC-SHA256(secret, "v1." + payload))

HttpOnly, SameSite=Strict, Path=/ui, Secure when the request came over https. Every request
re-checks that the key is still active (`repo.dashboard.session_tenant`), so revoking a key
ends its sessions at once. A session without a key (`k` null: auth off, or a visitor of the
login page) only carries the nonce that form tokens derive from.

CSRF: forms that change something (login, logout, cancel) carry `csrf = HMAC(secret, "csrf." +
nonce)` of the visitor's own cookie; SameSite=Strict keeps the cookie off cross-site requests too.

The secret is `DIGIN_SECRET_KEY`; in embedded mode without it, a random key is made once in
`<data_dir>/dashboard.key` (shared by the processes of one data folder). Production without it
has no dashboard login (the login page says so).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from digin.service.settings import Settings

COOKIE = "digin_session"
COOKIE_PATH = "/ui"
VERSION = "v1"
KEY_FILE = "dashboard.key"


def dashboard_secret(settings: Settings) -> bytes | None:
    """The signing key: DIGIN_SECRET_KEY, else (embedded mode) the data folder's key file,
    made on first use; None in production without DIGIN_SECRET_KEY."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    if settings.mode != "embedded":
        return None
    path = Path(settings.data_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two processes starting together keep the first one's key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(48))
    return path.read_text().strip().encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SessionToken:
    key_prefix: str | None  # None: no login (auth off, or not logged in yet)
    tenant_id: uuid.UUID | None
    expires: int  # unix seconds
    nonce: str


class Signer:
    """Makes and checks session cookies and CSRF tokens with one secret."""

    def __init__(self, secret: bytes, lifetime_s: int) -> None:
        self.secret, self.lifetime_s = secret, lifetime_s

    def _sign(self, message: str) -> str:
        return _b64(hmac.new(self.secret, message.encode(), hashlib.sha256).digest())

    def issue(
        self, *, key_prefix: str | None, tenant_id: uuid.UUID | None
    ) -> tuple[str, SessionToken]:
        token = SessionToken(
            key_prefix=key_prefix,
            tenant_id=tenant_id,
            expires=int(time.time()) + self.lifetime_s,
            nonce=secrets.token_urlsafe(16),
        )
        payload = {"k": key_prefix, "t": tenant_id.hex if tenant_id else None,
                   "e": token.expires, "n": token.nonce}  # fmt: skip
        body = f"{VERSION}.{_b64(json.dumps(payload, separators=(',', ':')).encode())}"
        return f"{body}.{self._sign(body)}", token

    def read(self, cookie: str | None) -> SessionToken | None:
        """The cookie's session if its signature holds and it has not expired, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        body, signature = cookie.rsplit(".", 1)
        if not body.startswith(VERSION + ".") or not hmac.compare_digest(
            signature, self._sign(body)
        ):
            return None
        try:
            payload = json.loads(_unb64(body.split(".", 1)[1]))
            token = SessionToken(
                key_prefix=payload["k"],
                tenant_id=uuid.UUID(hex=payload["t"]) if payload["t"] else None,
                expires=int(payload["e"]),
                nonce=str(payload["n"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        return token if token.expires > time.time() else None

    def csrf(self, token: SessionToken) -> str:
        return self._sign(f"csrf.{token.nonce}")

    def check_csrf(self, token: SessionToken | None, value: str | None) -> bool:
        if token is None or not value:
            return False
        return hmac.compare_digest(self.csrf(token), value)
