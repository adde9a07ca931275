from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from memcube.errors import InvalidArgument
from memcube.fusion import ReciprocalRankFusion, Signal, ZScoreFusion, make_fusion
from memcube.retrieval import CubeIndex, RetrievalConfig
from memcube.types import IndexedDoc, SearchFilters
from memcube.vector_index import HnswConfig

T0 = datetime(2023, 1, 1, tzinfo=UTC)


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def docs(n: int, dim: int = 16, seed: int = 0) -> list[IndexedDoc]:
    rng = np.random.default_rng(seed)
    return [
        IndexedDoc(
            seq=i,
            text=f"memory number{i} about topic{i % 7}",
            embedding=unit(rng.normal(size=dim)),
            session_id=f"s{i % 3}",
            timestamp=T0 + timedelta(days=i),
            metadata={"parity": i % 2, "tag": "x" if i < 5 else "y"},
        )
        for i in range(n)
    ]


def make_index(items: list[IndexedDoc], exact_max_rows: int = 0) -> CubeIndex:
    index = CubeIndex(16, "test:1", HnswConfig(), RetrievalConfig(exact_max_rows=exact_max_rows))
    index.load_rows(items, generation=1)
    index.rebuild_ann()
    return index


def test_rrf_ranks_only_what_each_signal_matched():
    signals = {
        "dense": Signal(np.array([0.9, 0.8, 0.1]), np.array([True, True, False])),
        "lexical": Signal(np.array([0.0, 3.0, 2.0]), np.array([False, True, True])),
    }
    fused = ReciprocalRankFusion(k=60, weights={"dense": 2.0}).fuse(signals)
    assert fused.tolist() == pytest.approx([2 / 61, 2 / 62 + 1 / 61, 1 / 62])


def test_zscore_fusion_is_a_weighted_sum_of_standardised_scores():
    dense = np.array([0.9, 0.6, 0.3])  # mean 0.6, std sqrt(0.06)
    lexical = np.array([0.0, 4.0, 4.0])  # a constant signal would add nothing
    fused = ZScoreFusion(weights={"dense": 0.5, "lexical": 2.0}).fuse(
        {"dense": Signal(dense, np.ones(3, bool)), "lexical": Signal(lexical, lexical > 0)}
    )
    z_dense = np.maximum((dense - 0.6) / np.sqrt(0.06), -1.0)  # floored at -1 by default
    z_lexical = np.maximum((lexical - lexical.mean()) / lexical.std(), -1.0)
    assert z_dense[2] == z_lexical[0] == -1.0  # the floor did apply
    assert fused.tolist() == pytest.approx((0.5 * z_dense + 2.0 * z_lexical).tolist())
    constant = ZScoreFusion().fuse({"dense": Signal(np.full(3, 0.5), np.ones(3, bool))})
    assert constant.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(InvalidArgument, match="valid: \\['rrf', 'zscore'\\]"):
        make_fusion("borda", 60, {})


def test_a_unique_exact_token_wins_even_with_a_low_cosine():
    rng = np.random.default_rng(7)
    centre = unit(rng.normal(size=16))
    items = [
        IndexedDoc(i, f"note about topic {i}", unit(centre + 0.5 * rng.normal(size=16)), None, T0)
        for i in range(60)
    ]
    items.append(IndexedDoc(60, "order code zq81x7", unit(-centre), None, T0))  # cosine ~ -1
    index = make_index(items, exact_max_rows=4096)
    hits = index.search(centre, "zq81x7", top_k=3)
    assert hits[0].seq == 60 and hits[0].signals["dense"] < 0 < hits[0].signals["lexical"]


def test_hybrid_prefers_a_doc_strong_on_both_signals():
    items = docs(50)
    index = make_index(items)
    query = items[10].embedding
    hits = index.search(query, "number10", top_k=3)
    assert hits[0].seq == 10
    assert hits[0].signals["lexical"] > 0 and hits[0].signals["dense"] == pytest.approx(1, abs=1e-5)


def test_modes_rank_by_one_signal():
    items = docs(50)
    index = make_index(items)
    dense = index.search(items[3].embedding, "number7", 1, mode="dense")
    lexical = index.search(items[3].embedding, "number7", 1, mode="lexical")
    assert (dense[0].seq, lexical[0].seq) == (3, 7)
    assert set(dense[0].signals) == {"dense"} and set(lexical[0].signals) == {"lexical"}
    with pytest.raises(InvalidArgument):
        index.search(items[3].embedding, "x", 1, mode="magic")


@pytest.mark.parametrize("exact_max_rows", [0, 10_000])  # filtered ANN walk, and brute force
def test_filters_restrict_every_path(exact_max_rows):
    items = docs(60)
    index = make_index(items, exact_max_rows)

    def seqs(**kw):
        return {h.seq for h in index.search(items[0].embedding, "memory", 100, SearchFilters(**kw))}

    assert seqs(session_id="s1") == {i for i in range(60) if i % 3 == 1}
    assert seqs(since=T0 + timedelta(days=50)) == set(range(50, 60))
    assert seqs(until=T0 + timedelta(days=3)) == {0, 1, 2}
    assert seqs(metadata={"tag": "x", "parity": 1}) == {1, 3}
    assert seqs(session_id="none") == set()


def test_apply_replaces_and_deletes():
    items = docs(20)
    index = make_index(items)
    moved = IndexedDoc(3, "now about zeppelins", items[7].embedding, "s9", T0, {})
    index.apply([moved], deleted=[7], generation=2)
    assert index.generation == 2 and index.live_count == 19
    assert [h.seq for h in index.search(items[7].embedding, "zeppelins", 1)] == [3]
    assert 7 not in {h.seq for h in index.search(items[7].embedding, "memory", 50)}
    assert {
        h.seq for h in index.search(items[0].embedding, "x", 50, SearchFilters(session_id="s9"))
    } == {3}
    assert index.verify_ann().clean


def test_verify_ann_detects_every_kind_of_drift():
    items = docs(30)
    index = make_index(items)
    ann = index._ann
    ann.upsert(np.array([4]), items[5].embedding[None, :])  # stale vector
    ann.delete([6])  # missing
    ann.upsert(np.array([999]), items[0].embedding[None, :])  # extra
    drift = index.verify_ann(sample=1000)
    assert (drift.missing, drift.stale, drift.extra) == (1, 1, 1)
    index.rebuild_ann()
    assert index.verify_ann(sample=1000).clean


def test_ann_agrees_with_exact_search():
    items = docs(3000, dim=16, seed=1)
    index = make_index(items)
    rng = np.random.default_rng(2)
    overlap = []
    for _ in range(50):
        q = unit(rng.normal(size=16))
        ann = {h.seq for h in index.search(q, "", 10, mode="dense")}
        exact = {h.seq for h in index.search(q, "", 10, mode="dense", exact=True)}
        overlap.append(len(ann & exact) / 10)
    assert np.mean(overlap) >= 0.98


# -- no unbounded growth ------------------------------------------------------------------

OTHERS = [
    "Sven repaired the old bicycle in the garage",
    "Olga sailed a dinghy across the bay at dawn",
    "Priya planted tomatoes and basil on the balcony",
]
QUERY = "who baked bread?"


def _note(seq: int, text: str, vector: np.ndarray) -> IndexedDoc:
    return IndexedDoc(seq, text, vector, "s1", T0 + timedelta(minutes=seq), {"k": seq % 2})


def _real_index(embedder, first: str) -> tuple[CubeIndex, np.ndarray]:
    """Four real notes (seq 0 is `first`), ANN searched whatever the size."""
    vectors = embedder.embed([first, *OTHERS])
    index = CubeIndex(384, "test:1", HnswConfig(), RetrievalConfig(exact_max_rows=0))
    texts = [first, *OTHERS]
    index.load_rows([_note(s, texts[s], vectors[s]) for s in range(4)], generation=1)
    index.rebuild_ann()
    return index, embedder.embed_query(QUERY)


def test_one_note_edited_20000_times_keeps_the_index_flat(embedder):
    variants = [f"Noor baked a {bread} loaf this morning" for bread in
                ("sourdough", "rye", "brioche", "spelt", "focaccia")]  # fmt: skip
    vectors = embedder.embed(variants)
    index, query = _real_index(embedder, variants[0])
    initial = index.footprint()
    baseline = index.search(query, QUERY, 4)
    assert [hit.seq for hit in baseline][0] == 0
    period = index.config.compact_min_dead + 1  # dead rows that outnumber 1024, then compacted
    assert period % len(variants) == 0  # each period ends on the first variant again
    for n in range(1, 20 * period + 1):
        k = n % len(variants)
        index.apply([_note(0, variants[k], vectors[k])], [], generation=1 + n)
        index.compact_ann()  # as the registry does after each write: nothing to do for edits
        if n % 1000 == 0:
            assert index.footprint().rows == 4 + n % period
        if n % period == 0:
            # The same four notes: every count and byte, and every hit and score, as at first.
            assert index.footprint() == initial
            assert index.search(query, QUERY, 4) == baseline
    assert (initial.live, initial.rows, initial.ann_elements, initial.ann_deleted) == (4, 4, 4, 0)


def test_add_delete_churn_compacts_rows_and_the_graph(embedder):
    index, query = _real_index(embedder, "Noor baked a sourdough loaf this morning")
    initial = index.footprint()
    baseline = index.search(query, QUERY, 4)
    passing = embedder.embed(["a passing note about kites"])[0]
    period = index.config.compact_min_dead + 1
    generation = 1
    for cycle in range(1, 2 * period + 1):
        seq = 100 + cycle
        index.apply([_note(seq, "a passing note about kites", passing)], [], generation + 1)
        index.apply([], [seq], generation + 2)
        generation += 2
        assert index.compact_ann() == (cycle % period == 0)  # deleted graph elements > 1024
        if cycle % 500 == 0:
            footprint = index.footprint()
            assert (footprint.rows, footprint.ann_elements) == (4 + cycle % period,) * 2
            assert footprint.ann_deleted == cycle % period
        if cycle % period == 0:
            assert index.footprint() == initial
            assert index.search(query, QUERY, 4) == baseline


def test_a_search_does_not_wait_for_a_whole_change_set():
    """An enrichment batch re-applies many notes at once; a search that comes while it is
    being applied gets in between two notes instead of waiting for all of them, so it can see
    the batch part-way (and each note whole: before or after its change)."""
    items = docs(400, dim=64)
    index = CubeIndex(64, "test:1", HnswConfig(), RetrievalConfig())
    index.load_rows(items, generation=1)
    index.rebuild_ann()
    rng = np.random.default_rng(1)
    changed = [
        IndexedDoc(d.seq, f"{d.text} enriched", unit(rng.normal(size=64)), d.session_id,
                   d.timestamp, d.metadata)
        for d in items
    ]  # fmt: skip
    seen: list[int] = []
    started, applied = threading.Event(), threading.Event()

    def search_until_applied() -> None:
        while True:
            done = applied.is_set()
            hits = index.search(unit(rng.normal(size=64)), "enriched", 400, mode="lexical")
            seen.append(len(hits))
            started.set()
            if done:
                return

    reader = threading.Thread(target=search_until_applied)
    reader.start()
    started.wait(30)
    index.apply(changed, [], generation=2)
    applied.set()
    reader.join(60)
    assert seen[-1] == 400 and index.generation == 2
    assert any(0 < n < 400 for n in seen), f"searches saw only {sorted(set(seen))}"
