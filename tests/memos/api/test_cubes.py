"""Users, cubes, grants and tenancy, exactly as the contract states, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading


def test_admin_creates_user_whose_key_works(server):
    user_id, key = server.new_user()
    assert user_id.startswith("usr_") and key.startswith("msk_")
    with server.client(key) as client:
        assert client.get("/v1/cubes").json() == {"items": [], "next_cursor": None}


def test_only_admin_creates_users(server):
    _, key = server.new_user()
    with server.client(key) as client:
        r = client.post("/v1/users", json={"name": "mallory"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"


def test_missing_or_unknown_key_is_401(server):
    import httpx

    r = httpx.get(f"{server.url}/v1/cubes")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    with server.client("msk_not-a-key") as client:
        assert client.get("/v1/cubes").status_code == 401


def test_cube_lifecycle_and_stats(server):
    owner_id, key = server.new_user()
    with server.client(key) as client:
        created = client.post("/v1/cubes", json={"name": "notes", "description": "d"})
        assert created.status_code == 201
        cube = created.json()
        assert {k: cube[k] for k in ("name", "description", "owner_id")} == {
            "name": "notes",
            "description": "d",
            "owner_id": owner_id,
        }
        assert cube["created_at"].endswith("Z")
        client.post(
            f"/v1/cubes/{cube['id']}/memories",
            json={"items": [{"content": "abc"}, {"content": "défi"}]},
        )
        got = client.get(f"/v1/cubes/{cube['id']}").json()
        # 3 + 5 bytes of UTF-8 content plus two 384-d float32 vectors, plus the saved index.
        assert got["stats"]["memories"] == 2
        assert got["stats"]["activations"] == 0
        assert got["stats"]["bytes"] >= 8 + 2 * 384 * 4
        assert [c["id"] for c in client.get("/v1/cubes").json()["items"]] == [cube["id"]]
        assert client.delete(f"/v1/cubes/{cube['id']}").status_code == 204
        assert client.get(f"/v1/cubes/{cube['id']}").status_code == 404
        assert client.get("/v1/cubes").json()["items"] == []


def test_duplicate_cube_name_is_409(server):
    _, key = server.new_user()
    with server.client(key) as client:
        assert client.post("/v1/cubes", json={"name": "x"}).status_code == 201
        r = client.post("/v1/cubes", json={"name": "x"})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "cube_exists"


def test_cubes_of_others_are_invisible_404(server):
    _, owner_key = server.new_user()
    _, other_key = server.new_user()
    with server.client(owner_key) as owner, server.client(other_key) as other:
        cube_id = owner.post("/v1/cubes", json={"name": "private"}).json()["id"]
        for method, path, body in [
            ("GET", f"/v1/cubes/{cube_id}", None),
            ("DELETE", f"/v1/cubes/{cube_id}", None),
            ("GET", f"/v1/cubes/{cube_id}/memories", None),
            ("POST", f"/v1/cubes/{cube_id}/memories", {"items": [{"content": "x"}]}),
            ("POST", f"/v1/cubes/{cube_id}/search", {"query": "x"}),
            ("POST", f"/v1/cubes/{cube_id}/grants", {"user_id": "usr_x", "role": "reader"}),
        ]:
            r = other.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "cube_not_found"
        # Same answer as for a cube that does not exist at all.
        assert other.get("/v1/cubes/cube_doesnotexist").json()["error"]["code"] == "cube_not_found"
        assert owner.get(f"/v1/cubes/{cube_id}/memories").json()["items"] == []


def test_reader_reads_but_cannot_write_writer_writes(server):
    _, owner_key = server.new_user()
    reader_id, reader_key = server.new_user()
    writer_id, writer_key = server.new_user()
    with (
        server.client(owner_key) as owner,
        server.client(reader_key) as reader,
        server.client(writer_key) as writer,
    ):
        cube_id = owner.post("/v1/cubes", json={"name": "shared"}).json()["id"]
        r = owner.post(f"/v1/cubes/{cube_id}/grants", json={"user_id": reader_id, "role": "reader"})
        assert r.status_code == 201
        assert r.json() == {"cube_id": cube_id, "user_id": reader_id, "role": "reader"}
        owner.post(f"/v1/cubes/{cube_id}/grants", json={"user_id": writer_id, "role": "writer"})

        added = writer.post(f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": "hi"}]})
        assert added.status_code == 201
        memory_id = added.json()["items"][0]["id"]

        assert reader.get(f"/v1/cubes/{cube_id}").status_code == 200
        assert [c["id"] for c in reader.get("/v1/cubes").json()["items"]] == [cube_id]
        assert reader.get(f"/v1/cubes/{cube_id}/memories/{memory_id}").status_code == 200
        assert reader.post(f"/v1/cubes/{cube_id}/search", json={"query": "hi"}).status_code == 200
        for method, path, body in [
            ("POST", f"/v1/cubes/{cube_id}/memories", {"items": [{"content": "no"}]}),
            ("PATCH", f"/v1/cubes/{cube_id}/memories/{memory_id}", {"content": "no"}),
            ("DELETE", f"/v1/cubes/{cube_id}/memories/{memory_id}", None),
            ("DELETE", f"/v1/cubes/{cube_id}", None),
            ("POST", f"/v1/cubes/{cube_id}/grants", {"user_id": writer_id, "role": "reader"}),
        ]:
            r = reader.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["code"] == "forbidden"
        # The writer may write but not delete the cube or grant.
        assert writer.delete(f"/v1/cubes/{cube_id}").status_code == 403
        # Nothing the reader tried changed anything.
        memory = owner.get(f"/v1/cubes/{cube_id}/memories/{memory_id}").json()
        assert (memory["content"], memory["version"]) == ("hi", 1)
        assert len(owner.get(f"/v1/cubes/{cube_id}/memories").json()["items"]) == 1


def test_grant_to_unknown_user_is_404_and_bad_role_422(server):
    _, key = server.new_user()
    other_id, _ = server.new_user()
    with server.client(key) as client:
        cube_id = client.post("/v1/cubes", json={"name": "g"}).json()["id"]
        r = client.post(
            f"/v1/cubes/{cube_id}/grants", json={"user_id": "usr_nobody", "role": "reader"}
        )
        assert (r.status_code, r.json()["error"]["code"]) == (404, "user_not_found")
        r = client.post(f"/v1/cubes/{cube_id}/grants", json={"user_id": other_id, "role": "admin"})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error")


def test_concurrent_grants_of_one_user_all_succeed_and_leave_one_grant(server):
    _, key = server.new_user()
    other_id, other_key = server.new_user()
    with server.client(key) as client:
        cube_id = client.post("/v1/cubes", json={"name": "race"}).json()["id"]
    roles = ["reader", "writer"] * 6
    statuses: list[int] = []

    def grant(role: str) -> None:
        with server.client(key) as c:
            r = c.post(f"/v1/cubes/{cube_id}/grants", json={"user_id": other_id, "role": role})
            statuses.append(r.status_code)

    threads = [threading.Thread(target=grant, args=(role,)) for role in roles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [201] * len(roles)
    with server.client(other_key) as other:
        (cube,) = other.get("/v1/cubes").json()["items"]
        assert cube["id"] == cube_id and cube["role"] in ("reader", "writer")


def test_cube_list_pages(server):
    _, key = server.new_user()
    with server.client(key) as client:
        ids = [client.post("/v1/cubes", json={"name": f"c{i}"}).json()["id"] for i in range(5)]
        seen, cursor = [], None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/cubes", params=params).json()
            seen += [c["id"] for c in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids


def test_stats_skip_files_an_atomic_rename_removes_while_they_are_counted(server, monkeypatch):
    """An atomic write renames its temporary file over the target while stats walk the cube's
    files. Both windows are made deterministic by hooking the real calls: the temporary file is
    removed right after the directory listing, or right after its first stat."""
    import os
    from pathlib import Path

    _, key = server.new_user()
    with server.client(key) as client:
        cube_id = client.post("/v1/cubes", json={"name": "renamed"}).json()["id"]
        client.post(f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": "abc"}]})
        daemon = server.daemon
        index_dir = daemon.indexes.directory(cube_id)
        blob_dir = daemon.settings.activation_dir / cube_id / "act_x"
        index_dir.mkdir(parents=True, exist_ok=True)
        blob_dir.mkdir(parents=True)
        (index_dir / "kept.bin").write_bytes(b"1234567")
        (blob_dir / "blob.safetensors").write_bytes(b"12345")
        victims = [index_dir / ".hnsw.bin.0a1b.tmp", blob_dir / ".blob.0a1b.tmp"]
        # 3 bytes of content, one 384-d float32 vector, and the two files that stay.
        base = 3 + 384 * 4 + 7 + 5

        def stats_bytes() -> int:
            for victim in victims:
                victim.write_bytes(b"x" * 1000)
            got = client.get(f"/v1/cubes/{cube_id}")
            monkeypatch.undo()
            assert got.status_code == 200, got.text
            assert not any(victim.exists() for victim in victims)
            return int(got.json()["stats"]["bytes"])

        def after_listing(listing):
            def listed(*args, **kwargs):
                entries = list(listing(*args, **kwargs))  # the real listing, taken first
                for victim in victims:
                    victim.unlink(missing_ok=True)  # then the rename removes the temp name
                return iter(entries)

            return listed

        for name in ("iterdir", "rglob"):
            monkeypatch.setattr(Path, name, after_listing(getattr(Path, name)))
        monkeypatch.setattr(os, "walk", after_listing(os.walk))
        assert stats_bytes() == base  # listed, gone by the time they are looked at

        real_stat = os.stat

        def stat_then_renamed(path, *args, **kwargs):
            result = real_stat(path, *args, **kwargs)
            if Path(path) in victims:
                Path(path).unlink()  # the rename lands right after this stat
            return result

        monkeypatch.setattr(os, "stat", stat_then_renamed)
        assert stats_bytes() == base + 2 * 1000  # seen once, counted with the size it had
