"""`GET`/`PUT /v1/cubes/{cube_id}/policy`: defaults, owner-only changes, 422s, history, 404s."""

from __future__ import annotations

DEFAULTS = {
    "activation_bytes_max": None,
    "memory_ttl_days": None,
    "deleted_retention_days": 30.0,
    "hot_recalls": 5,
    "demote_after_days": 7.0,
    "fuse": {"enabled": False, "threshold": 0.95},
    "eviction": "gdsf",
}


def _shared_cube(server):
    _, owner_key = server.new_user()
    reader_id, reader_key = server.new_user()
    writer_id, writer_key = server.new_user()
    _, stranger_key = server.new_user()
    with server.client(owner_key) as owner:
        cube_id = owner.post("/v1/cubes", json={"name": "p"}).json()["id"]
        for user_id, role in ((reader_id, "reader"), (writer_id, "writer")):
            owner.post(f"/v1/cubes/{cube_id}/grants", json={"user_id": user_id, "role": role})
    return cube_id, owner_key, reader_key, writer_key, stranger_key


def _policy(body):
    return {k: body[k] for k in DEFAULTS}


def test_a_new_cube_follows_the_daemon_defaults(server):
    cube_id, owner_key, reader_key, writer_key, _ = _shared_cube(server)
    for key in (owner_key, reader_key, writer_key):
        with server.client(key) as client:
            body = client.get(f"/v1/cubes/{cube_id}/policy").json()
            assert _policy(body) == DEFAULTS
            assert (body["version"], body["overrides"], body["changed_at"]) == (0, [], None)


def test_the_owner_sets_fields_and_each_change_is_a_version(server):
    cube_id, owner_key, reader_key, _, _ = _shared_cube(server)
    path = f"/v1/cubes/{cube_id}/policy"
    with server.client(owner_key) as owner:
        first = owner.put(path, json={"memory_ttl_days": 90, "eviction": "lru"})
        assert first.status_code == 200
        assert _policy(first.json()) == {**DEFAULTS, "memory_ttl_days": 90.0, "eviction": "lru"}
        assert first.json()["version"] == 1
        assert first.json()["overrides"] == ["memory_ttl_days", "eviction"]
        second = owner.put(path, json={"fuse": {"enabled": True}, "memory_ttl_days": None})
        assert _policy(second.json()) == {
            **DEFAULTS, "eviction": "lru", "fuse": {"enabled": True, "threshold": 0.95}
        }  # fmt: skip
        assert second.json()["version"] == 2
    with server.client(reader_key) as reader:
        assert _policy(reader.get(path).json()) == _policy(second.json())
        items = reader.get(f"{path}/history").json()["items"]
        assert [(i["version"], i["memory_ttl_days"], i["fuse"]["enabled"]) for i in items] == [
            (1, 90.0, False), (2, None, True)
        ]  # fmt: skip


def test_readers_writers_and_strangers_cannot_change_it(server):
    cube_id, owner_key, reader_key, writer_key, stranger_key = _shared_cube(server)
    path = f"/v1/cubes/{cube_id}/policy"
    for key in (reader_key, writer_key):
        with server.client(key) as client:
            r = client.put(path, json={"eviction": "lfu"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    with server.client(stranger_key) as stranger:
        for method in ("GET", "PUT"):
            r = stranger.request(method, path, json={"eviction": "lfu"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "cube_not_found"
        assert stranger.get(f"{path}/history").status_code == 404
    with server.client(owner_key) as owner:
        assert owner.get(path).json()["version"] == 0  # nothing changed


def test_bad_values_are_422_naming_the_problem_and_change_nothing(server):
    cube_id, owner_key, *_ = _shared_cube(server)
    path = f"/v1/cubes/{cube_id}/policy"
    with server.client(owner_key) as owner:
        owner.put(path, json={"hot_recalls": 9})
        for body, says in [
            ({"eviction": "fifo"}, "eviction: eviction policy 'fifo' is not one of"),
            ({"memory_ttl_days": 0}, "memory_ttl_days: Input should be greater than 0"),
            ({"deleted_retention_days": -1}, "deleted_retention_days: Input should be greater"),
            ({"fuse": {"threshold": 2}}, "fuse.threshold: Input should be less than or equal"),
            ({"hot_recalls": None}, "hot_recalls: Input should be a valid integer"),
        ]:
            r = owner.put(path, json=body)
            assert r.status_code == 422, body
            error = r.json()["error"]
            assert error["code"] == "invalid_policy" and says in error["message"], error
        r = owner.put(path, json={"bytes": 5})  # not a field at all
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
        body = owner.get(path).json()
        assert (body["version"], body["hot_recalls"]) == (1, 9)


def test_concurrent_changes_each_get_their_own_version(server):
    """Eight first changes at once: every one answers 200 and becomes one version (two used to
    read "no version yet" together on PostgreSQL, and the second insert failed with a 500)."""
    from concurrent.futures import ThreadPoolExecutor

    cube_id, owner_key, _, _, _ = _shared_cube(server)
    path = f"/v1/cubes/{cube_id}/policy"

    def change(days: int) -> int:
        with server.client(owner_key) as owner:
            r = owner.put(path, json={"memory_ttl_days": days})
            assert r.status_code == 200, r.text
            return int(r.json()["version"])

    with ThreadPoolExecutor(8) as pool:
        versions = sorted(pool.map(change, range(1, 9)))
    assert versions == list(range(1, 9))
    with server.client(owner_key) as owner:
        assert len(owner.get(f"{path}/history").json()["items"]) == 8
