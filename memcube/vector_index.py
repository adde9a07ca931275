"""Approximate nearest-neighbour search over one cube's embeddings with hnswlib.

Labels are the memories' integer `seq`s. The index is a cache of the database: it is saved
beside it with the generation it reflects, and at load the caller replays newer changes or
rebuilds. Saves are atomic per file and the manifest (written last) records the index file's
size and hash, so a crash mid-save is detected and healed by a rebuild, never loaded half-written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np
from pydantic import BaseModel, Field
from safetensors.numpy import load_file, save_file

from memcube.atomic import atomic_path, write_atomic

FORMAT_VERSION = 1


class HnswConfig(BaseModel):
    m: int = Field(16, ge=4, le=128, description="graph degree (hnswlib M)")
    ef_construction: int = Field(200, ge=16, le=2000)
    ef_search: int = Field(128, ge=8, le=5000)
    initial_capacity: int = Field(1024, ge=16)
    threads: int = Field(2, ge=1, le=256, description="threads for bulk inserts")


@dataclass(frozen=True)
class IndexManifest:
    """What a saved index claims to contain."""

    embedder: str
    dim: int
    generation: int
    live: int
    index_bytes: int
    index_blake2b: str


def _hash_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class HnswIndex:
    """hnswlib in inner-product space over unit vectors (so scores are cosine similarities).

    Searches may run concurrently with each other, never with a change (hnswlib's rule): the
    caller (`CubeIndex`) holds a readers-writer lock."""

    def __init__(self, dim: int, config: HnswConfig) -> None:
        self.dim = dim
        self.config = config
        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.init_index(
            max_elements=config.initial_capacity,
            ef_construction=config.ef_construction,
            M=config.m,
        )
        # Set once: hnswlib searches with max(ef, k), so no search needs to change it (and
        # concurrent searches must not race to).
        self._index.set_ef(config.ef_search)
        self._deleted: set[int] = set()

    # -- mutation ---------------------------------------------------------------------------

    def upsert(self, seqs: np.ndarray, vectors: np.ndarray) -> None:
        """seqs: (n,) int64; vectors: (n, dim) float32. Re-adding a label replaces its vector."""
        if len(seqs) == 0:
            return
        needed = self._index.element_count + len(seqs)
        capacity = self._index.get_max_elements()
        if needed > capacity:
            self._index.resize_index(max(needed, capacity * 2))
        revived = [int(s) for s in seqs if int(s) in self._deleted]
        for seq in revived:
            self._index.unmark_deleted(seq)
            self._deleted.discard(seq)
        threads = self.config.threads if len(seqs) >= 32 else 1
        self._index.add_items(vectors, seqs.astype(np.int64), num_threads=threads)

    def delete(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            if seq in self._deleted:
                continue
            try:
                self._index.mark_deleted(seq)
            except RuntimeError:
                continue  # label never indexed: nothing to delete
            self._deleted.add(seq)

    def erase(self, seqs: Iterable[int]) -> None:
        """Delete these labels for good: each stored vector is overwritten with zeros before it
        is marked deleted (hnswlib keeps a deleted label's vector), so neither the graph in
        memory nor a saved copy holds it any more."""
        present = set(int(x) for x in self._index.get_ids_list())
        zero = np.zeros((1, self.dim), dtype=np.float32)
        for seq in seqs:
            if seq not in present:
                continue
            # Re-adding a label (even a deleted one) overwrites its vector in place.
            self._index.add_items(zero, np.array([seq], dtype=np.int64), num_threads=1)
            self._index.mark_deleted(seq)
            self._deleted.add(seq)

    # -- queries ----------------------------------------------------------------------------

    @property
    def live_count(self) -> int:
        return self._index.element_count - len(self._deleted)

    @property
    def element_count(self) -> int:
        return int(self._index.element_count)

    @property
    def deleted_count(self) -> int:
        return len(self._deleted)

    @property
    def nbytes(self) -> int:
        """The graph's allocation as hnswlib lays it out: per element slot of capacity, the
        vector, a level-0 link list (2M links and a count), a label and a link-list pointer;
        upper levels (about 1 element in M) add M links each."""
        m = self.config.m
        per_slot = self.dim * 4 + (2 * m + 1) * 4 + 8 + 8 + (m + 1) * 4 // m
        return int(self._index.get_max_elements()) * per_slot

    def labels(self) -> set[int]:
        """Labels of live (not deleted) vectors."""
        return set(int(x) for x in self._index.get_ids_list()) - self._deleted

    def vectors(self, seqs: list[int]) -> np.ndarray:
        return np.asarray(self._index.get_items(seqs), dtype=np.float32)

    def search(
        self, query: np.ndarray, k: int, accept: Callable[[int], bool] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """query: (dim,) float32 -> (seqs (k',) int64, cosine scores (k',) float32), best first.

        `accept` filters labels during the graph walk. Returns fewer than k results when the
        index (or the filter) cannot supply them.
        """
        k = min(k, self.live_count)
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        try:
            labels, distances = self._index.knn_query(query, k=k, filter=accept)
        except RuntimeError:
            # hnswlib refuses when fewer than k labels pass the filter; the caller falls back
            # to exact search, which is cheap precisely when the filter is that selective.
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        return labels[0].astype(np.int64), (1.0 - distances[0]).astype(np.float32)

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: Path, embedder: str, generation: int) -> IndexManifest:
        directory.mkdir(parents=True, exist_ok=True)
        index_path = directory / "hnsw.bin"
        with atomic_path(index_path) as tmp:
            self._index.save_index(str(tmp))
        deleted = np.array(sorted(self._deleted), dtype=np.int64)
        with atomic_path(directory / "deleted.safetensors") as tmp:
            save_file({"deleted": deleted}, str(tmp))
        manifest = IndexManifest(
            embedder=embedder,
            dim=self.dim,
            generation=generation,
            live=self.live_count,
            index_bytes=index_path.stat().st_size,
            index_blake2b=_hash_file(index_path),
        )
        body = {"format": FORMAT_VERSION, **manifest.__dict__}
        write_atomic(directory / "manifest.json", json.dumps(body, indent=1).encode())
        return manifest

    @classmethod
    def load(
        cls, directory: Path, embedder: str, dim: int, config: HnswConfig
    ) -> tuple[HnswIndex, IndexManifest] | None:
        """The saved index if it is whole and built for this embedder; None otherwise."""
        manifest = read_manifest(directory)
        index_path = directory / "hnsw.bin"
        if manifest is None or manifest.embedder != embedder or manifest.dim != dim:
            return None
        if not index_path.exists() or index_path.stat().st_size != manifest.index_bytes:
            return None
        if _hash_file(index_path) != manifest.index_blake2b:
            return None
        try:
            deleted = load_file(str(directory / "deleted.safetensors"))["deleted"]
        except (OSError, KeyError, ValueError):
            return None
        self = cls(dim, config)
        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.load_index(str(index_path))
        self._index.set_ef(config.ef_search)
        self._deleted = set(int(x) for x in deleted)
        if self.live_count != manifest.live:
            return None
        return self, manifest


def read_manifest(directory: Path) -> IndexManifest | None:
    try:
        body = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if body.pop("format", None) != FORMAT_VERSION:
        return None
    try:
        return IndexManifest(**body)
    except TypeError:
        return None
