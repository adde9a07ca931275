"""One cube's in-memory retrieval index: dense (hnswlib or exact) + BM25, fused.

The database is the source of truth; a `CubeIndex` is rebuilt from it (rows, BM25) and from the
saved ANN graph (replaying changes newer than the graph's generation). All methods are
thread-safe. Its configuration is `memcube/retrieval_config.py`; what it reports about itself
(drift, footprint) is `memcube/index_reports.py`; what a hit's shown score means is
`memcube/scores.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from memcube.errors import InvalidArgument
from memcube.fusion import Signal, make_fusion
from memcube.index_reports import PER_ROW_OVERHEAD, DriftReport, IndexFootprint
from memcube.lexical import BM25Index
from memcube.retrieval_config import SEARCH_MODES, RetrievalConfig
from memcube.rows import RowTable
from memcube.rwlock import ReadWriteLock
from memcube.scores import relevance
from memcube.temporal import parse_time_query
from memcube.types import IndexedDoc, ScoredSeq, SearchFilters
from memcube.vector_index import HnswConfig, HnswIndex

__all__ = ["SEARCH_MODES", "CubeIndex", "DriftReport", "IndexFootprint", "RetrievalConfig"]


class CubeIndex:
    def __init__(self, dim: int, embedder: str, hnsw: HnswConfig, config: RetrievalConfig) -> None:
        self.dim = dim
        self.embedder = embedder
        self.hnsw_config = hnsw
        self.config = config
        self.generation = 0  # every database change up to this one is applied
        self.saved_generation = -1
        self._rows = RowTable(dim)
        self._bm25 = BM25Index(config.bm25_k1, config.bm25_b)
        self._ann: HnswIndex | None = None
        self._fusion = make_fusion(
            config.fusion,
            config.rrf_k,
            {"dense": config.dense_weight, "lexical": config.lexical_weight},
        )
        # Searches share it; changes hold it alone, a note at a time (see `apply`).
        self._lock = ReadWriteLock()
        # While an ANN compaction builds a fresh graph outside the lock, the changes applied
        # meanwhile, to replay onto it before the swap.
        self._ann_backlog: list[tuple[list[IndexedDoc], list[int]]] | None = None

    # -- building ---------------------------------------------------------------------------

    def load_rows(self, docs: Iterable[IndexedDoc], generation: int) -> None:
        """Fill rows and BM25 from the database's live memories (ANN comes separately)."""
        with self._lock.write():
            for doc in docs:
                self._bm25.add(self._rows.add(doc), doc.text)
            self.generation = generation

    def restore_ann(self, directory: Path) -> int | None:
        """Load the saved ANN graph; returns the generation it reflects, or None if unusable."""
        loaded = HnswIndex.load(directory, self.embedder, self.dim, self.hnsw_config)
        if loaded is None:
            return None
        with self._lock.write():
            self._ann, manifest = loaded
            self.saved_generation = manifest.generation
            return manifest.generation

    def rebuild_ann(self) -> None:
        """Build the ANN graph from the live rows (the vectors come from the database)."""
        with self._lock.write():
            ann = HnswIndex(self.dim, self.hnsw_config)
            live = np.flatnonzero(self._rows.live[: self._rows.size])
            ann.upsert(self._rows.seqs[live], self._rows.vectors[live])
            self._ann = ann
            self.saved_generation = -1

    def replay_ann(self, docs: list[IndexedDoc], deleted: list[int]) -> None:
        """Bring a restored ANN graph up to date with changes newer than its generation."""
        with self._lock.write():
            assert self._ann is not None, "restore_ann first"
            self._ann.delete(deleted)
            self._upsert_ann(docs)

    # -- changes ----------------------------------------------------------------------------

    def apply(
        self, docs: list[IndexedDoc], deleted: list[int], generation: int, atomic: bool = False
    ) -> None:
        """Apply one committed change set: `docs` added or replaced, `deleted` seqs removed.

        A note at a time, letting waiting searches in between notes: a search sees each note
        whole (before or after its change), and a large change set (an enrichment batch
        re-embeds every note in it, ~1-4 ms of graph repair each) holds searches back for
        one note, not for all of them. `atomic`: no search in between, it sees the whole set
        or none of it (for small sets). The generation moves once the whole set is in."""
        with self._lock.write():
            for seq in deleted:
                self._remove(seq)
                if self._ann is not None:
                    self._ann.delete([seq])
                    if self._ann_backlog is not None:
                        self._ann_backlog.append(([], [seq]))
                if not atomic:
                    self._lock.yield_to_readers()
            for doc in docs:
                self._remove(doc.seq)
                self._bm25.add(self._rows.add(doc), doc.text)
                if self._ann is not None:
                    self._upsert_ann([doc])
                    if self._ann_backlog is not None:
                        self._ann_backlog.append(([doc], []))
                if not atomic:
                    self._lock.yield_to_readers()
            self.generation = max(self.generation, generation)
            if self._rows.dead_count > max(self._rows.live_count, self.config.compact_min_dead):
                self._bm25.compact(self._rows.compact())

    def erase(self, seqs: list[int], generation: int) -> None:
        """Apply an erasure: the notes leave rows, BM25 (their words too) and the ANN graph,
        and every vector they had (any version) is overwritten, in memory and in the graph
        that the next `save` writes."""
        with self._lock.write():
            for seq in seqs:
                self._remove(seq)
            self._rows.erase(seqs)
            self._bm25.prune()
            if self._ann is not None:
                self._ann.erase(seqs)
            self.generation = max(self.generation, generation)

    def _remove(self, seq: int) -> None:
        row = self._rows.remove(seq)
        if row is not None:
            self._bm25.remove(row)

    def _upsert_ann(self, docs: list[IndexedDoc], ann: HnswIndex | None = None) -> None:
        target = ann or self._ann
        assert target is not None
        if docs:
            seqs = np.fromiter((d.seq for d in docs), dtype=np.int64, count=len(docs))
            target.upsert(seqs, np.stack([d.embedding for d in docs]))

    # -- compaction -------------------------------------------------------------------------

    @property
    def ann_needs_compaction(self) -> bool:
        """Deleted HNSW elements outnumber live ones (edits replace in place; deletes only
        mark), and are at least `compact_min_dead`."""
        ann = self._ann
        if ann is None or self._ann_backlog is not None:
            return False
        return ann.deleted_count > max(ann.live_count, self.config.compact_min_dead)

    def compact_ann(self) -> bool:
        """Rebuild the ANN graph from the live rows without its deleted elements. The graph is
        built outside the lock (searches and writes go on against the old one); the changes
        applied meanwhile are replayed onto it before the swap. Returns whether it ran."""
        with self._lock.write():
            if not self.ann_needs_compaction:
                return False
            live = np.flatnonzero(self._rows.live[: self._rows.size])
            seqs, vectors = self._rows.seqs[live].copy(), self._rows.vectors[live].copy()
            self._ann_backlog = []
        try:
            fresh = HnswIndex(self.dim, self.hnsw_config)
            fresh.upsert(seqs, vectors)
            with self._lock.write():
                for docs, deleted in self._ann_backlog:
                    fresh.delete(deleted)
                    self._upsert_ann(docs, fresh)
                self._ann = fresh
                self.saved_generation = -1
        finally:
            self._ann_backlog = None
        return True

    def footprint(self) -> IndexFootprint:
        with self._lock.read():
            ann = self._ann
            rows = self._rows
            return IndexFootprint(
                live=rows.live_count,
                rows=rows.size,
                postings=self._bm25.postings_count,
                terms=self._bm25.term_count,
                ann_elements=0 if ann is None else ann.element_count,
                ann_deleted=0 if ann is None else ann.deleted_count,
                bytes=rows.nbytes
                + self._bm25.nbytes
                + (0 if ann is None else ann.nbytes)
                + PER_ROW_OVERHEAD * rows.size,
            )

    # -- persistence and checks -------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._ann is not None and self.saved_generation != self.generation

    @property
    def live_count(self) -> int:
        return self._rows.live_count

    def live_seqs(self) -> set[int]:
        with self._lock.read():
            return set(self._rows.row_of)

    def save(self, directory: Path) -> None:
        with self._lock.read():
            if self._ann is None:
                return
            self._ann.save(directory, self.embedder, self.generation)
            self.saved_generation = self.generation

    def verify_ann(self, sample: int = 256, seed: int = 0) -> DriftReport:
        """Compare the ANN graph with the rows (which mirror the database)."""
        with self._lock.read():
            if self._ann is None:
                return DriftReport(missing=self._rows.live_count, stale=0, extra=0)
            expected = set(self._rows.row_of)
            present = self._ann.labels()
            missing = expected - present
            extra = present - expected
            common = sorted(expected & present)
            rng = np.random.default_rng(seed)
            picked = (
                rng.choice(common, size=min(sample, len(common)), replace=False).tolist()
                if common
                else []
            )
            stale = 0
            if picked:
                got = self._ann.vectors(picked)
                want = self._rows.vectors[[self._rows.row_of[s] for s in picked]]
                stale = int(np.sum(np.einsum("ij,ij->i", got, want) < 0.999))
            return DriftReport(missing=len(missing), stale=stale, extra=len(extra))

    # -- search -----------------------------------------------------------------------------

    def admissible(self, seqs: list[int], filters: SearchFilters) -> set[int]:
        """Those of `seqs` that are live and pass `filters` (for notes reached through links)."""
        with self._lock.read():
            mask = self._rows.mask(filters)
            return {
                seq
                for seq in seqs
                if (row := self._rows.row_of.get(seq)) is not None and bool(mask[row])
            }

    def relevance(self, query_vector: np.ndarray, query_text: str, seqs: list[int]) -> list[float]:
        """query_vector: (dim,) float32 unit vector. Each seq's absolute relevance to the query
        (`memcube/scores.py`), 0.0 for one no longer live."""
        with self._lock.read():
            out = []
            for seq in seqs:
                row = self._rows.row_of.get(seq)
                if row is None:
                    out.append(0.0)
                    continue
                cosine = float(self._rows.vectors[row] @ query_vector)
                out.append(relevance(cosine, self._bm25.coverage(query_text, row)))
            return out

    def search(
        self,
        query_vector: np.ndarray,
        query_text: str,
        top_k: int,
        filters: SearchFilters = SearchFilters(),
        mode: str = "hybrid",
        exact: bool = False,
    ) -> list[ScoredSeq]:
        """query_vector: (dim,) float32 unit vector. Returns up to top_k hits, best first.

        `mode` "hybrid" fuses dense and BM25; "dense" and "lexical" use one signal alone
        (for diagnosis and benchmarks). `exact` makes the dense search brute force.
        """
        if mode not in SEARCH_MODES:
            raise InvalidArgument(f"unknown search mode {mode!r}; valid: {list(SEARCH_MODES)}")
        with self._lock.read():
            mask = self._rows.mask(filters)
            allowed = int(mask.sum())
            if allowed == 0 or top_k <= 0:
                return []
            if mode == "dense":
                seqs, cosines = self._dense(query_vector, top_k, mask, allowed, filters, exact)
                return [
                    ScoredSeq(seq=int(q), score=float(c), signals={"dense": float(c)})
                    for q, c in zip(seqs.tolist(), cosines.tolist(), strict=True)
                ]
            lexical = self._bm25.scores(query_text, self._rows.size, mask)
            if mode == "lexical":
                top = _top_positive(lexical, top_k)
                return [
                    ScoredSeq(
                        seq=int(self._rows.seqs[r]),
                        score=float(lexical[r]),
                        signals={"lexical": float(lexical[r])},
                    )
                    for r in top.tolist()
                ]
            depth = max(self.config.candidates, 2 * top_k)
            dense_seqs, _ = self._dense(query_vector, depth, mask, allowed, filters, exact)
            # Score the union of both candidate lists on both signals, then rank within it.
            # Plain RRF over the two lists lets a memory that only one retriever found tie
            # with (or lose to) one the other retriever found, even when the first also
            # scores well on the second signal; exact cosines for the union are cheap.
            rows = np.unique(
                np.concatenate(
                    [
                        np.fromiter((self._rows.row_of[s] for s in dense_seqs.tolist()), np.int64),
                        _top_positive(lexical, depth),
                    ]
                )
            )
            seqs = self._rows.seqs[rows]
            dense = self._rows.vectors[rows] @ query_vector
            lex = lexical[rows]
            fused = self._fusion.fuse(
                {
                    "dense": Signal(dense, np.ones(len(rows), dtype=bool)),
                    "lexical": Signal(lex, lex > 0),
                }
            )
            when = parse_time_query(query_text)
            in_time = np.zeros(len(rows), dtype=bool)
            if not when.empty and self.config.temporal_weight > 0:
                in_time = np.fromiter(
                    (when.matches(self._rows.days[r]) for r in rows.tolist()), bool, len(rows)
                )
                fused += self.config.temporal_weight * in_time
        order = np.lexsort((seqs, -fused))[:top_k]
        hits = []
        for i in order.tolist():
            signals = {"dense": float(dense[i])}
            if lex[i] > 0:
                signals["lexical"] = float(lex[i])
            if in_time[i]:
                signals["temporal"] = self.config.temporal_weight
            hits.append(ScoredSeq(seq=int(seqs[i]), score=float(fused[i]), signals=signals))
        return hits

    def _dense(
        self,
        query: np.ndarray,
        depth: int,
        mask: np.ndarray,
        allowed: int,
        filters: SearchFilters,
        exact: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        if exact or self._ann is None or allowed <= self.config.exact_max_rows:
            return self._rows.exact_search(query, depth, mask)
        row_of = self._rows.row_of

        def accept(seq: int) -> bool:
            row = row_of.get(seq)
            return row is not None and bool(mask[row])

        seqs, scores = self._ann.search(query, depth, None if filters.empty else accept)
        if len(seqs) < min(depth, allowed):
            return self._rows.exact_search(query, depth, mask)
        return seqs, scores


def _top_positive(scores: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the k highest positive scores, best first."""
    positive = np.flatnonzero(scores > 0)
    if len(positive) > k:
        part = np.argpartition(-scores[positive], k - 1)[:k]
        positive = positive[part]
    return positive[np.argsort(-scores[positive], kind="stable")]
