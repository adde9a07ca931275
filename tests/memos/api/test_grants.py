"""Owners list and revoke grants; a revoked user loses the cube at once. SQLite and PG."""

from __future__ import annotations


def _cube_with_grants(server):
    owner_id, owner_key = server.new_user()
    reader_id, reader_key = server.new_user()
    writer_id, writer_key = server.new_user()
    with server.client(owner_key) as owner:
        cube_id = owner.post("/v1/cubes", json={"name": "shared"}).json()["id"]
        for user_id, role in ((reader_id, "reader"), (writer_id, "writer")):
            r = owner.post(f"/v1/cubes/{cube_id}/grants", json={"user_id": user_id, "role": role})
            assert r.status_code == 201
    return cube_id, (owner_id, owner_key), (reader_id, reader_key), (writer_id, writer_key)


def test_owner_lists_grants(server):
    cube_id, (_, owner_key), (reader_id, _), (writer_id, writer_key) = _cube_with_grants(server)
    with server.client(owner_key) as owner:
        body = owner.get(f"/v1/cubes/{cube_id}/grants").json()
        assert body["next_cursor"] is None
        assert [(g["cube_id"], g["user_id"], g["role"]) for g in body["items"]] == [
            (cube_id, reader_id, "reader"),
            (cube_id, writer_id, "writer"),
        ]
        assert all(g["created_at"].endswith("Z") for g in body["items"])
        first = owner.get(f"/v1/cubes/{cube_id}/grants", params={"limit": 1}).json()
        assert [g["user_id"] for g in first["items"]] == [reader_id]
        rest = owner.get(
            f"/v1/cubes/{cube_id}/grants", params={"limit": 1, "cursor": first["next_cursor"]}
        ).json()
        assert [g["user_id"] for g in rest["items"]] == [writer_id]
        assert rest["next_cursor"] is None
    with server.client(writer_key) as writer:  # a grantee may not list them
        r = writer.get(f"/v1/cubes/{cube_id}/grants")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def test_revoked_user_gets_404_at_once(server):
    cube_id, (_, owner_key), (reader_id, reader_key), (writer_id, writer_key) = _cube_with_grants(
        server
    )
    with server.client(writer_key) as writer:
        assert writer.get(f"/v1/cubes/{cube_id}").status_code == 200
        added = writer.post(f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": "x"}]})
        assert added.status_code == 201
    with server.client(owner_key) as owner:
        assert owner.delete(f"/v1/cubes/{cube_id}/grants/{writer_id}").status_code == 204
        remaining = owner.get(f"/v1/cubes/{cube_id}/grants").json()["items"]
        assert [g["user_id"] for g in remaining] == [reader_id]
    with server.client(writer_key) as writer:
        for method, path, body in [
            ("GET", f"/v1/cubes/{cube_id}", None),
            ("GET", f"/v1/cubes/{cube_id}/memories", None),
            ("POST", f"/v1/cubes/{cube_id}/memories", {"items": [{"content": "y"}]}),
            ("POST", f"/v1/cubes/{cube_id}/search", {"query": "x"}),
        ]:
            r = writer.request(method, path, json=body)
            assert r.status_code == 404, (method, path)
            assert r.json()["error"]["code"] == "cube_not_found"
        assert writer.get("/v1/cubes").json()["items"] == []
    with server.client(reader_key) as reader:  # the other grant is untouched
        assert reader.get(f"/v1/cubes/{cube_id}/memories").status_code == 200
    with server.client(owner_key) as owner:  # one memory: the refused add wrote nothing
        assert owner.get(f"/v1/cubes/{cube_id}").json()["stats"]["memories"] == 1


def test_revoking_a_missing_grant_is_404(server):
    cube_id, (owner_id, owner_key), (reader_id, reader_key), _ = _cube_with_grants(server)
    stranger_id, stranger_key = server.new_user()
    with server.client(owner_key) as owner:
        for user_id in (stranger_id, owner_id, "usr_nobody"):
            r = owner.delete(f"/v1/cubes/{cube_id}/grants/{user_id}")
            assert r.status_code == 404, user_id
            assert r.json()["error"]["code"] == "grant_not_found"
    with server.client(reader_key) as reader:  # a grantee may not revoke, not even itself
        r = reader.delete(f"/v1/cubes/{cube_id}/grants/{reader_id}")
        assert r.status_code == 403
    with server.client(stranger_key) as stranger:  # a stranger does not see the cube
        r = stranger.delete(f"/v1/cubes/{cube_id}/grants/{reader_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "cube_not_found"
        assert stranger.get(f"/v1/cubes/{cube_id}/grants").status_code == 404
    with server.client(reader_key) as reader:
        assert reader.get(f"/v1/cubes/{cube_id}").status_code == 200


def test_a_revoked_user_can_be_granted_again(server):
    cube_id, (_, owner_key), (reader_id, reader_key), _ = _cube_with_grants(server)
    with server.client(owner_key) as owner:
        assert owner.delete(f"/v1/cubes/{cube_id}/grants/{reader_id}").status_code == 204
        r = owner.post(f"/v1/cubes/{cube_id}/grants", json={"user_id": reader_id, "role": "writer"})
        assert r.status_code == 201
    with server.client(reader_key) as reader:
        assert reader.get(f"/v1/cubes/{cube_id}").json()["role"] == "writer"
