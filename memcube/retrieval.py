"""One cube's in-memory retrieval index: dense (hnswlib or exact) + BM25, fused.

The database is the source of truth; a `CubeIndex` is rebuilt from it (rows, BM25) and from the
saved ANN graph (replaying changes newer than the graph's generation). All methods are
thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from memcube.errors import InvalidArgument
from memcube.fusion import Signal, make_fusion
from memcube.lexical import BM25Index
from memcube.rows import RowTable
from memcube.temporal import parse_time_query
from memcube.types import IndexedDoc, ScoredSeq, SearchFilters
from memcube.vector_index import HnswConfig, HnswIndex

SEARCH_MODES = ("hybrid", "dense", "lexical")


class RetrievalConfig(BaseModel):
    # Defaults measured on LoCoMo (docs/benchmarks.md); see memcube/fusion.py.
    fusion: str = "zscore"
    rrf_k: float = Field(60.0, gt=0, description="k of the rrf fusion")
    dense_weight: float = Field(0.55, ge=0)
    lexical_weight: float = Field(0.45, ge=0)
    temporal_weight: float = Field(
        1.0,
        ge=0,
        description="bonus for notes in a time the query names (memcube/temporal.py), in units "
        "of the fused score: 1.0 is one standard deviation under zscore; far less suits rrf",
    )
    candidates: int = Field(50, ge=1, le=10_000, description="depth of each ranked list fused")
    exact_max_rows: int = Field(
        4096, ge=0, description="search exactly when at most this many rows pass the filters"
    )
    link_from: int = Field(
        5, ge=0, le=100, description="link expansion: how many top hits spread score to links"
    )
    link_weights: dict[str, float] = Field(
        # Measured on LoCoMo (docs/benchmarks.md): follows 0.5 lifts recall@10 0.6005 -> 0.6475;
        # similar or same_entity at 0.3 on top lower it to ~0.55, so they stay off.
        default_factory=lambda: {"follows": 0.5, "similar": 0.0, "same_entity": 0.0},
        description="share of a top hit's score each linked note gains, by link kind",
    )
    bm25_k1: float = Field(1.2, gt=0)
    bm25_b: float = Field(0.75, ge=0, le=1)


@dataclass(frozen=True)
class DriftReport:
    missing: int  # live in the database, absent from the ANN index
    stale: int  # present but its vector differs from the database's
    extra: int  # live in the ANN index, deleted or unknown in the database

    @property
    def clean(self) -> bool:
        return self.missing == self.stale == self.extra == 0


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
        self._lock = threading.RLock()

    # -- building ---------------------------------------------------------------------------

    def load_rows(self, docs: Iterable[IndexedDoc], generation: int) -> None:
        """Fill rows and BM25 from the database's live memories (ANN comes separately)."""
        with self._lock:
            for doc in docs:
                self._bm25.add(self._rows.add(doc), doc.text)
            self.generation = generation

    def restore_ann(self, directory: Path) -> int | None:
        """Load the saved ANN graph; returns the generation it reflects, or None if unusable."""
        loaded = HnswIndex.load(directory, self.embedder, self.dim, self.hnsw_config)
        if loaded is None:
            return None
        with self._lock:
            self._ann, manifest = loaded
            self.saved_generation = manifest.generation
            return manifest.generation

    def rebuild_ann(self) -> None:
        """Build the ANN graph from the live rows (the vectors come from the database)."""
        with self._lock:
            ann = HnswIndex(self.dim, self.hnsw_config)
            live = np.flatnonzero(self._rows.live[: self._rows.size])
            ann.upsert(self._rows.seqs[live], self._rows.vectors[live])
            self._ann = ann
            self.saved_generation = -1

    def replay_ann(self, docs: list[IndexedDoc], deleted: list[int]) -> None:
        """Bring a restored ANN graph up to date with changes newer than its generation."""
        with self._lock:
            assert self._ann is not None, "restore_ann first"
            self._ann.delete(deleted)
            self._upsert_ann(docs)

    # -- changes ----------------------------------------------------------------------------

    def apply(self, docs: list[IndexedDoc], deleted: list[int], generation: int) -> None:
        """Apply one committed change set: `docs` added or replaced, `deleted` seqs removed."""
        with self._lock:
            for seq in deleted:
                self._remove(seq)
            for doc in docs:
                self._remove(doc.seq)
                self._bm25.add(self._rows.add(doc), doc.text)
            if self._ann is not None:
                self._ann.delete(deleted)
                self._upsert_ann(docs)
            self.generation = max(self.generation, generation)

    def erase(self, seqs: list[int], generation: int) -> None:
        """Apply an erasure: the notes leave rows, BM25 (their words too) and the ANN graph,
        and every vector they had (any version) is overwritten, in memory and in the graph
        that the next `save` writes."""
        with self._lock:
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

    def _upsert_ann(self, docs: list[IndexedDoc]) -> None:
        assert self._ann is not None
        if docs:
            seqs = np.fromiter((d.seq for d in docs), dtype=np.int64, count=len(docs))
            self._ann.upsert(seqs, np.stack([d.embedding for d in docs]))

    # -- persistence and checks -------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._ann is not None and self.saved_generation != self.generation

    @property
    def live_count(self) -> int:
        return self._rows.live_count

    def save(self, directory: Path) -> None:
        with self._lock:
            if self._ann is None:
                return
            self._ann.save(directory, self.embedder, self.generation)
            self.saved_generation = self.generation

    def verify_ann(self, sample: int = 256, seed: int = 0) -> DriftReport:
        """Compare the ANN graph with the rows (which mirror the database)."""
        with self._lock:
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
        with self._lock:
            mask = self._rows.mask(filters)
            return {
                seq
                for seq in seqs
                if (row := self._rows.row_of.get(seq)) is not None and bool(mask[row])
            }

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
        with self._lock:
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
