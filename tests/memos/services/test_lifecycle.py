"""Usage signals and the `evict` job on a real daemon (real SQLite, real embedder)."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from memcube.types import SearchFilters
from memos.db.models import Activation, Link, Memory, MemoryHistory
from memos.services.views import NewMemory
from tests.memos.services.factories import ADMIN, TURNS, add_turns, make_daemon


def run(daemon, name: str) -> dict:
    view = daemon.jobs.get_run(daemon.jobs.run_now(name, wait=True))
    assert (view.status, view.error) == ("ok", None)
    return view.result


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def daemon(request, tmp_path, embedder):
    """A daemon on SQLite, then on a fresh PostgreSQL database of its own (the jobs walk
    every cube of their database: a shared one would hold other tests' cubes)."""
    if request.param == "sqlite":
        daemon = make_daemon(tmp_path, embedder)
        yield daemon
        daemon.stop()
        return
    import psycopg

    from tests.conftest import POSTGRES_ADMIN_URL

    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"memos_lifecycle_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    daemon = make_daemon(tmp_path, embedder, database_url=url)
    yield daemon
    daemon.stop()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def recalls(daemon, cube_id) -> dict[str, int]:
    with daemon.db.read() as s:
        rows = s.execute(select(Memory.id, Memory.recalls).where(Memory.cube_id == cube_id))
        return {memory_id: n for memory_id, n in rows}


def test_jobs_are_registered_with_their_intervals(daemon):
    assert sorted(daemon.jobs.jobs) == [
        "chat_prefix_save", "enrichment_retry", "evict", "fuse", "index_maintenance",
        "migrate", "unload_idle", "usage_flush",
    ]  # fmt: skip
    local = sorted(name for name, job in daemon.jobs.jobs.items() if job.local)
    assert local == ["chat_prefix_save", "index_maintenance", "unload_idle", "usage_flush"]
    assert daemon.jobs.jobs["evict"].interval_s == 600
    assert daemon.jobs.jobs["usage_flush"].interval_s == 30


def test_search_hits_are_counted_in_memory_and_flushed_by_the_job(daemon, monkeypatch):
    cube_id, ids = add_turns(daemon)
    writes = []
    real_write = daemon.db.write
    monkeypatch.setattr(daemon.db, "write", lambda: writes.append(1) or real_write())
    first = daemon.search.search(ADMIN, cube_id, "adoption agencies", 2, SearchFilters())
    second = daemon.search.search(ADMIN, cube_id, "adoption agencies", 1, SearchFilters())
    monkeypatch.undo()
    assert writes == []  # a search is a read, whatever it counts
    top = first.hits[0].memory.id
    assert top == ids[2] == second.hits[0].memory.id
    assert recalls(daemon, cube_id) == dict.fromkeys(ids, 0)  # nothing written yet
    expected = dict.fromkeys(ids, 0)
    for hit in first.hits + second.hits:
        expected[hit.memory.id] += 1
    assert daemon.usage.pending()[0] == {k: v for k, v in expected.items() if v}
    result = run(daemon, "usage_flush")
    assert result == {"memories": 2, "recalls": 3, "activations": 0, "loads": 0}
    assert recalls(daemon, cube_id) == expected
    with daemon.db.read() as s:
        last = s.scalar(select(Memory.last_recalled_at).where(Memory.id == top))
    assert last is not None and datetime.now(UTC) - last < timedelta(minutes=5)
    # A second flush has nothing to write and changes nothing.
    assert run(daemon, "usage_flush") == {"memories": 0, "recalls": 0, "activations": 0,
                                          "loads": 0}  # fmt: skip
    assert recalls(daemon, cube_id) == expected


def test_counts_pending_at_stop_are_written(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder)
    cube_id, ids = add_turns(daemon)
    hits = daemon.search.search(ADMIN, cube_id, "pottery bowl", 1, SearchFilters()).hits
    daemon.stop()
    again = make_daemon(tmp_path, embedder)
    assert recalls(again, cube_id)[hits[0].memory.id] == 1
    again.stop()


def age(daemon, memory_ids, days, column="created_at"):
    when = datetime.now(UTC) - timedelta(days=days)
    with daemon.db.write() as s:
        s.execute(update(Memory).where(Memory.id.in_(memory_ids)).values({column: when}))


def history(daemon, cube_id, memory_id):
    return [(h.version, h.reason) for h in daemon.memories.history(ADMIN, cube_id, memory_id)]


def test_evict_expires_notes_past_their_ttl_and_nothing_else(daemon):
    cube_id, ids = add_turns(daemon)
    other_cube, other_ids = add_turns(daemon)  # no TTL: its old notes stay
    daemon.policies.set(ADMIN, cube_id, {"memory_ttl_days": 10})
    age(daemon, ids[:2] + other_ids[:2], days=11)
    first = run(daemon, "evict")
    assert first["expired"] == {cube_id: 2}
    assert first["purged"] == {}
    assert history(daemon, cube_id, ids[0]) == [
        (1, "created"), (2, "expired: stored over memory_ttl_days=10 ago")
    ]  # fmt: skip
    live = [m.id for m in daemon.memories.page(ADMIN, cube_id, None, 10, None).items]
    assert live == ids[2:]
    assert len(daemon.memories.page(ADMIN, other_cube, None, 10, None).items) == 4
    hits = daemon.search.search(ADMIN, cube_id, "support group", 4, SearchFilters()).hits
    assert ids[0] not in {h.memory.id for h in hits}
    second = run(daemon, "evict")  # idempotent: nothing left to expire
    assert (second["expired"], second["purged"], second["evicted"]) == ({}, {}, [])
    assert history(daemon, cube_id, ids[0])[-1] == (
        2,
        "expired: stored over memory_ttl_days=10 ago",
    )


def test_evict_purges_deleted_notes_past_retention_for_real(daemon):
    cube_id, ids = add_turns(daemon)
    for memory_id in ids[:3]:
        daemon.memories.delete(ADMIN, cube_id, memory_id)
    age(daemon, ids[:2], days=31, column="deleted_at")  # retention is 30 days by default
    with daemon.db.read() as s:
        rows = s.execute(select(Memory.id, Memory.seq).where(Memory.cube_id == cube_id))
        seqs = {memory_id: seq for memory_id, seq in rows}
    with daemon.db.write() as s:  # a link into a purged note, and an activation built from it
        s.add(Link(cube_id=cube_id, src_seq=seqs[ids[3]], dst_seq=seqs[ids[0]], kind="follows",
                   score=1.0))  # fmt: skip
        s.add(Activation(id="act_from_purged", cube_id=cube_id, model="m", tokens=3, bits=16,
                         state="failed", source={"memory_ids": [ids[0]]}))  # fmt: skip
    result = run(daemon, "evict")
    assert result["purged"] == {
        cube_id: {"memories": 2, "history_rows": 4, "links": 1, "activations": 1}
    }
    with daemon.db.read() as s:
        left = set(s.scalars(select(Memory.id).where(Memory.cube_id == cube_id)))
        erased_history = s.scalar(
            select(func.count()).where(MemoryHistory.memory_seq.in_([seqs[i] for i in ids[:2]]))
        )
        assert s.get(Activation, "act_from_purged") is None
    assert left == set(ids[2:])  # the note deleted yesterday is kept, in history
    assert erased_history == 0
    assert history(daemon, cube_id, ids[2]) == [(1, "created"), (2, "deleted")]
    index = daemon.indexes.get(cube_id)
    assert index.admissible([seqs[i] for i in ids], SearchFilters()) == {seqs[ids[3]]}
    second = run(daemon, "evict")
    assert second["purged"] == {}


def fake_activation(daemon, cube_id, key, size, uses, tokens, last_used_days_ago):
    """A catalogue row and a manifest file on disk: what the budgets see of an activation."""
    used = datetime.now(UTC) - timedelta(days=last_used_days_ago)
    with daemon.db.write() as s:
        s.add(Activation(id=key, cube_id=cube_id, model="m", tokens=tokens, bits=16, bytes=size,
                         uses=uses, state="ready", created_at=used - timedelta(days=1),
                         last_used_at=used))  # fmt: skip
    folder = daemon.activations.catalogue.path(cube_id, key)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"fake": True}))


# Same shape as tests/memcube/test_policies.py: (bytes, uses, tokens, days since last use)
HISTORY = {
    "act_old_big": (8000, 9, 100, 30),
    "act_hot_small": (1000, 20, 400, 20),
    "act_fresh": (2000, 0, 200, 1),
    "act_mid": (3000, 2, 300, 10),
}


@pytest.mark.parametrize(
    ("name", "evicted"),
    [
        ("lru", ["act_old_big"]),  # 14000 - 8000 <= 9000
        ("lfu", ["act_fresh", "act_mid"]),  # 14000 - 2000 - 3000 <= 9000
        ("gdsf", ["act_fresh", "act_old_big"]),
    ],
)
def test_evict_keeps_a_cube_within_its_budget_by_its_policy(daemon, name, evicted):
    cube_id, _ = add_turns(daemon, TURNS[:1])
    for key, (size, uses, tokens, days) in HISTORY.items():
        fake_activation(daemon, cube_id, key, size, uses, tokens, days)
    daemon.policies.set(ADMIN, cube_id, {"activation_bytes_max": 9000, "eviction": name})
    result = run(daemon, "evict")
    assert [e["activation_id"] for e in result["evicted"]] == evicted
    assert {e["policy"] for e in result["evicted"]} == {name}
    assert result["evicted"][0]["why"] == f"cube {cube_id} over its activation_bytes_max 9000"
    kept = {a.id for a in daemon.activations.catalogue.views(cube_id)}
    assert kept == set(HISTORY) - set(evicted)
    assert result["held_bytes"] == sum(HISTORY[k][0] for k in kept) <= 9000
    for key in evicted:
        assert not daemon.activations.catalogue.path(cube_id, key).exists()
    again = run(daemon, "evict")
    assert again["evicted"] == [] and again["held_bytes"] == result["held_bytes"]


def test_evict_keeps_the_daemon_within_its_disk_budget(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder, lifecycle={"activation_disk_bytes": 5000,
                                                        "eviction": "lru"})  # fmt: skip
    a, _ = add_turns(daemon, TURNS[:1])
    b, _ = add_turns(daemon, TURNS[1:2])
    fake_activation(daemon, a, "act_a_old", 3000, 1, 10, 9)
    fake_activation(daemon, b, "act_b_new", 3000, 1, 10, 1)
    fake_activation(daemon, b, "act_b_mid", 1000, 1, 10, 5)
    result = run(daemon, "evict")
    assert [(e["activation_id"], e["cube_id"]) for e in result["evicted"]] == [("act_a_old", a)]
    assert result["held_bytes"] == 4000
    assert result["evicted"][0]["why"] == "daemon over lifecycle.activation_disk_bytes 5000"
    assert run(daemon, "evict")["evicted"] == []
    daemon.stop()


def test_a_new_note_after_a_purge_is_searchable(daemon):
    """The erasure leaves the index consistent: the cube keeps working after a purge."""
    cube_id, ids = add_turns(daemon, TURNS[:2])
    daemon.memories.delete(ADMIN, cube_id, ids[0])
    age(daemon, ids[:1], days=40, column="deleted_at")
    run(daemon, "evict")
    when = datetime(2023, 5, 9, tzinfo=UTC)
    (added,) = daemon.memories.add(ADMIN, cube_id, [NewMemory("I bought a red kayak.", "s",
                                                              "Caroline", when, {})])  # fmt: skip
    hits = daemon.search.search(ADMIN, cube_id, "red kayak", 1, SearchFilters()).hits
    assert hits[0].memory.id == added.id


def test_chat_recall_and_activation_loads_are_counted(daemon):
    """The notes a chat turn recalls count once each; an activation counts a use per
    generation and a load per read from disk (the second generation finds it loaded)."""
    from memos.services.activations import ActivationSource

    cube_id, ids = add_turns(daemon)
    chat = daemon.chats.create(ADMIN, cube_id, session_id="chat", recall_top_k=2)
    question = "Which adoption agencies did you look at?"
    expected = daemon.search.search(ADMIN, cube_id, question, 2, SearchFilters(), count=False)
    daemon.chats.send(ADMIN, cube_id, chat.id, question, max_tokens=1)
    act = daemon.activations.create(ADMIN, cube_id, ActivationSource(text="Max is a puppy."), 16,
                                    None)  # fmt: skip
    for _ in range(2):
        daemon.activations.generate(ADMIN, cube_id, "Who is Max?", act.id, 1)
    assert run(daemon, "usage_flush") == {"memories": 2, "recalls": 2, "activations": 1,
                                          "loads": 1}  # fmt: skip
    counts = recalls(daemon, cube_id)
    recalled = {h.memory.id for h in expected.hits}
    assert {i: counts[i] for i in ids} == {i: int(i in recalled) for i in ids}
    with daemon.db.read() as s:
        assert s.execute(
            select(Activation.uses, Activation.loads).where(Activation.id == act.id)
        ).one() == (2, 1)
