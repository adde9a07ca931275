"""Cron schedules: crontab's meaning of weekdays, clear refusals, JSON storage, settings."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from pydantic import ValidationError

from memcube.errors import InvalidArgument
from memos.scheduler.crontab import cron_trigger
from memos.scheduler.jobstore import decode_job, encode_job
from memos.settings import SchedulerConfig, Settings

SATURDAY_NOON = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def next_fires(expr: str, count: int = 3) -> list[str]:
    trigger, after, fires = cron_trigger(expr), SATURDAY_NOON, []
    for _ in range(count):
        after = trigger.get_next_fire_time(None, after)
        fires.append(after.strftime("%a %d %H:%M"))
        after = after.replace(second=1)
    return fires


@pytest.mark.parametrize(
    ("expr", "fires"),
    [
        # 1-5 is Monday to Friday, as in crontab (APScheduler 3 alone would read Tue-Sat).
        ("0 3 * * 1-5", ["Mon 07 03:00", "Tue 08 03:00", "Wed 09 03:00"]),
        ("0 0 * * 0", ["Sun 06 00:00", "Sun 13 00:00", "Sun 20 00:00"]),
        ("0 0 * * 7", ["Sun 06 00:00", "Sun 13 00:00", "Sun 20 00:00"]),
        ("0 0 * * */3", ["Sun 06 00:00", "Wed 09 00:00", "Sat 12 00:00"]),
        ("15 6 * * sat,sun", ["Sun 06 06:15", "Sat 12 06:15", "Sun 13 06:15"]),
        ("0 0 * * 5-7", ["Sun 06 00:00", "Fri 11 00:00", "Sat 12 00:00"]),
        ("*/20 12 * * *", ["Sat 05 12:00", "Sat 05 12:20", "Sat 05 12:40"]),
        ("0 9 15 * *", ["Tue 15 09:00", "Fri 15 09:00", "Mon 15 09:00"]),
    ],
)
def test_crontab_expressions_fire_when_cron_would(expr, fires):
    assert next_fires(expr) == fires


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("0 3 * *", "needs 5"),
        ("0 3 * * 8", "not 0-7"),
        ("61 * * * *", "61"),
        ("0 0 * * 5-1", "backwards"),
        ("0 0 * * */0", "not positive"),
        ("0 0 1 * mon", "either one matching"),
    ],
)
def test_malformed_expressions_are_refused_with_the_reason(expr, says):
    with pytest.raises(InvalidArgument, match=says):
        cron_trigger(expr)


def test_a_cron_job_round_trips_through_the_json_store():
    trigger = cron_trigger("30 2 * * 1-5")
    options = {"misfire_grace_time": 3600, "coalesce": True, "max_instances": 1}
    job = Job(
        BackgroundScheduler(timezone=UTC),
        id="evict",
        func="memos.scheduler.runner:scheduled_entry",
        args=["evict"],
        kwargs={},
        trigger=trigger,
        executor="default",
        name="evict",
        next_run_time=trigger.get_next_fire_time(None, SATURDAY_NOON),
        **options,
    )
    text = encode_job(job)
    assert json.loads(text)["trigger"]["type"] == "cron"  # JSON, not pickle
    back = decode_job(text, None, "default")
    assert str(back.trigger) == str(trigger)
    assert back.next_run_time == job.next_run_time
    after = datetime(2026, 12, 9, 3, 0, tzinfo=UTC)
    assert back.trigger.get_next_fire_time(None, after) == trigger.get_next_fire_time(None, after)


def test_cron_settings_come_from_the_environment_and_are_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMOS_SCHEDULER__CRON__EVICT", "0 3 * * 1-5")
    assert Settings(data_dir=tmp_path).scheduler.cron == {"evict": "0 3 * * 1-5"}
    with pytest.raises(ValidationError, match=r"scheduler.cron.evict: .*needs 5"):
        SchedulerConfig(cron={"evict": "0 3 * *"})


def test_a_cron_entry_for_no_such_job_stops_the_start():
    from types import SimpleNamespace

    from memos.scheduler.jobs import job_specs

    system = SimpleNamespace(save_chat_prefixes=dict)  # the job list reads one bound method
    specs = job_specs(system, SchedulerConfig(cron={"fuse": "0 4 * * *"}))  # type: ignore[arg-type]
    assert {s.name: s.schedule for s in specs}["fuse"] == "cron 0 4 * * *"
    with pytest.raises(ValueError, match=r"names no such job: \['fusion'\]"):
        job_specs(system, SchedulerConfig(cron={"fusion": "0 4 * * *"}))  # type: ignore[arg-type]
