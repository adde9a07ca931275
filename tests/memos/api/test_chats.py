"""Chat sessions over real HTTP with the real model: turns stored, notes recalled, prefix reused."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.memos.api.conftest import in_thread, model_held, wait_until

SYSTEM = "You are a friendly assistant. Answer in one short sentence."
CHAT_FIELDS = {"id", "cube_id", "session_id", "system", "recall", "max_context_tokens", "backend",
               "sampling", "turns", "created_at", "last_active_at"}  # fmt: skip
REPLY_FIELDS = {"reply", "user_memory_id", "assistant_memory_id", "recalled", "ttft_ms",
                "prompt_tokens", "reused_tokens", "finish_reason",
                "recomputed_tokens", "episode"}  # fmt: skip


def open_chat(client: httpx.Client, cube_id: str, **body) -> dict:
    r = client.post(f"/v1/cubes/{cube_id}/chats", json={"system": SYSTEM, **body})
    assert r.status_code == 201, r.text
    return r.json()


def send(client: httpx.Client, cube_id: str, chat_id: str, content: str, **body) -> dict:
    r = client.post(
        f"/v1/cubes/{cube_id}/chats/{chat_id}/messages",
        json={"content": content, "max_tokens": 8, **body},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_a_chat_stores_both_turns_recalls_notes_and_reuses_its_prefix(server, tenant):
    client, cube_id = tenant
    notes = [
        {"content": "Melanie paints sunrises over the lake every weekend.", "speaker": "Melanie"},
        {"content": "Caroline volunteers at the support group on Tuesdays.", "speaker": "Caroline"},
    ]
    assert client.post(f"/v1/cubes/{cube_id}/memories", json={"items": notes}).status_code == 201
    chat = open_chat(client, cube_id, recall={"top_k": 2})
    assert set(chat) == CHAT_FIELDS
    assert chat["session_id"] == chat["id"] and chat["turns"] == 0
    assert chat["recall"] == {"top_k": 2, "filters": {}} and chat["system"] == SYSTEM

    first = send(client, cube_id, chat["id"], "What does Melanie paint?")
    assert set(first) == REPLY_FIELDS
    assert first["finish_reason"] in {"stop", "length"} and first["reply"]
    assert first["user_memory_id"] and first["assistant_memory_id"]
    recalled = [hit["memory_id"] for hit in first["recalled"]]
    painted = client.get(f"/v1/cubes/{cube_id}/memories").json()["items"][0]["id"]
    assert painted in recalled and all(0 <= hit["score"] <= 1 for hit in first["recalled"])
    assert first["reused_tokens"] == 0 and first["prompt_tokens"] > 0  # nothing loaded yet

    second = send(client, cube_id, chat["id"], "And when does Caroline volunteer?")
    # Only the new turn was prefilled: the system prompt and the first turn were reused.
    runtime = server.daemon.runtime.get()
    history = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What does Melanie paint?"},
        {"role": "assistant", "content": first["reply"]},
    ]
    assert second["reused_tokens"] == len(runtime.template.render(history, False))
    assert second["prompt_tokens"] > second["reused_tokens"]

    messages = client.get(f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages").json()
    assert [(m["role"], m["content"]) for m in messages["items"]] == [
        ("user", "What does Melanie paint?"),
        ("assistant", first["reply"]),
        ("user", "And when does Caroline volunteer?"),
        ("assistant", second["reply"]),
    ]
    assert messages["items"][0]["memory_id"] == first["user_memory_id"]
    # The turns are memories of the chat's session, like any other.
    stored = client.get(
        f"/v1/cubes/{cube_id}/memories", params={"session_id": chat["session_id"]}
    ).json()["items"]
    assert [m["speaker"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1]["metadata"] == {"chat_id": chat["id"]}
    got = client.get(f"/v1/cubes/{cube_id}/chats/{chat['id']}").json()
    assert got["turns"] == 4 and got["last_active_at"] > chat["last_active_at"]
    listed = client.get(f"/v1/cubes/{cube_id}/chats").json()
    assert [c["id"] for c in listed["items"]] == [chat["id"]] and listed["next_cursor"] is None


def test_a_turn_on_the_reused_prefix_answers_exactly_as_a_full_prefill(server, tenant):
    client, cube_id = tenant
    chat = open_chat(client, cube_id, recall={"top_k": 0})
    turns = ["My name is Ada and I keep bees.", "What do I keep?"]
    first = send(client, cube_id, chat["id"], turns[0], max_tokens=12)
    second = send(client, cube_id, chat["id"], turns[1], max_tokens=12)
    assert second["reused_tokens"] > 0 and second["recalled"] == []
    runtime = server.daemon.runtime.get()
    whole = runtime.template.render(
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": turns[0]},
            {"role": "assistant", "content": first["reply"]},
            {"role": "user", "content": turns[1]},
        ]
    )
    assert second["prompt_tokens"] == len(whole)
    assert second["reply"] == runtime.generate(whole, max_tokens=12).collect().text


def test_a_chat_opened_on_an_existing_session_continues_it(server, tenant):
    client, cube_id = tenant
    said = [
        {"content": "I adopted a puppy named Oscar.", "speaker": "Caroline", "session_id": "s1"},
        {"content": "Oscar is a lovely name!", "speaker": "Melanie", "session_id": "s1"},
    ]
    client.post(f"/v1/cubes/{cube_id}/memories", json={"items": said})
    chat = open_chat(client, cube_id, session_id="s1", recall={"top_k": 0})
    assert chat["session_id"] == "s1" and chat["turns"] == 2
    reply = send(client, cube_id, chat["id"], "What is the puppy called?", speaker="Caroline")
    runtime = server.daemon.runtime.get()
    whole = runtime.template.render(
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Caroline: I adopted a puppy named Oscar."},
            {"role": "user", "content": "Melanie: Oscar is a lovely name!"},
            {"role": "user", "content": "Caroline: What is the puppy called?"},
        ]
    )
    assert reply["prompt_tokens"] == len(whole)
    items = client.get(f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages").json()["items"]
    assert [(m["role"], m["speaker"]) for m in items] == [
        ("user", "Caroline"), ("user", "Melanie"), ("user", "Caroline"), ("assistant", "assistant")
    ]  # fmt: skip


def test_a_long_conversation_never_fails_its_window_moves_and_old_turns_stay_recallable(
    server, tenant
):
    client, cube_id = tenant
    chat = open_chat(client, cube_id, max_context_tokens=64, recall={"top_k": 3})
    facts = [
        "My sister lives in Lisbon and teaches violin to children.",
        "My brother repairs old motorcycles in a garage in Porto.",
        "My cousin grows tomatoes and peppers on her balcony.",
        "My uncle sails a small wooden boat every summer.",
    ]
    for fact in facts:
        send(client, cube_id, chat["id"], fact)
    row = server.daemon.chats.catalogue.record(cube_id, chat["id"])
    assert row.window_from_seq > 0  # the first turns left the verbatim window
    reply = send(client, cube_id, chat["id"], "Where does my sister live and what does she teach?")
    first_turn = client.get(f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages").json()["items"][0]
    assert first_turn["content"] == facts[0]
    assert first_turn["memory_id"] in [hit["memory_id"] for hit in reply["recalled"]]


def test_one_turn_at_a_time_a_second_message_gets_409_chat_busy(server, tenant):
    client, cube_id = tenant
    chat = open_chat(client, cube_id, recall={"top_k": 0})
    url = f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages"
    with model_held(server):
        thread, out = in_thread(lambda: client.post(url, json={"content": "Hi!", "max_tokens": 4}))
        wait_until(lambda: server.daemon.chats.stats().busy == 1, "the first turn runs")
        r = client.post(url, json={"content": "Hello?", "max_tokens": 4})
        assert r.status_code == 409 and r.json()["error"]["code"] == "chat_busy"
        r = client.delete(f"/v1/cubes/{cube_id}/chats/{chat['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "chat_busy"
    thread.join(timeout=300)
    assert out[0].status_code == 200, out[0].text
    items = client.get(f"{url}").json()["items"]
    assert [m["content"] for m in items][:1] == ["Hi!"] and len(items) == 2


def test_a_turn_whose_client_leaves_stores_nothing(server, tenant):
    client, cube_id = tenant
    chat = open_chat(client, cube_id, recall={"top_k": 0})
    url = f"{server.url}/v1/cubes/{cube_id}/chats/{chat['id']}/messages"
    body = {
        "content": "Tell me a very long story about the sea.",
        "max_tokens": 400,
        "stream": True,
    }
    with httpx.stream("POST", url, json=body, headers=client.headers, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: piece"):
                break  # one piece, then the client goes away
    wait_until(lambda: server.daemon.chats.stats().busy == 0, "the turn ends")
    assert server.daemon.chats.stats().turns.get("cancelled", 0) >= 1
    assert client.get(f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages").json()["items"] == []
    # The chat goes on: its prefix was given back as it was before the turn.
    reply = send(client, cube_id, chat["id"], "Hello!")
    assert reply["user_memory_id"] is not None


def test_a_streamed_turn_sends_pieces_then_the_reply_body(tenant):
    client, cube_id = tenant
    chat = open_chat(client, cube_id, recall={"top_k": 0})
    url = f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages"
    with client.stream(
        "POST", url, json={"content": "Say hello.", "max_tokens": 8, "stream": True}
    ) as r:
        events = [line for line in r.iter_lines() if line.startswith(("event:", "data:"))]
    names = [e.removeprefix("event: ") for e in events if e.startswith("event:")]
    assert names[-1] == "done" and set(names[:-1]) <= {"piece"}
    done = json.loads(events[-1].removeprefix("data: "))
    pieces = [json.loads(e.removeprefix("data: "))["text"] for e in events[1:-1:2]]
    assert set(done) == REPLY_FIELDS and "".join(pieces) == done["reply"]
    assert done["user_memory_id"] is not None


def test_a_saved_prefix_is_loaded_instead_of_prefilled_again(server, tenant):
    client, cube_id = tenant
    chat = open_chat(client, cube_id, recall={"top_k": 0})
    first = send(client, cube_id, chat["id"], "Remember the number 42.")
    chats = server.daemon.chats
    assert chats.save_all()["saved"] >= 1
    row = chats.catalogue.record(cube_id, chat["id"])
    saved = client.get(f"/v1/cubes/{cube_id}/activations/{row.prefix_activation_id}").json()
    assert saved["state"] == "ready" and saved["bits"] == 16 and saved["tokens"] > 0
    chats.loaded.pop(chat["id"])  # as after an eviction or a restart: nothing in memory
    second = send(client, cube_id, chat["id"], "Which number?")
    assert second["reused_tokens"] == saved["tokens"]
    assert first["assistant_memory_id"] and second["assistant_memory_id"]


def test_chat_access_and_bad_input(server, tenant):
    client, cube_id = tenant
    chat = open_chat(client, cube_id)
    url = f"/v1/cubes/{cube_id}/chats"
    reader_id, reader_key = server.new_user()
    client.post(f"/v1/cubes/{cube_id}/grants", json={"user_id": reader_id, "role": "reader"})
    with server.client(reader_key) as reader:
        assert reader.get(f"{url}/{chat['id']}").status_code == 200
        r = reader.post(f"{url}/{chat['id']}/messages", json={"content": "hi"})
        assert r.status_code == 403
        assert reader.post(url, json={}).status_code == 403
    _, stranger_key = server.new_user()
    with server.client(stranger_key) as stranger:
        assert stranger.get(f"{url}/{chat['id']}").status_code == 404
        r = stranger.post(f"{url}/{chat['id']}/messages", json={"content": "hi"})
        assert r.status_code == 404
    for bad in (
        {"content": ""},
        {"content": "hi", "max_tokens": 0},
        {"content": "hi", "max_tokens": "5"},
        {"content": "hi", "stream": "yes"},
        {"content": "hi", "role": "system"},
    ):
        r = client.post(f"{url}/{chat['id']}/messages", json=bad)
        assert r.status_code == 422, (bad, r.text)
    for bad in (
        {"max_context_tokens": 10},
        {"recall": {"top_k": -1}},
        {"sampling": {"temperature": "hot"}},
        {"system": "   "},
    ):
        assert client.post(url, json=bad).status_code == 422, bad
    assert client.get(f"{url}/chat_nope").json()["error"]["code"] == "chat_not_found"
    assert client.get(f"{url}/{chat['id']}/messages").json()["items"] == []


def test_deleting_a_chat_keeps_its_memories_unless_purged(server, tenant):
    client, cube_id = tenant
    kept = open_chat(client, cube_id, recall={"top_k": 0})
    send(client, cube_id, kept["id"], "Keep this.")
    purged = open_chat(client, cube_id, recall={"top_k": 0})
    send(client, cube_id, purged["id"], "Forget this.")
    server.daemon.chats.save_all()
    prefix_id = server.daemon.chats.catalogue.record(cube_id, purged["id"]).prefix_activation_id
    assert client.delete(f"/v1/cubes/{cube_id}/chats/{kept['id']}").status_code == 204
    r = client.delete(f"/v1/cubes/{cube_id}/chats/{purged['id']}", params={"purge": "true"})
    assert r.status_code == 204
    assert client.get(f"/v1/cubes/{cube_id}/chats/{kept['id']}").status_code == 404
    sessions = {
        m["session_id"] for m in client.get(f"/v1/cubes/{cube_id}/memories").json()["items"]
    }
    assert sessions == {kept["session_id"]}
    assert client.get(f"/v1/cubes/{cube_id}/activations/{prefix_id}").status_code == 404


@pytest.mark.parametrize("content", ["x" * 70_000])
def test_a_message_over_the_prompt_limit_is_413_and_stores_nothing(tenant, content):
    client, cube_id = tenant
    chat = open_chat(client, cube_id, recall={"top_k": 0})
    r = client.post(f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages", json={"content": content})
    assert r.status_code == 413
    assert client.get(f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages").json()["items"] == []


def test_recall_is_the_searchs_top_k_when_the_window_holds_none_of_it(tenant):
    """The notes a turn recalls are those a search with the chat's top_k and filters ranks
    first (asking search for a larger pool would rank differently)."""
    client, cube_id = tenant
    facts = [
        "Caroline went to the LGBTQ support group on Tuesday.",
        "Melanie painted a sunrise over the lake last week.",
        "Caroline is researching adoption agencies.",
        "Melanie's kids love pottery and camping.",
        "Caroline gave a talk at a school about her journey.",
        "Melanie ran a charity race for mental health.",
    ]
    items = [{"content": f, "metadata": {"kind": "note"}} for f in facts]
    client.post(f"/v1/cubes/{cube_id}/memories", json={"items": items})
    filters = {"metadata": {"kind": "note"}}
    chat = open_chat(client, cube_id, recall={"top_k": 2, "filters": filters})
    for question in ("What did Melanie paint?", "What is Caroline researching?"):
        reply = send(client, cube_id, chat["id"], question)
        hits = client.post(
            f"/v1/cubes/{cube_id}/search",
            json={"query": question, "top_k": 2, "filters": filters},
        ).json()["hits"]
        assert [h["memory_id"] for h in reply["recalled"]] == [h["memory"]["id"] for h in hits]
