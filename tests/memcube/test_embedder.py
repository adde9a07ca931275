from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from memcube.embed_lanes import Kind, Lane, Recorder
from memcube.embedder import Embedder, EmbedderConfig, packaged_minilm_path

TEXTS = [
    "I adopted a golden retriever called Max.",
    "short",
    "A much longer sentence about hiking in the mountains near Grenoble with old friends, "
    "which keeps going so that padding inside a batch actually matters for the result.",
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    model = SentenceTransformer(packaged_minilm_path(), device="cpu")
    return model.encode(TEXTS, normalize_embeddings=True)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_fp32_backends_match_sentence_transformers(backend, model_cache, reference):
    ours = Embedder(EmbedderConfig(backend=backend, cache_dir=model_cache)).embed(TEXTS)
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.einsum("ij,ij->i", ours, reference), 1.0, atol=1e-5)


def test_int8_backend_is_close_but_a_different_space(model_cache, reference):
    int8 = Embedder(EmbedderConfig(backend="torch-int8", cache_dir=model_cache))
    cosine = np.einsum("ij,ij->i", int8.embed(TEXTS), reference)
    assert np.all(cosine > 0.8) and np.all(cosine < 0.9999)
    assert int8.fingerprint == "all-MiniLM-L6-v2:int8:384"


def test_batch_order_and_single_query_agree(embedder):
    batch = embedder.embed(TEXTS)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(embedder.embed_one(text), batch[i], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)
    assert embedder.fingerprint == "all-MiniLM-L6-v2:fp32:384"


def test_long_text_is_cut_before_tokenizing(embedder):
    limit = embedder.config.max_chars
    assert limit == 256 * 8
    huge = "".join(f"word{i} and " for i in range(120_000))[: 1 << 20]  # 1 MiB
    before = embedder.stats()
    vector = embedder.embed([huge, "short"])[0]
    after = embedder.stats()
    # Exactly the cut text and the short one reached the tokenizer.
    assert after.chars_tokenized - before.chars_tokenized == limit + len("short")
    assert after.texts_cut - before.texts_cut == 1
    # The cut loses nothing the model reads: its first 256 tokens lie inside the cut.
    assert len(embedder._bulk_tokenizer([huge[:limit]])["input_ids"][0]) == 256
    np.testing.assert_array_equal(vector, embedder.embed([huge[:limit]])[0])


def test_query_and_background_lanes_match_the_bulk_lane(embedder):
    assert list(embedder._bulk._forwards) == [Kind.BACKGROUND]  # its own one-thread session
    batch = embedder.embed(TEXTS)
    np.testing.assert_allclose(embedder.embed_background(TEXTS), batch, atol=1e-5)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(embedder.embed_query(text), batch[i], atol=1e-5)


def _background(embedder, count: int, threads: int) -> tuple[list[threading.Thread], int]:
    """Start `threads` background batches of `count` texts; return once each is inside its
    batch, with the number of background forwards served by then."""
    texts = [f"note {i}: we talked about hiking, dogs and the weather in May" for i in range(count)]
    start = embedder.stats().forwards.get("background", 0)
    workers = [
        threading.Thread(target=embedder.embed_background, args=(texts,), daemon=True)
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    while (served := embedder.stats().forwards.get("background", 0) - start) < threads:
        time.sleep(0.005)
    return workers, served


def _background_before(embedder, lane: str, kind: str, since: int) -> int:
    """Background forwards served from serial `since` until the last `kind` forward on `lane`."""
    served = embedder.stats().served
    last = max(serial for serial, *entry in served if entry == [lane, kind])
    return sum(1 for serial, _, k in served if since <= serial < last and k == "background")


def _next_serial(embedder) -> int:
    return sum(embedder.stats().forwards.values())


@pytest.fixture(scope="module")
def one_lane(model_cache):
    """Queries share the bulk lane; background work goes one text per forward."""
    shared = Embedder(EmbedderConfig(cache_dir=model_cache, query_threads=0, background_chunk=1))
    yield shared
    shared.close()


@pytest.mark.parametrize("kind", ["query", "write"])
def test_urgent_work_overtakes_queued_background_chunks(one_lane, kind):
    """Three enrichment-sized batches are in progress on the one lane; a query (or an add)
    submitted now is served right after the forward in flight, ahead of every queued chunk."""
    since = _next_serial(one_lane)
    workers, served = _background(one_lane, count=60, threads=3)
    if kind == "query":
        one_lane.embed_query("what did we talk about in May?")
    else:
        one_lane.embed(["a new note someone is waiting to store"])
    assert _background_before(one_lane, "bulk", kind, since) <= served + 1  # + the one in flight
    for worker in workers:
        worker.join()


def test_queries_have_their_own_lane(embedder):
    """With a query lane (the default), a search's query never enters the bulk lane's queue:
    it is served while a large background batch is still in progress."""
    since = _next_serial(embedder)
    workers, _ = _background(embedder, count=512, threads=1)
    embedder.embed_query("what did we talk about in May?")
    served = [entry for serial, *entry in embedder.stats().served if serial >= since]
    assert ["bulk", "query"] not in served and ["query", "query"] in served
    # Served before the batch's remaining chunks: 512 texts are 64 forwards of 8.
    assert _background_before(embedder, "query", "query", since) < 64
    for worker in workers:
        worker.join()


def test_a_kind_with_a_forward_of_its_own_runs_it_on_the_lane():
    """How background work gets its one-thread session: the lane picks the forward by kind."""

    def bulk(batch):
        return np.zeros((len(batch["input_ids"]), 2), np.float32)

    def background(batch):
        return np.ones((len(batch["input_ids"]), 2), np.float32)

    lane = Lane("bulk", bulk, Recorder(), {Kind.BACKGROUND: background})
    batch = {"input_ids": np.zeros((3, 4), np.int64)}
    try:
        assert lane.run(Kind.BACKGROUND, batch).tolist() == [[1.0, 1.0]] * 3
        assert lane.run(Kind.WRITE, batch).tolist() == [[0.0, 0.0]] * 3
        assert lane.run(Kind.QUERY, batch).tolist() == [[0.0, 0.0]] * 3
    finally:
        lane.close()


def test_background_embedding_pauses_before_each_chunk(embedder):
    """The caller's `pause` runs before every background forward: 20 texts are 3 chunks."""
    calls: list[int] = []
    texts = [f"note {i} about the lake" for i in range(20)]
    vectors = embedder.embed_background(texts, pause=lambda: calls.append(len(calls)))
    assert calls == [0, 1, 2]
    np.testing.assert_allclose(vectors, embedder.embed(texts), atol=1e-5)
