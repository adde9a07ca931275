"""The `evict` job killed (`kill -9`) in the middle of expiring and purging notes: after a
restart, the next run finishes the work and the database, index and history agree."""

from __future__ import annotations

import secrets
import sqlite3
import time

import httpx

from tests.conftest import make_daemon_process

OLD, FRESH = 300, 60


def _run_job(client: httpx.Client, name: str) -> dict:
    run_id = client.post(f"/v1/jobs/{name}/run").json()["run_id"]
    deadline = time.time() + 300
    while (run := client.get(f"/v1/jobs/runs/{run_id}").json())["status"] == "running":
        assert time.time() < deadline
        time.sleep(0.05)
    return run


def _wait_healed(daemon) -> None:
    deadline = time.time() + 300
    while httpx.get(f"{daemon.url}/healthz").json()["healing"]:
        assert time.time() < deadline, "index healing did not finish"
        time.sleep(0.1)


def test_evict_killed_mid_run_is_finished_by_the_next_run(tmp_path):
    # TTL 1 day, no retention: one run expires the old notes, then erases them for good.
    daemon = make_daemon_process(
        tmp_path,
        MEMOS_LIFECYCLE__MEMORY_TTL_DAYS="1",
        MEMOS_LIFECYCLE__DELETED_RETENTION_DAYS="0",
    )
    daemon.start()
    try:
        with daemon.client() as admin:
            cube_id = admin.post("/v1/cubes", json={"name": "crash"}).json()["id"]
            notes = []
            for start in range(0, OLD + FRESH, 60):
                items = [{"content": f"note {i} tok{secrets.token_hex(5)}"}
                         for i in range(start, start + 60)]  # fmt: skip
                r = admin.post(f"/v1/cubes/{cube_id}/memories", json={"items": items})
                notes += r.json()["items"]
        old, fresh = notes[:OLD], notes[OLD:]
        with sqlite3.connect(tmp_path / "memos.db") as conn:  # stored two days ago
            conn.executemany(
                "UPDATE memories SET created_at = '2020-01-01 00:00:00.000000' WHERE id = ?",
                [(n["id"],) for n in old],
            )
        with daemon.client() as admin:
            first = admin.post("/v1/jobs/evict/run").json()["run_id"]
            time.sleep(0.3)  # somewhere inside the run: expiring or purging
        daemon.kill()
        daemon.start()
        _wait_healed(daemon)
        with daemon.client() as admin:
            assert admin.get(f"/v1/jobs/runs/{first}").json()["status"] in ("interrupted", "ok")
            rerun = _run_job(admin, "evict")
            assert rerun["status"] == "ok", rerun
            again = _run_job(admin, "evict")["result"]  # nothing left: the same state
            assert (again["expired"], again["purged"]) == ({}, {})
            live = admin.get(f"/v1/cubes/{cube_id}/memories", params={"limit": 500}).json()
            assert [m["id"] for m in live["items"]] == [n["id"] for n in fresh]
            for note in old[::50] + old[-1:]:  # erased: not found by its unique token
                token = note["content"].split()[-1]
                hits = admin.post(f"/v1/cubes/{cube_id}/search",
                                  json={"query": token, "top_k": 5}).json()["hits"]  # fmt: skip
                assert note["id"] not in {h["memory"]["id"] for h in hits}
            for note in fresh[::20]:
                token = note["content"].split()[-1]
                hits = admin.post(f"/v1/cubes/{cube_id}/search",
                                  json={"query": token, "top_k": 1}).json()["hits"]  # fmt: skip
                assert hits[0]["memory"]["id"] == note["id"]
            actions = _run_job(admin, "index_maintenance")["result"]["actions"]
            assert set(actions) <= {"clean", "saved"}, actions
        with sqlite3.connect(tmp_path / "memos.db") as conn:
            kept = {r[0] for r in conn.execute(
                "SELECT id FROM memories WHERE cube_id = ?", (cube_id,))}  # fmt: skip
            orphans = conn.execute(
                "SELECT count(*) FROM memory_history h LEFT JOIN memories m "
                "ON m.seq = h.memory_seq WHERE m.seq IS NULL"
            ).fetchone()[0]
            live_count = conn.execute(
                "SELECT live_memories FROM cubes WHERE id = ?", (cube_id,)
            ).fetchone()[0]
        assert kept == {n["id"] for n in fresh}  # the old ones erased for good
        assert orphans == 0 and live_count == FRESH
    finally:
        daemon.stop()


def test_fuse_killed_mid_run_is_finished_by_the_next_run(tmp_path):
    daemon = make_daemon_process(tmp_path, MEMOS_LIFECYCLE__FUSE__ENABLED="true")
    daemon.start()
    pairs = 80
    try:
        with daemon.client() as admin:
            cube_id = admin.post("/v1/cubes", json={"name": "fuse"}).json()["id"]
            items = [
                {"content": f"My cousin number {i} lives in town {secrets.token_hex(3)}.",
                 "speaker": f"speaker{i}"}
                for i in range(pairs)
            ]  # fmt: skip
            first = admin.post(f"/v1/cubes/{cube_id}/memories", json={"items": items})
            second = admin.post(f"/v1/cubes/{cube_id}/memories", json={"items": items})
            originals = [m["id"] for m in first.json()["items"]]
            repeats = [m["id"] for m in second.json()["items"]]
            started = admin.post("/v1/jobs/fuse/run").json()["run_id"]
            time.sleep(0.5)  # somewhere among the groups
        daemon.kill()
        daemon.start()
        _wait_healed(daemon)
        with daemon.client() as admin:
            assert admin.get(f"/v1/jobs/runs/{started}").json()["status"] in ("interrupted", "ok")
            rerun = _run_job(admin, "fuse")
            assert rerun["status"] == "ok", rerun
            assert _run_job(admin, "fuse")["result"]["groups"] == 0
            live = admin.get(f"/v1/cubes/{cube_id}/memories", params={"limit": 500}).json()
            assert [m["id"] for m in live["items"]] == originals
            for keep, gone in list(zip(originals, repeats, strict=True))[::10]:
                path = f"/v1/cubes/{cube_id}/memories"
                kept = [h["reason"] for h in admin.get(f"{path}/{keep}/history").json()["items"]]
                fused = [h["reason"] for h in admin.get(f"{path}/{gone}/history").json()["items"]]
                assert kept == ["created", f"fused from ['{gone}']"]
                assert fused == ["created", f"fused into {keep}"]
            actions = _run_job(admin, "index_maintenance")["result"]["actions"]
            assert set(actions) <= {"clean", "saved"}, actions
            stats = admin.get(f"/v1/cubes/{cube_id}").json()["stats"]
            assert stats["memories"] == pairs
    finally:
        daemon.stop()


def test_migrate_killed_mid_run_leaves_rows_and_files_agreeing(tmp_path):
    """Activations unused for ~1 s are cold here, so every run re-quantizes each a step; a
    `kill -9` during one, a restart and a rerun leave every row matching its files."""
    import kv_runtime

    daemon = make_daemon_process(tmp_path, MEMOS_LIFECYCLE__DEMOTE_AFTER_DAYS="0.00001")
    daemon.start()
    try:
        with daemon.client() as admin:
            cube_id = admin.post("/v1/cubes", json={"name": "migrate"}).json()["id"]
            acts = [
                admin.post(f"/v1/cubes/{cube_id}/activations",
                           json={"text": f"Note {i}: Caroline painted {i} red boats. " * 12})
                .json()["id"]
                for i in range(8)
            ]  # fmt: skip
            time.sleep(1.5)  # all cold
            first = admin.post("/v1/jobs/migrate/run").json()["run_id"]
            time.sleep(0.15)  # somewhere inside the run: re-quantizing one of them
        daemon.kill()
        daemon.start()
        with daemon.client() as admin:
            assert admin.get(f"/v1/jobs/runs/{first}").json()["status"] in ("interrupted", "ok")
            time.sleep(1.0)
            rerun = _run_job(admin, "migrate")
            assert rerun["status"] == "ok", rerun
            assert _run_job(admin, "index_maintenance")["result"]["activations"]["removed"] == 0
            rows = {a["id"]: a for a in
                    admin.get(f"/v1/cubes/{cube_id}/activations").json()["items"]}  # fmt: skip
            assert set(rows) <= set(acts) and rows  # 16 -> 8 -> 4 -> 2: none dropped yet
            folder = tmp_path / "activations" / cube_id
            assert {p.name for p in folder.iterdir()} == set(rows)  # no file without a row
            for act_id, row in rows.items():
                manifest = kv_runtime.read_manifest(folder / act_id)
                assert (row["state"], row["bits"], row["bytes"]) == (
                    "ready", manifest.compression.bits, manifest.bytes
                )  # fmt: skip
                assert row["bits"] < 16  # each stepped at least once over the two runs
                r = admin.post(f"/v1/cubes/{cube_id}/generate",
                               json={"prompt": "What did Caroline paint?", "max_tokens": 2,
                                     "activation_id": act_id})  # fmt: skip
                assert r.status_code == 200, r.text
    finally:
        daemon.stop()
