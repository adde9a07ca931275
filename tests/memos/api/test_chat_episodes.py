"""A long chat's old part as an episodic activation, over real HTTP with the real model and
embedder: built in the background once the window moves, turns routed to the episode of their
topic with the window reused on it, rebuilt after growth, and a chat whose activation is
deleted keeps answering without it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import LiveServer
from tests.memos.api.conftest import wait_until
from tests.memos.api.test_episodic import BAKING_QUESTION, CONVERSATION, HIKING_QUESTION

BUDGET = 96


@pytest.fixture
def live(server: LiveServer, monkeypatch) -> LiveServer:
    """The shared daemon, its chats building small old parts for this test: 2 episodes of 96
    tokens, blocks of 128 (the settings are read at each turn)."""
    config = server.daemon.chats.config
    monkeypatch.setattr(config, "episodic_episodes", 2)
    monkeypatch.setattr(config, "episodic_budget_tokens", BUDGET)
    monkeypatch.setattr(config, "episodic_block_tokens", 128)
    monkeypatch.setattr(config, "episodic_rebuild_share", 0.25)
    return server


@pytest.fixture
def chat(live: LiveServer) -> Iterator[tuple[httpx.Client, str, str]]:
    """(client, cube id, chat id): a chat opened on an imported two-topic conversation, with a
    window too small for it (the first turn moves the window forward)."""
    _, key = live.new_user()
    with live.client(key) as client:
        cube_id = client.post("/v1/cubes", json={"name": "main"}).json()["id"]
        items = [
            {"content": text, "speaker": speaker, "session_id": "s1",
             "timestamp": f"2023-05-08T13:{i:02d}:00Z"}
            for i, (speaker, text) in enumerate(CONVERSATION)
        ]  # fmt: skip
        assert client.post(f"/v1/cubes/{cube_id}/memories", json={"items": items}).is_success
        body = {"session_id": "s1", "max_context_tokens": 256, "recall": {"top_k": 0}}
        r = client.post(f"/v1/cubes/{cube_id}/chats", json=body)
        assert r.status_code == 201, r.text
        yield client, cube_id, r.json()["id"]


def send(client: httpx.Client, cube_id: str, chat_id: str, content: str) -> dict:
    r = client.post(
        f"/v1/cubes/{cube_id}/chats/{chat_id}/messages",
        json={"content": content, "max_tokens": 8, "speaker": "Ana"},
    )
    assert r.status_code == 200, r.text
    return r.json()


def builds(live: LiveServer, cube_id: str, chat_id: str) -> list:
    record = live.daemon.chats.catalogue.record(cube_id, chat_id)
    return live.daemon.chats.episodes.builds(record)


def ready(
    live: LiveServer, client: httpx.Client, cube_id: str, chat_id: str, more_than: int = 0
) -> dict:
    """The chat's newest old part once a build over more than `more_than` old turns is ready."""

    def done() -> bool:
        found = builds(live, cube_id, chat_id)
        if any(b.state in ("failed", "corrupt") for b in found):
            raise AssertionError(f"an old-part build failed: {found}")
        return any(b.state == "ready" and b.old_turns > more_than for b in found)

    wait_until(done, "the chat's old part is built", timeout=180)
    newest = [b for b in builds(live, cube_id, chat_id) if b.state == "ready"][-1]
    r = client.get(f"/v1/cubes/{cube_id}/activations/{newest.id}")
    assert r.status_code == 200, r.text
    return {**r.json(), "old_turns": newest.old_turns}


def on_the_episode(
    live: LiveServer, cube_id: str, chat_id: str, activation_id: str, question: str
) -> tuple[str, int]:
    """(reply, prompt tokens) of the chat's next turn done without any reuse: the window and
    the message rendered after the episode's messages, generated on the episode's cache."""
    daemon = live.daemon
    runtime = daemon.runtime.get()
    row = daemon.activations.catalogue.view(cube_id, activation_id)
    kv, _, before = daemon.activations.generations.episode(runtime, row, question)
    record = daemon.chats.catalogue.record(cube_id, chat_id)
    turns = daemon.chats.history.recent(cube_id, "s1", record.window_from_seq, 1000)
    window = [t.message() for t in turns]
    template = runtime.template
    ids = template.render_delta(before, window, add_generation_prompt=False)
    ids += template.render_delta(
        [*before, *window], [{"role": "user", "content": f"Ana: {question}"}]
    )
    reply = runtime.generate(ids, kv=kv, max_tokens=8).collect().text
    return reply, kv.kept + len(ids)


def episode_of(act: dict, window: int) -> int:
    return next(e["index"] for e in act["episodes"] if window in e["windows"])


def test_a_long_chat_builds_its_old_part_and_routes_turns_to_their_topic(live, chat):
    client, cube_id, chat_id = chat
    first = send(client, cube_id, chat_id, "Tell me more about that.")
    assert first["episode"] is None  # the old part is only now being built
    record = live.daemon.chats.catalogue.record(cube_id, chat_id)
    assert record.window_from_seq > 0
    act = ready(live, client, cube_id, chat_id)
    assert act["episodes"] is not None and len(act["episodes"]) == 2
    assert all(0 < e["kept_tokens"] <= BUDGET for e in act["episodes"])
    hiking, baking = episode_of(act, 0), episode_of(act, 1)  # windows 0 and 1: the topics
    assert hiking != baking

    asked = send(client, cube_id, chat_id, HIKING_QUESTION)
    assert asked["episode"] == hiking
    # A new base: only the episode's kept tokens were not prefilled (the window was).
    kept = act["episodes"][hiking]["kept_tokens"]
    assert asked["reused_tokens"] == kept
    expected = on_the_episode(live, cube_id, chat_id, act["id"], HIKING_QUESTION)
    again = send(client, cube_id, chat_id, HIKING_QUESTION)
    assert again["episode"] == hiking
    assert again["reused_tokens"] > kept  # the same base: the window was reused on it too
    # Exact: the same answer and prompt as one generation of the whole prompt on the episode.
    assert (again["reply"], again["prompt_tokens"]) == expected
    other = send(client, cube_id, chat_id, BAKING_QUESTION)
    assert other["episode"] == baking
    assert other["reused_tokens"] == act["episodes"][baking]["kept_tokens"]


def test_the_old_part_is_built_again_once_it_has_grown_by_the_share(live, chat):
    client, cube_id, chat_id = chat
    send(client, cube_id, chat_id, "Tell me more about that.")
    first = ready(live, client, cube_id, chat_id)
    grown = first["old_turns"] * 1.25
    for n in range(30):  # each turn adds two; the window moves in steps
        send(client, cube_id, chat_id, f"Here is one more thing to remember, number {n}.")
        record = live.daemon.chats.catalogue.record(cube_id, chat_id)
        old = live.daemon.chats.history.count_before(cube_id, "s1", record.window_from_seq)
        if old >= grown:
            break
    else:
        raise AssertionError("the window never moved far enough")
    send(client, cube_id, chat_id, HIKING_QUESTION)  # the move is seen: a build starts
    second = ready(live, client, cube_id, chat_id, more_than=first["old_turns"])
    assert second["id"] != first["id"] and second["old_turns"] >= grown
    reply = send(client, cube_id, chat_id, HIKING_QUESTION)
    assert reply["episode"] is not None
    assert [b.id for b in builds(live, cube_id, chat_id)] == [second["id"]]  # the old one went


def test_a_chat_whose_old_part_was_deleted_keeps_answering(live, chat):
    client, cube_id, chat_id = chat
    send(client, cube_id, chat_id, "Tell me more about that.")
    act = ready(live, client, cube_id, chat_id)
    assert send(client, cube_id, chat_id, HIKING_QUESTION)["episode"] is not None
    r = client.delete(f"/v1/cubes/{cube_id}/activations/{act['id']}")
    assert r.status_code == 204, r.text
    reply = send(client, cube_id, chat_id, HIKING_QUESTION)
    assert (
        reply["episode"] is None and reply["reply"] and reply["finish_reason"] in ("stop", "length")
    )
    # Deleting the chat removes the old part it built meanwhile.
    assert client.delete(f"/v1/cubes/{cube_id}/chats/{chat_id}").status_code == 204
