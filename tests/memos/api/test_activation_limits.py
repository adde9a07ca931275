"""The bounds on activation work, over real HTTP: build queue, cancellation, sweep, source sizes,
generation admission, up-front refusals, clients that leave, and the byte-bounded loaded cache.

Waiting is made deterministic by holding the model's lock (`model_held`): builds and generations
then stop at their next forward pass until the test lets go, however fast the machine is.
"""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import replace

import httpx

from tests.conftest import LiveServer
from tests.memos.api.conftest import LIMITS, in_thread, metric, model_held, wait_until

# Longer than inline_max_tokens (32): these build on the worker thread.
LONG = (
    "Caroline is a school counselor who volunteers at the support group every Tuesday. "
    "Melanie paints sunrises over the lake and has two kids who love pottery."
)
SHORT = "Melanie paints."  # builds inline
TOKEN_BYTES = 23_040  # one token of a 16-bit SmolLM2 cache: 30 layers x 3 heads x 64 x 2 x 2


def build(client: httpx.Client, cube_id: str, text: str = LONG) -> httpx.Response:
    return client.post(f"/v1/cubes/{cube_id}/activations", json={"text": text})


def folder(server: LiveServer, cube_id: str, activation_id: str | None = None):
    base = server.daemon.settings.activation_dir / cube_id
    return base / activation_id if activation_id else base


def idle(server: LiveServer) -> None:
    assert server.daemon.activations.builds.join(timeout=300), "builds did not finish"


def tenant_of(server: LiveServer) -> tuple[httpx.Client, str]:
    _, key = server.new_user()
    client = server.client(key)
    return client, client.post("/v1/cubes", json={"name": "c"}).json()["id"]


# -- builds ---------------------------------------------------------------------------------


def test_builds_are_bounded_per_owner_and_daemon_wide_with_retry_after(limited, limited_tenant):
    client, cube_id = limited_tenant
    other, other_cube = tenant_of(limited)
    third, third_cube = tenant_of(limited)
    with model_held(limited):
        first = [build(client, cube_id) for _ in range(2)]
        assert [r.status_code for r in first] == [201, 201]
        assert {r.json()["state"] for r in first} == {"building"}
        refused = build(client, cube_id)  # this owner has 2 queued or running
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "too_many_builds")
        assert refused.headers["Retry-After"] == "7"
        assert build(other, other_cube).status_code == 201  # another owner still may
        everyone = build(third, third_cube)  # 3 in all: the daemon-wide bound
        assert (everyone.status_code, everyone.json()["error"]["code"]) == (429, "too_many_builds")
        assert everyone.headers["Retry-After"] == "7"
        assert len(client.get(f"/v1/cubes/{cube_id}/activations").json()["items"]) == 2
        assert third.get(f"/v1/cubes/{third_cube}/activations").json()["items"] == []
        wait_until(lambda: metric(limited, "memos_activation_builds_running") == 1, "one runs")
        assert metric(limited, "memos_activation_builds_queued") == 2
    idle(limited)
    states = [a["state"] for a in client.get(f"/v1/cubes/{cube_id}/activations").json()["items"]]
    assert states == ["ready", "ready"]
    assert build(third, third_cube).status_code == 201  # room again
    idle(limited)
    other.close()
    third.close()


def test_deleting_a_building_activation_cancels_it_and_leaves_no_files(limited, limited_tenant):
    client, cube_id = limited_tenant
    before = metric(limited, "memos_activation_builds_total", outcome="cancelled")
    ready_before = metric(limited, "memos_activation_builds_total", outcome="ready")
    with model_held(limited):
        running = build(client, cube_id).json()
        queued = build(client, cube_id).json()
        wait_until(lambda: metric(limited, "memos_activation_builds_running") == 1, "it runs")
        for act in (running, queued):
            r = client.delete(f"/v1/cubes/{cube_id}/activations/{act['id']}")
            assert r.status_code == 204
        # The queued one is dropped at once; the running one stops at its next prefill chunk.
        assert metric(limited, "memos_activation_builds_queued") == 0
    idle(limited)
    assert metric(limited, "memos_activation_builds_total", outcome="cancelled") == before + 2
    assert metric(limited, "memos_activation_builds_total", outcome="ready") == ready_before
    assert client.get(f"/v1/cubes/{cube_id}/activations").json()["items"] == []
    assert not folder(limited, cube_id, running["id"]).exists()
    assert not folder(limited, cube_id, queued["id"]).exists()


def test_deleting_a_cube_cancels_its_builds_and_leaves_no_files(limited, limited_tenant):
    client, cube_id = limited_tenant
    before = metric(limited, "memos_activation_builds_total", outcome="cancelled")
    with model_held(limited):
        build(client, cube_id)
        build(client, cube_id)
        wait_until(lambda: metric(limited, "memos_activation_builds_running") == 1, "it runs")
        assert client.delete(f"/v1/cubes/{cube_id}").status_code == 204
    idle(limited)
    assert metric(limited, "memos_activation_builds_total", outcome="cancelled") == before + 2
    assert not folder(limited, cube_id).exists()


def test_memory_and_session_sources_are_size_checked_before_tokenizing(limited, limited_tenant):
    client, cube_id = limited_tenant
    many = [{"content": f"note {i}", "session_id": "many"} for i in range(4)]
    big = [{"content": "x" * 1600, "session_id": "big"} for _ in range(2)]
    items = client.post(f"/v1/cubes/{cube_id}/memories", json={"items": many + big}).json()
    ids = [m["id"] for m in items["items"]]
    cases = [
        ({"session_id": "many"}, "session 'many' has 4 memories; an activation takes at most 3"),
        ({"memory_ids": ids[:4]}, "memory_ids has 4 memories; an activation takes at most 3"),
        # 3,200 bytes stored (+ 19 a line for the date): refused from the database's sums,
        # before any content is loaded or tokenized (tokenizing it would take ~800 tokens).
        ({"session_id": "big"}, "session 'big' renders to at least 3238 bytes; at most 3000"),
        ({"memory_ids": ids[4:]}, "memory_ids renders to at least 3238 bytes; at most 3000"),
        ({"text": "y" * 3001}, "the context's text is 3001 bytes; at most 3000"),
    ]
    for body, message in cases:
        r = client.post(f"/v1/cubes/{cube_id}/activations", json=body)
        assert r.status_code == 413, r.text
        assert r.json()["error"] == {"code": "payload_too_large", "message": message}
    assert client.get(f"/v1/cubes/{cube_id}/activations").json()["items"] == []
    fits = client.post(f"/v1/cubes/{cube_id}/activations", json={"memory_ids": ids[:3]})
    assert fits.status_code == 201
    idle(limited)


def test_the_maintenance_job_sweeps_files_without_rows_and_fails_rows_without_files(
    limited, limited_tenant
):
    client, cube_id = limited_tenant
    kept = build(client, cube_id, SHORT).json()
    lost = build(client, cube_id, "Caroline volunteers.").json()
    assert kept["state"] == lost["state"] == "ready"
    orphan = folder(limited, cube_id, "act_orphan")
    shutil.copytree(folder(limited, cube_id, kept["id"]), orphan)  # files, no row
    gone_cube = folder(limited, "cube_deleted", "act_x")
    shutil.copytree(folder(limited, cube_id, kept["id"]), gone_cube)  # a cube with no row
    shutil.rmtree(folder(limited, cube_id, lost["id"]))  # a row, no files
    with limited.client() as admin:
        run_id = admin.post("/v1/jobs/index_maintenance/run").json()["run_id"]

        def finished() -> bool:
            return admin.get(f"/v1/jobs/runs/{run_id}").json()["status"] != "running"

        wait_until(finished, "the job ran")
        run = admin.get(f"/v1/jobs/runs/{run_id}").json()
    assert run["status"] == "ok", run
    assert run["result"]["activations"] == {"removed": 2, "failed": 1, "cubes": 1}
    assert not orphan.exists() and not folder(limited, "cube_deleted").exists()
    seen = client.get(f"/v1/cubes/{cube_id}/activations/{lost['id']}").json()
    assert (seen["state"], seen["error"]) == ("failed", "its files are missing; build it again")
    assert client.get(f"/v1/cubes/{cube_id}/activations/{kept['id']}").json()["state"] == "ready"


# -- generations ----------------------------------------------------------------------------


def generate(client: httpx.Client, cube_id: str, **body: object) -> httpx.Response:
    return client.post(f"/v1/cubes/{cube_id}/generate", json={"prompt": "Who paints?", **body})


def test_generations_beyond_the_slot_and_the_queue_get_429_with_retry_after(
    limited, limited_tenant
):
    client, cube_id = limited_tenant
    act = build(client, cube_id, SHORT).json()
    refused_before = metric(limited, "memos_generations_refused_total", reason="queue_full")
    with model_held(limited):
        # A few tokens each: the work ahead stays well within the 60 s wait on any machine.
        running, first = in_thread(
            lambda: generate(client, cube_id, activation_id=act["id"], max_tokens=4)
        )
        wait_until(lambda: metric(limited, "memos_generations_active") == 1, "one runs")
        waiting, second = in_thread(lambda: generate(client, cube_id, max_tokens=2))
        wait_until(lambda: metric(limited, "memos_generations_waiting") == 1, "one waits")
        r = generate(client, cube_id, max_tokens=2)
        assert (r.status_code, r.json()["error"]["code"]) == (429, "too_many_generations")
        assert r.headers["Retry-After"] == str(LIMITS["generation_wait_s"])
    running.join(300)
    waiting.join(300)
    assert first[0].status_code == second[0].status_code == 200  # the waiting one got its turn
    assert metric(limited, "memos_generations_refused_total", reason="queue_full") == (
        refused_before + 1
    )
    assert metric(limited, "memos_generations_active") == 0


def test_a_generation_is_refused_at_once_when_the_work_ahead_exceeds_its_wait(
    limited, limited_tenant, monkeypatch
):
    """The model cannot decode while the test holds it: a generation admitted now would wait
    behind the 200 tokens of another. It is refused up front, with the wait it would have had
    beyond the budget as its Retry-After, and never queues."""
    client, cube_id = limited_tenant
    gate = limited.daemon.activations.gate
    runtime = limited.daemon.runtime.get()
    # 200 decoding steps take well over a quarter of a second on any CPU.
    monkeypatch.setattr(gate, "limits", replace(gate.limits, wait_s=0.25))
    busy_before = metric(limited, "memos_generations_refused_total", reason="busy")
    key = client.headers["Authorization"].removeprefix("Bearer ")
    with model_held(limited):
        sock = _post_raw(limited, key, cube_id, COUNTING)
        try:
            wait_until(lambda: metric(limited, "memos_generations_active") == 1, "it runs")
            ahead = gate.ahead_s(runtime.throughput.seconds)
            assert ahead > 0.25
            r = generate(client, cube_id, max_tokens=2)
            assert (r.status_code, r.json()["error"]["code"]) == (429, "too_many_generations")
            assert "of work ahead of this generation" in r.json()["error"]["message"]
            retry_after = int(r.headers["Retry-After"])
            assert retry_after == r.json()["error"]["retry_after"]
            assert retry_after >= 1 and abs(retry_after - (ahead - 0.25)) <= 1
            # Refused while the model was still held: it never waited for a slot or the model.
            assert metric(limited, "memos_generations_waiting") == 0
            assert metric(limited, "memos_generations_active") == 1
        finally:
            sock.close()  # the running one's client leaves: it stops at its next token
        wait_until(lambda: _noticed(limited), "the server noticed")
    wait_until(lambda: metric(limited, "memos_generations_active") == 0, "it ended")
    assert metric(limited, "memos_generations_refused_total", reason="busy") == busy_before + 1


def test_oversized_generations_are_refused_before_any_work(limited, limited_tenant):
    client, cube_id = limited_tenant
    act = build(client, cube_id, LONG).json()  # ~45 tokens: with 1000 more, past 1024
    idle(limited)
    per_token = limited.daemon.runtime.get().kv_bytes_per_token
    too_many = LIMITS["generation_kv_bytes"] // per_token + 1  # the cache alone would not fit
    ended = metric(limited, "memos_generations_total", finish_reason="length")
    cases = [
        ({"prompt": "p" * 201}, 413, "payload_too_large", "prompt is 201 bytes; at most 200"),
        ({"max_tokens": 1001}, 422, "invalid_argument", "max_tokens is 1001; it must be"),
        (
            {"activation_id": act["id"], "max_tokens": 1000},
            422,
            "invalid_argument",
            f"context {act['tokens']} + prompt",  # ... exceeds the model's 1024 positions
        ),
        ({"max_tokens": too_many}, 413, "generation_too_large", "this generation's cache would"),
    ]
    for body, status, code, message in cases:
        r = generate(client, cube_id, **body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        assert r.json()["error"]["message"].startswith(message)
    assert (
        "exceeds the model's 1024 positions"
        in generate(client, cube_id, activation_id=act["id"], max_tokens=1000).json()["error"][
            "message"
        ]
    )
    assert metric(limited, "memos_generations_active") == 0
    assert metric(limited, "memos_generations_total", finish_reason="length") == ended


COUNTING = {"prompt": "Count from 1 to 1000, separated by commas.", "max_tokens": 200}


def _post_raw(server: LiveServer, key: str, cube_id: str, body: dict) -> socket.socket:
    """Send a generate request on a bare socket (closing it is the client going away)."""
    data = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST /v1/cubes/{cube_id}/generate HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def _noticed(server: LiveServer) -> bool:
    """The server set the generation's cancel switch (it may even have ended already, if it was
    between two forward passes when the switch was set)."""
    return (
        metric(server, "memos_generations_cancelling") == 1
        or metric(server, "memos_generations_active") == 0
    )


def _stopped_after_its_client_left(server: LiveServer, cancelled_before: float) -> None:
    wait_until(lambda: metric(server, "memos_generations_active") == 0, "the generation ended")
    assert metric(server, "memos_generations_total", finish_reason="cancelled") == (
        cancelled_before + 1
    )
    assert metric(server, "memos_generations_cancelling") == 0


def test_a_generation_whose_client_left_stops_at_its_next_token(limited, limited_tenant):
    client, cube_id = limited_tenant
    key = client.headers["Authorization"].removeprefix("Bearer ")
    cancelled = metric(limited, "memos_generations_total", finish_reason="cancelled")
    with model_held(limited):  # it cannot decode a token before the client has gone
        sock = _post_raw(limited, key, cube_id, COUNTING)
        wait_until(lambda: metric(limited, "memos_generations_active") == 1, "it was admitted")
        sock.close()
        wait_until(lambda: _noticed(limited), "the server noticed")
    # 200 tokens would take ~200 forward passes; it ends after the one it was blocked in.
    _stopped_after_its_client_left(limited, cancelled)


def test_a_generation_whose_client_left_while_it_decodes_stops_early(limited, limited_tenant):
    """Pieces coming faster than the route looks for its client must not hide that it left."""
    client, cube_id = limited_tenant
    key = client.headers["Authorization"].removeprefix("Bearer ")
    cancelled = metric(limited, "memos_generations_total", finish_reason="cancelled")
    backlog = limited.daemon.activations.backlog
    sock = _post_raw(limited, key, cube_id, COUNTING)
    wait_until(lambda: any(w.decoded for w in backlog.work()), "it decodes")
    sock.close()  # ~200 tokens to go
    _stopped_after_its_client_left(limited, cancelled)


def test_a_stream_whose_client_left_stops_at_its_next_token(limited, limited_tenant):
    client, cube_id = limited_tenant
    cancelled = metric(limited, "memos_generations_total", finish_reason="cancelled")
    url = f"/v1/cubes/{cube_id}/generate"
    with client.stream("POST", url, json={**COUNTING, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines) == "event: piece"  # decoding has begun
        with model_held(limited):
            r.close()  # the client goes mid-stream
            wait_until(lambda: _noticed(limited), "the server noticed")
    _stopped_after_its_client_left(limited, cancelled)


def test_health_and_metrics_answer_while_a_generation_waits_for_the_model(limited, limited_tenant):
    client, cube_id = limited_tenant
    with model_held(limited):
        thread, answer = in_thread(lambda: generate(client, cube_id, max_tokens=2))
        wait_until(lambda: metric(limited, "memos_generations_active") == 1, "it was admitted")
        # The generation's thread waits on the model; the server's loop and pool do not.
        assert httpx.get(f"{limited.url}/healthz", timeout=60).status_code == 200
        assert client.get(f"/v1/cubes/{cube_id}/activations").status_code == 200
    thread.join(300)
    assert answer[0].status_code == 200


# -- the loaded cache -----------------------------------------------------------------------


def test_loaded_activations_are_bounded_by_bytes(limited, limited_tenant):
    client, cube_id = limited_tenant
    a = build(client, cube_id, f"{LONG} {LONG} {LONG}").json()
    b = build(client, cube_id, f"{LONG} {LONG} {LONG} Both families went camping.").json()
    idle(limited)
    a = client.get(f"/v1/cubes/{cube_id}/activations/{a['id']}").json()
    b = client.get(f"/v1/cubes/{cube_id}/activations/{b['id']}").json()
    budget = LIMITS["loaded_cache_bytes"]
    assert a["bits"] == b["bits"] == 16
    # Each fits the 150-token budget alone, not both together.
    assert TOKEN_BYTES * max(a["kept_tokens"], b["kept_tokens"]) <= budget
    assert TOKEN_BYTES * (a["kept_tokens"] + b["kept_tokens"]) > budget
    # 16-bit activations are stored in float16: 2 bytes an element, plus the manifest.
    assert TOKEN_BYTES * a["kept_tokens"] < a["bytes"] < TOKEN_BYTES * a["kept_tokens"] + 65_536
    loaded = limited.daemon.activations.loaded
    dequantized = limited.daemon.activations.dequantized
    for act in (a, b):
        assert generate(client, cube_id, activation_id=act["id"], max_tokens=1).status_code == 200
    assert (cube_id, a["id"]) not in loaded.order()  # least recently used, evicted for b
    assert (cube_id, b["id"]) in loaded.order()
    assert metric(limited, "memos_loaded_activations_bytes") == loaded.bytes
    assert loaded.bytes <= budget
    # The dequantized tier: b's float32 cache (its real bytes: twice the stored float16), kept
    # for the next request, which reads the very same tensors instead of dequantizing again.
    assert dequantized.order() == [(cube_id, b["id"])]
    assert (
        dequantized.bytes == 2 * TOKEN_BYTES * b["kept_tokens"] <= LIMITS["dequantized_cache_bytes"]
    )
    assert metric(limited, "memos_dequantized_activations_bytes") == dequantized.bytes
    kept = dequantized.get((cube_id, b["id"]))
    again = generate(client, cube_id, activation_id=b["id"], max_tokens=1)
    assert again.status_code == 200 and dequantized.get((cube_id, b["id"])) is kept
    assert client.delete(f"/v1/cubes/{cube_id}/activations/{b['id']}").status_code == 204
    assert dequantized.order() == [] and dequantized.bytes == 0
