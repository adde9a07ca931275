"""Erasure: a memory removed for good, unlike the soft delete that keeps it in history.

One transaction deletes the memory's row, every history row (each older version's content),
every link to or from it, and the activations built from it (from its id, or from its session);
then, still under the cube's write lock, the cube index forgets it (rows, BM25 terms, and the
vectors of every version, overwritten in the HNSW graph) and is saved at once, so the index
file on disk holds no copy either. After the commit the activations' files are removed and, on
SQLite, the WAL is checkpointed and truncated: with `secure_delete` the freed pages were zeroed,
so the database file keeps none of the erased bytes. On PostgreSQL the rows are deleted; their
dead tuples stay in the table files until VACUUM runs (the operator's job, like backups).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

import kv_runtime
from memos.db.engine import Database
from memos.db.locking import lock_cube
from memos.db.models import Activation, Link, Memory, MemoryHistory
from memos.services.cubes import CubeService
from memos.services.indexes import IndexRegistry
from memos.services.repository import bump_generation, check_version, memory_not_found
from memos.services.views import Principal, Role

log = logging.getLogger("memos.erasure")


@dataclass(frozen=True)
class ErasureReport:
    memory_ids: tuple[str, ...]
    history_rows: int
    links: int
    activations: tuple[str, ...]  # ids of the activations dropped with it
    wal_truncated: bool


def drop_activations_built_from(
    s: Session, cube_id: str, memory_id: str, session_id: str | None
) -> list[str]:
    """Delete the catalogue rows of the cube's activations built from this memory (their
    `source` names it in `memory_ids`) or from its session (`session_id` or one of
    `session_ids`); returns their ids. The caller
    removes their files after the commit. A build still running for one finds its row gone."""
    dropped = []
    for activation_id, source in s.execute(
        select(Activation.id, Activation.source).where(Activation.cube_id == cube_id)
    ):
        source = source or {}
        from_memory = memory_id in (source.get("memory_ids") or [])
        from_session = session_id is not None and (
            source.get("session_id") == session_id
            or session_id in (source.get("session_ids") or [])
        )
        if from_memory or from_session:
            dropped.append(activation_id)
    if dropped:
        s.execute(delete(Activation).where(Activation.id.in_(dropped)))
    return dropped


class ErasureService:
    def __init__(
        self,
        db: Database,
        cubes: CubeService,
        indexes: IndexRegistry,
        activation_dir: Path,
        on_erased: Callable[[str, str | None], None] = lambda cube_id, session_id: None,
        remove_activation: Callable[[str, str], None] | None = None,
    ) -> None:
        # (cube id, activation id): its files here and in the fleet's shared tier
        self.on_erased = on_erased  # (cube id, session id): drop what memory still holds of it
        self.db = db
        self.cubes = cubes
        self.indexes = indexes
        self.activation_dir = activation_dir
        self.remove_activation = remove_activation or (
            lambda cube_id, activation_id: kv_runtime.delete_activation(
                activation_dir / cube_id / activation_id
            )
        )

    def erase(
        self,
        principal: Principal,
        cube_id: str,
        memory_id: str,
        if_match: frozenset[int] | None = None,
    ) -> ErasureReport:
        """Erase a live or soft-deleted memory (owner only: it destroys the history too)."""
        self.cubes.require(principal, cube_id, Role.OWNER)
        report = self._erase(cube_id, [memory_id], if_match)
        log.info("memory erased", extra={"fields": {"cube_id": cube_id, **report.__dict__}})
        return report

    def purge(self, cube_id: str, memory_ids: Sequence[str]) -> ErasureReport | None:
        """Erase these soft-deleted memories of the cube for good, in one transaction: the
        system path (no principal) the `evict` job takes past the retention. Ids that are
        live again, or gone, are skipped; None when none was left to erase."""
        if not memory_ids:
            return None
        report = self._erase(cube_id, memory_ids, None, deleted_only=True)
        return report if report.memory_ids else None

    def _erase(
        self,
        cube_id: str,
        memory_ids: Sequence[str],
        if_match: frozenset[int] | None,
        deleted_only: bool = False,
    ) -> ErasureReport:
        with self.indexes.writing(cube_id) as index:
            with self.db.write() as s:
                lock_cube(s, cube_id)  # before its memories (memos/db/locking.py)
                query = select(Memory).where(Memory.id.in_(memory_ids), Memory.cube_id == cube_id)
                if deleted_only:
                    query = query.where(Memory.deleted_at.is_not(None))
                rows = list(s.scalars(query.order_by(Memory.seq).with_for_update()))
                if not deleted_only and not rows:
                    raise memory_not_found(memory_ids[0])
                for row in rows:
                    check_version(row, if_match)
                if not rows:
                    return ErasureReport((), 0, 0, (), False)
                live = sum(1 for row in rows if row.deleted_at is None)
                generation = bump_generation(s, cube_id, live_delta=-live)
                seqs = [row.seq for row in rows]
                links = s.execute(
                    delete(Link).where(or_(Link.src_seq.in_(seqs), Link.dst_seq.in_(seqs)))
                ).rowcount  # type: ignore[attr-defined]
                history = s.execute(
                    delete(MemoryHistory).where(MemoryHistory.memory_seq.in_(seqs))
                ).rowcount  # type: ignore[attr-defined]
                s.execute(delete(Memory).where(Memory.seq.in_(seqs)))
                activations: list[str] = []
                for row in rows:
                    activations += drop_activations_built_from(s, cube_id, row.id, row.session_id)
            index.erase(seqs, generation)
            index.save(self.indexes.directory(cube_id))
        for activation_id in activations:
            self.remove_activation(cube_id, activation_id)
        for session_id in sorted({row.session_id or "" for row in rows}):
            self.on_erased(cube_id, session_id or None)
        truncated = self.db.checkpoint()
        if not truncated:
            log.warning("WAL still in use after an erasure; the next checkpoint truncates it")
        return ErasureReport(
            tuple(row.id for row in rows), int(history), int(links), tuple(activations), truncated
        )
