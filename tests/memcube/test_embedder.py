from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

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
