"""Episodic activations (EpiCache) through the API, on the real model and embedder: built in
the background from a two-topic conversation, one bounded cache per episode, questions routed
to their topic's episode, the same after a restart; bad parameters refused, tenancy as ever."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest

from tests.conftest import _start_live_server, free_port
from tests.memos.api.conftest import model_held, wait_until

# Two topics, four utterances each, alternating: windows 0 and 2 are about hiking, 1 and 3 about
# baking (windows hold 4 utterances).
HIKING = [
    ("Ana", "We hiked the ridge trail to the summit on Saturday."),
    ("Ben", "Did you see the glacier lake below the mountain pass?"),
    ("Ana", "Yes, and my boots finally held up on the rocky descent."),
    ("Ben", "Next time we should camp at the alpine hut near the trailhead."),
    ("Ana", "The trail map said the ridge climbs nine hundred meters."),
    ("Ben", "My legs still ache from the steep switchbacks to the summit."),
    ("Ana", "We saw marmots and an eagle above the glacier."),
    ("Ben", "Let us hike the north ridge trail next month."),
]
BAKING = [
    ("Ana", "I baked sourdough bread with a new rye starter."),
    ("Ben", "How long did the dough proof in the fridge?"),
    ("Ana", "Overnight; the crust came out of the oven dark and crackly."),
    ("Ben", "Share the recipe, I want to bake loaves for the bake sale."),
    ("Ana", "Knead the dough ten minutes and bake it at 250 degrees."),
    ("Ben", "My last loaf of bread came out flat and dense."),
    ("Ana", "Feed the starter with flour and water every morning."),
    ("Ben", "I will bake cinnamon rolls and a rye loaf this weekend."),
]
CONVERSATION = HIKING[:4] + BAKING[:4] + HIKING[4:] + BAKING[4:]
EPISODIC = {"episodes": 2, "budget_tokens": 96, "block_tokens": 128}
HIKING_QUESTION = "Which mountain trail did Ana hike to the summit?"
BAKING_QUESTION = "How long did the sourdough bread dough proof?"


def add_conversation(client: httpx.Client, cube_id: str, session_id: str = "s1") -> list[str]:
    items = [
        {"content": text, "speaker": speaker, "session_id": session_id,
         "timestamp": f"2023-05-08T13:{i:02d}:00Z"}
        for i, (speaker, text) in enumerate(CONVERSATION)
    ]  # fmt: skip
    r = client.post(f"/v1/cubes/{cube_id}/memories", json={"items": items})
    assert r.status_code in (200, 201), r.text
    return [m["id"] for m in r.json()["items"]]


def build(client: httpx.Client, cube_id: str, **source: object) -> dict:
    body = {"session_id": "s1", **source, "episodic": EPISODIC, "compression": {"bits": 4}}
    r = client.post(f"/v1/cubes/{cube_id}/activations", json=body)
    assert r.status_code == 201, r.text
    act = r.json()
    assert act["state"] in ("building", "ready") and act["episodes"] is not None
    url = f"/v1/cubes/{cube_id}/activations/{act['id']}"
    wait_until(lambda: client.get(url).json()["state"] != "building", "the build ends")
    done = client.get(url).json()
    assert done["state"] == "ready", done
    return done


def ask(client: httpx.Client, cube_id: str, activation_id: str, prompt: str) -> dict:
    body = {"prompt": prompt, "activation_id": activation_id, "max_tokens": 8}
    r = client.post(f"/v1/cubes/{cube_id}/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def topic_episodes(act: dict) -> tuple[int, int]:
    """(the hiking episode, the baking episode), from the windows each holds."""
    by_windows = {tuple(e["windows"]): e["index"] for e in act["episodes"]}
    assert set(by_windows) == {(0, 2), (1, 3)}, act["episodes"]
    return by_windows[(0, 2)], by_windows[(1, 3)]


@pytest.fixture
def own_daemon(tmp_path: Path, embedder):
    """Start (and restart) a daemon of our own on one data dir: `start(**runtime settings)`
    -> LiveServer."""
    from memos.settings import Settings

    admin_key, port = f"admin-{secrets.token_hex(8)}", free_port()
    running: list = []

    def start(**runtime: object):
        if running:
            next(running.pop(), None)  # stops the one running
        settings = Settings(
            data_dir=tmp_path / "data",
            admin_key=admin_key,
            port=port,
            enrichment={"enabled": False},
            runtime=runtime,
        )
        servers = _start_live_server(settings, embedder, "sqlite")
        live = next(servers)
        running.append(servers)
        return live

    yield start
    if running:
        next(running.pop(), None)


def test_an_episodic_activation_routes_questions_to_their_episode_and_survives_a_restart(
    own_daemon,
):
    live = own_daemon()
    _, key = live.new_user()
    with live.client(key) as client:
        cube_id = client.post("/v1/cubes", json={"name": "main"}).json()["id"]
        add_conversation(client, cube_id)
        act = build(client, cube_id)
        plain = client.post(f"/v1/cubes/{cube_id}/activations", json={"session_id": "s1"}).json()
        assert plain["episodes"] is None
        hiking, baking = topic_episodes(act)
        for e in act["episodes"]:
            assert 0 < e["kept_tokens"] <= EPISODIC["budget_tokens"] and e["bytes"] > 0
        assert act["kept_tokens"] == max(e["kept_tokens"] for e in act["episodes"])
        assert (act["scorer"], plain["scorer"]) == ("prompt+kvzip", None)
        assert act["tokens"] == plain["tokens"] > EPISODIC["budget_tokens"]  # something evicted
        assert act["bits"] == 4 and act["bytes"] > sum(e["bytes"] for e in act["episodes"])
        files = live.daemon.settings.activation_dir / cube_id / act["id"]
        assert act["bytes"] == sum(p.stat().st_size for p in files.iterdir())

        first = ask(client, cube_id, act["id"], HIKING_QUESTION)
        assert first["episode"] == hiking and first["activation_id"] == act["id"]
        assert first["reused_tokens"] == act["episodes"][hiking]["kept_tokens"]
        second = ask(client, cube_id, act["id"], BAKING_QUESTION)
        assert second["episode"] == baking
        assert second["reused_tokens"] == act["episodes"][baking]["kept_tokens"]
        assert ask(client, cube_id, plain["id"], HIKING_QUESTION)["episode"] is None

        # /v1/completions continues the same episode for the same question.
        runtime = live.daemon.runtime.get()
        completion = client.post(
            "/v1/completions",
            json={"model": runtime.fingerprint.model, "prompt": HIKING_QUESTION,
                  "max_tokens": 4, "activation_id": act["id"]},
        )  # fmt: skip
        assert completion.status_code == 200, completion.text
        assert completion.json()["memos"] == {"episodes": [hiking]}
        before = client.get(f"/v1/cubes/{cube_id}/activations/{act['id']}").json()

    live = own_daemon()  # a new daemon on the same data dir
    with live.client(key) as client:
        again = client.get(f"/v1/cubes/{cube_id}/activations/{act['id']}").json()
        assert again == before and again["episodes"] == act["episodes"]
        reloaded = ask(client, cube_id, act["id"], HIKING_QUESTION)
        assert reloaded["episode"] == hiking and reloaded["text"] == first["text"]
        assert client.delete(f"/v1/cubes/{cube_id}/activations/{act['id']}").status_code == 204
        assert not files.exists()


def test_a_conversation_longer_than_the_models_positions_still_builds_and_answers(own_daemon):
    live = own_daemon(max_context=400)  # the conversation is ~540 tokens
    _, key = live.new_user()
    with live.client(key) as client:
        cube_id = client.post("/v1/cubes", json={"name": "main"}).json()["id"]
        add_conversation(client, cube_id)
        plain = client.post(f"/v1/cubes/{cube_id}/activations", json={"session_id": "s1"})
        assert plain.status_code == 413, plain.text  # one cache cannot hold it
        act = build(client, cube_id)
        assert act["tokens"] > 400 >= act["kept_tokens"]
        hiking, baking = topic_episodes(act)
        asked = ask(client, cube_id, act["id"], HIKING_QUESTION)
        assert asked["episode"] == hiking
        assert asked["reused_tokens"] == act["episodes"][hiking]["kept_tokens"]
        assert ask(client, cube_id, act["id"], BAKING_QUESTION)["episode"] == baking


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"text": "Ana hiked.", "episodic": EPISODIC}, "invalid_argument"),
        ({"session_id": "s1", "episodic": {**EPISODIC, "episodes": 0}}, "validation_error"),
        ({"session_id": "s1", "episodic": {**EPISODIC, "episodes": 999}}, "validation_error"),
        ({"session_id": "s1", "episodic": {**EPISODIC, "episodes": 200}}, "invalid_argument"),
        ({"session_id": "s1", "episodic": {"episodes": 2}}, "validation_error"),  # no budget
        ({"session_id": "s1", "episodic": {**EPISODIC, "budget_tokens": 8}}, "validation_error"),
        ({"session_id": "s1", "episodic": {**EPISODIC, "budget_tokens": 9000}},
         "invalid_argument"),  # over the model's positions
        ({"session_id": "s1", "episodic": {**EPISODIC, "block_tokens": 8190}},
         "invalid_argument"),  # budget + block over the model's positions
        ({"session_id": "s1", "episodic": {**EPISODIC, "shape": "round"}}, "validation_error"),
        ({"session_id": "s1", "episodic": EPISODIC, "compression": {"budget_tokens": 64}},
         "invalid_argument"),
        ({"session_ids": [], "episodic": EPISODIC}, "validation_error"),
        ({"session_ids": ["s1", "s1"], "episodic": EPISODIC}, "invalid_argument"),
        ({"session_id": "s1", "session_ids": ["s1"], "episodic": EPISODIC}, "validation_error"),
    ],
)  # fmt: skip
def test_bad_episodic_requests_are_refused_and_create_nothing(tenant, body, code):
    client, cube_id = tenant
    add_conversation(client, cube_id)
    r = client.post(f"/v1/cubes/{cube_id}/activations", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (422, code), r.text
    assert client.get(f"/v1/cubes/{cube_id}/activations").json()["items"] == []


def test_an_unknown_session_is_not_found(tenant):
    client, cube_id = tenant
    add_conversation(client, cube_id)
    body = {"session_ids": ["s1", "nobody"], "episodic": EPISODIC}
    r = client.post(f"/v1/cubes/{cube_id}/activations", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "session_not_found")
    assert client.get(f"/v1/cubes/{cube_id}/activations").json()["items"] == []


def test_episodic_tenancy_readers_ask_writers_build_strangers_see_nothing(server, tenant):
    client, cube_id = tenant
    ids = add_conversation(client, cube_id)
    act = build(client, cube_id, session_id=None, memory_ids=ids)
    hiking, _ = topic_episodes(act)
    reader_id, reader_key = server.new_user()
    _, stranger_key = server.new_user()
    grant = {"user_id": reader_id, "role": "reader"}
    assert client.post(f"/v1/cubes/{cube_id}/grants", json=grant).status_code in (200, 201)
    with server.client(reader_key) as reader:
        assert ask(reader, cube_id, act["id"], HIKING_QUESTION)["episode"] == hiking
        body = {"session_id": "s1", "episodic": EPISODIC}
        assert reader.post(f"/v1/cubes/{cube_id}/activations", json=body).status_code == 403
    with server.client(stranger_key) as stranger:
        body = {"session_id": "s1", "episodic": EPISODIC}
        assert stranger.post(f"/v1/cubes/{cube_id}/activations", json=body).status_code == 404
        r = stranger.post(
            f"/v1/cubes/{cube_id}/generate",
            json={"prompt": HIKING_QUESTION, "activation_id": act["id"]},
        )
        assert r.status_code == 404


def test_deleting_an_episodic_activation_while_it_builds_cancels_it(server, tenant):
    client, cube_id = tenant
    add_conversation(client, cube_id)
    body = {"session_id": "s1", "episodic": EPISODIC}
    with model_held(server):  # the build cannot finish a forward pass meanwhile
        r = client.post(f"/v1/cubes/{cube_id}/activations", json=body)
        assert r.status_code == 201 and r.json()["state"] == "building", r.text
        assert r.json()["episodes"] == []
        url = f"/v1/cubes/{cube_id}/activations/{r.json()['id']}"
        assert client.delete(url).status_code == 204
    assert server.daemon.activations.builds.join(timeout=300)
    assert client.get(url).status_code == 404
    assert not (server.daemon.settings.activation_dir / cube_id / r.json()["id"]).exists()
