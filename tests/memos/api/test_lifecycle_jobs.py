"""The lifecycle jobs over HTTP: run on one cube, listed runs with results, metrics."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import update

from memos.db.models import Memory
from tests.memos.api.conftest import metric


def _finished(admin: httpx.Client, run_id: str) -> dict:
    deadline = time.time() + 300
    while (run := admin.get(f"/v1/jobs/runs/{run_id}").json())["status"] == "running":
        assert time.time() < deadline
        time.sleep(0.05)
    return run


def test_evict_runs_on_one_cube_and_its_run_is_listed(server, tenant):
    client, cube_id = tenant
    path = f"/v1/cubes/{cube_id}"
    ids = [m["id"] for m in client.post(f"{path}/memories", json={"items": [
        {"content": "an old note"}, {"content": "another old note"}, {"content": "a new note"},
    ]}).json()["items"]]  # fmt: skip
    assert client.put(f"{path}/policy", json={"memory_ttl_days": 1}).status_code == 200
    with server.daemon.db.write() as s:
        old = datetime.now(UTC) - timedelta(days=2)
        s.execute(update(Memory).where(Memory.id.in_(ids[:2])).values(created_at=old))
    expired_before = metric(server, "memos_lifecycle_expired_notes_total")
    with server.client() as admin:
        r = admin.post("/v1/jobs/evict/run", json={"cube_id": cube_id})
        assert r.status_code == 202
        run = _finished(admin, r.json()["run_id"])
        assert (run["name"], run["status"], run["trigger"]) == ("evict", "ok", "manual")
        assert run["result"]["cube_id"] == cube_id
        assert run["result"]["expired"] == {cube_id: 2}
        listed = admin.get("/v1/jobs/runs", params={"name": "evict", "limit": 1}).json()
        assert [i["run_id"] for i in listed["items"]] == [run["run_id"]]
        assert listed["items"][0]["result"]["expired"] == {cube_id: 2}
        # A job over the whole daemon takes no cube; an unknown cube or job is 404.
        r = admin.post("/v1/jobs/index_maintenance/run", json={"cube_id": cube_id})
        assert r.status_code == 422 and "takes no cube_id" in r.json()["error"]["message"]
        r = admin.post("/v1/jobs/fuse/run", json={"cube_id": "cube_nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "cube_not_found"
        assert admin.get("/v1/jobs/runs", params={"name": "nope"}).status_code == 404
    assert [m["id"] for m in client.get(f"{path}/memories").json()["items"]] == ids[2:]
    assert metric(server, "memos_lifecycle_expired_notes_total") - expired_before == 2
    assert metric(server, "memos_job_runs_total", job="evict") >= 1
    with httpx.Client(base_url=server.url) as anonymous:  # users cannot run jobs
        _, key = server.new_user()
        r = anonymous.post("/v1/jobs/evict/run", json={"cube_id": cube_id},
                           headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert r.status_code == 403
