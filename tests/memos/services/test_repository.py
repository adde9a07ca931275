"""Shared row helpers key every seq by its cube: a stray row never crosses cubes."""

from __future__ import annotations

from sqlalchemy import select

from memos.db.models import Link, Memory
from tests.memos.services.factories import ADMIN, TURNS, add_turns, make_daemon


def test_links_are_read_and_dropped_within_their_own_cube_only(tmp_path, embedder):
    """Before, links were keyed by seq alone: a row linking cube A's note to cube B's showed
    B's memory id in A's views, and an edit in A deleted a row filed under B."""
    daemon = make_daemon(tmp_path, embedder)
    cube_a, (a1, a2) = add_turns(daemon, TURNS[:2])
    cube_b, (b1,) = add_turns(daemon, TURNS[2:3])
    with daemon.db.write() as s:
        seq = {m.id: m.seq for m in s.scalars(select(Memory))}
        s.add_all([
            Link(cube_id=cube_a, src_seq=seq[a1], dst_seq=seq[a2], kind="similar", score=0.9),
            # Stray rows: a link to another cube's note, and one filed under the other cube.
            Link(cube_id=cube_a, src_seq=seq[a1], dst_seq=seq[b1], kind="similar", score=0.8),
            Link(cube_id=cube_b, src_seq=seq[a1], dst_seq=seq[b1], kind="same_entity",
                 score=0.7),
        ])  # fmt: skip
    view = daemon.memories.get(ADMIN, cube_a, a1)
    assert [(link.id, link.kind) for link in view.links] == [(a2, "similar")]
    assert daemon.memories.get(ADMIN, cube_b, b1).links == []
    daemon.memories.update(ADMIN, cube_a, a1, "We adopted a kitten.", None)  # drops a1's links
    with daemon.db.read() as s:
        left = s.execute(select(Link.cube_id, Link.src_seq, Link.dst_seq, Link.kind)).all()
    assert [tuple(row) for row in left] == [(cube_b, seq[a1], seq[b1], "same_entity")]
    daemon.stop()
