"""Domain errors: caller mistakes, each naming the bad value and what is allowed.

The API layer maps each class to one HTTP status in a single place (`memos/api/errors.py`).
"""

from __future__ import annotations


class DomainError(Exception):
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(DomainError):
    code = "invalid_argument"


class NotFound(DomainError):
    code = "not_found"


class Forbidden(DomainError):
    code = "forbidden"


class Conflict(DomainError):
    code = "conflict"


class TooLarge(DomainError):
    code = "payload_too_large"


class Unauthorized(DomainError):
    code = "unauthorized"


class Unavailable(DomainError):
    """A part the request needs (e.g. the local model) cannot run now."""

    code = "unavailable"


class PreconditionFailed(DomainError):
    """An `If-Match` precondition did not hold: the thing changed since the caller read it."""

    code = "precondition_failed"


class TooManyRequests(DomainError):
    """Out of capacity for now (a rate, a queue): retry after `retry_after` seconds if known."""

    code = "too_many_requests"

    def __init__(
        self, message: str, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


class QuotaExceeded(TooManyRequests):
    """A per-user quota would be passed; `limit` names the setting. Waiting does not help,
    so there is no `retry_after`: the owner must free something or the operator raise it."""

    code = "quota_exceeded"

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit
