from __future__ import annotations

import numpy as np
import pytest

from memcube.vector_index import HnswConfig, HnswIndex, read_manifest


def unit_vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def index() -> tuple[HnswIndex, np.ndarray]:
    vectors = unit_vectors(300)
    ann = HnswIndex(32, HnswConfig(initial_capacity=16))  # forces several resizes
    ann.upsert(np.arange(1000, 1300, dtype=np.int64), vectors)
    return ann, vectors


def test_each_vector_finds_itself_first(index):
    ann, vectors = index
    for i in (0, 17, 299):
        seqs, scores = ann.search(vectors[i], k=3)
        assert seqs[0] == 1000 + i
        assert scores[0] == pytest.approx(1.0, abs=1e-5)
        assert list(scores) == sorted(scores, reverse=True)
    assert ann.live_count == 300


def test_delete_hides_and_readd_revives(index):
    ann, vectors = index
    ann.delete([1005, 1005, 99999])  # repeated and unknown labels are ignored
    assert 1005 not in ann.search(vectors[5], k=5)[0]
    assert ann.live_count == 299 and 1005 not in ann.labels()
    ann.upsert(np.array([1005]), vectors[6:7])  # back, with another vector
    seqs, _ = ann.search(vectors[6], k=2)
    assert set(seqs) == {1005, 1006}
    assert ann.live_count == 300


def test_filter_and_k_beyond_size(index):
    ann, vectors = index
    seqs, _ = ann.search(vectors[0], k=5, accept=lambda seq: seq % 2 == 1)
    assert len(seqs) == 5 and all(s % 2 == 1 for s in seqs)
    assert len(ann.search(vectors[0], k=10_000)[0]) == 300


def test_save_load_roundtrip_keeps_results_and_deletions(index, tmp_path):
    ann, vectors = index
    ann.delete([1001])
    manifest = ann.save(tmp_path, embedder="e:1", generation=42)
    assert read_manifest(tmp_path) == manifest
    loaded, got = HnswIndex.load(tmp_path, "e:1", 32, HnswConfig())
    assert got.generation == 42 and got.live == 299
    for i in (0, 2, 150):
        np.testing.assert_array_equal(loaded.search(vectors[i], 5)[0], ann.search(vectors[i], 5)[0])
    assert 1001 not in loaded.labels()


def test_load_refuses_corrupt_truncated_or_foreign_indexes(index, tmp_path):
    ann, _ = index
    ann.save(tmp_path, embedder="e:1", generation=1)
    assert HnswIndex.load(tmp_path, "other-model", 32, HnswConfig()) is None
    assert HnswIndex.load(tmp_path, "e:1", 64, HnswConfig()) is None
    path = tmp_path / "hnsw.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    assert HnswIndex.load(tmp_path, "e:1", 32, HnswConfig()) is None
    path.write_bytes(bytes(data[:1000]))
    assert HnswIndex.load(tmp_path, "e:1", 32, HnswConfig()) is None
    (tmp_path / "manifest.json").write_text("{not json")
    assert read_manifest(tmp_path) is None
