"""The daemon's per-cube retrieval indexes: loaded lazily, healed from the database, saved.

Invariant: for a loaded cube, `index.generation` equals the cube's database generation once the
cube's write lock is released. Writers hold that lock across "commit, then apply to the index",
so the index never misses or reorders a change made through this daemon. Anything else (a crash
between commit and save, a foreign writer) is caught by comparing generations and replaying the
rows whose `change_seq` is newer than what the index reflects.

Several daemons on one database (a fleet) each keep their own indexes. A daemon learns of
another's writes from PostgreSQL notifications or a poll (`memos/services/fleet/changes.py`)
and catches up (`catch_up`): under the cube's write lock it reads, in one snapshot, the cube's
generation and the rows changed since its index's generation, and applies them, one source
transaction at a time. Erased memories leave no row to replay: they show as live rows the
index has and the database's live count does not, and are swept out by comparing seqs. A
local write that finds foreign changes between its own and the index's (a generation gap)
catches up before releasing the lock, so a local write never skips a foreign change.

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
from memcube.types import IndexedDoc
from memcube.vector_index import HnswConfig, read_manifest
from memos.db.engine import Database
from memos.db.models import Cube, Memory
from memos.services.cubes import cube_not_found
from memos.services.repository import note_embedding_text

log = logging.getLogger("memos.indexes")


def vector_space(embedder_fingerprint: str) -> str:
    """The tag stored with a cube's vectors: the embedder's space and the text format."""
    return f"{embedder_fingerprint}/{EMBEDDING_TEXT_FORMAT}"


# A catch-up applies each source transaction's notes without letting a search in between
# (a search sees the transaction whole), up to this many notes; a larger one (an import) goes
# a note at a time, as local writes do, so searches are not held back for seconds.
ATOMIC_APPLY_MAX = 256


@dataclass(frozen=True)
class CatchUp:
    cube_id: str
    action: str  # "not_loaded", "current", "replayed", "swept", "reloaded", "dropped"
    generation: int  # the index's generation after it
    replayed: int  # rows applied
    erased: int = 0  # live rows the index had that the database no longer has


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
            before = index.generation
            yield index
            if index.generation > before + 1:
                # Another daemon changed the cube between the index's generation and this
                # write's: replay from there (this write's rows again too, harmlessly).
                try:
                    self._catch_up_locked(cube_id, index, before)
                except Exception:  # the write is committed: the poll replays it all later
                    index.generation = before
                    log.exception("catch-up after a write failed", extra={"fields": {
                        "cube_id": cube_id}})  # fmt: skip
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
            action, replayed = "clean", 0
            if generation != index.generation:
                # Changed behind our back (another daemon; a missed notification): catch up.
                caught = self._catch_up_locked(cube_id, index, index.generation)
                action, replayed = caught.action, caught.replayed
                with self._guard:
                    fresh = self._indexes.get(cube_id)
                if fresh is not index:  # dropped, or reloaded (verified and saved at load)
                    live = 0 if fresh is None else fresh.live_count
                    return HealReport(cube_id, action, replayed, live)
            drift = index.verify_ann(sample=256)
            if not drift.clean:
                index.rebuild_ann()
                action = "rebuilt"
            if index.dirty:
                index.save(self.directory(cube_id))
                action = "saved" if action == "clean" else action
            return HealReport(cube_id, action, replayed, index.live_count)

    # -- catching up with other daemons' writes ---------------------------------------------

    def behind(self, cube_id: str, generation: int) -> bool:
        """Whether the cube is loaded here at a generation older than `generation`."""
        with self._guard:
            index = self._indexes.get(cube_id)
        return index is not None and index.generation < generation

    def lagging(self) -> list[str]:
        """Loaded cubes whose database generation differs from their index's (or that are
        gone): one query for all of them, the fallback when notifications were missed."""
        with self._guard:
            loaded = {cube_id: index.generation for cube_id, index in self._indexes.items()}
        if not loaded:
            return []
        with self.db.read() as s:
            current = dict(
                s.execute(select(Cube.id, Cube.generation).where(Cube.id.in_(list(loaded)))).all()
            )
        return [c for c, g in loaded.items() if current.get(c) != g]

    def catch_up(self, cube_id: str) -> CatchUp:
        """Bring the cube's loaded index up to the database: replay the rows changed since
        its generation. A cube not loaded here has nothing to catch up (it loads current)."""
        with self._lock(cube_id):
            with self._guard:
                index = self._indexes.get(cube_id)
            if index is None:
                return CatchUp(cube_id, "not_loaded", 0, 0)
            report = self._catch_up_locked(cube_id, index, index.generation)
            with self._guard:
                index = self._indexes.get(cube_id)
        if index is not None and report.action != "current":
            index.compact_ann()
            with self._guard:
                if self._indexes.get(cube_id) is index:
                    self._sizes[cube_id] = index.footprint().bytes
            self.evict_over_budget(keep=cube_id)
        return report

    def _catch_up_locked(self, cube_id: str, index: CubeIndex, since: int) -> CatchUp:
        """Under the cube's lock: apply the changes newer than `since` to `index`, streamed
        one source transaction (one `change_seq`) at a time, so memory holds one at most."""
        replayed = 0
        with self.db.read() as s:
            if self.db.dialect == "postgresql":  # the head and the rows from one snapshot
                s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            head = s.execute(
                select(Cube.generation, Cube.live_memories).where(Cube.id == cube_id)
            ).first()
            went_back = head is not None and int(head[0]) < index.generation
            if head is not None and not went_back:
                query = (
                    select(Memory)
                    .where(Memory.cube_id == cube_id, Memory.change_seq > since)
                    .order_by(Memory.change_seq, Memory.seq)
                    .execution_options(yield_per=1000)
                )
                change: tuple[int, list[IndexedDoc], list[int]] = (0, [], [])
                for row in s.scalars(query):
                    if row.change_seq != change[0]:
                        _apply_change(index, *change)
                        change = (int(row.change_seq), [], [])
                    if row.deleted_at is None:
                        change[1].append(to_doc(row))
                    else:
                        change[2].append(row.seq)
                    replayed += 1
                _apply_change(index, *change)
        if head is None:  # deleted by another daemon
            with self._guard:
                self._indexes.pop(cube_id, None)
                self._sizes.pop(cube_id, None)
            shutil.rmtree(self.directory(cube_id), ignore_errors=True)
            return CatchUp(cube_id, "dropped", 0, 0)
        if went_back:  # the database is older than the index (restored): start over
            return self._reload_locked(cube_id)
        generation, live = int(head[0]), int(head[1])
        index.generation = max(index.generation, generation)
        action = "replayed" if replayed else "current"
        erased = 0
        if index.live_count != live:
            erased = self._sweep_erased(cube_id, index, generation)
            action = "swept"
        return CatchUp(cube_id, action, index.generation, replayed, erased)

    def _sweep_erased(self, cube_id: str, index: CubeIndex, generation: int) -> int:
        """Erase from the index the live rows it has that the database no longer has as live
        (erased ones leave no row to replay); the index is saved at once, as an erasure here
        saves it, so no file keeps an erased vector."""
        with self.db.read() as s:
            live = set(
                s.scalars(
                    select(Memory.seq).where(Memory.cube_id == cube_id, Memory.deleted_at.is_(None))
                )
            )
        gone = sorted(index.live_seqs() - live)
        if gone:
            index.erase(gone, generation)
            index.save(self.directory(cube_id))
        return len(gone)

    def _reload_locked(self, cube_id: str) -> CatchUp:
        fresh, report = self._load(cube_id)
        with self._guard:
            self._indexes[cube_id] = fresh
            self._sizes[cube_id] = fresh.footprint().bytes
        return CatchUp(cube_id, "reloaded", fresh.generation, report.replayed)

    def save_all(self) -> None:
        for cube_id in list(self._indexes):
            with self._lock(cube_id):
                index = self._indexes.get(cube_id)
                if index is not None and index.dirty:
                    index.save(self.directory(cube_id))


def _apply_change(
    index: CubeIndex, change_seq: int, docs: list[IndexedDoc], gone: list[int]
) -> None:
    """One source transaction's rows: whole to searches when small (`ATOMIC_APPLY_MAX`)."""
    if docs or gone:
        index.apply(docs, gone, change_seq, atomic=len(docs) + len(gone) <= ATOMIC_APPLY_MAX)
