"""Two daemons on one PostgreSQL database and one (private) Redis: the shared activation tier.

One test, real processes and the real model: an activation built on A generates on B (fetched
from Redis); bytes altered in Redis make B mark it corrupt, not unavailable; Redis stopped
under load: no 5xx but the documented 503 for a blob only Redis held, /healthz says so, what
B holds on disk still generates, A still builds; Redis back: ok again without a restart, and
what it lost is written back by A's sweep. A chat's prefix saved on A is reused on B.
"""

from __future__ import annotations

import threading
from collections import Counter

import httpx

from tests.conftest import make_daemon_process
from tests.memos.services.blobs.conftest import wait_until

PROMPT = {"prompt": "Who paints?", "max_tokens": 2}


def run_job(client: httpx.Client, name: str) -> dict:
    run_id = client.post(f"/v1/jobs/{name}/run").json()["run_id"]

    def finished() -> bool:
        return client.get(f"/v1/jobs/runs/{run_id}").json()["status"] != "running"

    wait_until(finished, f"{name} ran")
    run = client.get(f"/v1/jobs/runs/{run_id}").json()
    assert run["status"] == "ok", run
    return dict(run["result"])


def test_an_activation_built_on_one_daemon_generates_on_another_and_survives_redis_down(
    tmp_path, fresh_postgres_url, private_redis
):
    env = {
        "MEMOS_DATABASE_URL": fresh_postgres_url,
        "MEMOS_REDIS_URL": private_redis.url,
        "MEMOS_FLEET__LEASE_S": "3",
        "MEMOS_FLEET__HEARTBEAT_S": "0.5",
        "MEMOS_BLOBS__REDIS_RETRY_S": "0.5",
        "MEMOS_SCHEDULER__ENABLED": "false",  # jobs run when the test asks
        "MEMOS_CHATS__SAVE_IDLE_S": "0",
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_daemon_process(tmp_path / "a", **env)
    b = make_daemon_process(tmp_path / "b", **{**env, "MEMOS_ADMIN_KEY": a.admin_key})
    b.admin_key = a.admin_key
    a.start()  # first: it creates the schema
    b_up = threading.Thread(target=b.start)  # while A loads its model and builds
    b_up.start()
    try:
        with a.client() as on_a, b.client() as on_b:
            cube = on_a.post("/v1/cubes", json={"name": "shared"}).json()["id"]

            def build(text: str) -> dict:
                r = on_a.post(f"/v1/cubes/{cube}/activations", json={"text": text})
                assert r.status_code == 201 and r.json()["state"] == "ready", r.text
                return r.json()

            def generate(client: httpx.Client, act: dict) -> httpx.Response:
                body = {**PROMPT, "activation_id": act["id"]}
                return client.post(f"/v1/cubes/{cube}/generate", json=body)

            shared, tampered, only_in_redis = (
                build(t) for t in ("Melanie paints.", "Caroline runs.", "Jon swims.")
            )
            b_up.join()
            assert b.proc is not None and b.proc.poll() is None, b.log_tail()
            # Built on A, generated on B: B fetched its files from Redis, checked, to its disk.
            assert not (b.data_dir / "activations" / cube / shared["id"]).exists()
            r = generate(on_b, shared)
            assert r.status_code == 200, r.text
            assert r.json()["reused_tokens"] == shared["tokens"]
            fetched = b.data_dir / "activations" / cube / shared["id"]
            held = a.data_dir / "activations" / cube / shared["id"]
            assert {p.name: p.read_bytes() for p in fetched.iterdir()} == {
                p.name: p.read_bytes() for p in held.iterdir()
            }

            # A chat's prefix saved on A is loaded by B: its next turn reuses it, no prefill.
            r = on_a.post(f"/v1/cubes/{cube}/chats", json={"system": "Be brief."})
            chat = r.json()["id"]
            turn = {"content": "Remember the number 42.", "max_tokens": 2}
            assert on_a.post(f"/v1/cubes/{cube}/chats/{chat}/messages", json=turn).is_success
            assert run_job(on_a, "chat_prefix_save")["saved"] == 1
            prefix = [
                x for x in on_a.get(f"/v1/cubes/{cube}/activations").json()["items"]
                if x["kind"] == "chat_prefix"
            ]  # fmt: skip
            assert [x["state"] for x in prefix] == ["ready"]
            turn = {"content": "Which number?", "max_tokens": 2}
            r = on_b.post(f"/v1/cubes/{cube}/chats/{chat}/messages", json=turn)
            assert r.status_code == 200, r.text
            assert r.json()["reused_tokens"] == prefix[0]["tokens"]

            # Bytes altered in Redis (B never loaded it): corrupt, not unavailable.
            redis = private_redis.client()
            key = f"memos:act:{cube}:{tampered['id']}"
            (blob,) = [f for f in redis.hkeys(key) if f.startswith(b"file:kv-")]
            data = bytearray(redis.hget(key, blob))
            data[-1] ^= 0xFF
            redis.hset(key, blob, bytes(data))
            r = generate(on_b, tampered)
            assert r.status_code == 409 and r.json()["error"]["code"] == "activation_corrupt"
            seen = on_a.get(f"/v1/cubes/{cube}/activations/{tampered['id']}").json()
            assert seen["state"] == "corrupt" and "sha256" in seen["error"]

            # Redis stopped under load.
            statuses: Counter[int] = Counter()
            stop = threading.Event()

            def load() -> None:
                with b.client() as client:
                    while not stop.is_set():
                        statuses[generate(client, shared).status_code] += 1
                        statuses[client.get(f"/v1/cubes/{cube}/activations").status_code] += 1

            worker = threading.Thread(target=load)
            worker.start()
            wait_until(lambda: statuses[200] >= 4, "requests were served before the stop")
            private_redis.stop()
            wait_until(lambda: httpx.get(f"{b.url}/healthz").json()["redis"] == "down", "down")
            before = statuses[200]
            wait_until(lambda: statuses[200] >= before + 4, "B kept serving with redis down")
            r = generate(on_b, only_in_redis)  # never on B's disk, and Redis is gone
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "activation_unavailable"
            assert r.headers["Retry-After"] == "5"
            seen = on_a.get(f"/v1/cubes/{cube}/activations/{only_in_redis['id']}").json()
            assert (seen["state"], seen["error"]) == ("ready", None)  # never marked
            built_while_down = build("Maria bakes bread.")  # A builds and serves on its own
            assert generate(on_a, built_while_down).status_code == 200

            # Redis back (empty: --save ''): ok without a restart; A publishes what it missed.
            private_redis.start()
            for daemon in (a, b):
                wait_until(
                    lambda d=daemon: httpx.get(f"{d.url}/healthz").json()["redis"] == "ok", "ok"
                )
            redis = private_redis.client()
            missed = f"memos:act:{cube}:{built_while_down['id']}"
            wait_until(lambda: redis.exists(missed), "A replayed the write Redis missed")
            r = generate(on_b, built_while_down)
            assert r.status_code == 200, r.text
            # What the restarted Redis lost, A writes back at its next sweep.
            assert generate(on_b, only_in_redis).status_code == 503
            assert run_job(on_a, "index_maintenance")["activations"]["failed"] == 0
            r = generate(on_b, only_in_redis)
            assert r.status_code == 200, r.text
            stop.set()
            worker.join(timeout=120)
            assert set(statuses) == {200}, statuses
            # Deleted on B: gone from Redis too (A's copy goes at A's next sweep: no row).
            assert on_b.delete(f"/v1/cubes/{cube}/activations/{shared['id']}").is_success
            assert not redis.exists(f"memos:act:{cube}:{shared['id']}")
            assert redis.exists(f"memos:act:{cube}:{only_in_redis['id']}")
    finally:
        b_up.join()
        b.stop()
        a.stop()
