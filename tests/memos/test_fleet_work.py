"""Several daemons on one PostgreSQL database share its work: real `memos serve` processes.

Each pending note is enriched by one daemon; each scheduled tick runs on one daemon (the
scheduler's leader), and another leads once the leader is killed; a daemon killed mid-job and
mid-build has that work marked interrupted/failed by another after its lease, while the
survivor's own work in flight is left alone.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import DaemonProcess, make_daemon_process

LEASE_S = 3.0


@dataclass
class Fleet:
    """Daemon processes over one fresh database, started by the test, stopped after it."""

    root: Path
    url: str
    admin_key: str = field(default_factory=lambda: f"admin-{secrets.token_hex(8)}")
    daemons: list[DaemonProcess] = field(default_factory=list)

    def make(self, name: str, **env: str) -> DaemonProcess:
        data_dir = self.root / name
        data_dir.mkdir()
        settings = {
            "MEMOS_DATABASE_URL": self.url,
            "MEMOS_ADMIN_KEY": self.admin_key,
            "MEMOS_FLEET__INSTANCE_ID": f"inst_{name}",
            "MEMOS_FLEET__LEASE_S": str(LEASE_S),
            "MEMOS_FLEET__HEARTBEAT_S": "0.5",
            "MEMOS_ACTIVATIONS__ENABLED": "false",
        }
        daemon = make_daemon_process(data_dir, **{**settings, **env})
        daemon.admin_key = self.admin_key
        self.daemons.append(daemon)
        return daemon

    def sql(self, query: str, *args: object) -> list[tuple]:
        with psycopg.connect(self.url.replace("postgresql+psycopg://", "postgresql://")) as c:
            return c.execute(query, args).fetchall()  # type: ignore[arg-type]


@pytest.fixture
def fleet(tmp_path, fresh_postgres_url) -> Iterator[Fleet]:
    crew = Fleet(tmp_path, fresh_postgres_url)
    yield crew
    for daemon in crew.daemons:
        daemon.stop()


def metric(daemon: DaemonProcess, name: str) -> float:
    text = httpx.get(f"{daemon.url}/metrics", timeout=30).text
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert found, text
    return float(found.group(1))


def test_each_pending_note_is_enriched_once_across_daemons(fleet):
    env = {"MEMOS_ENRICHMENT__ENABLED": "true", "MEMOS_ENRICHMENT__IDLE_POLL_S": "0.2"}
    a, b = fleet.make("a", **env), fleet.make("b", **env)
    a.start()
    b.start()
    started = time.perf_counter()
    with a.client() as client:
        cube_id = client.post("/v1/cubes", json={"name": "shared"}).json()["id"]
        for batch in range(4):
            items = [
                {"content": f"note {batch}-{i}: Caroline met {secrets.token_hex(3)} at the lake",
                 "session_id": f"s{batch}"}
                for i in range(50)
            ]  # fmt: skip
            assert client.post(f"/v1/cubes/{cube_id}/memories", json={"items": items}).is_success
        deadline = time.time() + 240
        while client.get(f"/v1/cubes/{cube_id}").json()["stats"]["enrichment_pending"]:
            assert time.time() < deadline, a.log_tail() + b.log_tail()
            time.sleep(0.5)
    took = time.perf_counter() - started
    states = Counter(state for (state,) in fleet.sql("SELECT enrichment FROM memories"))
    assert states == {"done": 200}
    claimed = fleet.sql("SELECT count(*) FROM memories WHERE claimed_by IS NOT NULL")
    assert claimed == [(0,)]  # every claim cleared once its batch was done
    # Each daemon counts the notes it enriched: together exactly the 200, none twice.
    done = [metric(d, "memos_enrichment_notes_total") for d in (a, b)]
    print(f"200 notes enriched in {took:.1f} s; by daemon a, b: {done}")
    assert sum(done) == 200


def schedule_runs(fleet: Fleet, since: float, until: float) -> list[tuple[float, str]]:
    """(start time, daemon) of the scheduled enrichment_retry runs started in [since, until)."""
    return fleet.sql(
        "SELECT extract(epoch FROM started_at)::float8, instance_id FROM job_runs "
        "WHERE job_name = 'enrichment_retry' AND trigger = 'schedule' "
        "AND started_at >= to_timestamp(%s) AND started_at < to_timestamp(%s) "
        "ORDER BY started_at",
        since,
        until,
    )


def assert_once_per_tick(runs: list[tuple[float, str]], window: float) -> None:
    starts = [t for t, _ in runs]
    assert window - 2 <= len(runs) <= window + 1, runs  # a 1 s interval: one run a second
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) > 0.5, runs  # no tick ran twice (on two daemons)
    assert len({who for _, who in runs}) == 1, runs  # all on the leader


def test_each_scheduled_tick_runs_once_and_another_daemon_leads_after_a_kill(fleet):
    env = {
        "MEMOS_SCHEDULER__ENRICHMENT_RETRY_INTERVAL_S": "1",  # a job of the fleet
        "MEMOS_SCHEDULER__USAGE_FLUSH_INTERVAL_S": "1",  # a job of each daemon
    }
    a, b = fleet.make("a", **env), fleet.make("b", **env)
    a.start()
    b.start()
    with b.client() as client:
        seen = client.get("/v1/fleet").json()
    assert {m["id"] for m in seen["members"]} == {"inst_a", "inst_b"}
    assert seen["instance"] == "inst_b" and seen["scheduler_leader"] == "inst_a"  # first up
    assert [metric(d, "memos_scheduler_leader") for d in (a, b)] == [1, 0]
    window = 8.0
    since = time.time()
    time.sleep(window)
    runs = schedule_runs(fleet, since, since + window)
    assert_once_per_tick(runs, window)
    assert runs[0][1] == "inst_a"
    with b.client() as client:  # runs are visible from any daemon, with who ran them
        listed = client.get("/v1/jobs/runs", params={"name": "enrichment_retry"}).json()
        flushes = client.get("/v1/jobs/runs", params={"name": "usage_flush"}).json()
    assert {r["instance_id"] for r in listed["items"]} == {"inst_a"}
    # Each daemon flushes the counts it holds itself, on its own clock.
    assert {r["instance_id"] for r in flushes["items"]} == {"inst_a", "inst_b"}

    a.kill()  # no clean stop: its lease has to expire
    killed = time.time()
    deadline = killed + LEASE_S + 5
    while fleet.sql("SELECT holder FROM leases WHERE name = 'scheduler'") != [("inst_b",)]:
        assert time.time() < deadline, b.log_tail()
        time.sleep(0.2)
    took_over = time.time() - killed
    since = time.time() + 1
    time.sleep(window + 1)
    runs = schedule_runs(fleet, since, since + window)
    assert_once_per_tick(runs, window)
    assert runs[0][1] == "inst_b"
    with b.client() as client:
        seen = client.get("/v1/fleet").json()
    assert [m["id"] for m in seen["members"]] == ["inst_b"]
    assert seen["scheduler_leader"] == "inst_b"
    print(f"leader killed; the other led after {took_over:.1f} s (lease {LEASE_S} s)")


def test_a_killed_daemon_s_job_and_build_are_ended_by_another_after_its_lease(fleet):
    # Builds of some 7,000 tokens prefilled 16 a pass: still building long after the kill.
    env = {
        "MEMOS_ACTIVATIONS__ENABLED": "true",
        "MEMOS_ACTIVATIONS__INLINE_MAX_TOKENS": "64",
        "MEMOS_RUNTIME__PREFILL_CHUNK": "16",
    }
    a, b = fleet.make("a", **env), fleet.make("b", **env)
    a.start()
    b.start()
    text = " ".join(f"Day {i}: Caroline walked to the lake; Melanie painted." for i in range(450))
    body = {"text": text, "compression": {"bits": 4}}
    with a.client() as client:
        cube_id = client.post("/v1/cubes", json={"name": "acts"}).json()["id"]
    builds = {}
    for name, daemon in (("a", a), ("b", b)):
        with daemon.client() as client:
            act = client.post(f"/v1/cubes/{cube_id}/activations", json=body).json()
        assert act["state"] == "building", act
        builds[name] = act["id"]
    owners = dict(fleet.sql("SELECT id, instance_id FROM activations"))
    assert owners == {builds["a"]: "inst_a", builds["b"]: "inst_b"}
    # Jobs held up mid-run: index maintenance reads the cubes, which this test locks.
    admin = fleet.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin) as lock:
        lock.execute("LOCK TABLE cubes IN ACCESS EXCLUSIVE MODE")
        runs = {}
        for name, daemon in (("a", a), ("b", b)):
            with daemon.client() as client:
                runs[name] = client.post("/v1/jobs/index_maintenance/run").json()["run_id"]
        time.sleep(1)
        b.kill()
        killed = time.time()

        def state() -> dict[str, tuple]:
            jobs = fleet.sql("SELECT id, status, error, instance_id FROM job_runs")
            acts = fleet.sql("SELECT id, state, error, instance_id FROM activations")
            return {row[0]: row[1:] for row in jobs + acts}

        deadline = killed + LEASE_S + 15
        while (seen := state())[runs["b"]][0] == "running" or seen[builds["b"]][0] == "building":
            assert time.time() < deadline, (seen, a.log_tail())
            time.sleep(0.2)
        took = time.time() - killed
        # After the lease (not before), the survivor ended the dead daemon's work, saying so.
        ((ended, lease_until),) = fleet.sql(
            "SELECT r.finished_at, i.lease_until FROM job_runs r, instances i "
            "WHERE r.id = %s AND i.id = 'inst_b'",
            runs["b"],
        )
        assert ended >= lease_until, (ended, lease_until)
        assert seen[runs["b"]] == ("interrupted", "interrupted: daemon inst_b stopped", "inst_b")
        assert seen[builds["b"]] == (
            "failed", "interrupted: daemon inst_b stopped; build it again", "inst_b"
        )  # fmt: skip
        # Its own work in flight is left alone: the run still waits, the build goes on.
        assert seen[runs["a"]] == ("running", None, "inst_a")
        assert seen[builds["a"]][0] in ("building", "ready"), seen[builds["a"]]
        time.sleep(2)  # more leader ticks: still left alone
        seen = state()
        assert seen[runs["a"]][0] == "running" and seen[builds["a"]][0] != "failed", seen
        lock.rollback()
    deadline = time.time() + 60
    with a.client() as client:
        while (run := client.get(f"/v1/jobs/runs/{runs['a']}").json())["status"] == "running":
            assert time.time() < deadline, a.log_tail()
            time.sleep(0.2)
        assert (run["status"], run["instance_id"]) == ("ok", "inst_a"), run
        cut = client.get(f"/v1/cubes/{cube_id}/activations/{builds['b']}").json()
        assert cut["state"] == "failed" and "inst_b" in cut["error"]
    print(f"daemon killed mid-job and mid-build; its work ended {took:.1f} s later")
