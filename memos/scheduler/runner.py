"""Runs named jobs on a schedule or on demand, and records every run in `job_runs`.

Jobs are plain callables returning a JSON-able dict, registered by name with an interval, or a
crontab expression that replaces it (`scheduler.cron`, `memos/scheduler/crontab.py`). Their
schedules live in the database (`JsonJobStore`), so a daily job does not restart its clock on
every daemon restart; a changed interval or cron expression reschedules the job.

Several daemons on one database share those schedules; only the scheduler leader
(`memos/scheduler/leader.py`) runs them, so each tick runs once across the fleet: its
APScheduler runs while it leads and is paused otherwise, and only it writes the job store.
Jobs about a daemon's own memory (`JobSpec.local`) are scheduled by every daemon for itself,
in memory. Manual runs run on the daemon asked. Each run records the daemon running it
(`instance_id`); a run whose daemon is gone (its lease expired) is marked "interrupted", at
start and by the leader while it leads, never one of a live daemon.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apscheduler.jobstores.base import ConflictingIdError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import ColumnElement, select, update

from memcube.errors import InvalidArgument, NotFound
from memos.db.engine import Database
from memos.db.models import JobRun
from memos.db.types import utcnow
from memos.scheduler.crontab import cron_trigger
from memos.scheduler.jobstore import JsonJobStore
from memos.scheduler.leader import Leadership
from memos.services.fleet import Leases, other_owner_gone, owner_gone
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
    # On every daemon, of what it holds in memory (usage counts, loaded chat prefixes):
    # scheduled by each daemon for itself, not by the fleet's leader.
    local: bool = False
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
    instance_id: str | None  # the daemon that ran it


# APScheduler stores a textual reference to the function it calls, so scheduled runs enter
# through this module-level function and find the daemon's runner here.
_active: JobRunner | None = None


def scheduled_entry(name: str) -> None:
    runner = _active
    if runner is not None and runner.leads():  # asked the database again, right before
        runner.run_now(name, trigger="schedule", wait=True)


class JobRunner:
    def __init__(
        self,
        db: Database,
        jobs: list[JobSpec],
        enabled: bool = True,
        leases: Leases | None = None,
        lease_s: float = 15.0,
        on_lead: Callable[[], object] = lambda: None,
    ) -> None:
        """`leases`: this daemon's (its holder is the instance id); without them the runner
        is alone, leads always and recovers every run. `on_lead`: more of the leader's
        periodic duties, run every `lease_s / 3` while it leads."""
        self.db = db
        self.jobs = {job.name: job for job in jobs}
        self.enabled = enabled
        self.instance_id = leases.holder if leases is not None else None
        self.on_lead = on_lead
        self.leadership = (
            Leadership(leases, lease_s, self._lead, self._leader_duties)
            if leases is not None and enabled
            else None
        )
        self._locks = {name: threading.Lock() for name in self.jobs}
        self._durations: dict[str, tuple[int, float]] = {}  # name -> (runs, seconds), metrics
        self._stats_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="memos-job")
        self._scheduler = BackgroundScheduler(
            jobstores={"default": JsonJobStore(db, may_write=self.leading)},
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        )
        self._local = BackgroundScheduler(  # local jobs: this daemon's alone, in memory
            timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1}
        )

    def start(self) -> None:
        global _active
        _active = self
        self.interrupt_orphans(at_start=True)  # runs cut short by a crash or a stop
        if not self.enabled:
            return
        self._scheduler.start(paused=True)
        self._local.start()
        for job in self.jobs.values():
            if job.local:
                self._local.add_job(
                    self._run_scheduled,
                    trigger=job.trigger(),
                    args=[job.name],
                    id=job.name,
                    name=job.name,
                )
        if self.leadership is not None:
            self.leadership.start()  # resumes the scheduler once (and while) it leads
        else:
            self._lead(True)

    def stop(self) -> None:
        global _active
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        if self._local.running:
            self._local.shutdown(wait=True)
        if self.leadership is not None:
            self.leadership.stop()  # after its runs ended: the next leader may start them
        self._pool.shutdown(wait=True)
        if _active is self:
            _active = None

    # -- leadership -------------------------------------------------------------------------

    def leading(self) -> bool:
        """Whether this daemon leads, as last seen (no database round trip)."""
        return self.leadership is None or self.leadership.leading

    def leads(self) -> bool:
        """Whether this daemon leads, asked of the database (renewing the lease if so)."""
        return self.leadership is None or self.leadership.confirm()

    def _lead(self, leading: bool) -> None:
        if not self._scheduler.running:  # stopping
            return
        if leading:
            self._sync_jobs()
            self._scheduler.resume()
        else:
            self._scheduler.pause()

    def _sync_jobs(self) -> None:
        """The shared schedule holds every job, at its configured interval (the leader's)."""
        for job in self.jobs.values():
            existing = self._scheduler.get_job(job.name)
            trigger = job.trigger()
            if job.local:
                if existing is not None:  # shared by an older memosd: each daemon's now
                    self._scheduler.remove_job(job.name)
            elif existing is None:
                with contextlib.suppress(ConflictingIdError):  # added a moment ago elsewhere
                    self._scheduler.add_job(
                        "memos.scheduler.runner:scheduled_entry",
                        trigger=trigger,
                        args=[job.name],
                        id=job.name,
                        name=job.name,
                    )
            elif str(existing.trigger) != str(trigger):  # e.g. "interval[0:05:00]"
                self._scheduler.reschedule_job(job.name, trigger=trigger)

    def _run_scheduled(self, name: str) -> None:
        self.run_now(name, trigger="schedule", wait=True)

    def _leader_duties(self) -> None:
        self.interrupt_orphans(at_start=False)
        self.on_lead()

    def interrupt_orphans(self, at_start: bool) -> int:
        """Mark "interrupted" the runs no daemon will finish: at start, those of this daemon's
        earlier self, of no daemon and of daemons whose lease expired; later, only the last.
        Never a run of a live daemon. Returns how many."""
        me = self.instance_id
        cut: ColumnElement[bool] | None = None
        if me is not None:
            cut = (
                owner_gone(JobRun.instance_id, me)
                if at_start
                else other_owner_gone(JobRun.instance_id, me)
            )
        elif not at_start:
            return 0
        running = JobRun.status == "running"
        query = select(JobRun.id, JobRun.instance_id).where(running)
        query = query if cut is None else query.where(cut)
        with self.db.read() as s:  # mostly none: no write transaction then (SQLite: a lock)
            if s.execute(query.limit(1)).first() is None:
                return 0
        with self.db.write() as s:
            rows = s.execute(query).all()
            for run_id, owner in rows:
                gone = owner is not None and owner != me
                s.execute(
                    update(JobRun)
                    .where(JobRun.id == run_id, running)
                    .values(
                        status="interrupted",
                        finished_at=utcnow(),
                        error=f"interrupted: daemon {owner} stopped" if gone else None,
                    )
                )
        if rows and not at_start:
            log.warning("job runs of stopped daemons interrupted", extra={"fields": {
                "runs": [run_id for run_id, _ in rows]
            }})  # fmt: skip
        return len(rows)

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
            s.add(
                JobRun(
                    id=run_id,
                    job_name=name,
                    trigger=trigger,
                    status="running",
                    instance_id=self.instance_id,
                )
            )
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
                scheduler = self._local if job.local else self._scheduler
                scheduled = scheduler.get_job(name) if scheduler.running else None
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
        instance_id=run.instance_id,
    )
