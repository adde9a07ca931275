"""The one place where errors become HTTP responses: `{"error": {"code", "message", ...}}`.

Domain errors (`memcube.errors`) and runtime errors (`kv_runtime.errors`) are mapped to a status
by one table, `STATUS`, walked along the exception's class hierarchy, so a subclass another
module adds (`QuotaExceeded(TooManyRequests)`) gets its parent's status with its own `code`.
Services still translate a runtime error where that adds meaning (marking an activation corrupt);
everything else may propagate here untranslated.

The database going away (PostgreSQL restarted or down, its connections cut, the pool out of
connections, SQLite locked past its timeout) is answered 503 `database_unavailable` with a
`Retry-After`: the request may be sent again. The engine pings each connection it hands out
(`pool_pre_ping`) and replaces the dead ones, so requests succeed again once the database is
back, without a restart.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

import kv_runtime.errors as rt
from memcube.errors import (
    Conflict,
    DomainError,
    Forbidden,
    InvalidArgument,
    NotFound,
    PreconditionFailed,
    QuotaExceeded,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)

log = logging.getLogger("memos.api")

STATUS: dict[type[Exception], int] = {
    DomainError: 400,
    InvalidArgument: 422,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PreconditionFailed: 412,
    TooLarge: 413,
    TooManyRequests: 429,
    Unavailable: 503,
    rt.InvalidArgument: 422,
    rt.ActivationMismatch: 409,
    rt.ActivationCorrupt: 409,
    rt.ModelUnavailable: 503,
    # The bare KVRuntimeError has no meaning for a caller: it is answered as a server error.
}

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


DATABASE_RETRY_AFTER_S = 1


def database_unavailable(exc: BaseException) -> bool:
    """The database could not be reached or could not serve now: worth sending again. Other
    database errors (a constraint, a bad statement) are bugs, answered 500."""
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    return exc.connection_invalidated or isinstance(
        exc, sa_exc.OperationalError | sa_exc.InterfaceError
    )


def database_response() -> JSONResponse:
    seconds = DATABASE_RETRY_AFTER_S
    return error_response(
        503,
        "database_unavailable",
        "the database is unavailable (restarting or unreachable); send the request again",
        headers={"Retry-After": str(seconds)},
        retry_after=seconds,
    )


def status_of(exc: Exception) -> int | None:
    """The HTTP status of a domain or runtime error; None for anything else (a bug)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return None


def error_response(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    headers = dict(headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(
        {"error": {"code": code, "message": message, **extra}},
        status_code=status,
        headers=headers or None,
    )


def mapped_response(exc: Exception) -> JSONResponse | None:
    """The response for a domain or runtime error, or None when `exc` is neither."""
    status = status_of(exc)
    if status is None:
        return None
    code = str(getattr(exc, "code", HTTP_CODES.get(status, "error")))
    message = str(getattr(exc, "message", exc))
    if isinstance(exc, QuotaExceeded):  # waiting does not free a quota: no Retry-After
        return error_response(status, code, message, limit=exc.limit)
    retry_after = getattr(exc, "retry_after", None)
    if status in (429, 503) and retry_after is not None:
        seconds = max(1, math.ceil(retry_after))  # Retry-After takes whole seconds
        return error_response(
            status, code, message, headers={"Retry-After": str(seconds)}, retry_after=seconds
        )
    return error_response(status, code, message)


# OpenAI's error body is {"error": {"message", "type", "param", "code"}}: on the OpenAI-compatible
# routes ours gains `type` and `param`, so clients of either shape read it.
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


def openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _openai_shaped(
    request: Request, response: JSONResponse, param: str | None = None
) -> JSONResponse:
    if not request.url.path.startswith(OPENAI_PATHS):
        return response
    body = json.loads(bytes(response.body))
    body["error"].update(type=openai_type(response.status_code), param=param)
    headers = {
        k: v
        for k, v in response.headers.items()
        if k.lower() not in ("content-length", "content-type")
    }
    return JSONResponse(body, status_code=response.status_code, headers=headers or None)


def _location(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text or "body"


def _body_parse_error(exc: StarletteHTTPException) -> JSONResponse | None:
    """FastAPI answers a body `json.loads` fails on with a bare 400 for anything but a syntax
    error; tell the two real causes apart."""
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        return error_response(
            422, "validation_error", "body: JSON nests too deeply to be read (see metadata limits)"
        )
    if isinstance(cause, UnicodeDecodeError | json.JSONDecodeError):
        return error_response(400, "malformed_json", "request body is not valid UTF-8 JSON")
    return None


def install(app: FastAPI) -> None:
    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        response = mapped_response(exc)
        if response is None:
            return await _unexpected(request, exc)
        return _openai_shaped(request, response)

    app.add_exception_handler(DomainError, _mapped)
    app.add_exception_handler(rt.KVRuntimeError, _mapped)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            response = error_response(400, "malformed_json", "request body is not valid JSON")
            return _openai_shaped(request, response)
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        message = f"{_location(tuple(first.get('loc', ())))}: {first.get('msg')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        details = [
            {"field": _location(tuple(e.get("loc", ()))), "problem": str(e.get("msg"))}
            for e in errors[:20]
        ]
        response = error_response(422, "validation_error", message, details=details)
        return _openai_shaped(request, response, details[0]["field"] if details else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        parse_error = _body_parse_error(exc) if exc.status_code == 400 else None
        if parse_error is not None:
            return _openai_shaped(request, parse_error)
        code = HTTP_CODES.get(exc.status_code, "error")
        response = error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)
        return _openai_shaped(request, response)

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):
            return await _unexpected(request, exc)
        log.warning(
            "database unavailable",
            extra={"fields": {"path": request.url.path, "error": str(exc).splitlines()[0]}},
        )
        return _openai_shaped(request, database_response())

    app.add_exception_handler(sa_exc.DBAPIError, _database)
    app.add_exception_handler(sa_exc.TimeoutError, _database)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if database_unavailable(exc):  # raised outside the routes (a middleware)
            return await _database(request, exc)
        log.exception("unhandled error", extra={"fields": {"path": request.url.path}})
        response = error_response(500, "internal_error", "the server failed; see its log")
        return _openai_shaped(request, response)
