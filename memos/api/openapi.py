"""The OpenAPI document, told truthfully: every error a route can answer, with the real body.

FastAPI documents a 422 with its own `HTTPValidationError` body that this daemon never sends, and
none of the other errors. Here the generated document is post-processed once, for every route
included in it (routes added later by any router get the same treatment without asking):

- each operation declares the errors its shape implies, all with the `ErrorBody` schema: 500
  always; 401, 429 (rate limits, queues, quotas) and 503 (`database_unavailable`, the database
  restarting or away) when it authenticates the caller (which reads the database); 403 when
  it needs the admin key or writes to a cube; 404 when it has path parameters; 400
  (`malformed_json`), 413 and 422 when it takes a body; 422 when it takes parameters; 412 when
  it reads `If-Match`. A route declares what only it can answer (409, 503, ...) with
  `responses=errors({...})`, which wins over these defaults;
- limits that are settings (top_k, max_tokens, items per batch) are written into the schemas
  with the configured values, so the document describes this daemon, not the defaults.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastapi import FastAPI, routing
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from memcube.errors import Unavailable
from memos.api.deps import get_admin, get_principal
from memos.api.schemas import ErrorBody, GenerateRequest
from memos.api.schemas_openai import CompletionRequest
from memos.services.runtime import RuntimeHolder
from memos.settings import Settings

REF = "#/components/schemas/"

DESCRIPTIONS: dict[int, str] = {
    400: "`malformed_json`: the body is not valid JSON",
    401: "`unauthorized`: no API key, or an unknown or revoked one",
    403: "`forbidden`: the key may not do this (a reader writing, not the owner, not the admin)",
    404: "`not_found` or a more specific `*_not_found`: no such thing, or one the key may not see",
    409: "`conflict` or a more specific code: the request clashes with the current state",
    412: "`precondition_failed`: `If-Match` names another version than the current one",
    413: "`payload_too_large`: the body, or one of its parts, is over a configured limit",
    422: "`validation_error` (with `details`) or `invalid_argument`: well-formed JSON that is "
    "not acceptable; nothing was changed",
    429: "`too_many_requests` or a more specific code (a rate, queue or quota): retry after "
    "`Retry-After` seconds when it is given",
    500: "`internal_error`: a bug; the daemon's log has the traceback",
    503: "`unavailable` or a more specific code (`model_unavailable`, "
    "`activation_unavailable`, `database_unavailable`): a part the request needs cannot run "
    "now; retry after `Retry-After` seconds when it is given",
}

RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer", "minimum": 1},
        "description": "seconds to wait before retrying, when known",
    }
}
HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}},
    429: RETRY_AFTER,
    503: RETRY_AFTER,
}

_WRITES = {"POST", "PUT", "PATCH", "DELETE"}

# `openapi_extra=READ_ONLY` marks a POST that changes nothing (search, generate): a reader may
# call it, so it answers no 403 for the role.
READ_ONLY: dict[str, Any] = {"x-read-only": True}


def errors(specific: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route's own error statuses: `{409: "`cube_exists`: ..."}`."""
    return {status: {"model": ErrorBody, "description": text} for status, text in specific.items()}


def event_stream(events: dict[str, dict[str, Any]], example: str = "") -> dict[str, Any]:
    """The `text/event-stream` media type of a route that streams server-sent events, each
    `event: NAME` with one `data:` line holding a JSON document of `events[NAME]`'s schema.
    Before OpenAPI 3.2 (`itemSchema`), a stream's `schema` describes one event."""
    one_of = [
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"const": name},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": schema,
                },
            },
        }
        for name, schema in events.items()
    ]
    media: dict[str, Any] = {"schema": {"oneOf": one_of}}
    if example:
        media["example"] = example
    return media


def _dependants(root: Dependant) -> Iterator[Dependant]:
    stack = [root]
    while stack:
        dependant = stack.pop()
        yield dependant
        stack.extend(dependant.dependencies)


def api_routes(app: FastAPI) -> Iterator[Any]:
    """Every documented API route of `app`, with the prefix and dependencies of the routers
    that include it (FastAPI >= 0.160 includes routers lazily; older ones copy the routes)."""
    iter_contexts = getattr(routing, "iter_route_contexts", None)
    contexts: Iterable[Any] = iter_contexts(app.routes) if iter_contexts else app.routes
    for context in contexts:
        route = getattr(context, "original_route", context)
        if isinstance(route, APIRoute) and context.include_in_schema:
            yield context


def implied_errors(route: Any, method: str) -> set[int]:
    """The error statuses a route can answer, read from its dependencies and parameters."""
    found = list(_dependants(route.dependant))
    calls: set[Callable[..., Any] | None] = {d.call for d in found}
    path = [p for d in found for p in d.path_params]
    query = [p for d in found for p in d.query_params]
    headers = {p.alias.lower() for d in found for p in d.header_params}
    statuses = {500}
    if get_principal in calls:
        statuses |= {401, 429, 503}
    if get_admin in calls:
        statuses.add(403)
    if path:
        statuses |= {404, 422}
    if query or headers:
        statuses.add(422)
    if route.body_field is not None:
        statuses |= {400, 413, 422}
    read_only = bool((route.openapi_extra or {}).get("x-read-only"))
    if "{cube_id}" in route.path_format and method in _WRITES and not read_only:
        statuses.add(403)
    if "if-match" in headers:
        statuses.add(412)
    return statuses


def _error_response(status: int, description: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description or DESCRIPTIONS.get(status, "an error"),
        "content": {"application/json": {"schema": {"$ref": f"{REF}ErrorBody"}}},
    }
    if status in HEADERS:
        response["headers"] = HEADERS[status]
    return response


def _is_fastapi_422(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))


def _add_error_schemas(components: dict[str, Any]) -> None:
    schema = ErrorBody.model_json_schema(ref_template=REF + "{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault("ErrorBody", schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)


def configured_limits(settings: Settings) -> dict[tuple[str, str], dict[str, Any]]:
    """(schema, property) -> JSON Schema keywords of limits that come from the settings."""
    max_tokens = settings.activations.max_generate_tokens
    default_tokens = min(GenerateRequest.model_fields["max_tokens"].default, max_tokens)
    completion_default = CompletionRequest.model_fields["max_tokens"].default
    limits: dict[tuple[str, str], dict[str, Any]] = {
        ("SearchRequest", "top_k"): {"maximum": settings.limits.max_top_k},
        ("GenerateRequest", "max_tokens"): {"maximum": max_tokens, "default": default_tokens},
        ("MemoryBatch", "items"): {"maxItems": settings.limits.max_batch_items},
        ("ChatCompletionRequest", "max_tokens"): {"maximum": max_tokens},
        ("ChatCompletionRequest", "max_completion_tokens"): {"maximum": max_tokens},
        ("CompletionRequest", "max_tokens"): {
            "maximum": max_tokens,
            "default": min(completion_default, max_tokens),
        },
        ("CompletionRequest", "prompt"): {
            "description": "text or token ids, or a list of either (one choice each, at most "
            f"{settings.openai.max_prompts})"
        },
    }
    try:  # the served model's id, so a drawn request can name it (found without loading it)
        served = RuntimeHolder(settings.runtime, enabled=settings.activations.enabled).card()
    except Unavailable:
        return limits
    for schema in ("ChatCompletionRequest", "CompletionRequest"):
        limits[(schema, "model")] = {"examples": [served.id]}
    return limits


def _apply_limits(components: dict[str, Any], settings: Settings) -> None:
    for (name, prop), keywords in configured_limits(settings).items():
        properties = components.get(name, {}).get("properties", {})
        assert prop in properties, f"schema {name}.{prop} is gone: update configured_limits"
        properties[prop].update(keywords)


def build(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The whole document for `app`, as `/openapi.json` serves it."""
    document = copy.deepcopy(FastAPI.openapi(app))
    for route in api_routes(app):
        for method in route.methods:
            operation = document["paths"][route.path_format][method.lower()]
            responses = operation.setdefault("responses", {})
            for status in sorted(implied_errors(route, method)):
                declared = responses.get(str(status))
                if declared is None or _is_fastapi_422(declared):
                    responses[str(status)] = _error_response(status)
            for code, declared in responses.items():
                if code.startswith(("4", "5")):
                    # Errors are JSON whatever the route's own media type (text/plain /metrics).
                    declared.update(_error_response(int(code), declared.get("description")))
    components = document.setdefault("components", {}).setdefault("schemas", {})
    _add_error_schemas(components)
    _apply_limits(components, settings)
    return document


def install(app: FastAPI, settings: Settings) -> None:
    """Serve `build(app)` at the app's `openapi_url`, built once, on first request, when
    every router is included."""
    built: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        if not built:
            built.append(build(app, settings))
        return built[0]

    app.openapi = openapi  # type: ignore[method-assign]
