"""Operations routes: health, metrics, jobs, OpenAPI."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from memos.db.migrate import head_revision
from memos.settings import Settings
from tests.conftest import LiveServer, _start_live_server, free_port


def test_healthz_is_public(server):
    body = httpx.get(f"{server.url}/healthz").json()
    assert body["status"] == "ok"
    assert body["database"] == ("sqlite" if server.backend == "sqlite" else "postgresql")
    assert body["schema"] == head_revision()
    assert body["redis"] == "off"  # MEMOS_REDIS_URL unset


def test_metrics_count_requests_by_route(server):
    httpx.get(f"{server.url}/healthz")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'memos_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert "memos_request_duration_seconds_bucket" in text


def gauge(text: str, name: str) -> float:
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_metrics_show_the_loaded_index_and_chat_prefix_bytes(server):
    _, key = server.new_user()
    with server.client(key) as user:
        cube = user.post("/v1/cubes", json={"name": f"m-{secrets.token_hex(4)}"}).json()["id"]
        before = gauge(httpx.get(f"{server.url}/metrics").text, "memos_indexes_loaded_bytes")
        added = user.post(f"/v1/cubes/{cube}/memories", json={"items": [{"content": "a note"}]})
        assert added.status_code == 201, added.text
    text = httpx.get(f"{server.url}/metrics").text
    assert gauge(text, "memos_indexes_loaded_bytes") > before  # the new cube's index is loaded
    assert gauge(text, "memos_chat_prefixes_bytes") >= 0


def test_openapi_and_docs_are_served(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/cubes/{cube_id}/search" in spec["paths"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def wait_run(client: httpx.Client, name: str) -> dict:
    r = client.post(f"/v1/jobs/{name}/run")
    assert r.status_code == 202
    deadline = time.time() + 300
    while (run := client.get(f"/v1/jobs/runs/{r.json()['run_id']}").json())["status"] == "running":
        assert time.time() < deadline
        time.sleep(0.05)
    return run


def test_jobs_are_admin_only_and_run_records_status(server):
    _, key = server.new_user()
    with server.client(key) as user:
        assert user.get("/v1/jobs").status_code == 403
        assert user.post("/v1/jobs/index_maintenance/run").status_code == 403
    with server.client() as admin:
        jobs = admin.get("/v1/jobs").json()["items"]
        assert [j["name"] for j in jobs] == [
            "chat_prefix_save",
            "enrichment_retry",
            "evict",
            "fuse",
            "index_maintenance",
            "migrate",
            "unload_idle",
            "usage_flush",
        ]
        assert set(jobs[1]) >= {"name", "next_run_at", "last_run_at", "last_status"}
        assert all(job["next_run_at"] is not None for job in jobs)
        run = wait_run(admin, "enrichment_retry")
        assert (run["name"], run["trigger"], run["status"], run["error"]) == (
            "enrichment_retry", "manual", "ok", None
        )  # fmt: skip
        # This daemon does not enrich: the run says so rather than claim it retried.
        assert run["result"] == {"skipped": "enrichment is disabled (enrichment.enabled=false)"}
        job = admin.get("/v1/jobs").json()["items"][1]
        assert job["last_status"] == "ok" and job["last_run_at"] == run["started_at"]
        r = admin.post("/v1/jobs/no_such_job/run")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "job_not_found")


@pytest.fixture
def own_server(tmp_path, embedder) -> Iterator[LiveServer]:
    """A daemon of this test's own, so a job's result over every cube is known exactly."""
    settings = Settings(data_dir=tmp_path, admin_key=f"admin-{secrets.token_hex(8)}",
                        port=free_port(), enrichment={"enabled": False},
                        scheduler={"enabled": False})  # fmt: skip
    yield from _start_live_server(settings, embedder, "sqlite")


def test_a_job_run_records_exactly_what_the_job_did(own_server):
    with own_server.client() as admin:
        for name in ("a", "b"):
            cube_id = admin.post("/v1/cubes", json={"name": name}).json()["id"]
            added = admin.post(f"/v1/cubes/{cube_id}/memories",
                               json={"items": [{"content": f"note in {name}"}]})  # fmt: skip
            assert added.status_code == 201
        # Both cubes' indexes are loaded with unsaved changes: the first run saves both...
        first = wait_run(admin, "index_maintenance")
        swept = {"removed": 0, "failed": 0, "cubes": 0}  # no activation files to sweep
        assert (first["status"], first["result"]) == (
            "ok", {"cubes": 2, "actions": {"saved": 2}, "activations": swept}
        )  # fmt: skip
        # ... and the next finds them clean.
        second = wait_run(admin, "index_maintenance")
        assert second["result"] == {"cubes": 2, "actions": {"clean": 2}, "activations": swept}


def test_a_cron_schedule_replaces_a_jobs_interval(tmp_path, embedder):
    settings = Settings(data_dir=tmp_path, admin_key=f"admin-{secrets.token_hex(8)}",
                        port=free_port(), enrichment={"enabled": False},
                        scheduler={"cron": {"evict": "0 3 * * 1-5"}})  # fmt: skip
    for server in _start_live_server(settings, embedder, "sqlite"):
        with server.client() as admin:
            jobs = {j["name"]: j for j in admin.get("/v1/jobs").json()["items"]}
    assert jobs["evict"]["schedule"] == "cron 0 3 * * 1-5"
    assert jobs["fuse"]["schedule"] == f"every {settings.scheduler.fuse_interval_s} s"
    due = datetime.fromisoformat(jobs["evict"]["next_run_at"]).astimezone(UTC)
    # The next weekday (Monday to Friday, as crontab reads 1-5) at 03:00 UTC, within 3 days.
    assert (due.hour, due.minute, due.second) == (3, 0, 0) and due.isoweekday() <= 5
    assert timedelta(0) < due - datetime.now(UTC) <= timedelta(days=3)
