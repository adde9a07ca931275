"""Operations routes: health, metrics, jobs, OpenAPI."""

from __future__ import annotations

import time

import httpx

from memos.db.migrate import head_revision


def test_healthz_is_public(server):
    body = httpx.get(f"{server.url}/healthz").json()
    assert body["status"] == "ok"
    assert body["database"] == ("sqlite" if server.backend == "sqlite" else "postgresql")
    assert body["schema"] == head_revision()


def test_metrics_count_requests_by_route(server):
    httpx.get(f"{server.url}/healthz")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'memos_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert "memos_request_duration_seconds_bucket" in text


def test_openapi_and_docs_are_served(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/cubes/{cube_id}/search" in spec["paths"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_jobs_are_admin_only_and_run_records_status(server):
    _, key = server.new_user()
    with server.client(key) as user:
        assert user.get("/v1/jobs").status_code == 403
        assert user.post("/v1/jobs/index_maintenance/run").status_code == 403
    with server.client() as admin:
        jobs = admin.get("/v1/jobs").json()["items"]
        assert [j["name"] for j in jobs] == ["index_maintenance"]
        assert set(jobs[0]) >= {"name", "next_run_at", "last_run_at", "last_status"}
        assert jobs[0]["next_run_at"] is not None
        r = admin.post("/v1/jobs/index_maintenance/run")
        assert r.status_code == 202
        run_id = r.json()["run_id"]
        deadline = time.time() + 300
        while (run := admin.get(f"/v1/jobs/runs/{run_id}").json())["status"] == "running":
            assert time.time() < deadline
            time.sleep(0.05)
        assert run["status"] == "ok", run
        assert run["result"]["cubes"] >= 0
        job = admin.get("/v1/jobs").json()["items"][0]
        assert job["last_status"] == "ok" and job["last_run_at"] is not None
        r = admin.post("/v1/jobs/no_such_job/run")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "job_not_found")
