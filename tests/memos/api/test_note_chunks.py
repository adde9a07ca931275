"""Notes as activation memory: per-note KV chunks built, listed, dropped with their note, and
blended into chat turns (issue 12), over real HTTP with the real model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import pytest

from memos.services.activations.notes import note_line
from memos.services.ids import note_chunk_id

NOTES = [
    {"content": "Melanie paints sunrises over the lake.", "speaker": "Melanie",
     "session_id": "facts", "timestamp": "2023-05-08T13:56:00Z"},
    {"content": "Caroline volunteers on Tuesdays.", "speaker": "Caroline",
     "session_id": "facts", "timestamp": "2023-05-09T10:00:00Z"},
]  # fmt: skip
SYSTEM = "You are a friendly assistant. Answer in one short sentence."


def add_notes(client, cube_id: str) -> list[dict]:
    r = client.post(f"/v1/cubes/{cube_id}/memories", json={"items": NOTES})
    assert r.status_code == 201, r.text
    return r.json()["items"]


def chunk(client, cube_id: str, ids: list[str], **body) -> list[dict]:
    r = client.post(
        f"/v1/cubes/{cube_id}/activations", json={"memory_ids": ids, "per_memory": True, **body}
    )
    assert r.status_code == 201, r.text
    return r.json()["items"]


def has_kv(client, cube_id: str) -> dict[str, bool]:
    items = client.get(f"/v1/cubes/{cube_id}/memories").json()["items"]
    return {m["id"]: m["has_kv"] for m in items}


@contextmanager
def recompute_ratio(server, ratio: float) -> Iterator[None]:
    config = server.daemon.activations.config
    before = config.blend_recompute_ratio
    config.blend_recompute_ratio = ratio
    try:
        yield
    finally:
        config.blend_recompute_ratio = before


def test_per_memory_builds_one_chunk_per_note_skips_current_ones_and_follows_edits(server, tenant):
    client, cube_id = tenant
    notes = add_notes(client, cube_id)
    ids = [n["id"] for n in notes]
    assert has_kv(client, cube_id) == dict.fromkeys(ids, False)

    built = chunk(client, cube_id, ids)
    runtime = server.daemon.runtime.get()
    assert [a["memory_id"] for a in built] == ids
    assert [a["id"] for a in built] == [note_chunk_id(n["id"], n["version"]) for n in notes]
    for act, note in zip(built, notes, strict=True):
        assert (act["kind"], act["state"], act["bits"]) == ("note", "ready", 16)
        # The chunk holds the note's line exactly as a chat's notes block renders it.
        line = note_line(note["speaker"], datetime.fromisoformat(note["timestamp"]),
                         note["content"])  # fmt: skip
        assert act["tokens"] == act["kept_tokens"] == len(runtime.tokenize(line))
        assert act["bytes"] > 0
    assert has_kv(client, cube_id) == dict.fromkeys(ids, True)
    listed = client.get(f"/v1/cubes/{cube_id}/activations").json()["items"]
    assert sorted((a["id"], a["kind"]) for a in listed) == sorted((a["id"], "note") for a in built)

    # Current chunks are kept, not built again (whatever the bits asked for).
    again = chunk(client, cube_id, [ids[1], ids[0]], compression={"bits": 4})
    assert [a["id"] for a in again] == [built[1]["id"], built[0]["id"]]
    assert [a["created_at"] for a in again] == [built[1]["created_at"], built[0]["created_at"]]

    # Editing a note drops its chunk; the other keeps its own.
    r = client.patch(f"/v1/cubes/{cube_id}/memories/{ids[0]}", json={"content": "Melanie sings."})
    assert r.status_code == 200 and r.json()["has_kv"] is False
    assert has_kv(client, cube_id) == {ids[0]: False, ids[1]: True}
    assert client.get(f"/v1/cubes/{cube_id}/activations/{built[0]['id']}").status_code == 404
    assert not (server.daemon.settings.activation_dir / cube_id / built[0]["id"]).exists()
    # Its new version is chunked anew, here at 4 bits (KIVI).
    (fresh,) = chunk(client, cube_id, [ids[0]], compression={"bits": 4})
    assert fresh["id"] == note_chunk_id(ids[0], 2) and fresh["bits"] == 4
    assert has_kv(client, cube_id) == dict.fromkeys(ids, True)

    # Deleting a note drops its chunk too.
    assert client.delete(f"/v1/cubes/{cube_id}/memories/{ids[1]}").status_code == 204
    assert client.get(f"/v1/cubes/{cube_id}/activations/{built[1]['id']}").status_code == 404
    left = client.get(f"/v1/cubes/{cube_id}/activations").json()["items"]
    assert [a["id"] for a in left] == [fresh["id"]]


def test_erasing_a_note_erases_its_chunk_files_and_all(server, tenant):
    client, cube_id = tenant
    ids = [n["id"] for n in add_notes(client, cube_id)]
    built = chunk(client, cube_id, ids)
    folder = server.daemon.settings.activation_dir / cube_id
    assert (folder / built[0]["id"]).exists()
    r = client.delete(f"/v1/cubes/{cube_id}/memories/{ids[0]}", params={"erase": "true"})
    assert r.status_code == 204
    left = client.get(f"/v1/cubes/{cube_id}/activations").json()["items"]
    assert [a["id"] for a in left] == [built[1]["id"]]
    assert not (folder / built[0]["id"]).exists()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"text": "hello there", "per_memory": True}, 422, "invalid_argument"),
        ({"session_id": "facts", "per_memory": True}, 422, "invalid_argument"),
        ({"session_ids": ["facts"], "per_memory": True}, 422, "invalid_argument"),
        ({"memory_ids": "IDS", "per_memory": True, "compression": {"budget_tokens": 8}}, 422,
         "invalid_argument"),
        ({"memory_ids": "IDS", "per_memory": True,
          "episodic": {"episodes": 1, "budget_tokens": 64}}, 422, "invalid_argument"),
        ({"memory_ids": "IDS", "per_memory": "yes"}, 422, "validation_error"),
        ({"memory_ids": ["mem_nope"], "per_memory": True}, 404, "memory_not_found"),
    ],
)  # fmt: skip
def test_bad_per_memory_requests_are_refused_and_change_nothing(tenant, body, status, code):
    client, cube_id = tenant
    ids = [n["id"] for n in add_notes(client, cube_id)]
    if body.get("memory_ids") == "IDS":
        body = {**body, "memory_ids": ids}
    r = client.post(f"/v1/cubes/{cube_id}/activations", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert client.get(f"/v1/cubes/{cube_id}/activations").json()["items"] == []
    assert has_kv(client, cube_id) == dict.fromkeys(ids, False)


def test_readers_cannot_build_chunks_and_strangers_see_nothing(server, tenant):
    client, cube_id = tenant
    ids = [n["id"] for n in add_notes(client, cube_id)]
    reader_id, reader_key = server.new_user()
    _, stranger_key = server.new_user()
    grant = {"user_id": reader_id, "role": "reader"}
    assert client.post(f"/v1/cubes/{cube_id}/grants", json=grant).status_code in (200, 201)
    body = {"memory_ids": ids, "per_memory": True}
    asked = {"prompt": "Who paints?", "memory_ids": ids, "max_tokens": 2}
    with server.client(reader_key) as reader:
        r = reader.post(f"/v1/cubes/{cube_id}/activations", json=body)
        assert r.status_code == 403, r.text
        assert reader.post(f"/v1/cubes/{cube_id}/generate", json=asked).status_code == 200
    with server.client(stranger_key) as stranger:
        r = stranger.post(f"/v1/cubes/{cube_id}/activations", json=body)
        assert r.status_code == 404, r.text
        assert stranger.post(f"/v1/cubes/{cube_id}/generate", json=asked).status_code == 404
    assert has_kv(client, cube_id) == dict.fromkeys(ids, False)


def open_chat(client, cube_id: str) -> str:
    body = {"system": SYSTEM, "recall": {"top_k": 2, "filters": {"session_id": "facts"}}}
    r = client.post(f"/v1/cubes/{cube_id}/chats", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def ask(client, cube_id: str, chat_id: str) -> dict:
    r = client.post(
        f"/v1/cubes/{cube_id}/chats/{chat_id}/messages",
        json={"content": "What does Melanie paint?", "max_tokens": 8},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_a_chat_turn_blends_its_recalled_notes_chunks_exactly_at_ratio_one(server, tenant):
    client, cube_id = tenant
    ids = [n["id"] for n in add_notes(client, cube_id)]
    plain = ask(client, cube_id, open_chat(client, cube_id))
    assert sorted(h["memory_id"] for h in plain["recalled"]) == sorted(ids)
    assert plain["recomputed_tokens"] == 0 and plain["reused_tokens"] == 0

    chunk_tokens = sum(a["tokens"] for a in chunk(client, cube_id, ids))
    # Blended at the default ratio: a share of the chunks recomputed, the rest reused.
    blended = ask(client, cube_id, open_chat(client, cube_id))
    assert [h["memory_id"] for h in blended["recalled"]] == [
        h["memory_id"] for h in plain["recalled"]
    ]
    assert 0 < blended["recomputed_tokens"] < chunk_tokens
    # A fresh chat has no prefix yet: what it reused is exactly the chunks' kept tokens.
    assert blended["reused_tokens"] == chunk_tokens - blended["recomputed_tokens"]
    assert blended["prompt_tokens"] == plain["prompt_tokens"]

    # r = 1 recomputes every chunk token: a full prefill's cache, the plain reply (greedy).
    with recompute_ratio(server, 1.0):
        exact = ask(client, cube_id, open_chat(client, cube_id))
    assert (exact["recomputed_tokens"], exact["reused_tokens"]) == (chunk_tokens, 0)
    assert exact["reply"] == plain["reply"]
    assert exact["prompt_tokens"] == plain["prompt_tokens"]


def test_a_blended_turn_leaves_the_chat_prefix_without_its_notes(server, tenant):
    client, cube_id = tenant
    ids = [n["id"] for n in add_notes(client, cube_id)]
    chunk_tokens = sum(a["tokens"] for a in chunk(client, cube_id, ids))
    chat_id = open_chat(client, cube_id)
    first = ask(client, cube_id, chat_id)
    assert first["recomputed_tokens"] > 0
    # The prefix holds system + the stored turn (no notes): the next turn reuses all of it.
    runtime = server.daemon.runtime.get()
    history = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What does Melanie paint?"},
        {"role": "assistant", "content": first["reply"]},
    ]
    second = ask(client, cube_id, chat_id)
    held = len(runtime.template.render(history, False))
    assert second["recomputed_tokens"] > 0
    assert second["reused_tokens"] == held + chunk_tokens - second["recomputed_tokens"]


def generate(client, cube_id: str, **body) -> dict:
    r = client.post(
        f"/v1/cubes/{cube_id}/generate",
        json={"prompt": "What does Melanie paint?", "max_tokens": 6, **body},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_blends_the_chunks_of_the_notes_it_names(server, tenant):
    client, cube_id = tenant
    ids = [n["id"] for n in add_notes(client, cube_id)]
    plain = generate(client, cube_id, memory_ids=ids)
    assert (plain["reused_tokens"], plain["recomputed_tokens"]) == (0, 0)
    bare = generate(client, cube_id)
    assert plain["prompt_tokens"] > bare["prompt_tokens"]  # the notes are in the prompt

    chunk_tokens = sum(a["tokens"] for a in chunk(client, cube_id, ids))
    blended = generate(client, cube_id, memory_ids=ids)
    assert 0 < blended["recomputed_tokens"] < chunk_tokens
    assert blended["reused_tokens"] == chunk_tokens - blended["recomputed_tokens"]
    # As with an activation, the tokens reused are not counted as the prompt's.
    assert blended["prompt_tokens"] + blended["reused_tokens"] == plain["prompt_tokens"]
    with recompute_ratio(server, 1.0):
        exact = generate(client, cube_id, memory_ids=ids)
    assert (exact["reused_tokens"], exact["recomputed_tokens"]) == (0, chunk_tokens)
    assert exact["text"] == plain["text"] and exact["prompt_tokens"] == plain["prompt_tokens"]

    # Only the notes named are in the prompt; one with a chunk, one without, is fine too.
    r = client.patch(f"/v1/cubes/{cube_id}/memories/{ids[1]}", json={"content": "Caroline sings."})
    assert r.status_code == 200
    (kept,) = chunk(client, cube_id, [ids[0]])  # its current chunk, unchanged
    mixed = generate(client, cube_id, memory_ids=ids)
    assert mixed["reused_tokens"] + mixed["recomputed_tokens"] == kept["tokens"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"memory_ids": "IDS", "activation_id": "act_x"}, 422, "invalid_argument"),
        ({"memory_ids": []}, 422, "validation_error"),
        ({"memory_ids": ["mem_nope"]}, 404, "memory_not_found"),
    ],
)
def test_bad_generate_with_memory_ids_is_refused(tenant, body, status, code):
    client, cube_id = tenant
    ids = [n["id"] for n in add_notes(client, cube_id)]
    if body.get("memory_ids") == "IDS":
        body = {**body, "memory_ids": ids}
    r = client.post(f"/v1/cubes/{cube_id}/generate", json={"prompt": "hi", **body})
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def complete(server, client, cube_id: str, ids: list[str]) -> dict:
    body = {
        "model": server.daemon.runtime.get().fingerprint.model,
        "prompt": "Melanie paints",
        "max_tokens": 5,
        "temperature": 0,
        "memos": {"cube_id": cube_id, "memory_ids": ids},
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_blend_the_chunks_of_the_notes_they_name(server, tenant):
    client, cube_id = tenant
    ids = [n["id"] for n in add_notes(client, cube_id)]
    plain = complete(server, client, cube_id, ids)
    assert plain["memos"] == {"episodes": [], "reused_tokens": [0], "recomputed_tokens": [0]}
    chunk_tokens = sum(a["tokens"] for a in chunk(client, cube_id, ids))
    blended = complete(server, client, cube_id, ids)
    (recomputed,) = blended["memos"]["recomputed_tokens"]
    assert 0 < recomputed < chunk_tokens
    assert blended["memos"]["reused_tokens"] == [chunk_tokens - recomputed]
    assert blended["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    with recompute_ratio(server, 1.0):
        exact = complete(server, client, cube_id, ids)
    assert exact["memos"]["recomputed_tokens"] == [chunk_tokens]
    assert exact["choices"][0]["text"] == plain["choices"][0]["text"]
    # Not with an activation, nor to score a prompt; a stranger's cube is not found.
    model = server.daemon.runtime.get().fingerprint.model
    memos = {"cube_id": cube_id, "memory_ids": ids}
    scored = {"model": model, "prompt": "x", "max_tokens": 0, "echo": True, "memos": memos}
    r = client.post("/v1/completions", json=scored)
    assert r.status_code == 422, r.text
    both = {"model": model, "prompt": "x", "activation_id": "act_x", "memos": memos}
    r = client.post("/v1/completions", json=both)
    assert r.status_code == 422, r.text
    _, stranger_key = server.new_user()
    with server.client(stranger_key) as stranger:
        r = stranger.post("/v1/completions", json={"model": model, "prompt": "x", "memos": memos})
        assert r.status_code == 404, r.text
