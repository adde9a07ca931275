"""Erasure against the services: an enrichment in flight never lands on a note that reused an
erased note's seq (SQLite hands the last rowid out again), and never links to an erased note."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from memcube.enrichment import make_enricher
from memos.daemon import Daemon
from memos.db.models import Memory
from memos.services.auth import ADMIN_USER_ID
from memos.services.linking import PlannedLink, replace_links
from memos.services.views import NewMemory, Principal
from memos.settings import Settings

ADMIN = Principal(ADMIN_USER_ID, True)


class ErasingEnricher:
    """The local enricher, but the first call erases the note being enriched and adds another
    before returning: what an erasure racing the enrichment worker looks like."""

    def __init__(self, daemon: Daemon, cube_id: str, embed) -> None:
        self.daemon, self.cube_id = daemon, cube_id
        self.local = make_enricher("local", embed)
        self.added: list = []

    def enrich(self, notes):
        results = self.local.enrich(notes)
        if not self.added:
            (victim,) = self.daemon.memories.page(ADMIN, self.cube_id, None, 10, None).items
            self.daemon.erasure.erase(ADMIN, self.cube_id, victim.id)
            self.added = self.daemon.memories.add(
                ADMIN, self.cube_id, [NewMemory("Tea at four.", None, None, _now(), {})]
            )
        return results


def _now() -> datetime:
    return datetime.now(UTC)


def _seq(daemon: Daemon, memory_id: str) -> int:
    with daemon.db.read() as s:
        return int(s.scalar(select(Memory.seq).where(Memory.id == memory_id)))


def test_an_enrichment_in_flight_skips_a_note_that_reused_an_erased_seq(tmp_path, embedder):
    daemon = Daemon(
        Settings(data_dir=tmp_path, admin_key="k" * 20, enrichment={"enabled": False}),
        embedder=embedder,
    )
    daemon.start()
    cube = daemon.cubes.create(ADMIN, "c", "")
    (secret,) = daemon.memories.add(
        ADMIN, cube.id, [NewMemory("Zanzibar vault code is 7741.", "s", "bob", _now(), {})]
    )
    secret_seq = _seq(daemon, secret.id)
    racer = ErasingEnricher(daemon, cube.id, embedder.embed)
    daemon.enrichment.enricher = racer
    daemon.enrichment.run_once()
    (newcomer,) = racer.added
    assert _seq(daemon, newcomer.id) == secret_seq  # SQLite reused the erased note's seq
    got = daemon.memories.get(ADMIN, cube.id, newcomer.id)
    assert (got.enrichment, got.keywords, got.version) == ("pending", [], 1)
    # Enriched later from its own content, never the erased note's.
    daemon.enrichment.enricher = make_enricher("local", embedder.embed)
    assert daemon.enrichment.run_once() == 1
    got = daemon.memories.get(ADMIN, cube.id, newcomer.id)
    assert got.enrichment == "done"
    assert not any("zanzibar" in k.lower() or "7741" in k for k in got.keywords)
    daemon.stop()


def test_links_to_an_erased_note_are_dropped(tmp_path, embedder):
    daemon = Daemon(
        Settings(data_dir=tmp_path, admin_key="k" * 20, enrichment={"enabled": False}),
        embedder=embedder,
    )
    daemon.start()
    cube = daemon.cubes.create(ADMIN, "c", "")
    a, b = daemon.memories.add(
        ADMIN, cube.id, [NewMemory(t, None, None, _now(), {}) for t in ("one", "two")]
    )
    seq_a, seq_b = _seq(daemon, a.id), _seq(daemon, b.id)
    daemon.erasure.erase(ADMIN, cube.id, b.id)
    with daemon.db.write() as s:  # a link planned before the erasure, written after it
        replace_links(s, cube.id, [seq_a], [PlannedLink(seq_a, seq_b, "similar", 0.9)])
    assert daemon.memories.get(ADMIN, cube.id, a.id).links == []
    daemon.stop()
