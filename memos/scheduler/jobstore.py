"""An APScheduler 3 job store that keeps jobs as JSON rows in the daemon's database.

APScheduler's own SQLAlchemy store pickles job state; nothing we store is pickled, so this
store writes the state as JSON instead. It supports what memosd schedules: jobs given by a
textual function reference, JSON-serialisable arguments, interval and cron triggers. Anything
else is a programming error and fails loudly when the job is added.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from memos.db.engine import Database
from memos.db.models import SchedulerJob

RETRY_S = 5.0  # how soon the scheduler looks again when the database is away


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _parse(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _zone(name: str) -> Any:
    return UTC if name in ("UTC", "utc") else ZoneInfo(name)


def _encode_trigger(trigger: BaseTrigger) -> dict[str, Any]:
    assert isinstance(trigger, IntervalTrigger | CronTrigger), f"unsupported trigger {trigger!r}"
    common = {
        "start_date": _iso(trigger.start_date),
        "end_date": _iso(trigger.end_date),
        "timezone": str(trigger.timezone),
        "jitter": trigger.jitter,
    }
    if isinstance(trigger, IntervalTrigger):
        return {"type": "interval", "seconds": trigger.interval.total_seconds(), **common}
    fields = {f.name: str(f) for f in trigger.fields if not f.is_default}
    return {"type": "cron", "fields": fields, **common}


def _decode_trigger(spec: dict[str, Any]) -> BaseTrigger:
    common = {
        "start_date": _parse(spec["start_date"]),
        "end_date": _parse(spec["end_date"]),
        "timezone": _zone(spec["timezone"]),
        "jitter": spec["jitter"],
    }
    if spec["type"] == "interval":
        return IntervalTrigger(seconds=spec["seconds"], **common)
    if spec["type"] == "cron":
        return CronTrigger(**spec["fields"], **common)
    raise AssertionError(f"unsupported trigger {spec!r}")


def encode_job(job: Job) -> str:
    state = job.__getstate__()
    body = {
        **{k: v for k, v in state.items() if k not in ("trigger", "next_run_time", "args")},
        "args": list(state["args"]),
        "next_run_time": _iso(state["next_run_time"]),
        "trigger": _encode_trigger(state["trigger"]),
    }
    return json.dumps(body)  # raises TypeError for arguments JSON cannot hold


def decode_job(text: str, scheduler: Any, alias: str) -> Job:
    body = json.loads(text)
    trigger = _decode_trigger(body.pop("trigger"))
    state = {
        **body,
        "trigger": trigger,
        "args": tuple(body["args"]),
        "next_run_time": _parse(body["next_run_time"]),
    }
    job = Job.__new__(Job)
    job.__setstate__(state)
    job._scheduler = scheduler
    job._jobstore_alias = alias
    return job


class JsonJobStore(BaseJobStore):
    """`may_write`: whether this daemon leads the fleet's scheduler, the one that advances
    the shared schedule (a daemon that just lost the lead leaves it to the new leader)."""

    def __init__(self, db: Database, may_write: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.db = db
        self.may_write = may_write

    def _jobs(self, *conditions: Any) -> list[Job]:
        with self.db.read() as s:
            rows = s.execute(
                select(SchedulerJob.id, SchedulerJob.job_state)
                .where(*conditions)
                .order_by(SchedulerJob.next_run_time)
            ).all()
        jobs = []
        for job_id, state in rows:
            try:
                jobs.append(decode_job(state, self._scheduler, self._alias))
            except Exception:
                self._logger.exception("cannot restore job %r; removing it", job_id)
                self.remove_job(job_id)
        return jobs

    def lookup_job(self, job_id: str) -> Job | None:
        jobs = self._jobs(SchedulerJob.id == job_id)
        return jobs[0] if jobs else None

    def get_due_jobs(self, now: datetime) -> list[Job]:
        return self._jobs(SchedulerJob.next_run_time <= now.timestamp())

    def get_next_run_time(self) -> datetime | None:
        # APScheduler's loop calls this (and `update_job`) without catching: a database that
        # is away must not end the scheduler's thread. Look again in a few seconds instead.
        try:
            with self.db.read() as s:
                value = s.scalar(
                    select(SchedulerJob.next_run_time)
                    .where(SchedulerJob.next_run_time.is_not(None))
                    .order_by(SchedulerJob.next_run_time)
                    .limit(1)
                )
        except SQLAlchemyError as exc:
            self._logger.warning("job store unreachable (%s); looking again soon", exc)
            return datetime.now(UTC) + timedelta(seconds=RETRY_S)
        return None if value is None else datetime.fromtimestamp(value, UTC)

    def get_all_jobs(self) -> list[Job]:
        jobs = self._jobs()
        self._fix_paused_jobs_sorting(jobs)
        return jobs

    def add_job(self, job: Job) -> None:
        try:
            with self.db.write() as s:
                s.add(SchedulerJob(id=job.id, next_run_time=_stamp(job), job_state=encode_job(job)))
        except IntegrityError:
            raise ConflictingIdError(job.id) from None

    def update_job(self, job: Job) -> None:
        if not self.may_write():
            return
        try:
            with self.db.write() as s:
                row = s.get(SchedulerJob, job.id)
                if row is None:
                    raise JobLookupError(job.id)
                row.next_run_time = _stamp(job)
                row.job_state = encode_job(job)
        except SQLAlchemyError as exc:  # away: the job stays due and runs again when back
            self._logger.warning("job %r not rescheduled (%s)", job.id, exc)

    def remove_job(self, job_id: str) -> None:
        with self.db.write() as s:
            gone = s.execute(delete(SchedulerJob).where(SchedulerJob.id == job_id))
            if gone.rowcount == 0:  # type: ignore[attr-defined]
                raise JobLookupError(job_id)

    def remove_all_jobs(self) -> None:
        with self.db.write() as s:
            s.execute(delete(SchedulerJob))


def _stamp(job: Job) -> float | None:
    return None if job.next_run_time is None else job.next_run_time.timestamp()
