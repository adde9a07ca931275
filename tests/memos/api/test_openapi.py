"""The OpenAPI document tells the truth, and the interactive docs work without the internet."""

from __future__ import annotations

import re

import httpx
import pytest

ERROR_REF = "#/components/schemas/ErrorBody"


@pytest.fixture(scope="module")
def spec(server):
    r = httpx.get(f"{server.url}/openapi.json")
    assert r.status_code == 200
    return r.json()


def _operations(spec):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def test_every_error_response_has_the_real_error_body(spec):
    """FastAPI documents 422 as `{"detail": [...]}`, which the daemon never sends."""
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "ValidationError" not in spec["components"]["schemas"]
    seen = 0
    for method, path, operation in _operations(spec):
        for status, response in operation["responses"].items():
            if status[0] in "45":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (method, path, status)
                assert list(response["content"]) == ["application/json"], (method, path, status)
                seen += 1
    assert seen > 100
    error = spec["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["error"]
    detail = spec["components"]["schemas"]["ErrorDetail"]
    assert detail["required"] == ["code", "message"]
    assert set(detail["properties"]) == {"code", "message", "details", "retry_after"}


def _statuses(spec, method, path):
    return sorted(int(s) for s in spec["paths"][path][method.lower()]["responses"])


def test_each_route_declares_the_errors_it_can_answer(spec):
    assert _statuses(spec, "GET", "/healthz") == [200, 500]
    assert _statuses(spec, "GET", "/metrics") == [200, 403, 500]
    assert _statuses(spec, "POST", "/v1/users") == [201, 400, 401, 403, 413, 422, 429, 500, 503]
    assert _statuses(spec, "POST", "/v1/cubes") == [201, 400, 401, 409, 413, 422, 429, 500, 503]
    assert _statuses(spec, "GET", "/v1/cubes") == [200, 401, 422, 429, 500, 503]
    assert _statuses(spec, "GET", "/v1/cubes/{cube_id}") == [200, 401, 404, 422, 429, 500, 503]
    cube = "/v1/cubes/{cube_id}"
    assert _statuses(spec, "DELETE", cube) == [204, 401, 403, 404, 422, 429, 500, 503]
    memories = "/v1/cubes/{cube_id}/memories"
    assert _statuses(spec, "POST", memories) == [201, 400, 401, 403, 404, 413, 422, 429, 500, 503]
    search = "/v1/cubes/{cube_id}/search"  # a reader may search: no 403
    assert _statuses(spec, "POST", search) == [200, 400, 401, 404, 413, 422, 429, 500, 503]
    generate = "/v1/cubes/{cube_id}/generate"
    assert _statuses(spec, "POST", generate) == [
        *(200, 400, 401, 404, 409, 413, 422, 429, 500, 503)
    ]
    activations = "/v1/cubes/{cube_id}/activations"
    assert 503 in _statuses(spec, "POST", activations)
    for method, path, operation in _operations(spec):
        statuses = set(_statuses(spec, method, path))
        assert 500 in statuses, (method, path)
        if operation.get("security"):
            assert {401, 429, 503} <= statuses, (method, path)  # 503: the database away
            responses = operation["responses"]
            assert set(responses["401"]["headers"]) == {"WWW-Authenticate"}
            assert set(responses["429"]["headers"]) == {"Retry-After"}
            assert set(responses["503"]["headers"]) == {"Retry-After"}
        if "requestBody" in operation:
            assert {400, 413, 422} <= statuses, (method, path)
        if "{" in path:
            assert 404 in statuses, (method, path)


def test_streams_and_plain_text_are_declared(spec):
    ok = spec["paths"]["/v1/cubes/{cube_id}/generate"]["post"]["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "text/event-stream"}
    events = ok["content"]["text/event-stream"]["schema"]["oneOf"]
    assert [e["properties"]["event"]["const"] for e in events] == ["piece", "done", "error"]
    assert events[1]["properties"]["data"]["contentSchema"] == {
        "$ref": "#/components/schemas/GenerateResponse"
    }
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(metrics["content"]) == ["text/plain"]


def test_enforced_limits_are_in_the_schema(spec, server):
    schemas = spec["components"]["schemas"]
    settings = server.daemon.settings
    top_k = schemas["SearchRequest"]["properties"]["top_k"]
    assert (top_k["type"], top_k["minimum"], top_k["maximum"]) == (
        "integer",
        1,
        settings.limits.max_top_k,
    )
    max_tokens = schemas["GenerateRequest"]["properties"]["max_tokens"]
    assert (max_tokens["minimum"], max_tokens["maximum"]) == (
        1,
        settings.activations.max_generate_tokens,
    )
    items = schemas["MemoryBatch"]["properties"]["items"]
    assert (items["minItems"], items["maxItems"]) == (1, settings.limits.max_batch_items)
    assert schemas["MemoryBatch"]["required"] == ["items"]
    for name, prop in (
        ("MemoryIn", "content"),
        ("SearchRequest", "query"),
        ("GenerateRequest", "prompt"),
        ("CubeCreate", "name"),
        ("UserCreate", "name"),
    ):
        assert schemas[name]["properties"][prop]["minLength"] == 1, name
    create = schemas["ActivationCreate"]
    assert [branch["required"] for branch in create["oneOf"]] == [
        ["text"],
        ["memory_ids"],
        ["session_id"],
        ["session_ids"],
    ]
    memory_ids = next(s for s in create["properties"]["memory_ids"]["anyOf"] if "items" in s)
    assert memory_ids["uniqueItems"] is True and memory_ids["minItems"] == 1
    metadata = schemas["MemoryIn"]["properties"]["metadata"]
    assert "16 levels" in metadata["description"] and "65536 bytes" in metadata["description"]


def test_docs_load_every_asset_from_the_daemon(server):
    """Swagger UI and ReDoc pages reference only the daemon's own URLs, and each answers."""
    for page in ("/docs", "/redoc"):
        r = httpx.get(f"{server.url}{page}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "cdn" not in r.text and "googleapis" not in r.text
        urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert urls, page
        for url in urls:
            assert url.startswith("/docs/assets/"), (page, url)
            asset = httpx.get(f"{server.url}{url}")
            assert asset.status_code == 200 and len(asset.content) > 100, url
        assert "'/openapi.json'" in r.text or '"/openapi.json"' in r.text
    assert "swagger-ui-bundle.js" in httpx.get(f"{server.url}/docs").text
    script = httpx.get(f"{server.url}/docs/assets/swagger-ui-bundle.js")
    assert script.headers["content-type"].split(";")[0] in (
        "application/javascript",
        "text/javascript",
    )
