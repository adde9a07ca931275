"""The JSON job store on a real database: jobs round-trip exactly and nothing is pickled."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from memos.db.engine import Database
from memos.db.migrate import upgrade
from memos.db.models import SchedulerJob
from memos.scheduler.jobstore import JsonJobStore, decode_job, encode_job


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'jobs.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    db = Database(url)
    upgrade(db)
    scheduler = BackgroundScheduler(timezone=UTC)
    store = JsonJobStore(db)
    store.start(scheduler, "default")
    store.remove_all_jobs()
    yield store
    store.remove_all_jobs()
    db.dispose()


def make_job(job_id: str, next_run: datetime, seconds: int = 300) -> Job:
    scheduler = BackgroundScheduler(timezone=UTC)
    trigger = IntervalTrigger(seconds=seconds, start_date=datetime(2026, 1, 1, tzinfo=UTC))
    return Job(
        scheduler,
        id=job_id,
        func="memos.scheduler.runner:scheduled_entry",
        args=[job_id],
        kwargs={},
        trigger=trigger,
        executor="default",
        name=job_id,
        misfire_grace_time=3600,
        coalesce=True,
        max_instances=1,
        next_run_time=next_run,
    )


def test_encode_decode_roundtrip_is_exact_json():
    when = datetime(2026, 5, 1, 12, 30, tzinfo=UTC)
    job = make_job("index_maintenance", when, seconds=90)
    text = encode_job(job)
    body = json.loads(text)  # plain JSON, no pickle
    assert body["trigger"]["seconds"] == 90 and body["args"] == ["index_maintenance"]
    back = decode_job(text, None, "default")
    assert (back.id, back.next_run_time, back.args) == (job.id, when, ("index_maintenance",))
    assert back.trigger.interval == timedelta(seconds=90)
    assert back.trigger.start_date == job.trigger.start_date


def test_arguments_json_cannot_hold_are_refused():
    job = make_job("x", datetime(2026, 5, 1, tzinfo=UTC))
    job.args = (object(),)
    with pytest.raises(TypeError):
        encode_job(job)


def test_store_add_lookup_due_update_remove(store):
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    store.add_job(make_job("late", now + timedelta(hours=1)))
    store.add_job(make_job("soon", now - timedelta(minutes=1)))
    with pytest.raises(ConflictingIdError):
        store.add_job(make_job("soon", now))
    assert [j.id for j in store.get_all_jobs()] == ["soon", "late"]
    assert [j.id for j in store.get_due_jobs(now)] == ["soon"]
    assert store.get_next_run_time() == now - timedelta(minutes=1)
    job = store.lookup_job("soon")
    job.next_run_time = now + timedelta(hours=2)
    store.update_job(job)
    assert store.get_due_jobs(now) == []
    assert store.lookup_job("soon").next_run_time == now + timedelta(hours=2)
    with store.db.read() as s:
        states = [json.loads(row.job_state) for row in s.query(SchedulerJob).all()]
    assert {st["id"] for st in states} == {"soon", "late"}
    store.remove_job("soon")
    with pytest.raises(JobLookupError):
        store.remove_job("soon")
    with pytest.raises(JobLookupError):
        store.update_job(make_job("ghost", now))
    assert store.lookup_job("soon") is None


def test_a_database_away_does_not_stop_the_scheduler_loop(tmp_path):
    """APScheduler's loop calls these without catching: they must not raise while the
    database is unreachable (nothing listens on the port), only put the next look off."""
    from tests.conftest import free_port

    db = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    store = JsonJobStore(db)
    store.start(BackgroundScheduler(timezone=UTC), "default")
    before = datetime.now(UTC)
    wake = store.get_next_run_time()
    assert wake is not None and before < wake <= datetime.now(UTC) + timedelta(seconds=6)
    store.update_job(make_job("index_maintenance", before))  # logged, not raised
    db.dispose()
