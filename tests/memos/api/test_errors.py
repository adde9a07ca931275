"""One table maps domain and runtime errors to HTTP (`memos/api/errors.py`)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import exc as sa_exc

import kv_runtime.errors as rt
from memcube import errors as domain
from memos.api.errors import database_response, database_unavailable, mapped_response

CASES = [
    (domain.InvalidArgument("top_k is 0"), 422, "invalid_argument"),
    (domain.NotFound("no such cube", code="cube_not_found"), 404, "cube_not_found"),
    (domain.Conflict("taken", code="cube_exists"), 409, "cube_exists"),
    (domain.PreconditionFailed("version 3 is current"), 412, "precondition_failed"),
    (domain.TooLarge("too big"), 413, "payload_too_large"),
    (domain.Unavailable("model off"), 503, "unavailable"),
    (domain.DomainError("odd"), 400, "bad_request"),
    # Runtime errors that reach the API layer untranslated.
    (rt.InvalidArgument("max_tokens=0 must be in 1..1000000"), 422, "invalid_argument"),
    (rt.ModelUnavailable("no weights"), 503, "model_unavailable"),
    (rt.ActivationMismatch({"dtype": ("float16", "float32")}), 409, "activation_mismatch"),
    (rt.ActivationCorrupt("checksum"), 409, "activation_corrupt"),
]


@pytest.mark.parametrize("exc,status,code", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_each_error_class_has_one_status(exc, status, code):
    response = mapped_response(exc)
    assert response is not None
    assert response.status_code == status
    assert json.loads(response.body) == {"error": {"code": code, "message": exc.message}}
    assert "retry-after" not in response.headers


def test_too_many_requests_carries_retry_after_in_whole_seconds():
    exc = domain.TooManyRequests("3 builds queued", code="too_many_builds", retry_after=2.2)
    response = mapped_response(exc)
    assert response is not None and response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert json.loads(response.body) == {
        "error": {"code": "too_many_builds", "message": "3 builds queued", "retry_after": 3}
    }
    quota = mapped_response(domain.QuotaExceeded("100 cubes at most", limit="max_cubes"))
    assert quota is not None and quota.status_code == 429
    assert "retry-after" not in quota.headers  # waiting does not help


def test_unauthorized_names_the_scheme_and_bugs_are_not_mapped():
    response = mapped_response(domain.Unauthorized("missing API key"))
    assert response is not None and response.headers["www-authenticate"] == "Bearer"
    assert mapped_response(rt.KVRuntimeError("an unnamed runtime failure")) is None
    assert mapped_response(ValueError("a bug")) is None


def test_an_unreachable_activation_is_503_with_retry_after():
    from memos.services.blobs import BlobUnavailable

    response = mapped_response(BlobUnavailable("redis is down", retry_after=5))
    assert response is not None and response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert json.loads(response.body) == {
        "error": {"code": "activation_unavailable", "message": "redis is down", "retry_after": 5}
    }


def _dbapi(cls, invalidated: bool = False):
    return cls(
        "SELECT 1",
        {},
        Exception("server closed the connection"),
        connection_invalidated=invalidated,
    )


@pytest.mark.parametrize(
    "exc,unavailable",
    [
        (_dbapi(sa_exc.OperationalError), True),  # refused, shut down, starting up, locked
        (_dbapi(sa_exc.InterfaceError), True),  # a connection already closed
        (_dbapi(sa_exc.DBAPIError, invalidated=True), True),  # a disconnect, however raised
        (sa_exc.TimeoutError("QueuePool limit reached"), True),  # no connection came free
        (_dbapi(sa_exc.IntegrityError), False),  # a bug or a race: 500
        (_dbapi(sa_exc.ProgrammingError), False),
        (RuntimeError("database"), False),
    ],
)
def test_only_a_database_away_is_503_database_unavailable(exc, unavailable):
    assert database_unavailable(exc) is unavailable
    if unavailable:
        response = database_response()
        body = json.loads(bytes(response.body))
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert body["error"]["code"] == "database_unavailable"
        assert body["error"]["retry_after"] == 1
