from __future__ import annotations

import ipaddress
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse

from memcube.errors import Forbidden
from memos import __version__
from memos.api.deps import AdminDep, DaemonDep
from memos.api.openapi import errors
from memos.api.schemas import (
    FleetMember,
    FleetOut,
    JobList,
    JobOut,
    JobRunBody,
    RunAccepted,
    RunList,
    RunOut,
)
from memos.scheduler.leader import LEASE_NAME

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz(daemon: DaemonDep) -> dict[str, object]:
    return {
        "status": "ok",
        "version": __version__,
        "schema": daemon.schema_revision,
        "database": daemon.db.dialect,
        "embedder": daemon.embedder.fingerprint,
        "indexes_loaded": len(daemon.indexes.loaded()),
        "healing": daemon.healing,
        "instance": daemon.instance.id,
        "changes": daemon.changes.status(),
        "redis": daemon.blobs.health(),  # "ok" | "down" | "off" (MEMOS_REDIS_URL unset)
    }


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "testclient"  # Starlette's in-process test client


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"description": "Prometheus text exposition format"},
        **errors({403: "`forbidden`: asked from another host than loopback"}),
    },
)
def metrics(request: Request) -> Response:
    """Prometheus text format; answered on loopback only."""
    if not _is_loopback(request.client.host if request.client else None):
        raise Forbidden("/metrics is served on loopback only")
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/jobs", response_model=JobList)
def list_jobs(daemon: DaemonDep, _: AdminDep) -> JobList:
    return JobList(items=[JobOut.model_validate(j) for j in daemon.jobs.views()])


@router.post("/v1/jobs/{name}/run", status_code=202, response_model=RunAccepted)
def run_job(
    name: str, daemon: DaemonDep, _: AdminDep, body: JobRunBody | None = None
) -> RunAccepted:
    """Run a job now, in the background; `{"cube_id"}` runs `evict`, `fuse` or `migrate` on one
    cube."""
    cube_id = body.cube_id if body is not None else None
    if cube_id is not None:
        daemon.system.require_cube(cube_id)
    return RunAccepted(run_id=daemon.jobs.run_now(name, cube_id=cube_id))


@router.get(
    "/v1/jobs/runs",
    response_model=RunList,
    responses=errors({404: "`job_not_found`: no job has that name"}),
)
def list_runs(
    daemon: DaemonDep,
    _: AdminDep,
    name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> RunList:
    """Job runs with their results, newest first (`?name=` for one job's)."""
    runs, next_cursor = daemon.jobs.runs(name, limit, cursor)
    return RunList(items=[RunOut.model_validate(r) for r in runs], next_cursor=next_cursor)


@router.get("/v1/jobs/runs/{run_id}", response_model=RunOut)
def get_run(run_id: str, daemon: DaemonDep, _: AdminDep) -> RunOut:
    return RunOut.model_validate(daemon.jobs.get_run(run_id))


@router.get("/v1/fleet", response_model=FleetOut)
def fleet(daemon: DaemonDep, _: AdminDep) -> FleetOut:
    """The daemons on this database whose lease has not expired, and the scheduler's leader."""
    return FleetOut(
        instance=daemon.instance.id,
        members=[FleetMember.model_validate(m) for m in daemon.instance.members()],
        scheduler_leader=daemon.leases.holder_of(LEASE_NAME),
    )
