"""Link planning for enriched notes, and the evolution of the neighbours they revise.

The enrichment service (memos/services/enrichment.py) calls these inside its read and write
transactions; the rules deciding `duplicate` and `updates` live in memcube/linking.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from memcube.enrichment import Enrichment
from memcube.linking import Evolution, LinkingConfig, NoteFacts, evolve, near_duplicate, revises
from memcube.notes import note_keywords
from memcube.types import ScoredSeq
from memos.db.models import Link, Memory
from memos.db.types import utcnow
from memos.services.repository import drop_derived_links, enriched_text, history_row


@dataclass(frozen=True)
class PlannedLink:
    src: int
    dst: int
    kind: str
    score: float


@dataclass
class PlannedEvolution:
    seq: int
    version: int  # applied only if the note is still at this version
    evolution: Evolution
    text: str  # the evolved note's embedding text
    vector: np.ndarray | None = None  # (dim,) float32, embedded before the commit


def note_facts(row: Memory, enrichment: Enrichment | None = None) -> NoteFacts:
    """The linking rules' view of a stored note, or of a new one with its fresh enrichment."""
    keywords = enrichment.keywords if enrichment else note_keywords(row)
    return NoteFacts(
        seq=row.seq,
        content=row.content,
        speaker=row.speaker,
        session_id=row.session_id,
        timestamp=row.timestamp,
        keywords=frozenset(keywords),
        tags=tuple(enrichment.tags if enrichment else row.tags),
        context=enrichment.context if enrichment else row.context,
    )


def judge(
    s: Session,
    cube_id: str,
    rows: Sequence[Memory],
    results: list[Enrichment],
    neighbours: dict[int, list[ScoredSeq]],
    config: LinkingConfig,
) -> tuple[list[PlannedLink], dict[int, PlannedEvolution]]:
    """`duplicate` and `updates` links from each note to its enriched neighbours, and the
    evolutions of the neighbours it revises (memcube/linking.py has the rules)."""
    batch = {r.seq for r in rows}
    wanted = {hit.seq for hits in neighbours.values() for hit in hits} - batch
    older = {
        row.seq: row
        for row in s.scalars(
            select(Memory).where(
                Memory.cube_id == cube_id,
                Memory.seq.in_(wanted),
                Memory.deleted_at.is_(None),
                Memory.enrichment == "done",
            )
        )
    }
    facts = {seq: note_facts(row) for seq, row in older.items()}
    links: list[PlannedLink] = []
    evolutions: dict[int, PlannedEvolution] = {}
    for row, enrichment in zip(rows, results, strict=True):
        new = note_facts(row, enrichment)
        for hit in neighbours[row.seq]:
            old = facts.get(hit.seq)
            if old is None:
                continue
            similarity = near_duplicate(new, old, config)
            if similarity is not None:
                links.append(PlannedLink(row.seq, old.seq, "duplicate", similarity))
            elif revises(new, old, hit.signals["dense"], config):
                links.append(PlannedLink(row.seq, old.seq, "updates", hit.signals["dense"]))
                evolution = evolve(old, new, row.id, config)
                facts[old.seq] = replace(old, tags=evolution.tags, context=evolution.context)
                target = older[old.seq]
                evolutions[old.seq] = PlannedEvolution(
                    seq=old.seq,
                    version=target.version,
                    evolution=evolution,
                    text=enriched_text(
                        s, target, target.keywords, evolution.tags, evolution.context
                    ),
                )
    return links, evolutions


def session_neighbours(
    s: Session, cube_id: str, rows: Sequence[Memory]
) -> dict[int, tuple[int, ...]]:
    """The live notes just before and just after each row in its session (by seq), by the
    row's seq, in one query; rows without a session are left out."""
    placed = [row.seq for row in rows if row.session_id is not None]
    if not placed:
        return {}
    other = aliased(Memory)
    same_session = (
        other.cube_id == Memory.cube_id,
        other.session_id == Memory.session_id,
        other.deleted_at.is_(None),
    )
    before = select(func.max(other.seq)).where(*same_session, other.seq < Memory.seq)
    after = select(func.min(other.seq)).where(*same_session, other.seq > Memory.seq)
    found = s.execute(
        select(Memory.seq, before.scalar_subquery(), after.scalar_subquery()).where(
            Memory.cube_id == cube_id, Memory.seq.in_(placed)
        )
    )
    return {seq: tuple(n for n in (prev, nxt) if n) for seq, prev, nxt in found}


def plan_links(
    row: Memory,
    neighbours: Sequence[ScoredSeq],
    keywords: dict[int, set[str]],
    similar_threshold: float,
    follows: Sequence[int] = (),
) -> list[PlannedLink]:
    """`follows` (to the given session neighbours, see `session_neighbours`), `similar` and
    `same_entity` links of a freshly enriched note."""
    planned = [PlannedLink(row.seq, seq, "follows", 1.0) for seq in follows]
    mine = set(note_keywords(row))  # keyphrases only: a shared date is no shared entity
    for hit in neighbours:
        if hit.seq == row.seq:
            continue
        cosine = hit.signals["dense"]
        if cosine >= similar_threshold:
            planned.append(PlannedLink(row.seq, hit.seq, "similar", cosine))
        if mine & keywords.get(hit.seq, set()):
            planned.append(PlannedLink(row.seq, hit.seq, "same_entity", cosine))
    return planned


def keywords_of(s: Session, cube_id: str, seqs: Sequence[int]) -> dict[int, set[str]]:
    """The keyphrases of these notes of the cube, by seq."""
    if not seqs:
        return {}
    rows = s.execute(
        select(Memory.seq, Memory.keywords).where(
            Memory.cube_id == cube_id, Memory.seq.in_(set(seqs))
        )
    )
    return {seq: set(keywords or []) for seq, keywords in rows}


def replace_links(s: Session, cube_id: str, seqs: list[int], links: list[PlannedLink]) -> None:
    """Drop the notes' derived links (both directions) and write the new ones, mirrored."""
    drop_derived_links(s, cube_id, seqs)
    unique: dict[tuple[int, int, str], float] = {}
    for link in links:
        for src, dst in ((link.src, link.dst), (link.dst, link.src)):
            key = (src, dst, link.kind)
            unique[key] = max(unique.get(key, link.score), link.score)
    # A neighbour erased since it was found has no row to link to any more.
    ends = {src for src, _, _ in unique} | {dst for _, dst, _ in unique}
    present = set(s.scalars(select(Memory.seq).where(Memory.seq.in_(ends)))) if ends else set()
    unique = {k: v for k, v in unique.items() if k[0] in present and k[1] in present}
    s.add_all(
        Link(cube_id=cube_id, src_seq=src, dst_seq=dst, kind=kind, score=score)
        for (src, dst, kind), score in unique.items()
    )


def apply_evolution(
    s: Session, cube_id: str, planned: PlannedEvolution, generation: int
) -> Memory | None:
    """Apply an evolution: a new version with new tags and context, its old one in history
    with the reason. None if the note changed since it was judged."""
    row = s.scalar(select(Memory).where(Memory.cube_id == cube_id, Memory.seq == planned.seq))
    # Targets were enriched when judged; a pending one at that seq is a new note that reused
    # an erased note's seq (SQLite), not the target.
    if (
        row is None
        or row.deleted_at is not None
        or row.version != planned.version
        or row.enrichment != "done"
    ):
        return None
    assert planned.vector is not None, "evolved vectors are embedded before the commit"
    row.tags = list(planned.evolution.tags)
    row.context = planned.evolution.context
    row.embedding = planned.vector.astype(np.float32).tobytes()
    row.version += 1
    row.change_seq = generation
    row.updated_at = utcnow()
    s.add(history_row(row, planned.evolution.reason))
    return row
