"""Row helpers every service shares: history rows, cube generations, derived links, views.

Services import these instead of each other, so `memories.py` stays memory CRUD only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from sqlalchemy import String, cast, delete, func, or_, select, update
from sqlalchemy.orm import Session

from memcube.errors import NotFound, PreconditionFailed
from memcube.notes import embedding_text
from memos.db.models import Activation, Cube, Link, Memory, MemoryHistory
from memos.services.cubes import cube_not_found
from memos.services.ids import note_chunk_id
from memos.services.views import LinkView, MemoryView

# The PostgreSQL NOTIFY channel every change to a cube's memories is announced on.
CHANGES_CHANNEL = "memos_changes"

# Links the enrichment worker derives (and rebuilds); other kinds would be user-made.
DERIVED_LINK_KINDS = ("follows", "similar", "same_entity", "duplicate", "updates")


def drop_derived_links(s: Session, cube_id: str, seqs: Sequence[int]) -> None:
    """Delete the derived links of these notes of the cube, in both directions."""
    s.execute(
        delete(Link).where(
            Link.cube_id == cube_id,
            Link.kind.in_(DERIVED_LINK_KINDS),
            or_(Link.src_seq.in_(seqs), Link.dst_seq.in_(seqs)),
        )
    )


def memory_not_found(memory_id: str) -> NotFound:
    return NotFound(f"memory {memory_id!r} not found", code="memory_not_found")


def check_version(row: Memory, if_match: frozenset[int] | None) -> None:
    """412 unless the row is at one of the versions the caller expects (None: any)."""
    if if_match is not None and row.version not in if_match:
        expected = ", ".join(f'"{v}"' for v in sorted(if_match)) or "none"
        raise PreconditionFailed(
            f"memory {row.id!r} is at version {row.version}; If-Match expected {expected}"
        )


def memory_views(s: Session, rows: Sequence[Memory]) -> list[MemoryView]:
    """Rows -> views, with every row's links fetched in one query.

    A link counts only within its own cube, at both ends: keyed by (cube, seq), never by seq
    alone, so a stray row can never show one cube's note in another cube's links.
    """
    links: dict[tuple[str, int], list[LinkView]] = {(row.cube_id, row.seq): [] for row in rows}
    if rows:
        query = (
            select(Link.cube_id, Link.src_seq, Memory.id, Link.kind, Link.score)
            .join(Memory, (Memory.seq == Link.dst_seq) & (Memory.cube_id == Link.cube_id))
            .where(
                Link.cube_id.in_(sorted({cube_id for cube_id, _ in links})),
                Link.src_seq.in_([seq for _, seq in links]),
                Memory.deleted_at.is_(None),
            )
            .order_by(Link.src_seq, Link.score.desc())
        )
        for cube_id, src, dst_id, kind, score in s.execute(query):
            found = links.get((cube_id, src))
            if found is not None:
                found.append(LinkView(id=dst_id, kind=kind, score=float(score)))
    # Notes with a KV chunk of their current version: one primary-key lookup for all of them.
    chunk_ids = [note_chunk_id(row.id, row.version) for row in rows]
    chunked = (
        set(
            s.scalars(
                select(Activation.id).where(
                    Activation.id.in_(chunk_ids), Activation.state == "ready"
                )
            )
        )
        if rows
        else set()
    )
    return [
        MemoryView(
            id=row.id,
            cube_id=row.cube_id,
            content=row.content,
            session_id=row.session_id,
            speaker=row.speaker,
            timestamp=row.timestamp,
            metadata=row.metadata_ or {},
            keywords=list(row.keywords or []),
            tags=list(row.tags or []),
            context=row.context or "",
            links=links[(row.cube_id, row.seq)],
            version=row.version,
            enrichment=row.enrichment or "pending",
            dates=[date.fromisoformat(d) for d in row.dates or []],
            enrichment_attempts=row.enrichment_attempts or 0,
            enrichment_error=row.enrichment_error,
            has_kv=note_chunk_id(row.id, row.version) in chunked,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        for row in rows
    ]


def history_row(row: Memory, reason: str) -> MemoryHistory:
    return MemoryHistory(
        memory_seq=row.seq,
        version=row.version,
        content=row.content,
        metadata_=row.metadata_,
        keywords=row.keywords,
        dates=row.dates,
        tags=row.tags,
        context=row.context,
        changed_at=row.updated_at,
        reason=reason,
    )


def bump_generation(s: Session, cube_id: str, live_delta: int = 0) -> int:
    """Take the cube's next generation for this transaction's changes. `live_delta`: how many
    live memories the transaction adds (or, negative, removes), kept in `cubes.live_memories`
    for the memory quota: every insert, soft delete or erasure of a memory must pass it.

    On PostgreSQL the same statement queues a notification `"<cube_id> <generation>"` on
    `CHANGES_CHANNEL`, delivered to every listening daemon when (and only if) the transaction
    commits: how the fleet's other daemons learn that their loaded index of the cube lags
    (`memos/services/fleet/changes.py`). Every writer passes here, so every change is told."""
    query = (
        update(Cube)
        .where(Cube.id == cube_id)
        .values(generation=Cube.generation + 1, live_memories=Cube.live_memories + live_delta)
        .returning(Cube.generation)
    )
    if s.get_bind().dialect.name == "postgresql":
        payload = Cube.id.concat(" ").concat(cast(Cube.generation, String))
        query = query.returning(func.pg_notify(CHANGES_CHANNEL, payload))
    generation = s.scalar(query)
    if generation is None:  # the cube was deleted while this request was in flight
        raise cube_not_found(cube_id)
    return int(generation)


def previous_in_session(s: Session, row: Memory) -> Memory | None:
    """The live note just before `row` in its session (by seq), if any."""
    if row.session_id is None:
        return None
    return s.scalar(
        select(Memory)
        .where(
            Memory.cube_id == row.cube_id,
            Memory.session_id == row.session_id,
            Memory.deleted_at.is_(None),
            Memory.seq < row.seq,
        )
        .order_by(Memory.seq.desc())
        .limit(1)
    )


def enriched_text(
    s: Session, row: Memory, keywords: Sequence[str], tags: Sequence[str], context: str
) -> str:
    """`embedding_text` of a stored note with this enrichment, after the turn it answers."""
    previous = previous_in_session(s, row)
    return embedding_text(
        row.content, keywords, tags, context, previous.content if previous else None
    )


def note_embedding_text(s: Session, row: Memory) -> str:
    """`embedding_text` for a stored note, as its enrichment state calls for."""
    if row.enrichment != "done":
        return embedding_text(row.content)
    return enriched_text(s, row, row.keywords, row.tags, row.context)
