"""Per-user quotas on cubes and memories, counted against the cube owner: 429 `quota_exceeded`
naming the limit, nothing half-written, and no two concurrent writes both passing the limit."""

from __future__ import annotations

import pytest

from memos.settings import QuotasConfig
from tests.memos.api.helpers import at_once


@pytest.fixture
def quotas(server, monkeypatch):
    """Set the live daemon's quotas for one test (the previous ones come back after)."""

    def set_quotas(**limits: int) -> None:
        monkeypatch.setattr(server.daemon.quotas, "config", QuotasConfig(**limits))

    return set_quotas


def _items(*contents):
    return {"items": [{"content": c} for c in contents]}


def _refused(r, limit):
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "quota_exceeded"
    assert r.json()["error"]["limit"] == limit
    assert "Retry-After" not in r.headers  # waiting does not free a quota


def test_cube_quota(server, quotas):
    quotas(max_cubes_per_user=2)
    _, key = server.new_user()
    with server.client(key) as client:
        assert client.post("/v1/cubes", json={"name": "a"}).status_code == 201
        b = client.post("/v1/cubes", json={"name": "b"}).json()["id"]
        _refused(client.post("/v1/cubes", json={"name": "c"}), "max_cubes_per_user")
        assert [c["name"] for c in client.get("/v1/cubes").json()["items"]] == ["a", "b"]
        assert client.delete(f"/v1/cubes/{b}").status_code == 204  # frees one
        assert client.post("/v1/cubes", json={"name": "c"}).status_code == 201


def test_memory_quota_refuses_a_whole_batch(tenant, quotas):
    client, cube_id = tenant
    quotas(max_memories_per_user=3)
    assert client.post(f"/v1/cubes/{cube_id}/memories", json=_items("a", "b")).status_code == 201
    r = client.post(f"/v1/cubes/{cube_id}/memories", json=_items("c", "d"))
    _refused(r, "max_memories_per_user")
    assert "3" in r.json()["error"]["message"]
    listed = client.get(f"/v1/cubes/{cube_id}/memories").json()["items"]
    assert [m["content"] for m in listed] == ["a", "b"]  # nothing of the refused batch
    r = client.post(f"/v1/cubes/{cube_id}/search", json={"query": "d", "mode": "lexical"})
    assert r.json()["hits"] == []
    added = client.post(f"/v1/cubes/{cube_id}/memories", json=_items("c"))
    assert added.status_code == 201
    refused = client.post(f"/v1/cubes/{cube_id}/memories", json=_items("d"))
    _refused(refused, "max_memories_per_user")
    # A deleted memory no longer counts.
    gone = added.json()["items"][0]["id"]
    assert client.delete(f"/v1/cubes/{cube_id}/memories/{gone}").status_code == 204
    assert client.post(f"/v1/cubes/{cube_id}/memories", json=_items("d")).status_code == 201
    quotas()  # 0: unlimited
    assert client.post(f"/v1/cubes/{cube_id}/memories", json=_items("e", "f")).status_code == 201


def test_memories_count_against_the_cube_owner(server, quotas):
    quotas(max_memories_per_user=2)
    _, owner_key = server.new_user()
    writer_id, writer_key = server.new_user()
    with server.client(owner_key) as owner, server.client(writer_key) as writer:
        shared = owner.post("/v1/cubes", json={"name": "shared"}).json()["id"]
        grant = {"user_id": writer_id, "role": "writer"}
        assert owner.post(f"/v1/cubes/{shared}/grants", json=grant).status_code == 201
        assert writer.post(f"/v1/cubes/{shared}/memories", json=_items("a", "b")).status_code == 201
        # The owner's quota is full, whoever writes; the writer's own quota is untouched.
        for client in (owner, writer):
            refused = client.post(f"/v1/cubes/{shared}/memories", json=_items("c"))
            _refused(refused, "max_memories_per_user")
        own = writer.post("/v1/cubes", json={"name": "own"}).json()["id"]
        assert writer.post(f"/v1/cubes/{own}/memories", json=_items("x", "y")).status_code == 201


def test_concurrent_adds_cannot_both_take_the_last_place(server, quotas):
    """Two cubes of one owner, one place left, two adds at once: one 201 and one 429."""
    _, key = server.new_user()
    with server.client(key) as client:
        cubes = [client.post("/v1/cubes", json={"name": n}).json()["id"] for n in ("p", "q")]
        for round_ in range(3):
            quotas(max_memories_per_user=round_ + 1)  # round_ stored: one place left
            statuses = at_once(
                [
                    lambda c=c: (
                        client.post(f"/v1/cubes/{c}/memories", json=_items("race")).status_code
                    )
                    for c in cubes
                ]
            )
            assert sorted(statuses) == [201, 429]
            total = sum(client.get(f"/v1/cubes/{c}").json()["stats"]["memories"] for c in cubes)
            assert total == round_ + 1


def test_live_memory_counter_follows_every_write(tenant, server):
    """The memory quota sums `cubes.live_memories`: adds, soft deletes and erasures keep it
    equal to the live rows (edits and enrichment leave it alone)."""
    from sqlalchemy import func, select

    from memos.db.models import Cube, Memory

    client, cube_id = tenant
    path = f"/v1/cubes/{cube_id}/memories"
    ids = [m["id"] for m in client.post(path, json=_items("a", "b", "c", "d")).json()["items"]]
    client.patch(f"{path}/{ids[0]}", json={"content": "a2"})
    client.delete(f"{path}/{ids[1]}")
    client.delete(f"{path}/{ids[1]}", params={"erase": "true"})  # soft-deleted already
    client.delete(f"{path}/{ids[2]}", params={"erase": "true"})  # live
    client.post(path, json={"items": [{"content": "x"} for _ in range(5)]})
    with server.daemon.db.read() as s:
        counter = s.scalar(select(Cube.live_memories).where(Cube.id == cube_id))
        live = s.scalar(
            select(func.count()).where(Memory.cube_id == cube_id, Memory.deleted_at.is_(None))
        )
    assert counter == live == 7


def test_activation_bytes_quota_refuses_a_build_before_it_starts(tenant, quotas):
    client, cube_id = tenant
    text = {"text": "Maya keeps bees on the roof of her building in Lyon."}
    quotas(max_activation_bytes_per_user=1)
    _refused(
        client.post(f"/v1/cubes/{cube_id}/activations", json=text),
        "max_activation_bytes_per_user",
    )
    assert client.get(f"/v1/cubes/{cube_id}/activations").json()["items"] == []
    quotas(max_activation_bytes_per_user=1 << 30)
    made = client.post(f"/v1/cubes/{cube_id}/activations", json=text)
    assert made.status_code == 201, made.text
    assert made.json()["state"] == "ready" and made.json()["bytes"] > 1
