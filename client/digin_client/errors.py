"""The client's errors: one class per kind of failure, each HTTP error carrying the server's
problem+json fields (RFC 9457: `status`, `type`, `title`, `detail`, `instance`, and `errors`,
each rejected field with its message).

    DiginError                      anything the client raises on purpose
    ├── APIError                    the server answered with an error status
    │   ├── BadRequestError         400
    │   ├── AuthenticationError     401  (no key, a wrong or revoked key)
    │   ├── PermissionDeniedError   403
    │   ├── NotFoundError           404  (also another tenant's job)
    │   ├── ConflictError           409
    │   ├── PayloadTooLargeError    413
    │   ├── UnsupportedMediaError   415
    │   ├── UnprocessableError      422  (bad params: `.field` names the first bad one)
    │   ├── RateLimitError          429  (`.retry_after` in seconds)
    │   └── ServerError             5xx
    ├── DiginConnectionError        no answer (connection refused, timeout, broken stream)
    └── WaitTimeoutError            `wait`/`wait_batch` ran out of time (`.last`: the last read)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx


@dataclass(frozen=True)
class FieldError:
    """One rejected input: where (`params.guidance.iterations`, `items[17].params.seed`,
    `Idempotency-Key`) and what is wrong, with the limit."""

    field: str
    message: str


class DiginError(Exception):
    """Base of every error the client raises on purpose."""


class APIError(DiginError):
    """The server answered with an error status; its problem+json body is parsed into fields.

    A body that is not a problem (e.g. a proxy's HTML page) still gives `status` and `title`,
    and its first 500 characters as `detail`."""

    def __init__(
        self,
        status: int,
        *,
        type: str = "about:blank",
        title: str = "",
        detail: str | None = None,
        instance: str | None = None,
        errors: list[FieldError] | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.instance = instance
        self.errors = errors or []
        self.body = body or {}
        self.headers = headers or {}
        super().__init__(self._message())

    @property
    def field(self) -> str | None:
        """The first rejected field, if the server named one."""
        return self.errors[0].field if self.errors else None

    @property
    def code(self) -> str | None:
        """The problem type's last part (`urn:digin:problem:invalid-params` -> `invalid-params`)."""
        if self.type.startswith("urn:"):
            return self.type.rsplit(":", 1)[-1]
        return None

    def _message(self) -> str:
        head = f"{self.status} {self.title}".strip()
        if self.detail:
            return f"{head}: {self.detail}"
        if self.errors:
            return f"{head}: " + "; ".join(f"{e.field}: {e.message}" for e in self.errors)
        return head

    def to_dict(self) -> dict[str, Any]:
        """The problem as the server sent it (or as reconstructed from a non-problem body)."""
        return self.body or {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "errors": [{"field": e.field, "message": e.message} for e in self.errors] or None,
        }


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class PermissionDeniedError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class PayloadTooLargeError(APIError):
    pass


class UnsupportedMediaError(APIError):
    pass


class UnprocessableError(APIError):
    pass


class RateLimitError(APIError):
    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked to wait (its `Retry-After`), if it said."""
        return parse_retry_after(self.headers.get("retry-after"))


class ServerError(APIError):
    pass


class DiginConnectionError(DiginError):
    """The request got no answer: connection refused or reset, a timeout, a broken stream."""


class WaitTimeoutError(DiginError, TimeoutError):
    """`wait`/`wait_batch` ran out of time before the job or batch finished; `last` is the last
    state read (a Job or a Batch)."""

    def __init__(self, message: str, last: Any) -> None:
        super().__init__(message)
        self.last = last


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaError,
    422: UnprocessableError,
    429: RateLimitError,
}


def error_from_response(response: httpx.Response) -> APIError:
    """The APIError subclass for an error response, with its problem fields. The body must
    have been read (`response.read()` on a streamed response)."""
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    headers = {k.lower(): v for k, v in response.headers.items()}
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = None
    if not isinstance(body, dict):
        text = response.text.strip()[:500] or None
        return cls(status, title=response.reason_phrase, detail=text, headers=headers)
    errors = [
        FieldError(field=str(e.get("field", "")), message=str(e.get("message", "")))
        for e in body.get("errors") or []
        if isinstance(e, dict)
    ]
    detail = body.get("detail")
    return cls(
        status,
        type=str(body.get("type") or "about:blank"),
        title=str(body.get("title") or response.reason_phrase),
        detail=str(detail) if detail is not None else None,
        instance=body.get("instance"),
        errors=errors,
        body=body,
        headers=headers,
    )


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
