"""The `fuse` job merges near-duplicate notes: history, links and search exactly as specified."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from sqlalchemy import select

from memcube.types import SearchFilters
from memos.db.models import Link, Memory
from memos.services.views import NewMemory
from tests.memos.services.factories import ADMIN, make_daemon

WHEN = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)


def run(daemon, name: str) -> dict:
    view = daemon.jobs.get_run(daemon.jobs.run_now(name, wait=True))
    assert (view.status, view.error) == ("ok", None)
    return view.result


def add(daemon, cube_id, notes):
    items = [NewMemory(text, session, speaker, WHEN, {}) for speaker, session, text in notes]
    return [m.id for m in daemon.memories.add(ADMIN, cube_id, items)]


def links(daemon, cube_id) -> set[tuple[str, str, str]]:
    with daemon.db.read() as s:
        ids = dict(
            (seq, mid)
            for seq, mid in s.execute(
                select(Memory.seq, Memory.id).where(Memory.cube_id == cube_id)
            )
        )
        rows = s.execute(
            select(Link.src_seq, Link.dst_seq, Link.kind).where(Link.cube_id == cube_id)
        )
        return {(ids[src], ids[dst], kind) for src, dst, kind in rows}


def reasons(daemon, cube_id, memory_id):
    return [h.reason for h in daemon.memories.history(ADMIN, cube_id, memory_id)]


def test_duplicates_fuse_into_the_earliest_with_history_links_and_search(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder, enrichment={"enabled": True})
    cube_id = daemon.cubes.create(ADMIN, secrets.token_hex(3), "").id
    ids = add(daemon, cube_id, [
        ("Caroline", "s1", "I adopted a puppy named Max last week and he is adorable."),
        ("Melanie", "s1", "That's wonderful, what breed is he?"),
    ])  # fmt: skip
    daemon.enrichment.run_once()  # a repeat is judged against notes enriched before it
    ids += add(daemon, cube_id, [
        ("Caroline", "s1", "I adopted a puppy named Max last week, and he is adorable!"),
        ("Melanie", "s1", "I painted a sunrise over the lake last weekend."),
    ])  # fmt: skip
    daemon.enrichment.run_once()
    keep, other = ids[0], ids[2]
    before = links(daemon, cube_id)
    assert (other, keep, "duplicate") in before  # enrichment found the repeat
    with daemon.db.read() as s:
        rows = {r.id: r for r in s.scalars(select(Memory).where(Memory.id.in_([keep, other])))}
        keywords = list(dict.fromkeys(rows[keep].keywords + rows[other].keywords))
        tags = list(dict.fromkeys(rows[keep].tags + rows[other].tags))
        contexts = list(dict.fromkeys(c for c in (rows[keep].context, rows[other].context) if c))
    # Fusing is off by default: nothing happens until the owner turns it on.
    assert run(daemon, "fuse")["cubes"] == 0
    daemon.policies.set(ADMIN, cube_id, {"fuse": {"enabled": True}})
    result = run(daemon, "fuse")
    assert (result["cubes"], result["groups"], result["notes"], result["skipped"]) == (1, 1, 1, 0)
    assert result["fused"][0]["survivor"] == keep and result["fused"][0]["fused"] == [other]
    assert result["fused"][0]["why"] == "duplicate links"

    survivor = daemon.memories.get(ADMIN, cube_id, keep)
    assert (survivor.keywords, survivor.tags) == (keywords, tags)
    assert survivor.context == " ".join(contexts)
    assert survivor.version == 2  # enrichment adds no version; the fusion does
    assert reasons(daemon, cube_id, keep) == ["created", f"fused from ['{other}']"]
    assert reasons(daemon, cube_id, other) == ["created", f"fused into {keep}"]
    live = [m.id for m in daemon.memories.page(ADMIN, cube_id, None, 10, None).items]
    assert live == [ids[0], ids[1], ids[3]]

    # Links: every one of the fused note's now the survivor's, none between the two.
    def moved(end):
        return keep if end == other else end

    expected = {(moved(a), moved(b), k) for a, b, k in before} - {
        (a, b, k) for a, b, k in {(moved(a), moved(b), k) for a, b, k in before} if a == b
    }
    assert links(daemon, cube_id) == expected

    hits = daemon.search.search(ADMIN, cube_id, "puppy named Max", 3, SearchFilters()).hits
    assert [h.memory.id for h in hits][0] == keep
    assert other not in {h.memory.id for h in hits}

    again = run(daemon, "fuse")  # idempotent: nothing left to fuse, nothing changes
    assert (again["groups"], again["notes"], again["skipped"]) == (0, 0, 0)
    assert links(daemon, cube_id) == expected
    assert daemon.memories.get(ADMIN, cube_id, keep).version == 2
    daemon.stop()


def test_notes_of_one_speaker_above_the_threshold_fuse_and_others_do_not(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder)  # enrichment off: notes stay as written
    cube_id = daemon.cubes.create(ADMIN, secrets.token_hex(3), "").id
    ids = add(daemon, cube_id, [
        ("Caroline", "a", "I love hiking in the mountains on weekends."),
        ("Melanie", "a", "I love hiking in the mountains on weekends."),
        ("Caroline", "b", "I love hiking in the mountains on weekends!"),
        ("Caroline", "b", "My favourite food is spicy ramen."),
    ])  # fmt: skip
    daemon.policies.set(ADMIN, cube_id, {"fuse": {"enabled": True, "threshold": 0.95}})
    result = run(daemon, "fuse")
    assert result["fused"] == [
        {"survivor": ids[0], "fused": [ids[2]], "why": "same speaker, cosine >= 0.95"}
    ]
    live = [m.id for m in daemon.memories.page(ADMIN, cube_id, None, 10, None).items]
    assert live == [ids[0], ids[1], ids[3]]  # Melanie's identical words are hers to keep
    assert reasons(daemon, cube_id, ids[2]) == ["created", f"fused into {ids[0]}"]
    assert run(daemon, "fuse")["groups"] == 0
    daemon.stop()
