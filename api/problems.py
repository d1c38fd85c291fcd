"""Every error as an RFC 9457 problem (`application/problem+json`), docs/architecture.md §9.2, §9.7.

A problem names what went wrong (`type`, a stable URN per kind of error; `title`; `detail`) and,
for bad input, each offending field with a message that states the limit (`errors`). The
handlers below turn our own `ProblemError`, FastAPI's request validation errors, Starlette's
HTTP errors (404, 405, …) and unexpected exceptions (500, no stack trace) into that shape.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:digin:problem:"
_LOCATIONS = {"body", "query", "path", "header", "cookie"}


class FieldError(BaseModel):
    """One rejected input: where it is (`params.guidance.iterations`, `file`,
    `Idempotency-Key`, …) and what is wrong, with the limit."""

    field: str
    message: str


class Problem(BaseModel):
    """An error response (RFC 9457 problem details)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {
                "type": "urn:digin:problem:validation",
                "title": "Unprocessable Content",
                "status": 422,
                "detail": "1 invalid field",
                "instance": "/v1/jobs",
                "errors": [
                    {
                        "field": "params.guidance.iterations",
                        "message": "Input should be less than or equal to 500",
                    }
                ],
            }
        },
    )

    type: str = Field(description="a URN naming the kind of problem ('about:blank' if none)")
    title: str = Field(description="short summary of the kind of problem (the status phrase)")
    status: int = Field(description="the HTTP status code")
    detail: str | None = Field(None, description="what went wrong in this request")
    instance: str | None = Field(None, description="the request path")
    errors: list[FieldError] | None = Field(None, description="each rejected field (4xx input)")


class ProblemError(Exception):
    """Raise from a route or dependency to answer with a problem.

    `code` becomes the type `urn:digin:problem:<code>`; `extra` adds members to the body."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.errors, self.headers, self.extra = errors, headers or {}, extra


def field_problem(status: int, code: str, field: str, message: str, **kwargs: Any) -> ProblemError:
    """A problem about one field; the detail repeats it as `field: message`."""
    return ProblemError(
        status, code, f"{field}: {message}", errors=[{"field": field, "message": message}], **kwargs
    )


def fields_problem(status: int, code: str, errors: list[dict[str, str]]) -> ProblemError:
    """A problem about several fields ({field, message} each); the detail lists them."""
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return ProblemError(status, code, detail, errors=errors)


def not_found(what: str, ident: object) -> ProblemError:
    return ProblemError(404, "not-found", f"no {what} with id {ident}")


def problem_response(
    request: Request,
    status: int,
    code: str | None,
    detail: str | None,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = Problem(
        type=TYPE_PREFIX + code if code else "about:blank",
        title=_phrase(status),
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=[FieldError(**e) for e in errors] if errors else None,
        **extra,
    )
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}  # RFC 9110 names


def _phrase(status: int) -> str:
    if status in _TITLES:
        return _TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def validation_errors(raw: list[dict[str, Any]]) -> list[dict[str, str]]:
    """FastAPI/pydantic errors as {field, message}: locations without the 'body'/'query'
    prefix (`params.seed`, `limit`), and JSON syntax errors on the field `body`."""
    out = []
    for error in raw:
        loc = [str(part) for part in error.get("loc", ())]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            out.append(
                {"field": "body", "message": f"invalid JSON at position {loc[-1]}: {reason}"}
            )
            continue
        if loc and loc[0] in _LOCATIONS:
            loc = loc[1:] or loc[:1]
        out.append({"field": ".".join(loc) or "body", "message": message})
    return out


# --- handlers -----------------------------------------------------------------------------------
async def _problem_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(
        request, exc.status, exc.code, exc.detail, errors=exc.errors, headers=exc.headers,
        **exc.extra,
    )  # fmt: skip


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = validation_errors(list(exc.errors()))
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem_response(request, 422, "validation", detail, errors=errors)


_HTTP_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    413: "content-too-large",
    415: "unsupported-media-type",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        detail = f"{request.method} is not allowed on {request.url.path}" + (
            f"; allowed: {allowed}" if allowed else ""
        )
    code = _HTTP_CODES.get(exc.status_code, "http-error")
    return problem_response(request, exc.status_code, code, detail, headers=dict(exc.headers or {}))


DATABASE_RETRY_AFTER_S = 5


def database_unavailable(exc: BaseException) -> bool:
    """Is `exc` the database being away (refused or lost connection, server shutting down,
    SQLite locked) rather than a bug (e.g. a missing table)?"""
    if type(exc).__module__.startswith("psycopg"):  # raised by the driver itself (COPY)
        names = {cls.__name__ for cls in type(exc).__mro__}
        return bool(names & {"OperationalError", "InterfaceError"})
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if type(orig).__module__.startswith("psycopg"):
        return True  # psycopg's OperationalError/InterfaceError: the connection or the server
    text = str(orig).lower()
    return "database is locked" in text or "unable to open database" in text


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if database_unavailable(exc):
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(
            request, 503, "database-unavailable",
            "the database is unavailable; retry after the Retry-After seconds",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )  # fmt: skip
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request, 500, "internal", "an unexpected error occurred; it was logged on the server"
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses (the content type and schema are
    set to the problem by `digin.api.app`'s OpenAPI hook)."""
    return {
        status: {"description": _DESCRIPTIONS.get(status, _phrase(status))} for status in statuses
    }


_DESCRIPTIONS = {
    401: "missing, invalid or revoked API key (`WWW-Authenticate: Bearer`)",
    404: "no such resource for this tenant",
    413: "request body or upload over its size limit (the problem names the limit)",
    415: "image format not on the allow-list",
    422: "invalid input; `errors` names each field and its limit",
    429: "a per-tenant cap is reached; retry after `Retry-After` seconds",
    503: "a dependency is down; the problem names it",
}
