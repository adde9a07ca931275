"""A chat served by any daemon of a fleet: two daemon processes on one PostgreSQL database.

Turns alternate between the daemons and answer exactly as one daemon answers the same
conversation (greedy decoding); each turn is stored once; a turn of a chat running on one
daemon makes the other refuse a second one 409 chat_busy; a daemon killed mid-turn frees the
chat once its lease (3 s here) has run out.
"""

from __future__ import annotations

import secrets
import threading
import time

import httpx
import psycopg

from tests.conftest import DaemonProcess, make_daemon_process

SYSTEM = "You are a friendly assistant. Answer in one short sentence."
TURNS = ["My name is Ada and I keep bees.", "What do I keep?", "What is my name?"]
LONG = "Count from 1 to 300, separated by commas."
LEASE_S = 3.0


def _daemon(tmp_path, name: str, url: str, admin_key: str) -> DaemonProcess:
    (tmp_path / name).mkdir()
    daemon = make_daemon_process(
        tmp_path / name,
        MEMOS_DATABASE_URL=url,
        MEMOS_ADMIN_KEY=admin_key,  # one admin for the fleet
        MEMOS_FLEET__LEASE_S=str(LEASE_S),
        MEMOS_FLEET__HEARTBEAT_S="0.5",
        MEMOS_SCHEDULER__ENABLED="false",  # prefixes are saved when the test says
        MEMOS_CHATS__SAVE_IDLE_S="0",
    )
    daemon.admin_key = admin_key
    return daemon


def _post(client: httpx.Client, cube_id: str, chat_id: str, content: str, max_tokens: int):
    return client.post(
        f"/v1/cubes/{cube_id}/chats/{chat_id}/messages",
        json={"content": content, "max_tokens": max_tokens},
    )


def _send(client: httpx.Client, cube_id: str, chat_id: str, content: str) -> dict:
    r = _post(client, cube_id, chat_id, content, 8)
    assert r.status_code == 200, r.text
    return r.json()


def _post_quietly(client: httpx.Client, *args) -> httpx.Response | None:
    """For a request whose daemon is killed while it runs."""
    try:
        return _post(client, *args)
    except httpx.HTTPError:
        return None


def _run_job(admin: httpx.Client, name: str) -> dict:
    run_id = admin.post(f"/v1/jobs/{name}/run").json()["run_id"]
    deadline = time.monotonic() + 120
    while (run := admin.get(f"/v1/jobs/runs/{run_id}").json())["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert run["status"] == "ok", run
    return run


def _prefix_state(url: str, chat_id: str) -> str | None:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute(
            "SELECT a.state FROM chats c JOIN activations a ON a.id = c.prefix_activation_id "
            "WHERE c.id = %s",
            (chat_id,),
        ).fetchone()
    return row[0] if row else None


def _holder(url: str, chat_id: str) -> str | None:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute("SELECT turn_holder FROM chats WHERE id = %s", (chat_id,)).fetchone()
    return row[0]


def _wait_held(url: str, chat_id: str) -> str:
    deadline = time.monotonic() + 120
    while (holder := _holder(url, chat_id)) is None:
        assert time.monotonic() < deadline, "the long turn never took its chat"
        time.sleep(0.02)
    return holder


def _in_thread(fn):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_a_chat_is_served_by_either_daemon_as_one_daemon_serves_it(tmp_path, fresh_postgres_url):
    url, admin_key = fresh_postgres_url, f"admin-{secrets.token_hex(8)}"
    a = _daemon(tmp_path, "a", url, admin_key)
    b = _daemon(tmp_path, "b", url, admin_key)
    a.start()
    b.start()  # after a: one of them migrates the fresh database
    try:
        with a.client() as admin:
            key = admin.post("/v1/users", json={"name": "fleet"}).json()["api_key"]
        with a.client(key) as on_a, b.client(key) as on_b:
            cube_id = on_a.post("/v1/cubes", json={"name": "main"}).json()["id"]
            body = {"system": SYSTEM, "recall": {"top_k": 0}}
            reference, chat = (
                on_a.post(f"/v1/cubes/{cube_id}/chats", json=body).json()["id"] for _ in range(2)
            )

            # b loads the model meanwhile (a has converted it by now, creating its chats).
            warm, _ = _in_thread(lambda: on_b.post(f"/v1/cubes/{cube_id}/chats", json=body))
            # One daemon: the reference conversation. Then the same on a, b, a.
            expected = [_send(on_a, cube_id, reference, turn) for turn in TURNS]
            warm.join(timeout=300)
            served = [
                _send(client, cube_id, chat, turn)
                for client, turn in zip((on_a, on_b, on_a), TURNS, strict=True)
            ]
            assert [r["reply"] for r in served] == [r["reply"] for r in expected]
            assert [r["prompt_tokens"] for r in served] == [r["prompt_tokens"] for r in expected]
            # b had no prefix of this chat; a's held turn 1 only, and was extended by turn 2
            # (fell behind: b served it), not prefilled again.
            assert served[1]["reused_tokens"] == 0
            assert 0 < served[2]["reused_tokens"] < expected[2]["reused_tokens"], served

            # Each turn stored once, in order, seen alike from either daemon.
            messages = f"/v1/cubes/{cube_id}/chats/{chat}/messages"
            listed = [on.get(messages).json()["items"] for on in (on_a, on_b)]
            assert listed[0] == listed[1]
            assert [m["content"] for m in listed[0]] == [
                text for turn, r in zip(TURNS, served, strict=True) for text in (turn, r["reply"])
            ]
            assert _holder(url, chat) is None  # every turn gave its lease back

            # b's copy of the prefix is behind (a served turn 3): dropped, not saved over a's.
            with b.client() as admin_b:
                assert _run_job(admin_b, "chat_prefix_save")["result"] == {"saved": 0, "skipped": 1}
            with a.client() as admin_a:  # a saves both of its chats, to its own disk
                assert _run_job(admin_a, "chat_prefix_save")["result"] == {"saved": 2, "skipped": 0}
            assert _prefix_state(url, chat) == "ready"
            # b cannot read a's saved prefix: it prefills, and neither fails nor marks it corrupt.
            assert _send(on_b, cube_id, chat, "Thanks!")["reused_tokens"] == 0
            assert _prefix_state(url, chat) == "ready"

            # A turn running on a: b refuses a second one, as a does on one daemon.
            thread, out = _in_thread(lambda: _post(on_a, cube_id, chat, LONG, 24))
            holder = _wait_held(url, chat)
            busy = _post(on_b, cube_id, chat, "Are you there?", 4)
            assert busy.status_code == 409, busy.text
            assert busy.json()["error"]["code"] == "chat_busy"
            assert on_b.delete(f"/v1/cubes/{cube_id}/chats/{chat}").status_code == 409
            thread.join(timeout=300)
            assert out[0].status_code == 200, out[0].text
            assert len(on_b.get(messages).json()["items"]) == 10
            assert _holder(url, chat) is None

            # b killed mid-turn: the chat is busy until b's lease runs out, then a serves it.
            _in_thread(lambda: _post_quietly(on_b, cube_id, chat, LONG, 24))
            killed_holder = _wait_held(url, chat)
            assert killed_holder != holder  # b's instance, not a's
            b.kill()
            killed = time.monotonic()
            r = _post(on_a, cube_id, chat, "Still there?", 4)
            assert r.status_code == 409 and r.json()["error"]["code"] == "chat_busy", r.text
            deadline = killed + LEASE_S + 30
            while True:
                freed_s = time.monotonic() - killed
                r = _post(on_a, cube_id, chat, "Still there?", 4)
                if r.status_code != 409:
                    break
                assert time.monotonic() < deadline, "the killed daemon's lease never ran out"
                time.sleep(0.2)
            assert r.status_code == 200, r.text
            assert freed_s > LEASE_S - 1.0, freed_s  # not before the lease ran out
            print(f"chat freed {freed_s:.2f} s after the kill (lease {LEASE_S} s)")
            # The killed turn stored nothing: 10 before, 2 for the turn a served after.
            assert len(on_a.get(messages).json()["items"]) == 12
    finally:
        a.stop()
        b.stop()
