"""Runs named jobs on a schedule or on demand, and records every run in `job_runs`.

Jobs are plain callables returning a JSON-able dict, registered by name with an interval, or a
crontab expression that replaces it (`scheduler.cron`, `memos/scheduler/crontab.py`). Their
schedules live in the database (`JsonJobStore`), so a daily job does not restart its clock on
every daemon restart; a changed interval or cron expression reschedules the job at start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import select, update

from memcube.errors import InvalidArgument, NotFound
from memos.db.engine import Database
from memos.db.models import JobRun
from memos.db.types import utcnow
from memos.scheduler.crontab import cron_trigger
from memos.scheduler.jobstore import JsonJobStore
from memos.services.ids import decode_cursor, encode_cursor, new_id

log = logging.getLogger("memos.jobs")

JobFn = Callable[[], dict[str, Any]]
CubeJobFn = Callable[[str], dict[str, Any]]


@dataclass(frozen=True)
class JobSpec:
    name: str
    description: str
    interval_s: int
    run: JobFn
    run_cube: CubeJobFn | None = None  # the job on one cube (`POST .../run {"cube_id"}`)
    cron: str | None = None  # a crontab expression (UTC) in place of the interval

    @property
    def schedule(self) -> str:
        """How it is scheduled, for people: "every 300 s" or "cron 0 3 * * *"."""
        return f"cron {self.cron}" if self.cron else f"every {self.interval_s} s"

    def trigger(self) -> BaseTrigger:
        if self.cron:
            return cron_trigger(self.cron)
        return IntervalTrigger(seconds=self.interval_s, timezone=UTC)


@dataclass(frozen=True)
class JobView:
    name: str
    description: str
    schedule: str
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_status: str | None


@dataclass(frozen=True)
class RunView:
    run_id: str
    name: str
    trigger: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    result: dict[str, Any]
    error: str | None


# APScheduler stores a textual reference to the function it calls, so scheduled runs enter
# through this module-level function and find the daemon's runner here.
_active: JobRunner | None = None


def scheduled_entry(name: str) -> None:
    if _active is not None:
        _active.run_now(name, trigger="schedule", wait=True)


class JobRunner:
    def __init__(self, db: Database, jobs: list[JobSpec], enabled: bool = True) -> None:
        self.db = db
        self.jobs = {job.name: job for job in jobs}
        self.enabled = enabled
        self._locks = {name: threading.Lock() for name in self.jobs}
        self._durations: dict[str, tuple[int, float]] = {}  # name -> (runs, seconds), metrics
        self._stats_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="memos-job")
        self._scheduler = BackgroundScheduler(
            jobstores={"default": JsonJobStore(db)},
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        )

    def start(self) -> None:
        global _active
        _active = self
        with self.db.write() as s:  # runs cut short by a crash or a stop
            s.execute(
                update(JobRun)
                .where(JobRun.status == "running")
                .values(status="interrupted", finished_at=utcnow())
            )
        if not self.enabled:
            return
        self._scheduler.start(paused=True)
        for job in self.jobs.values():
            existing = self._scheduler.get_job(job.name)
            trigger = job.trigger()
            if existing is None:
                self._scheduler.add_job(
                    "memos.scheduler.runner:scheduled_entry",
                    trigger=trigger,
                    args=[job.name],
                    id=job.name,
                    name=job.name,
                )
            elif str(existing.trigger) != str(trigger):  # e.g. "interval[0:05:00]"
                self._scheduler.reschedule_job(job.name, trigger=trigger)
        self._scheduler.resume()

    def stop(self) -> None:
        global _active
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        if _active is self:
            _active = None

    # -- runs -------------------------------------------------------------------------------

    def _spec(self, name: str) -> JobSpec:
        job = self.jobs.get(name)
        if job is None:
            raise NotFound(
                f"job {name!r} not found; jobs: {sorted(self.jobs)}", code="job_not_found"
            )
        return job

    def run_now(
        self,
        name: str,
        trigger: str = "manual",
        wait: bool = False,
        cube_id: str | None = None,
    ) -> str:
        """Record a run and execute it (in the background unless `wait`), on every cube or on
        `cube_id` alone. Returns the run id."""
        job = self._spec(name)
        if cube_id is not None and job.run_cube is None:
            raise InvalidArgument(
                f"job {name!r} runs on the whole daemon and takes no cube_id; jobs that do: "
                f"{sorted(n for n, j in self.jobs.items() if j.run_cube is not None)}"
            )
        run_id = new_id("run")
        with self.db.write() as s:
            s.add(JobRun(id=run_id, job_name=name, trigger=trigger, status="running"))
        if wait:
            self._execute(job, run_id, cube_id)
        else:
            self._pool.submit(self._execute, job, run_id, cube_id)
        return run_id

    def _execute(self, job: JobSpec, run_id: str, cube_id: str | None = None) -> None:
        with self._locks[job.name]:  # one run of a job at a time
            status, result, error = "ok", {}, None
            started = time.perf_counter()
            try:
                if cube_id is not None and job.run_cube is not None:
                    result = {"cube_id": cube_id, **job.run_cube(cube_id)}
                else:
                    result = job.run()
            except Exception as exc:
                log.exception("job failed", extra={"fields": {"job": job.name, "run_id": run_id}})
                status, error = "error", f"{type(exc).__name__}: {exc}"
            with self._stats_lock:
                runs, seconds = self._durations.get(job.name, (0, 0.0))
                self._durations[job.name] = (runs + 1, seconds + time.perf_counter() - started)
            with self.db.write() as s:
                s.execute(
                    update(JobRun)
                    .where(JobRun.id == run_id)
                    .values(status=status, result=result, error=error, finished_at=utcnow())
                )

    # -- views ------------------------------------------------------------------------------

    def views(self) -> list[JobView]:
        views = []
        with self.db.read() as s:
            for name, job in sorted(self.jobs.items()):
                last = s.execute(
                    select(JobRun.started_at, JobRun.status)
                    .where(JobRun.job_name == name)
                    .order_by(JobRun.started_at.desc())
                    .limit(1)
                ).first()
                scheduled = self._scheduler.get_job(name) if self._scheduler.running else None
                views.append(
                    JobView(
                        name=name,
                        description=job.description,
                        schedule=job.schedule,
                        next_run_at=scheduled.next_run_time if scheduled else None,
                        last_run_at=last.started_at if last else None,
                        last_status=last.status if last else None,
                    )
                )
        return views

    def durations(self) -> dict[str, tuple[int, float]]:
        """Runs since start and their seconds in all, by job name (for /metrics)."""
        with self._stats_lock:
            return dict(self._durations)

    def runs(
        self, name: str | None, limit: int, cursor: str | None
    ) -> tuple[list[RunView], str | None]:
        """Runs newest first (of one job, if named), a page at a time."""
        if name is not None:
            self._spec(name)
        start = decode_cursor(cursor) or 0
        query = select(JobRun).order_by(JobRun.started_at.desc(), JobRun.id.desc())
        if name is not None:
            query = query.where(JobRun.job_name == name)
        with self.db.read() as s:
            rows = s.scalars(query.offset(start).limit(limit + 1)).all()
        more = len(rows) > limit
        return [_run_view(r) for r in rows[:limit]], encode_cursor(start + limit) if more else None

    def get_run(self, run_id: str) -> RunView:
        with self.db.read() as s:
            run = s.get(JobRun, run_id)
        if run is None:
            raise NotFound(f"job run {run_id!r} not found", code="run_not_found")
        return _run_view(run)


def _run_view(run: JobRun) -> RunView:
    return RunView(
        run_id=run.id,
        name=run.job_name,
        trigger=run.trigger,
        status=run.status,
        started_at=run.started_at,
        finished_at=run.finished_at,
        result=run.result or {},
        error=run.error,
    )
