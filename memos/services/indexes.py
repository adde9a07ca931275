"""The daemon's per-cube retrieval indexes: loaded lazily, healed from the database, saved.

Invariant: for a loaded cube, `index.generation` equals the cube's database generation once the
cube's write lock is released. Writers hold that lock across "commit, then apply to the index",
so the index never misses or reorders a change made through this daemon. Anything else (a crash
between commit and save, a foreign writer) is caught by comparing generations and replaying the
rows whose `change_seq` is newer than what the index reflects.

Loaded indexes share a memory budget (`max_loaded_bytes`, measured by each index's footprint):
past it the least recently used are unloaded (saved first when dirty) and load again on their
next use. An index compacts its dead rows as it goes (`CubeIndex.apply`); its ANN graph's
deleted elements are compacted right after the write that tipped them over, outside the lock.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select, update

from memcube.atomic import tree_bytes
from memcube.notes import EMBEDDING_TEXT_FORMAT, to_doc
from memcube.retrieval import CubeIndex, RetrievalConfig
from memcube.vector_index import HnswConfig, read_manifest
from memos.db.engine import Database
from memos.db.models import Cube, Memory
from memos.services.cubes import cube_not_found
from memos.services.repository import note_embedding_text

log = logging.getLogger("memos.indexes")


def vector_space(embedder_fingerprint: str) -> str:
    """The tag stored with a cube's vectors: the embedder's space and the text format."""
    return f"{embedder_fingerprint}/{EMBEDDING_TEXT_FORMAT}"


@dataclass(frozen=True)
class HealReport:
    cube_id: str
    action: str  # "clean", "replayed", "rebuilt", "empty"
    replayed: int
    live: int


class IndexRegistry:
    def __init__(
        self,
        db: Database,
        root: Path,
        dim: int,
        embedder: str,
        hnsw: HnswConfig,
        retrieval: RetrievalConfig,
        embed: Callable[[Sequence[str]], np.ndarray],
        max_loaded_bytes: int = 2 << 30,
    ) -> None:
        self.db = db
        self.max_loaded_bytes = max_loaded_bytes
        self.embed = embed
        self.root = root
        self.dim = dim
        self.embedder = embedder
        self.hnsw = hnsw
        self.retrieval = retrieval
        self._indexes: OrderedDict[str, CubeIndex] = OrderedDict()  # least recently used first
        self._sizes: dict[str, int] = {}  # footprint bytes of each loaded index
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()

    def directory(self, cube_id: str) -> Path:
        return self.root / cube_id

    def _lock(self, cube_id: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(cube_id, threading.RLock())

    # -- access -----------------------------------------------------------------------------

    def get(self, cube_id: str) -> CubeIndex:
        """The cube's index, loaded (and healed) on first use or after an eviction."""
        with self._guard:
            index = self._indexes.get(cube_id)
            if index is not None:
                self._indexes.move_to_end(cube_id)
                return index
        with self._lock(cube_id):
            with self._guard:
                index = self._indexes.get(cube_id)
            if index is not None:
                return index
            index, report = self._load(cube_id)
            with self._guard:
                self._indexes[cube_id] = index
                self._sizes[cube_id] = index.footprint().bytes
            log.info("index loaded", extra={"fields": report.__dict__})
        self.evict_over_budget(keep=cube_id)
        return index

    @contextmanager
    def writing(self, cube_id: str) -> Iterator[CubeIndex]:
        """Hold the cube's write lock: commit inside, then apply to the yielded index."""
        self.get(cube_id)
        with self._lock(cube_id):
            # Looked up again under the lock: maintenance may have swapped in a fresh index.
            index = self.get(cube_id)
            yield index
        # After the lock: other writers go on while deleted graph elements are compacted away.
        index.compact_ann()
        with self._guard:
            if self._indexes.get(cube_id) is index:
                self._sizes[cube_id] = index.footprint().bytes
        self.evict_over_budget(keep=cube_id)

    def loaded(self) -> list[str]:
        """Loaded cubes, least recently used first."""
        with self._guard:
            return list(self._indexes)

    def loaded_bytes(self) -> int:
        """The loaded indexes' footprints, as of their load or last write."""
        with self._guard:
            return sum(self._sizes.values())

    def evict_over_budget(self, keep: str | None = None) -> list[str]:
        """Unload least recently used cubes (saving a dirty one first) until the loaded ones fit
        in `max_loaded_bytes`. `keep` (the cube in use) and cubes whose lock is held (a write
        or a load in progress) stay; an unloaded cube loads again on its next use."""
        evicted: list[str] = []
        while self.loaded_bytes() > self.max_loaded_bytes:
            for cube_id in self.loaded():
                if cube_id != keep and self._unload(cube_id):
                    evicted.append(cube_id)
                    break
            else:
                break  # everything left is in use
        return evicted

    def _unload(self, cube_id: str) -> bool:
        lock = self._lock(cube_id)
        if not lock.acquire(blocking=False):
            return False
        try:
            with self._guard:
                index = self._indexes.get(cube_id)
            if index is None:
                return False
            if index.dirty:
                try:
                    index.save(self.directory(cube_id))
                except OSError:  # the database has it all: the next load replays or rebuilds
                    log.exception(
                        "index save before eviction failed", extra={"fields": {"cube_id": cube_id}}
                    )
            with self._guard:
                self._indexes.pop(cube_id, None)
                self._sizes.pop(cube_id, None)
            fields = {"cube_id": cube_id, "bytes": index.footprint().bytes}
            log.info("index evicted", extra={"fields": fields})
            return True
        finally:
            lock.release()

    def drop(self, cube_id: str) -> None:
        with self._lock(cube_id):
            with self._guard:
                self._indexes.pop(cube_id, None)
                self._sizes.pop(cube_id, None)
            shutil.rmtree(self.directory(cube_id), ignore_errors=True)

    def disk_bytes(self, cube_id: str) -> int:
        """Bytes of the cube's saved index files (a save may be renaming them meanwhile)."""
        return tree_bytes(self.directory(cube_id))

    # -- loading and healing ----------------------------------------------------------------

    def _generation(self, cube_id: str) -> int:
        with self.db.read() as s:
            generation = s.scalar(select(Cube.generation).where(Cube.id == cube_id))
        if generation is None:
            raise cube_not_found(cube_id)
        return int(generation)

    def _rows(self, cube_id: str, newer_than: int | None = None, deleted: bool = False):
        query = select(Memory).where(Memory.cube_id == cube_id)
        query = query.where(
            Memory.deleted_at.is_not(None) if deleted else Memory.deleted_at.is_(None)
        )
        if newer_than is not None:
            query = query.where(Memory.change_seq > newer_than)
        with self.db.read() as s:
            yield from s.scalars(query.order_by(Memory.seq).execution_options(yield_per=2000))

    def _load(self, cube_id: str) -> tuple[CubeIndex, HealReport]:
        reembedded = self._ensure_vector_space(cube_id)
        generation = self._generation(cube_id)
        index = CubeIndex(self.dim, self.embedder, self.hnsw, self.retrieval)
        index.load_rows((to_doc(r) for r in self._rows(cube_id)), generation)
        action, replayed = self._heal_ann(cube_id, index, generation)
        if reembedded:
            action = f"reembedded {reembedded}, {action}"
        return index, HealReport(cube_id, action, replayed, index.live_count)

    def _ensure_vector_space(self, cube_id: str, chunk: int = 512) -> int:
        """Re-embed the cube's memories if they were embedded in another vector space.

        Returns how many memories were re-embedded. Runs under the cube's lock, before any
        write can add vectors of the new space; a crash midway re-embeds again at next load
        (the cube's space is recorded only when every memory is done).
        """
        with self.db.read() as s:
            recorded = s.scalar(select(Cube.embedder).where(Cube.id == cube_id))
        if recorded == self.embedder:
            return 0
        count = 0
        if recorded is not None:
            log.warning(
                "re-embedding cube for a new embedder",
                extra={"fields": {"cube_id": cube_id, "from": recorded, "to": self.embedder}},
            )
            with self.db.read() as s:
                seqs = list(s.scalars(
                    select(Memory.seq).where(Memory.cube_id == cube_id).order_by(Memory.seq)
                ))  # fmt: skip
            for start in range(0, len(seqs), chunk):
                part = seqs[start : start + chunk]
                with self.db.read() as s:
                    query = select(Memory).where(Memory.cube_id == cube_id, Memory.seq.in_(part))
                    texts = {row.seq: note_embedding_text(s, row) for row in s.scalars(query)}
                # Embedded outside any transaction: SQLite's write lock is global.
                vectors = self.embed([texts[seq] for seq in part])
                with self.db.write() as s:
                    rows = select(Memory).where(Memory.cube_id == cube_id, Memory.seq.in_(part))
                    for row in s.scalars(rows):
                        row.embedding = vectors[part.index(row.seq)].astype(np.float32).tobytes()
                count += len(part)
        with self.db.write() as s:
            s.execute(update(Cube).where(Cube.id == cube_id).values(embedder=self.embedder))
        return count

    def _heal_ann(self, cube_id: str, index: CubeIndex, generation: int) -> tuple[str, int]:
        """Bring the ANN graph in line with the rows; save it if anything changed."""
        saved = index.restore_ann(self.directory(cube_id))
        replayed = 0
        if saved is None or saved > generation:
            index.rebuild_ann()
            action = "rebuilt"
        elif saved < generation:
            docs = [to_doc(r) for r in self._rows(cube_id, newer_than=saved)]
            gone = [r.seq for r in self._rows(cube_id, newer_than=saved, deleted=True)]
            index.replay_ann(docs, gone)
            replayed = len(docs) + len(gone)
            action = "replayed"
        else:
            action = "clean"
        index.generation = generation
        if not index.verify_ann(sample=64).clean:
            index.rebuild_ann()
            action = "rebuilt"
        if index.dirty and index.live_count > 0:
            index.save(self.directory(cube_id))
        return action, replayed

    def heal_all(self) -> list[HealReport]:
        """At start: load and heal every cube whose saved index lags its database generation."""
        with self.db.read() as s:
            cubes = s.execute(select(Cube.id, Cube.generation)).all()
        reports = []
        for cube_id, generation in cubes:
            manifest = read_manifest(self.directory(cube_id))
            lagging = generation > 0 and (
                manifest is None
                or manifest.generation != generation
                or manifest.embedder != self.embedder  # another vector space: re-embed now
            )
            if lagging and cube_id not in self.loaded():
                try:
                    index = self.get(cube_id)
                except Exception:  # a cube deleted meanwhile, or a broken row: keep going
                    log.exception("heal failed", extra={"fields": {"cube_id": cube_id}})
                    continue
                reports.append(HealReport(cube_id, "healed", 0, index.live_count))
        return reports

    def maintain(self, cube_id: str) -> HealReport:
        """The maintenance job's check of one loaded cube: replay, verify, rebuild, save."""
        with self._lock(cube_id):
            index = self._indexes.get(cube_id)
            if index is None:
                return HealReport(cube_id, "not_loaded", 0, 0)
            generation = self._generation(cube_id)
            if generation != index.generation:
                # Changed behind our back (another process): reload from the database.
                fresh, report = self._load(cube_id)
                with self._guard:
                    self._indexes[cube_id] = fresh
                    self._sizes[cube_id] = fresh.footprint().bytes
                return HealReport(cube_id, "reloaded", report.replayed, fresh.live_count)
            drift = index.verify_ann(sample=256)
            action = "clean"
            if not drift.clean:
                index.rebuild_ann()
                action = "rebuilt"
            if index.dirty:
                index.save(self.directory(cube_id))
                action = "saved" if action == "clean" else action
            return HealReport(cube_id, action, 0, index.live_count)

    def save_all(self) -> None:
        for cube_id in list(self._indexes):
            with self._lock(cube_id):
                index = self._indexes.get(cube_id)
                if index is not None and index.dirty:
                    index.save(self.directory(cube_id))
