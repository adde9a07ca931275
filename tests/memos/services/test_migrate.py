"""The `migrate` job on a real daemon: real SQLite, the real embedder, the real small model.

Time is moved by passing `now` to a run (the job itself runs at the real time); the cost
model's load rate is given as a number where a test needs a verdict that does not depend on
how fast this machine happens to be (prefill speed is always the runtime's measured one).
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from memos.api.lifecycle_metrics import LifecycleCollector
from memos.db.models import Activation
from memos.db.types import utcnow
from memos.services.activations import ActivationSource
from memos.services.lifecycle import CostModel
from memos.services.views import NewMemory
from tests.memos.services.factories import ADMIN, add_turns, make_daemon

FAST_DISK = 1e-12  # seconds per byte: loading always beats re-prefilling
SLOW_DISK = 1.0  # seconds per byte: re-prefilling always beats loading


def run(daemon, name: str = "migrate") -> dict:
    view = daemon.jobs.get_run(daemon.jobs.run_now(name, wait=True))
    assert (view.status, view.error) == ("ok", None)
    return view.result


def rows(daemon, cube_id) -> list[Activation]:
    with daemon.db.read() as s:
        found = s.scalars(select(Activation).where(Activation.cube_id == cube_id)).all()
        s.expunge_all()
        return list(found)


def pin_costs(daemon, load_s_per_byte: float) -> None:
    daemon.migrator.costs = CostModel(
        daemon.migrator._prefill_rate, load_s_per_byte=load_s_per_byte, learn=False
    )


@pytest.fixture
def daemon(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder, lifecycle={"hot_recalls": 3})
    yield daemon
    daemon.stop()


def test_a_hot_session_is_promoted_once_and_generate_reuses_it(daemon):
    hot_cube, hot_ids = add_turns(daemon)
    cold_cube, cold_ids = add_turns(daemon)
    once_cube, once_ids = add_turns(daemon)
    daemon.usage.recalled(hot_ids[:2])  # 2 recalls: below hot_recalls=3
    daemon.usage.recalled(cold_ids[:2])
    daemon.usage.recalled(once_ids, when=utcnow() - timedelta(days=8))  # hot, but long ago
    run(daemon, "usage_flush")
    assert run(daemon)["counts"] == {}
    daemon.usage.recalled(hot_ids[2:3])  # the session's notes: 3 recalls in all
    run(daemon, "usage_flush")

    first = run(daemon)
    assert first["counts"] == {"promoted": 1}
    (item,) = first["moved"]
    assert item["action"] == "promoted"
    assert (item["cube_id"], item["session_id"], item["recalls"]) == (hot_cube, "s", 3)
    assert (item["kind"], item["bits"]) == ("plain", 16)  # short: below 2048 tokens
    assert item["why"].startswith("its notes were recalled 3 times (hot_recalls=3; those recalled")
    assert daemon.activations.builds.join(timeout=300)
    (row,) = rows(daemon, hot_cube)
    assert (row.id, row.state, row.bits) == (item["activation_id"], "ready", 16)
    assert row.source["session_id"] == "s" and row.source["promoted_by"] == "migrate"
    assert rows(daemon, cold_cube) == rows(daemon, once_cube) == []

    metrics = LifecycleCollector(daemon.evictor, daemon.fuser, daemon.jobs, daemon.migrator)
    (moved,) = [m for m in metrics.collect() if m.name == "memos_lifecycle_migrations"]
    assert [(s.labels, s.value) for s in moved.samples] == [({"action": "promoted"}, 1)]

    second = run(daemon)  # a current activation exists: nothing to do
    assert second["counts"] == {} and second["moved"] == []
    assert len(rows(daemon, hot_cube)) == 1
    answer = daemon.activations.generate(ADMIN, hot_cube, "What did Melanie paint?", row.id, 3)
    assert answer.reused_tokens == row.kept_tokens > 0

    # A note added to the session makes the activation stale: it is promoted again.
    daemon.memories.add(ADMIN, hot_cube, [_turn("Caroline", "I also started a choir.")])
    third = run(daemon)
    assert third["counts"] == {"promoted": 1}
    assert third["moved"][0]["activation_id"] != row.id


def _turn(speaker: str, text: str):
    from memos.services.views import NewMemory

    return NewMemory(text, "s", speaker, utcnow(), {})


def test_a_long_session_is_promoted_episodic_and_demoted_like_any(tmp_path, embedder):
    # "Long" set to 1 token here, so the four-turn session is promoted as an episodic one.
    daemon = make_daemon(tmp_path, embedder, lifecycle={
        "hot_recalls": 1, "promote_episodic_tokens": 1, "promote_episodes": 2,
        "promote_episode_budget_tokens": 128, "promote_bits": 8,
    })  # fmt: skip
    try:
        pin_costs(daemon, FAST_DISK)
        cube_id, ids = add_turns(daemon)
        daemon.usage.recalled(ids[:1])
        run(daemon, "usage_flush")
        (item,) = run(daemon)["moved"]
        assert (item["action"], item["kind"], item["bits"]) == ("promoted", "episodic", 8)
        assert daemon.activations.builds.join(timeout=300)
        (row,) = rows(daemon, cube_id)
        built = row.compression["episodic"]["built"]  # four short turns: a single window
        assert row.state == "ready" and [e["index"] for e in built] == [0]
        report = daemon.migrator.run(now=utcnow() + timedelta(days=8))
        assert report.counts == {"demoted": 1}
        (demoted,) = rows(daemon, cube_id)
        assert (demoted.bits, demoted.compression["bits"]) == (4, 4)
        assert demoted.bytes < row.bytes
        assert sum(e["bytes"] for e in demoted.compression["episodic"]["built"]) < sum(
            e["bytes"] for e in row.compression["episodic"]["built"]
        )
        answer = daemon.activations.generate(ADMIN, cube_id, "Who paints?", row.id, 2)
        assert answer.episode == 0 and answer.text
    finally:
        daemon.stop()


def test_cold_activations_step_down_16_8_4_2_then_drop(daemon):
    pin_costs(daemon, FAST_DISK)
    cube_id, _ = add_turns(daemon)
    act = daemon.activations.create(ADMIN, cube_id, ActivationSource(session_id="s"), 16, None)
    assert act.state == "ready"
    sizes = [act.bytes]
    now = utcnow()
    assert daemon.migrator.run(now=now + timedelta(days=6)).counts == {}  # not cold yet
    for step, bits in enumerate((8, 4, 2), start=1):
        report = daemon.migrator.run(now=now + timedelta(days=8 * step))
        assert report.counts == {"demoted": 1}
        (item,) = report.moved
        assert (item["from_bits"], item["to_bits"]) == (bits * 2, bits)
        assert "unused for" in item["why"] and "beats re-prefilling" in item["why"]
        (row,) = rows(daemon, cube_id)
        assert (row.bits, row.bytes) == (bits, item["bytes_after"])
        assert row.bytes < sizes[-1]
        assert [s["to"] for s in row.compression["demoted"]] == [8, 4, 2][:step]
        sizes.append(row.bytes)
        # Idempotent: a rerun at the same moment finds it demoted since, not cold.
        assert daemon.migrator.run(now=now + timedelta(days=8 * step)).counts == {}
        answer = daemon.activations.generate(ADMIN, cube_id, "Who paints?", row.id, 2)
        assert answer.reused_tokens == row.kept_tokens and answer.text
    # Cold again demote_after_days after its last use and its last step: the last step, 2 bits.
    report = daemon.migrator.run(now=now + timedelta(days=32))
    assert report.counts == {"dropped": 1}
    assert report.moved[0]["why"].endswith("at 2 bits, the last step")
    assert rows(daemon, cube_id) == []
    assert not daemon.activations.catalogue.path(cube_id, act.id).exists()
    assert report.bytes_before == sizes[-1] and report.bytes_after == 0


def test_a_cache_slower_to_load_than_to_prefill_is_dropped_not_requantized(daemon):
    cube_id, ids = add_turns(daemon)
    act = daemon.activations.create(ADMIN, cube_id, ActivationSource(session_id="s"), 16, None)
    daemon.activations.generate(ADMIN, cube_id, "Who paints?", act.id, 1)  # prefill measured
    pin_costs(daemon, SLOW_DISK)
    result = run(daemon)
    assert result["counts"] == {}  # used just now: not cold, nothing dropped
    with daemon.db.write() as s:  # unused for 10 days
        s.execute(
            update(Activation)
            .where(Activation.id == act.id)
            .values(last_used_at=utcnow() - timedelta(days=10))
        )
    daemon.usage.recalled(ids)  # hot too: but a cache would not pay off, so not promoted
    run(daemon, "usage_flush")
    result = run(daemon)
    assert result["counts"] == {"dropped": 1, "skipped": 1}
    dropped, skipped = result["moved"]
    assert (dropped["action"], dropped["activation_id"]) == ("dropped", act.id)
    assert "costs more than prefilling its" in dropped["why"]
    assert dropped["load_s"] > dropped["prefill_s"] > 0
    assert skipped["why"].startswith("not promoted: loading its")
    assert result["costs"]["load_s_per_byte"] == SLOW_DISK
    assert result["costs"]["prefill_s_per_token"] > 0
    assert rows(daemon, cube_id) == []


def test_a_run_cut_after_writing_the_blob_is_reconciled_from_the_files(daemon):
    pin_costs(daemon, FAST_DISK)
    cube_id, _ = add_turns(daemon)
    act = daemon.activations.create(ADMIN, cube_id, ActivationSource(session_id="s"), 16, None)
    later = utcnow() + timedelta(days=8)
    assert daemon.migrator.run(now=later).counts == {"demoted": 1}
    with daemon.db.write() as s:  # as if killed before the row was updated
        s.execute(
            update(Activation)
            .where(Activation.id == act.id)
            .values(bits=16, bytes=act.bytes, compression={"bits": 16})
        )
    report = daemon.migrator.run(now=later)
    assert report.counts == {"reconciled": 1}
    (row,) = rows(daemon, cube_id)
    assert (row.bits, row.bytes) == (8, report.moved[0]["bytes"])
    assert daemon.activations.generate(ADMIN, cube_id, "Who paints?", act.id, 1).text


def test_caches_idle_in_ram_are_unloaded(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder, lifecycle={"unload_idle_s": 0.2})
    try:
        cube_id, _ = add_turns(daemon)
        act = daemon.activations.create(ADMIN, cube_id, ActivationSource(session_id="s"), 8,
                                        None)  # fmt: skip
        daemon.activations.generate(ADMIN, cube_id, "Who paints?", act.id, 1)
        held = daemon.activations.loaded.bytes + daemon.activations.dequantized.bytes
        assert held > 0
        time.sleep(0.3)
        result = run(daemon)
        assert result["counts"] == {"unloaded": 2}
        assert {m["tier"] for m in result["moved"]} == {"loaded", "dequantized"}
        assert result["unloaded_bytes"] == held
        assert daemon.activations.loaded.bytes == daemon.activations.dequantized.bytes == 0
        assert rows(daemon, cube_id)[0].state == "ready"  # its files stay
        # The unload_idle job (every daemon of a fleet runs it) does the RAM step alone.
        daemon.activations.generate(ADMIN, cube_id, "Who paints?", act.id, 1)
        held = daemon.activations.loaded.bytes + daemon.activations.dequantized.bytes
        time.sleep(0.3)
        result = run(daemon, "unload_idle")
        assert result["counts"] == {"unloaded": 2} and result["unloaded_bytes"] == held
        assert daemon.activations.loaded.bytes == daemon.activations.dequantized.bytes == 0
    finally:
        daemon.stop()


def test_hot_notes_outside_any_session_get_their_kv_chunk_once(daemon):
    cube = daemon.cubes.create(ADMIN, "loose", "").id
    when = utcnow()
    notes = [NewMemory(f"Melanie painted a lake at dawn, take {i}.", None, "Melanie", when, {})
             for i in range(2)]  # fmt: skip
    hot, cold = (m.id for m in daemon.memories.add(ADMIN, cube, notes))
    daemon.usage.recalled([hot, hot, hot, cold])  # hot_recalls=3: only the first
    run(daemon, "usage_flush")

    first = run(daemon)
    (item,) = [m for m in first["moved"] if m["action"] == "promoted_note"]
    assert (item["cube_id"], item["memory_id"]) == (cube, hot)
    assert item["why"].startswith("recalled often outside any session")
    assert daemon.memories.get(ADMIN, cube, hot).has_kv
    assert not daemon.memories.get(ADMIN, cube, cold).has_kv
    second = run(daemon)  # its chunk is current: nothing more to do
    assert [m for m in second["moved"] if m["action"] == "promoted_note"] == []
