"""The scheduler's leader and taking over the work of daemons gone, on SQLite and PostgreSQL:
one leader at a time, another once it stops; runners starting at once share one schedule; job
runs and builds of a live daemon are never taken over (by recovery, the leader or the sweep),
those of an expired one are (saying whose they were)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from memos.db.models import Activation, Cube, Instance, JobRun, SchedulerJob, User
from memos.db.types import utcnow
from memos.scheduler.leader import Leadership
from memos.scheduler.runner import JobRunner, JobSpec
from memos.services.activations.builds import BuildQueue
from memos.services.activations.catalogue import INTERRUPTED, Catalogue
from memos.services.activations.sweep import ActivationSweep
from memos.services.fleet import Leases


@pytest.fixture
def db(migrated_db):
    return migrated_db


def test_one_leader_at_a_time_and_another_once_it_stops(db):
    changes: list[tuple[str, bool]] = []
    ticks: list[str] = []

    def leader(name: str) -> Leadership:
        return Leadership(
            Leases(db, name),
            lease_s=0.9,
            on_change=lambda leading: changes.append((name, leading)),
            on_tick=lambda: ticks.append(name),
        )

    a, b = leader("inst_a"), leader("inst_b")
    a.start()
    b.start()
    time.sleep(1.2)  # several renewals (every 0.3 s)
    assert (a.leading, b.leading) == (True, False)
    assert a.confirm() and not b.confirm()  # asked of the database
    assert set(ticks) == {"inst_a"} and len(ticks) >= 3
    a.stop()  # hands the lease back: b leads at its next try
    time.sleep(0.6)
    assert b.leading and b.confirm()
    assert changes == [("inst_a", True), ("inst_b", True)]
    b.stop()


def _instance(s, name: str, alive: bool) -> None:
    until = utcnow() + timedelta(seconds=60 if alive else -1)
    s.add(Instance(id=name, host="h", pid=1, started_at=utcnow(), heartbeat_at=utcnow(),
                   lease_until=until))  # fmt: skip


def test_runs_of_live_daemons_are_never_interrupted(db):
    with db.write() as s:
        _instance(s, "inst_live", alive=True)
        _instance(s, "inst_dead", alive=False)
        for run_id, owner in [("run_me", "inst_me"), ("run_live", "inst_live"),
                              ("run_dead", "inst_dead"), ("run_none", None)]:  # fmt: skip
            s.add(JobRun(id=run_id, job_name="j", trigger="manual", status="running",
                         instance_id=owner))  # fmt: skip
    spec = JobSpec(name="j", description="", interval_s=60, run=lambda: {})
    runner = JobRunner(db, [spec], enabled=False, leases=Leases(db, "inst_me"))

    def statuses() -> dict[str, tuple[str, str | None]]:
        return {r.run_id: (r.status, r.error) for r in runner.runs(None, 10, None)[0]}

    # While running, the leader takes over only what expired daemons left.
    assert runner.interrupt_orphans(at_start=False) == 1
    assert statuses() == {
        "run_me": ("running", None),
        "run_live": ("running", None),
        "run_dead": ("interrupted", "interrupted: daemon inst_dead stopped"),
        "run_none": ("running", None),
    }
    # At start, also its own earlier self's and those of no daemon.
    assert runner.interrupt_orphans(at_start=True) == 2
    assert statuses()["run_me"] == statuses()["run_none"] == ("interrupted", None)
    assert statuses()["run_live"] == ("running", None)
    assert {r.instance_id for r in runner.runs(None, 10, None)[0]} == {
        "inst_me", "inst_live", "inst_dead", None
    }  # fmt: skip


def test_builds_of_live_daemons_are_never_failed(db, tmp_path):
    with db.write() as s:
        _instance(s, "inst_live", alive=True)
        _instance(s, "inst_dead", alive=False)
        s.add(User(id="u", name="u"))
        s.flush()
        s.add(Cube(id="c", name="c", owner_id="u"))
        s.flush()
        for act_id, owner in [("act_me", "inst_me"), ("act_live", "inst_live"),
                              ("act_dead", "inst_dead"), ("act_none", None)]:  # fmt: skip
            s.add(Activation(id=act_id, cube_id="c", model="m", source={}, compression={},
                             tokens=9, bits=4, state="building", created_at=utcnow(),
                             instance_id=owner))  # fmt: skip
    catalogue = Catalogue(db, tmp_path / "acts", instance_id="inst_me")

    def states() -> dict[str, tuple[str, str | None]]:
        return {a.id: (a.state, a.error) for a in catalogue.views("c")}

    assert catalogue.fail_orphans() == [("c", "act_dead")]
    dead = ("failed", "interrupted: daemon inst_dead stopped; build it again")
    assert states() == {
        "act_me": ("building", None),
        "act_live": ("building", None),
        "act_dead": dead,
        "act_none": ("building", None),
    }
    assert sorted(catalogue.recover()) == [("c", "act_me"), ("c", "act_none")]
    assert states() == {
        "act_me": ("failed", INTERRUPTED),
        "act_live": ("building", None),
        "act_dead": dead,
        "act_none": ("failed", INTERRUPTED),
    }


def test_the_sweep_fails_a_building_row_only_when_its_builder_is_gone(db, tmp_path):
    with db.write() as s:
        _instance(s, "inst_live", alive=True)
        _instance(s, "inst_dead", alive=False)
        s.add(User(id="u", name="u"))
        s.flush()
        s.add(Cube(id="c", name="c", owner_id="u"))
        s.flush()
        for act_id, owner in [("act_me", "inst_me"), ("act_live", "inst_live"),
                              ("act_dead", "inst_dead")]:  # fmt: skip
            s.add(Activation(id=act_id, cube_id="c", model="m", source={}, compression={},
                             tokens=9, bits=4, state="building", created_at=utcnow(),
                             instance_id=owner))  # fmt: skip
    catalogue = Catalogue(db, tmp_path / "acts", instance_id="inst_me")
    builds = BuildQueue(lambda ticket: "ready", workers=0, max_builds=1, max_per_user=1)
    report = ActivationSweep(db, catalogue, builds).run()
    assert report.failed == 2  # not in this daemon's builds, and their builder is gone
    assert {a.id: (a.state, a.error) for a in catalogue.views("c")} == {
        "act_me": ("failed", INTERRUPTED),
        "act_live": ("building", None),  # another live daemon builds it
        "act_dead": ("failed", "interrupted: daemon inst_dead stopped; build it again"),
    }


def test_the_sweep_leaves_a_build_a_request_runs_itself_alone(db, tmp_path):
    """A note's KV chunk and a saved chat prefix are built in the request's thread, not in the
    build queue: while one is in flight its "building" row (and a ready row being rewritten)
    is not failed, and its folder not removed; once it is over, the sweep does its work."""
    with db.write() as s:
        s.add(User(id="u", name="u"))
        s.flush()
        s.add(Cube(id="c", name="c", owner_id="u"))
        s.flush()
        for act_id, state in [("act_chunk", "building"), ("act_prefix", "ready")]:
            s.add(Activation(id=act_id, cube_id="c", model="m", source={}, compression={},
                             tokens=9, bits=4, state=state, created_at=utcnow(),
                             instance_id="inst_me"))  # fmt: skip
    catalogue = Catalogue(db, tmp_path / "acts", instance_id="inst_me")
    (tmp_path / "acts" / "c" / "act_chunk").mkdir(parents=True)  # its files, being written
    builds = BuildQueue(lambda ticket: "ready", workers=0, max_builds=1, max_per_user=1)
    sweep = ActivationSweep(db, catalogue, builds)
    with catalogue.building_inline("act_chunk"), catalogue.building_inline("act_prefix"):
        with catalogue.building_inline("act_chunk"):  # a second request on the same chunk
            pass
        assert sweep.run().failed == 0
        assert {a.id: a.state for a in catalogue.views("c")} == {
            "act_chunk": "building", "act_prefix": "ready"
        }  # fmt: skip
        assert (tmp_path / "acts" / "c" / "act_chunk").is_dir()
    assert catalogue.building_here() == set()
    assert sweep.run().failed == 2  # no build left: failed; a ready row without files: failed
    assert not (tmp_path / "acts" / "c" / "act_chunk").exists()


def test_two_runners_starting_at_once_share_one_schedule_and_one_leader(db):
    specs = [JobSpec(name=n, description="", interval_s=3600, run=dict) for n in ("j", "k")]
    runners = [
        JobRunner(db, specs, leases=Leases(db, name), lease_s=3) for name in ("inst_a", "inst_b")
    ]
    errors: list[BaseException] = []

    def start(runner: JobRunner) -> None:
        try:
            runner.start()
        except BaseException as exc:  # noqa: BLE001 (the test reports it)
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert sorted(r.leading() for r in runners) == [False, True]
        with db.read() as s:
            assert sorted(s.scalars(select(SchedulerJob.id))) == ["j", "k"]
        views = [{v.name: v.next_run_at for v in r.views()} for r in runners]
        assert views[0] == views[1] and None not in views[0].values()  # one shared schedule
    finally:
        for runner in runners:
            runner.stop()
