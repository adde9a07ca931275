"""Crash safety with real daemon processes: kill -9 at any moment loses no acknowledged write,
and the vector index heals from the database at the next start."""

from __future__ import annotations

import os
import secrets
import threading
import time

import httpx

from tests.conftest import make_daemon_process

BATCH = 16


def _wait_healed(daemon, timeout=300.0):
    deadline = time.time() + timeout
    while httpx.get(f"{daemon.url}/healthz").json()["healing"]:
        assert time.time() < deadline, "index healing did not finish"
        time.sleep(0.1)


def _all_memories(client, cube_id):
    items, cursor = [], None
    while True:
        params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        body = client.get(f"/v1/cubes/{cube_id}/memories", params=params).json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


def _run_job(client, name="index_maintenance"):
    run_id = client.post(f"/v1/jobs/{name}/run").json()["run_id"]
    deadline = time.time() + 300
    while (run := client.get(f"/v1/jobs/runs/{run_id}").json())["status"] == "running":
        assert time.time() < deadline
        time.sleep(0.05)
    return run


def _search(client, cube_id, query, top_k, mode="hybrid"):
    body = {"query": query, "top_k": top_k, "mode": mode}
    return client.post(f"/v1/cubes/{cube_id}/search", json=body).json()["hits"]


def _assert_findable(client, cube_id, memories):
    """Each memory's unique token finds it: first on BM25 alone (the index holds its words)
    and among the top hybrid hits (it holds its vector). Not necessarily first in hybrid: on
    a bare hex token the dense signal is noise, and an outlier cosine among these near-identical
    notes can outscore a lone exact-token match (z-score fusion, memcube/fusion.py)."""
    for memory in memories:
        token = memory["content"].split()[-1]
        lexical = _search(client, cube_id, token, 1, mode="lexical")
        assert lexical and lexical[0]["memory"]["id"] == memory["id"], (token, lexical)
        hybrid = [hit["memory"]["id"] for hit in _search(client, cube_id, token, 5)]
        assert memory["id"] in hybrid, (token, hybrid)


def test_acknowledged_adds_survive_kill_9(tmp_path):
    daemon = make_daemon_process(tmp_path)
    daemon.start()
    with daemon.client() as admin:
        cube_id = admin.post("/v1/cubes", json={"name": "crash"}).json()["id"]
    acked: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(wid: int) -> None:
        with daemon.client() as client:
            n = 0
            while not stop.is_set():
                items = [
                    {"content": f"writer {wid} batch {n} item {j} tok{secrets.token_hex(5)}"}
                    for j in range(BATCH)
                ]
                try:
                    r = client.post(f"/v1/cubes/{cube_id}/memories", json={"items": items})
                except httpx.HTTPError:
                    return  # the daemon died mid-request: this batch was never acknowledged
                if r.status_code == 201:
                    with lock:
                        acked.extend(r.json()["items"])
                n += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while len(acked) < 12 * BATCH:
        assert time.time() < deadline, daemon.log_tail()
        time.sleep(0.01)
    time.sleep(int.from_bytes(os.urandom(1)) / 1000)  # 0-255 ms more, so the kill lands anywhere
    daemon.kill()
    stop.set()
    for t in threads:
        t.join()

    daemon.start()
    _wait_healed(daemon)
    with daemon.client() as admin:
        stored = {m["id"]: m for m in _all_memories(admin, cube_id)}
        acked_ids = {m["id"] for m in acked}
        assert acked_ids <= set(stored), (
            f"lost {len(acked_ids - set(stored))} acknowledged memories"
        )
        assert len(stored) % BATCH == 0, "a batch was stored in part"
        for m in acked:
            assert stored[m["id"]]["content"] == m["content"]
        _assert_findable(admin, cube_id, acked[:: max(1, len(acked) // 25)])
        unacked = [m for i, m in stored.items() if i not in acked_ids]  # committed, reply lost
        _assert_findable(admin, cube_id, unacked[:5])
    daemon.stop()


def test_index_replays_changes_newer_than_its_save(tmp_path):
    # No scheduled maintenance: the test counts exactly what its own runs find, however long
    # the machine takes to get there.
    daemon = make_daemon_process(tmp_path, MEMOS_SCHEDULER__ENABLED="false")
    daemon.start()
    with daemon.client() as admin:
        cube_id = admin.post("/v1/cubes", json={"name": "heal"}).json()["id"]

        def post(items):
            return admin.post(f"/v1/cubes/{cube_id}/memories", json={"items": items}).json()[
                "items"
            ]  # noqa: E731

        early = post([{"content": f"early fact {i} tok{secrets.token_hex(5)}"} for i in range(40)])
        assert _run_job(admin)["result"]["actions"] == {"saved": 1}
        late = post([{"content": f"late fact {i} tok{secrets.token_hex(5)}"} for i in range(30)])
        admin.delete(f"/v1/cubes/{cube_id}/memories/{early[0]['id']}")
        patched = admin.patch(
            f"/v1/cubes/{cube_id}/memories/{early[1]['id']}",
            json={"content": f"rewritten fact tok{secrets.token_hex(5)}"},
        ).json()
    daemon.kill()  # the saved index is now 32 changes behind the database

    daemon.start()
    _wait_healed(daemon)
    with daemon.client() as admin:
        _assert_findable(admin, cube_id, early[2:] + late + [patched])
        gone_token = early[0]["content"].split()[-1]
        hits = admin.post(
            f"/v1/cubes/{cube_id}/search", json={"query": gone_token, "top_k": 5}
        ).json()["hits"]
        assert early[0]["id"] not in {h["memory"]["id"] for h in hits}
        # After the heal the saved index matches the database: maintenance finds it clean.
        assert _run_job(admin)["result"]["actions"] == {"clean": 1}
    daemon.stop()


def test_corrupt_index_file_is_rebuilt_not_loaded(tmp_path):
    daemon = make_daemon_process(tmp_path)
    daemon.start()
    with daemon.client() as admin:
        cube_id = admin.post("/v1/cubes", json={"name": "corrupt"}).json()["id"]
        items = admin.post(
            f"/v1/cubes/{cube_id}/memories",
            json={"items": [{"content": f"fact {i} tok{secrets.token_hex(5)}"} for i in range(50)]},
        ).json()["items"]
    daemon.stop()  # a clean stop saves the index
    index_file = tmp_path / "indexes" / cube_id / "hnsw.bin"
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the middle
    index_file.write_bytes(bytes(data))

    daemon.start()
    with daemon.client() as admin:
        _assert_findable(admin, cube_id, items)
        assert '"action": "rebuilt"' in (tmp_path / "daemon.log").read_text()
    daemon.stop()


def _next_run(admin: httpx.Client, job: str) -> str:
    return next(j for j in admin.get("/v1/jobs").json()["items"] if j["name"] == job)["next_run_at"]


def test_restart_keeps_data_generated_admin_key_and_schedules(tmp_path):
    daemon = make_daemon_process(tmp_path)
    daemon.env.pop("MEMOS_ADMIN_KEY")
    daemon.start()
    key_file = tmp_path / "admin.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    daemon.admin_key = key_file.read_text().strip()
    with daemon.client() as admin:
        cube_id = admin.post("/v1/cubes", json={"name": "keep"}).json()["id"]
        memory = admin.post(
            f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": "kept"}]}
        ).json()["items"][0]
        next_run = _next_run(admin, "fuse")
    daemon.stop()

    daemon.start()
    assert key_file.read_text().strip() == daemon.admin_key  # the same key still works
    with daemon.client() as admin:
        assert admin.get(f"/v1/cubes/{cube_id}/memories/{memory['id']}").json() == memory
        # The schedule lives in the database: a restart does not reset the job's clock (of the
        # fleet's jobs; those about a daemon's own memory and disk, such as usage_flush and
        # index_maintenance, start afresh).
        assert _next_run(admin, "fuse") == next_run
    daemon.stop()


def test_kill_9_during_activation_builds_leaves_ready_ones_intact(tmp_path):
    """A ready activation survives a crash bit for bit; a build cut short by kill -9 is
    reported `failed` after the restart, never half-loaded."""
    # Close to the model's 8,192 positions, prefilled 16 tokens a forward pass (some 450 passes),
    # and killed as soon as the build is acknowledged: the build is still far from stored on
    # any machine, a fast GPU included, with no waiting on the machine being slow.
    daemon = make_daemon_process(
        tmp_path, MEMOS_ACTIVATIONS__INLINE_MAX_TOKENS="64", MEMOS_RUNTIME__PREFILL_CHUNK="16"
    )
    daemon.start()
    text = " ".join(f"Day {i}: Caroline walked to the lake; Melanie painted." for i in range(450))
    question = {"prompt": "Who painted?", "max_tokens": 6}
    with daemon.client() as client:
        cube_id = client.post("/v1/cubes", json={"name": "acts"}).json()["id"]
        ready = client.post(f"/v1/cubes/{cube_id}/activations", json={"text": "Hello, Melanie."})
        ready = ready.json()
        assert ready["state"] == "ready"
        before = client.post(
            f"/v1/cubes/{cube_id}/generate", json={**question, "activation_id": ready["id"]}
        ).json()
        big = client.post(
            f"/v1/cubes/{cube_id}/activations", json={"text": text, "compression": {"bits": 4}}
        ).json()
        assert big["state"] == "building" and big["tokens"] > 7000
    daemon.kill()  # mid-build, nothing stored yet (no waiting for progress: a fast machine
    # could finish the build in the wait)
    daemon.start()
    with daemon.client() as client:
        cut = client.get(f"/v1/cubes/{cube_id}/activations/{big['id']}").json()
        assert (cut["state"], cut["bytes"]) == ("failed", 0), cut
        assert cut["error"] == "interrupted by a restart; build it again"
        r = client.post(
            f"/v1/cubes/{cube_id}/generate", json={**question, "activation_id": big["id"]}
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "activation_not_ready"
        after = client.post(
            f"/v1/cubes/{cube_id}/generate", json={**question, "activation_id": ready["id"]}
        ).json()
        assert after["text"] == before["text"] and after["reused_tokens"] == ready["kept_tokens"]
    daemon.stop()


def test_kill_9_mid_turn_stores_no_half_turn_and_a_clean_restart_reuses_the_prefix(tmp_path):
    """Acknowledged turns survive kill -9; the turn it cut stored neither side. After a clean
    stop the chat's prefix was saved, and the next turn loads it instead of prefilling."""
    daemon = make_daemon_process(tmp_path)
    daemon.start()
    with daemon.client() as client:
        cube_id = client.post("/v1/cubes", json={"name": "chats"}).json()["id"]
        chat = client.post(
            f"/v1/cubes/{cube_id}/chats", json={"system": "Be brief.", "recall": {"top_k": 0}}
        ).json()
        url = f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages"
        done = client.post(url, json={"content": "My cat is called Miso.", "max_tokens": 6})
        assert done.status_code == 200 and done.json()["assistant_memory_id"]
        body = {"content": "Write a long poem about the sea.", "max_tokens": 500, "stream": True}
        with client.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("event: piece"):
                    daemon.kill()  # mid-reply: decoding, nothing of this turn stored yet
                    break
    daemon.start()
    with daemon.client() as client:
        items = client.get(url).json()["items"]
        assert [m["content"] for m in items] == ["My cat is called Miso.", done.json()["reply"]]
        first = client.post(url, json={"content": "What is my cat called?", "max_tokens": 6})
        assert first.status_code == 200 and first.json()["reused_tokens"] == 0  # never saved
    daemon.stop()  # a clean stop saves the chat's prefix
    daemon.start()
    with daemon.client() as client:
        again = client.post(url, json={"content": "Thanks!", "max_tokens": 4}).json()
        assert again["reused_tokens"] > 0 and again["assistant_memory_id"]
        assert len(client.get(url).json()["items"]) == 6
    daemon.stop()
