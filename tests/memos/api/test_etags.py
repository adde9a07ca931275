"""Optimistic concurrency: a memory's ETag is its version; If-Match on PATCH/DELETE is 412 when
stale, checked inside the write transaction. SQLite and PostgreSQL."""

from __future__ import annotations

from tests.memos.api.helpers import at_once


def _memory(client, cube_id, content="v1"):
    r = client.post(f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": content}]})
    return r.json()["items"][0]["id"]


def test_get_and_patch_carry_the_version_as_etag(tenant):
    client, cube_id = tenant
    memory_id = _memory(client, cube_id)
    path = f"/v1/cubes/{cube_id}/memories/{memory_id}"
    assert client.get(path).headers["ETag"] == '"1"'
    r = client.patch(path, json={"content": "v2"}, headers={"If-Match": '"1"'})
    assert r.status_code == 200
    assert r.headers["ETag"] == '"2"' and r.json()["version"] == 2
    assert client.get(path).headers["ETag"] == '"2"'


def test_stale_if_match_is_412_and_changes_nothing(tenant):
    client, cube_id = tenant
    memory_id = _memory(client, cube_id)
    path = f"/v1/cubes/{cube_id}/memories/{memory_id}"
    assert client.patch(path, json={"content": "v2"}).status_code == 200  # no header: no check
    for header in ('"1"', "1", 'W/"2"', '"one"', '"1", "3"', ""):
        r = client.patch(path, json={"content": "lost"}, headers={"If-Match": header})
        assert r.status_code == 412, header
        assert r.json()["error"]["code"] == "precondition_failed"
        r = client.delete(path, headers={"If-Match": header})
        assert r.status_code == 412, header
    got = client.get(path).json()
    assert (got["content"], got["version"]) == ("v2", 2)
    history = client.get(f"{path}/history").json()["items"]
    assert [h["version"] for h in history] == [1, 2]
    # A list that names the current version matches; so does `*`.
    r = client.patch(path, json={"content": "v3"}, headers={"If-Match": '"1", "2"'})
    assert r.status_code == 200 and r.json()["version"] == 3
    r = client.patch(path, json={"content": "v4"}, headers={"If-Match": "*"})
    assert r.status_code == 200 and r.json()["version"] == 4
    assert client.delete(path, headers={"If-Match": '"4"'}).status_code == 204
    assert client.get(path).status_code == 404
    # Gone: If-Match "*" does not bring it back to life, and the answer is 404, not 412.
    r = client.patch(path, json={"content": "v5"}, headers={"If-Match": "*"})
    assert r.status_code == 404


def test_concurrent_patches_of_one_version_have_one_winner(tenant):
    client, cube_id = tenant
    for _ in range(3):
        memory_id = _memory(client, cube_id)
        path = f"/v1/cubes/{cube_id}/memories/{memory_id}"
        statuses = at_once(
            [
                lambda n=n, path=path: (
                    client.patch(
                        path, json={"content": f"writer {n}"}, headers={"If-Match": '"1"'}
                    ).status_code
                )
                for n in range(4)
            ]
        )
        assert sorted(statuses) == [200, 412, 412, 412]
        history = client.get(f"{path}/history").json()["items"]
        assert [h["version"] for h in history] == [1, 2]
