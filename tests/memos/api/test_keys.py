"""API keys: a user lists, creates and revokes their own; the admin lists users. SQLite and PG."""

from __future__ import annotations

import secrets

import httpx

from memos.settings import QuotasConfig

KEY_FIELDS = {"id", "name", "prefix", "created_at", "revoked_at"}


def test_user_lists_creates_and_revokes_own_keys(server):
    _, first = server.new_user()
    with server.client(first) as client:
        listed = client.get("/v1/keys").json()
        assert listed["next_cursor"] is None
        (initial,) = listed["items"]
        assert set(initial) == KEY_FIELDS  # no secret, no hash
        assert initial["name"] == "initial" and initial["prefix"] == first[:8]
        assert initial["revoked_at"] is None

        created = client.post("/v1/keys", json={"name": "laptop"})
        assert created.status_code == 201
        body = created.json()
        assert set(body) == {"id", "name", "prefix", "created_at", "api_key"}
        assert body["name"] == "laptop" and body["api_key"].startswith("msk_")
        assert body["prefix"] == body["api_key"][:8] and body["id"] != initial["id"]
        second = body["api_key"]

        listed = client.get("/v1/keys").json()["items"]
        assert [k["id"] for k in listed] == [initial["id"], body["id"]]
        assert all("api_key" not in k for k in listed)

    with server.client(second) as client:
        assert client.delete(f"/v1/keys/{initial['id']}").status_code == 204
    # The very next request with the revoked key is refused.
    with server.client(first) as revoked:
        r = revoked.get("/v1/cubes")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    with server.client(second) as client:
        listed = client.get("/v1/keys").json()["items"]
        assert [k["id"] for k in listed] == [initial["id"], body["id"]]
        assert listed[0]["revoked_at"] is not None and listed[1]["revoked_at"] is None
        # Revoking a revoked key again changes nothing.
        assert client.delete(f"/v1/keys/{initial['id']}").status_code == 204


def test_the_last_active_key_cannot_be_revoked(server):
    _, key = server.new_user()
    with server.client(key) as client:
        (only,) = client.get("/v1/keys").json()["items"]
        r = client.delete(f"/v1/keys/{only['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "last_key"
        assert client.get("/v1/keys").json()["items"][0]["revoked_at"] is None


def test_another_users_key_is_404(server):
    _, mine = server.new_user()
    _, theirs = server.new_user()
    with server.client(theirs) as other:
        their_key = other.get("/v1/keys").json()["items"][0]["id"]
        other.post("/v1/keys", json={"name": "spare"})
    with server.client(mine) as client:
        client.post("/v1/keys", json={"name": "spare"})
        for key_id in (their_key, "key_999999999", "nope", "key_", "key_-1"):
            r = client.delete(f"/v1/keys/{key_id}")
            assert r.status_code == 404, key_id
            assert r.json()["error"]["code"] == "key_not_found"
    with server.client(theirs) as other:  # still works
        assert other.get("/v1/cubes").status_code == 200


def test_create_key_without_a_body(server):
    _, key = server.new_user()
    with server.client(key) as client:
        r = client.post("/v1/keys")
        assert r.status_code == 201 and r.json()["name"] == ""
        r = client.post("/v1/keys", json={"name": "x", "scope": "all"})
        assert r.status_code == 422  # unknown fields are refused


def test_active_keys_are_bounded(server, monkeypatch):
    monkeypatch.setattr(server.daemon.quotas, "config", QuotasConfig(max_keys_per_user=2))
    _, key = server.new_user()
    with server.client(key) as client:
        assert client.post("/v1/keys", json={"name": "b"}).status_code == 201
        r = client.post("/v1/keys", json={"name": "c"})
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "quota_exceeded"
        assert r.json()["error"]["limit"] == "max_keys_per_user"
        assert len(client.get("/v1/keys").json()["items"]) == 2


def test_keys_are_per_user_and_need_a_key(server):
    assert httpx.get(f"{server.url}/v1/keys").status_code == 401
    _, a = server.new_user()
    _, b = server.new_user()
    with server.client(a) as ca, server.client(b) as cb:
        assert ca.get("/v1/keys").json()["items"][0]["prefix"] == a[:8]
        assert cb.get("/v1/keys").json()["items"][0]["prefix"] == b[:8]


def test_admin_lists_users_in_pages(server):
    names = [f"lister-{secrets.token_hex(3)}" for _ in range(3)]
    with server.client() as admin:
        created = [admin.post("/v1/users", json={"name": n}).json() for n in names]
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = admin.get("/v1/users", params=params).json()
            assert len(page["items"]) <= 2
            seen += page["items"]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert pages >= 2
    ids = [u["id"] for u in seen]
    assert len(ids) == len(set(ids))  # every user once
    by_id = {u["id"]: u for u in seen}
    assert set(by_id["usr_admin"]) == {"id", "name", "is_admin", "created_at"}
    assert by_id["usr_admin"]["is_admin"] is True
    for user, name in zip(created, names, strict=True):
        assert by_id[user["id"]]["name"] == name and by_id[user["id"]]["is_admin"] is False
    # Oldest first: the three new users come last, in creation order.
    assert ids[-3:] == [u["id"] for u in created]


def test_only_the_admin_lists_users(server):
    _, key = server.new_user()
    with server.client(key) as client:
        r = client.get("/v1/users")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
