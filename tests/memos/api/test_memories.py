"""Plaintext memory routes: add, read, page, patch, delete, history."""

from __future__ import annotations

MEMORY_FIELDS = {
    "id",
    "cube_id",
    "content",
    "session_id",
    "speaker",
    "timestamp",
    "metadata",
    "keywords",
    "tags",
    "context",
    "links",
    "version",
    "created_at",
    "updated_at",
}


# Beyond the contract: the enrichment state (pending, retrying, done or failed), its failed
# attempts and last error, and the dates enrichment resolved.
EXTENSION_FIELDS = {"enrichment", "enrichment_attempts", "enrichment_error", "dates", "has_kv"}


def test_add_returns_full_memories_in_order(tenant):
    client, cube_id = tenant
    r = client.post(
        f"/v1/cubes/{cube_id}/memories",
        json={
            "items": [
                {
                    "content": "Caroline went to the support group.",
                    "session_id": "s1",
                    "speaker": "Caroline",
                    "timestamp": "2023-05-08T13:56:00+02:00",
                    "metadata": {"dia_id": "D1:3", "n": 3},
                },
                {"content": "Melanie painted a lake."},
            ]
        },
    )
    assert r.status_code == 201
    first, second = r.json()["items"]
    assert set(first) == MEMORY_FIELDS | EXTENSION_FIELDS
    assert first["cube_id"] == cube_id and first["id"].startswith("mem_")
    assert first["content"] == "Caroline went to the support group."
    assert (first["session_id"], first["speaker"]) == ("s1", "Caroline")
    assert first["timestamp"] == "2023-05-08T11:56:00Z"  # normalised to UTC
    assert first["metadata"] == {"dia_id": "D1:3", "n": 3}
    assert first["version"] == 1 and first["links"] == []
    assert (first["enrichment"], first["enrichment_attempts"], first["enrichment_error"]) == (
        "pending", 0, None
    )  # fmt: skip
    assert first["dates"] == []  # resolved by enrichment, later
    assert second["content"] == "Melanie painted a lake."
    assert second["timestamp"].endswith("Z")  # defaults to now
    got = client.get(f"/v1/cubes/{cube_id}/memories/{first['id']}").json()
    assert got == first


def test_list_pages_and_filters_by_session(tenant):
    client, cube_id = tenant
    items = [{"content": f"note {i}", "session_id": f"s{i % 2}"} for i in range(7)]
    ids = [
        m["id"]
        for m in client.post(f"/v1/cubes/{cube_id}/memories", json={"items": items}).json()["items"]
    ]
    pages, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = client.get(f"/v1/cubes/{cube_id}/memories", params=params).json()
        pages.append([m["id"] for m in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == [ids[0:3], ids[3:6], ids[6:7]]
    s0 = client.get(f"/v1/cubes/{cube_id}/memories", params={"session_id": "s0"}).json()
    assert [m["id"] for m in s0["items"]] == ids[0::2]
    assert s0["next_cursor"] is None


def test_patch_bumps_version_and_history_keeps_every_version(tenant):
    client, cube_id = tenant
    memory = client.post(
        f"/v1/cubes/{cube_id}/memories",
        json={"items": [{"content": "I live in Paris", "metadata": {"a": 1}}]},
    ).json()["items"][0]
    path = f"/v1/cubes/{cube_id}/memories/{memory['id']}"
    patched = client.patch(path, json={"content": "I live in Berlin now"})
    assert patched.status_code == 200
    assert (patched.json()["version"], patched.json()["content"]) == (2, "I live in Berlin now")
    assert patched.json()["metadata"] == {"a": 1}
    meta = client.patch(path, json={"metadata": {"a": 2}}).json()
    assert (meta["version"], meta["content"], meta["metadata"]) == (
        3,
        "I live in Berlin now",
        {"a": 2},
    )
    history = client.get(f"{path}/history").json()["items"]
    assert [(h["version"], h["content"], h["reason"]) for h in history] == [
        (1, "I live in Paris", "created"),
        (2, "I live in Berlin now", "updated"),
        (3, "I live in Berlin now", "updated"),
    ]
    assert set(history[0]) >= {
        "version",
        "content",
        "keywords",
        "tags",
        "context",
        "changed_at",
        "reason",
    }
    # Search sees the new content, not the old.
    hits = client.post(f"/v1/cubes/{cube_id}/search", json={"query": "Berlin"}).json()["hits"]
    assert hits[0]["memory"]["id"] == memory["id"]
    assert hits[0]["memory"]["content"] == "I live in Berlin now"


def test_soft_delete_hides_everywhere_but_history(tenant):
    client, cube_id = tenant
    keep, gone = client.post(
        f"/v1/cubes/{cube_id}/memories",
        json={"items": [{"content": "the red bicycle"}, {"content": "the blue bicycle"}]},
    ).json()["items"]
    path = f"/v1/cubes/{cube_id}/memories/{gone['id']}"
    assert client.delete(path).status_code == 204
    assert client.get(path).status_code == 404
    assert client.delete(path).status_code == 404
    assert client.patch(path, json={"content": "x"}).status_code == 404
    listed = client.get(f"/v1/cubes/{cube_id}/memories").json()["items"]
    assert [m["id"] for m in listed] == [keep["id"]]
    hits = client.post(
        f"/v1/cubes/{cube_id}/search", json={"query": "blue bicycle", "top_k": 10}
    ).json()["hits"]
    assert [h["memory"]["id"] for h in hits] == [keep["id"]]
    history = client.get(f"{path}/history").json()["items"]
    assert [(h["version"], h["reason"]) for h in history] == [(1, "created"), (2, "deleted")]
    assert client.get(f"/v1/cubes/{cube_id}").json()["stats"]["memories"] == 1


def test_unknown_memory_ids_are_404(tenant):
    client, cube_id = tenant
    for method, suffix, body in [
        ("GET", "", None),
        ("PATCH", "", {"content": "x"}),
        ("DELETE", "", None),
        ("GET", "/history", None),
    ]:
        r = client.request(method, f"/v1/cubes/{cube_id}/memories/mem_nope{suffix}", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "memory_not_found")


def test_memory_of_another_cube_is_not_reachable_through_mine(server):
    _, key = server.new_user()
    with server.client(key) as client:
        a = client.post("/v1/cubes", json={"name": "a"}).json()["id"]
        b = client.post("/v1/cubes", json={"name": "b"}).json()["id"]
        memory_id = client.post(
            f"/v1/cubes/{a}/memories", json={"items": [{"content": "x"}]}
        ).json()["items"][0]["id"]
        assert client.get(f"/v1/cubes/{b}/memories/{memory_id}").status_code == 404
        assert client.delete(f"/v1/cubes/{b}/memories/{memory_id}").status_code == 404
        assert client.get(f"/v1/cubes/{a}/memories/{memory_id}").status_code == 200
