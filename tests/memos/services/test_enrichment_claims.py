"""Enrichment claims on SQLite and PostgreSQL: daemons claiming at once get disjoint batches,
a live claim is never taken, an expired one is, and a release clears only one's own claims."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from memos.db.models import Cube, Memory, User
from memos.db.types import utcnow
from memos.services.enrichment_claims import Claims


@pytest.fixture
def db(migrated_db):
    db = migrated_db
    with db.write() as s:
        s.add(User(id="u", name="u"))
        s.flush()
        s.add(Cube(id="c", name="c", owner_id="u"))
        s.flush()
        s.add_all(
            Memory(id=f"m{i}", cube_id="c", content=f"note {i}", timestamp=utcnow(),
                   embedding=b"", change_seq=1)
            for i in range(120)
        )  # fmt: skip
    return db


def pending(limit: int):
    return select(Memory.seq, Memory.cube_id).where(Memory.enrichment == "pending").limit(limit)


def test_daemons_claiming_at_once_get_disjoint_batches(db):
    takers = [Claims(db, f"inst_{i}", lease_s=30) for i in range(4)]
    got: dict[str, list[int]] = {c.holder: [] for c in takers}

    def drain(claims: Claims) -> None:
        while taken := claims.take(pending(7).order_by(Memory.seq)):
            got[claims.holder].extend(seq for seq, _ in taken)

    threads = [threading.Thread(target=drain, args=(c,)) for c in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [seq for taken in got.values() for seq in taken]
    assert len(seqs) == len(set(seqs)) == 120  # each note claimed once, all claimed
    with db.read() as s:
        holders = {seq: by for seq, by in s.execute(select(Memory.seq, Memory.claimed_by))}
    assert all(holders[seq] == holder for holder, taken in got.items() for seq in taken)


def test_a_live_claim_is_never_taken_an_expired_one_is(db):
    a, b = Claims(db, "inst_a", lease_s=0.5), Claims(db, "inst_b", lease_s=30)
    first = a.take(pending(200))
    assert len(first) == 120
    assert b.take(pending(200)) == []  # a's claims are live
    b.release([seq for seq, _ in first])  # not b's to clear
    assert b.take(pending(200)) == []
    time.sleep(0.7)
    assert len(b.take(pending(200))) == 120  # a's lease is over: a killed daemon's notes
    a.release([seq for seq, _ in first])  # a, late, clears nothing of b's
    with db.read() as s:
        assert set(s.scalars(select(Memory.claimed_by))) == {"inst_b"}
    b.release_all()
    with db.read() as s:
        assert set(s.scalars(select(Memory.claimed_by))) == {None}
