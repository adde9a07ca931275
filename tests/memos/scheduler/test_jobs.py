"""The daemon's jobs, run through the runner: each run records exactly what the job did."""

from __future__ import annotations

from memcube.enrichment import make_enricher
from memos.scheduler.runner import RunView
from tests.memos.services.factories import TURNS, BrokenEnricher, add_turns, make_daemon, states


def run(daemon, name: str) -> RunView:
    return daemon.jobs.get_run(daemon.jobs.run_now(name, wait=True))


def test_the_retry_job_records_what_it_did(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder, enrichment={"enabled": True, "retry_base_s": 0})
    assert sorted(daemon.jobs.jobs) == [
        "chat_prefix_save", "enrichment_retry", "evict", "fuse", "index_maintenance", "migrate",
        "unload_idle", "usage_flush",
    ]  # fmt: skip
    cube_id, _ = add_turns(daemon, TURNS[:3])
    daemon.enrichment.enricher = BrokenEnricher()
    assert daemon.enrichment.run_once() == 3  # three failed attempts, due again at once
    daemon.enrichment.enricher = make_enricher("local", embedder.embed)
    first = run(daemon, "enrichment_retry")
    assert (first.name, first.trigger, first.status, first.error) == (
        "enrichment_retry", "manual", "ok", None
    )  # fmt: skip
    assert first.result == {"due": 3, "done": 3, "retrying": 0, "failed": 0, "stale": 0}
    assert states(daemon, cube_id) == [("done", 1, None)] * 3
    assert run(daemon, "enrichment_retry").result == {
        "due": 0, "done": 0, "retrying": 0, "failed": 0, "stale": 0
    }  # fmt: skip
    daemon.stop()


def test_the_maintenance_job_records_each_cube_s_action(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder)
    add_turns(daemon, TURNS[:2])  # loads the cube's index and leaves it unsaved
    add_turns(daemon, TURNS[2:])
    swept = {"removed": 0, "failed": 0, "cubes": 0}  # no activation files to sweep
    first = run(daemon, "index_maintenance").result
    assert first == {"cubes": 2, "actions": {"saved": 2}, "activations": swept}
    second = run(daemon, "index_maintenance").result
    assert second == {"cubes": 2, "actions": {"clean": 2}, "activations": swept}
    # Enrichment is off in this daemon: the retry job says so rather than claim it retried.
    assert run(daemon, "enrichment_retry").result == {
        "skipped": "enrichment is disabled (enrichment.enabled=false)"
    }
    daemon.stop()
