"""Bad input gets a clear 4xx JSON error, never a 500, and changes nothing."""

from __future__ import annotations

import json

import pytest


def _state(client, cube_id):
    """Everything a bad request might have changed."""
    memories = client.get(f"/v1/cubes/{cube_id}/memories", params={"limit": 500}).json()["items"]
    cube = client.get(f"/v1/cubes/{cube_id}").json()
    return [(m["id"], m["content"], m["version"], m["metadata"]) for m in memories], cube["stats"][
        "memories"
    ]


def _seeded(tenant):
    client, cube_id = tenant
    memory = client.post(
        f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": "seed"}]}
    ).json()["items"][0]
    return client, cube_id, memory["id"]


BAD_ADDS = [
    ("malformed json", b'{"items": [{"content": "x"}', 400, "malformed_json"),
    ("not an object", b'[{"content": "x"}]', 422, "validation_error"),
    ("missing items", b"{}", 422, "validation_error"),
    ("missing content", b'{"items": [{"speaker": "a"}]}', 422, "validation_error"),
    ("content not a string", b'{"items": [{"content": 42}]}', 422, "validation_error"),
    ("items not a list", b'{"items": {"content": "x"}}', 422, "validation_error"),
    ("empty batch", b'{"items": []}', 422, "validation_error"),
    ("empty content", b'{"items": [{"content": "   "}]}', 422, "validation_error"),
    (
        "naive timestamp",
        b'{"items": [{"content": "x", "timestamp": "2023-05-08T10:00:00"}]}',
        422,
        "validation_error",
    ),
    (
        "bad timestamp",
        b'{"items": [{"content": "x", "timestamp": "yesterday"}]}',
        422,
        "validation_error",
    ),
    (
        "metadata not object",
        b'{"items": [{"content": "x", "metadata": [1]}]}',
        422,
        "validation_error",
    ),
    (
        "unknown field",
        b'{"items": [{"content": "x", "sesion_id": "typo"}]}',
        422,
        "validation_error",
    ),
    (
        "one bad item spoils the batch",
        b'{"items": [{"content": "ok"}, {"content": null}]}',
        422,
        "validation_error",
    ),
]


@pytest.mark.parametrize("name,body,status,code", BAD_ADDS, ids=[b[0] for b in BAD_ADDS])
def test_bad_add_is_refused_and_changes_nothing(tenant, name, body, status, code):
    client, cube_id, _ = _seeded(tenant)
    before = _state(client, cube_id)
    r = client.post(
        f"/v1/cubes/{cube_id}/memories", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and len(error["message"]) > 5
    assert _state(client, cube_id) == before


def test_oversize_batch_is_413_and_atomic(tenant):
    client, cube_id, _ = _seeded(tenant)
    before = _state(client, cube_id)
    r = client.post(
        f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": f"m{i}"} for i in range(1001)]}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")
    assert "1001" in r.json()["error"]["message"]
    assert _state(client, cube_id) == before


def test_oversize_content_is_413_and_atomic(tenant):
    client, cube_id, memory_id = _seeded(tenant)
    before = _state(client, cube_id)
    huge = "x" * ((1 << 20) + 1)
    r = client.post(
        f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": "fine"}, {"content": huge}]}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")
    assert "items[1].content" in r.json()["error"]["message"]
    r = client.patch(f"/v1/cubes/{cube_id}/memories/{memory_id}", json={"content": huge})
    assert r.status_code == 413
    assert _state(client, cube_id) == before


def test_exactly_1000_items_and_1_mib_are_accepted(tenant):
    client, cube_id, _ = _seeded(tenant)
    r = client.post(
        f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": f"m{i}"} for i in range(1000)]}
    )
    assert r.status_code == 201 and len(r.json()["items"]) == 1000
    r = client.post(f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": "é" * (1 << 19)}]})
    assert r.status_code == 201  # 2 bytes a character: exactly 1 MiB


BAD_PATCHES = [
    ({}, 422, "validation_error"),
    ({"content": None}, 422, "validation_error"),
    ({"content": 5}, 422, "validation_error"),
    ({"content": ""}, 422, "validation_error"),
    ({"metadata": "x"}, 422, "validation_error"),
    ({"version": 7}, 422, "validation_error"),
]


@pytest.mark.parametrize("body,status,code", BAD_PATCHES)
def test_bad_patch_changes_nothing(tenant, body, status, code):
    client, cube_id, memory_id = _seeded(tenant)
    before = _state(client, cube_id)
    r = client.patch(f"/v1/cubes/{cube_id}/memories/{memory_id}", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert _state(client, cube_id) == before
    assert len(client.get(f"/v1/cubes/{cube_id}/memories/{memory_id}/history").json()["items"]) == 1


BAD_SEARCHES = [
    ({}, 422),
    ({"query": ""}, 422),
    ({"query": "x", "top_k": 0}, 422),
    ({"query": "x", "top_k": 501}, 422),
    ({"query": "x", "top_k": "ten"}, 422),
    ({"query": "x", "filters": {"since": "2023-01-01"}}, 422),
    (
        {
            "query": "x",
            "filters": {"since": "2023-02-01T00:00:00Z", "until": "2023-01-01T00:00:00Z"},
        },
        422,
    ),
    ({"query": "x", "filters": {"speaker": "a"}}, 422),
]


@pytest.mark.parametrize("body,status", BAD_SEARCHES)
def test_bad_search_is_4xx(tenant, body, status):
    client, cube_id, _ = _seeded(tenant)
    r = client.post(f"/v1/cubes/{cube_id}/search", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"code", "message"}


def test_bad_query_params_and_cursor(tenant):
    client, cube_id, _ = _seeded(tenant)
    for params in ({"limit": 0}, {"limit": 501}, {"limit": "many"}):
        r = client.get(f"/v1/cubes/{cube_id}/memories", params=params)
        assert r.status_code == 422, params
    r = client.get(f"/v1/cubes/{cube_id}/memories", params={"cursor": "garbage!"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_cursor")


def test_bad_cube_and_user_bodies(server):
    _, key = server.new_user()
    with server.client(key) as client:
        assert client.post("/v1/cubes", json={}).status_code == 422
        assert client.post("/v1/cubes", json={"name": ""}).status_code == 422
        assert client.post("/v1/cubes", json={"name": 3}).status_code == 422
        assert client.get("/v1/cubes").json()["items"] == []
    with server.client() as admin:
        assert admin.post("/v1/users", json={"name": ""}).status_code == 422
        assert (
            admin.post(
                "/v1/users", content=b"nope", headers={"content-type": "application/json"}
            ).status_code
            == 400
        )


def test_unknown_route_and_method_are_json_errors(server):
    with server.client() as admin:
        r = admin.get("/v1/nothing-here")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
        r = admin.put("/v1/cubes")
        assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")


def test_json_body_is_read_whatever_content_type_the_client_sent(tenant):
    """curl -d labels bodies as form data; the API speaks JSON only, so it reads them as JSON."""
    client, cube_id = tenant
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        r = client.post(
            f"/v1/cubes/{cube_id}/memories",
            content=b'{"items": [{"content": "sent like curl -d"}]}',
            headers={"content-type": content_type},
        )
        assert r.status_code == 201, r.text
    r = client.post(
        f"/v1/cubes/{cube_id}/memories",
        content=b"content=form+data",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert (r.status_code, r.json()["error"]["code"]) == (400, "malformed_json")


UNSTORABLE = [  # one memory item each, as raw JSON
    ("lone surrogate in content", b'{"content": "a\\ud800b"}'),
    ("NUL in content", b'{"content": "a\\u0000b"}'),
    ("lone surrogate in metadata", b'{"content": "x", "metadata": {"k": "\\udfff"}}'),
    ("NaN in metadata", b'{"content": "x", "metadata": {"k": NaN}}'),
    ("Infinity nested in metadata", b'{"content": "x", "metadata": {"k": [1, Infinity]}}'),
    ("timestamp beyond storage", b'{"content": "x", "timestamp": "0001-01-01T00:00:00+01:00"}'),
]


@pytest.mark.parametrize("name,item", UNSTORABLE, ids=[u[0] for u in UNSTORABLE])
def test_input_no_store_can_hold_is_422_and_changes_nothing(tenant, name, item):
    client, cube_id, memory_id = _seeded(tenant)
    before = _state(client, cube_id)
    headers = {"content-type": "application/json"}
    body = b'{"items": [' + item + b"]}"
    r = client.post(f"/v1/cubes/{cube_id}/memories", content=body, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error"), r.text
    if b"timestamp" not in item:  # PATCH takes content and metadata only
        r = client.patch(f"/v1/cubes/{cube_id}/memories/{memory_id}", content=item, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error"), r.text
    assert _state(client, cube_id) == before
    assert client.get(f"/v1/cubes/{cube_id}/memories").status_code == 200


def test_forged_cursors_are_422(tenant):
    import base64

    client, cube_id, _ = _seeded(tenant)
    for raw in (b"p100000000000000000000", b"p-5"):
        cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        for path in (f"/v1/cubes/{cube_id}/memories", "/v1/cubes"):
            r = client.get(path, params={"cursor": cursor})
            assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_cursor"), path


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, embedder):
    from memos.settings import Settings
    from tests.conftest import _start_live_server, free_port

    settings = Settings(
        data_dir=tmp_path_factory.mktemp("small"),
        admin_key="admin-small-limits",
        port=free_port(),
        limits={"max_body_bytes": 1 << 20},
        enrichment={"enabled": False},
    )
    yield from _start_live_server(settings, embedder, "sqlite")


def test_oversize_body_is_413_declared_or_chunked(small_server):
    with small_server.client() as client:
        cube_id = client.post("/v1/cubes", json={"name": "limits"}).json()["id"]
        body = b'{"items": [{"content": "' + b"x" * (1 << 20) + b'"}]}'
        path = f"/v1/cubes/{cube_id}/memories"
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")

        def chunks():
            for start in range(0, len(body), 64 * 1024):
                yield body[start : start + 64 * 1024]

        r = client.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")
        small = b'{"items": [{"content": "fits"}]}'
        r = client.post(path, content=iter([small[:10], small[10:]]))  # chunked, under the limit
        assert r.status_code == 201
        assert client.get(f"/v1/cubes/{cube_id}").json()["stats"]["memories"] == 1


def test_default_body_limit_is_32_mib(server):
    """1000 items of 33 KB each pass the item and content limits but not the body limit."""
    with server.client() as client:
        cube_id = client.post("/v1/cubes", json={"name": "big-body"}).json()["id"]
        item = b'{"content": "' + b"y" * (33 * 1024) + b'"}'
        body = b'{"items": [' + b",".join([item] * 1000) + b"]}"
        assert (32 << 20) < len(body) < (33 << 20)
        r = client.post(
            f"/v1/cubes/{cube_id}/memories",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")
        assert r.json()["error"]["message"] == f"request body over {32 << 20} bytes"
        assert client.get(f"/v1/cubes/{cube_id}").json()["stats"]["memories"] == 0


# -- strict types, invisible text, duplicate ids, deep or huge metadata ---------------------


def _refused(r, field):
    """422 `validation_error` whose details name `field`."""
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_error", error
    assert field in [d["field"] for d in error["details"]], error


LOOSE_TYPES = [  # each was coerced before: "5" and true became a top_k of 5 and 1
    ("search", {"query": "x", "top_k": "5"}, "top_k"),
    ("search", {"query": "x", "top_k": True}, "top_k"),
    ("search", {"query": "x", "top_k": 5.5}, "top_k"),
    ("search", {"query": "x", "exact": "true"}, "exact"),
    ("search", {"query": "x", "exact": 1}, "exact"),
    ("generate", {"prompt": "hi", "max_tokens": "1"}, "max_tokens"),
    ("generate", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ("generate", {"prompt": "hi", "stream": 1}, "stream"),
    (
        "activations",
        {"text": "hi", "compression": {"budget_tokens": "8"}},
        "compression.budget_tokens",
    ),
]


@pytest.mark.parametrize("route,body,field", LOOSE_TYPES, ids=[str(b) for _, b, _ in LOOSE_TYPES])
def test_numbers_and_booleans_are_strict(tenant, route, body, field):
    client, cube_id, _ = _seeded(tenant)
    before = _state(client, cube_id)
    _refused(client.post(f"/v1/cubes/{cube_id}/{route}", json=body), field)
    assert _state(client, cube_id) == before
    assert client.get(f"/v1/cubes/{cube_id}/activations").json()["items"] == []


INVISIBLE = [
    "\u200b",  # zero-width space
    "\u200b\u200c\u200d",  # zero-width space, non-joiner, joiner
    "\ufeff\u2060",  # byte order mark, word joiner
    " \u00a0\u3000\t\n",  # spaces of several widths, tab, newline
    "\u202e\u2066\u2069",  # bidirectional controls
    "\u3164\u115f",  # Hangul fillers: letters that draw nothing
    "\u034f\ufe0f",  # combining grapheme joiner, variation selector
    "\U000e0041\U000e007f",  # tag characters
    "\x07\x1b",  # control characters
]


@pytest.mark.parametrize("text", INVISIBLE, ids=[ascii(t) for t in INVISIBLE])
def test_text_of_only_invisible_characters_is_refused(tenant, text):
    client, cube_id, memory_id = _seeded(tenant)
    before = _state(client, cube_id)
    memories = f"/v1/cubes/{cube_id}/memories"
    _refused(client.post(memories, json={"items": [{"content": text}]}), "items[0].content")
    _refused(client.patch(f"{memories}/{memory_id}", json={"content": text}), "content")
    _refused(client.post(f"/v1/cubes/{cube_id}/search", json={"query": text}), "query")
    _refused(client.post(f"/v1/cubes/{cube_id}/generate", json={"prompt": text}), "prompt")
    _refused(client.post(f"/v1/cubes/{cube_id}/activations", json={"text": text}), "text")
    _refused(client.post("/v1/cubes", json={"name": text}), "name")
    assert _state(client, cube_id) == before
    assert [c["id"] for c in client.get("/v1/cubes").json()["items"]] == [cube_id]


def test_whole_numbers_are_integers_as_in_json_schema(tenant):
    """JSON Schema's `integer` includes 5.0; the schema says `integer`, so 5.0 is a top_k."""
    client, cube_id, _ = _seeded(tenant)
    r = client.post(f"/v1/cubes/{cube_id}/search", json={"query": "seed", "top_k": 1.0})
    assert r.status_code == 200 and len(r.json()["hits"]) == 1


def test_visible_text_with_invisible_characters_is_kept_as_sent(tenant):
    client, cube_id, _ = _seeded(tenant)
    content = "\u200bcafe\u0301 \u3164\u2060"
    r = client.post(f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": content}]})
    assert r.status_code == 201 and r.json()["items"][0]["content"] == content


def test_duplicate_ids_in_a_list_are_refused(tenant):
    client, cube_id, memory_id = _seeded(tenant)
    r = client.post(f"/v1/cubes/{cube_id}/activations", json={"memory_ids": [memory_id, memory_id]})
    _refused(r, "memory_ids")
    assert "listed twice" in r.json()["error"]["message"]
    assert client.get(f"/v1/cubes/{cube_id}/activations").json()["items"] == []


def _nested(depth: int) -> bytes:
    """A metadata object `depth` levels deep: {"a": [[...]]}."""
    return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_metadata_depth_limit(tenant):
    from memos.api.fields import MAX_METADATA_DEPTH

    client, cube_id, memory_id = _seeded(tenant)
    headers = {"content-type": "application/json"}
    memories = f"/v1/cubes/{cube_id}/memories"
    deepest = _nested(MAX_METADATA_DEPTH)
    r = client.post(
        memories,
        content=b'{"items": [{"content": "x", "metadata": ' + deepest + b"}]}",
        headers=headers,
    )
    assert r.status_code == 201, r.text
    assert r.json()["items"][0]["metadata"] == json.loads(deepest)
    before = _state(client, cube_id)
    # 17 levels, then depths that made a RecursionError: a 500 (600) and a 400 (5000)
    for depth in (MAX_METADATA_DEPTH + 1, 600, 5000):
        item = b'{"content": "x", "metadata": ' + _nested(depth) + b"}"
        r = client.post(memories, content=b'{"items": [' + item + b"]}", headers=headers)
        assert r.status_code == 422, (depth, r.text)
        assert r.json()["error"]["code"] == "validation_error"
        r = client.patch(
            f"{memories}/{memory_id}",
            content=b'{"metadata": ' + _nested(depth) + b"}",
            headers=headers,
        )
        assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error"), depth
        r = client.post(
            f"/v1/cubes/{cube_id}/search",
            content=b'{"query": "x", "filters": {"metadata": ' + _nested(depth) + b"}}",
            headers=headers,
        )
        assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error"), depth
    assert _state(client, cube_id) == before


def test_a_body_that_is_not_utf8_is_malformed_json(tenant):
    client, cube_id, _ = _seeded(tenant)
    before = _state(client, cube_id)
    r = client.post(
        f"/v1/cubes/{cube_id}/memories",
        content=b'{"items": [{"content": "caf\xe9"}]}',  # Latin-1, not UTF-8
        headers={"content-type": "application/json"},
    )
    assert (r.status_code, r.json()["error"]["code"]) == (400, "malformed_json")
    assert _state(client, cube_id) == before


def test_a_body_too_deep_to_parse_is_422(tenant):
    client, cube_id, _ = _seeded(tenant)
    r = client.post(
        f"/v1/cubes/{cube_id}/memories",
        content=b"[" * 100_000 + b"]" * 100_000,
        headers={"content-type": "application/json"},
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error")
    assert "nests too deeply" in r.json()["error"]["message"]


def test_metadata_size_limit(tenant):
    from memos.api.fields import MAX_METADATA_BYTES

    client, cube_id, memory_id = _seeded(tenant)
    memories = f"/v1/cubes/{cube_id}/memories"
    filler = MAX_METADATA_BYTES - len('{"k":""}')
    exact = {"k": "v" * filler}
    r = client.post(memories, json={"items": [{"content": "x", "metadata": exact}]})
    assert r.status_code == 201 and r.json()["items"][0]["metadata"] == exact
    before = _state(client, cube_id)
    over = {"k": "v" * (filler + 1)}
    many = {f"k{i}": "v" * 100 for i in range(10_000)}  # 1.1 MB, stored before
    for metadata in (over, many):
        r = client.post(memories, json={"items": [{"content": "x", "metadata": metadata}]})
        _refused(r, "items[0].metadata")
        assert "at most 65536" in r.json()["error"]["message"]
        _refused(client.patch(f"{memories}/{memory_id}", json={"metadata": metadata}), "metadata")
    assert _state(client, cube_id) == before
