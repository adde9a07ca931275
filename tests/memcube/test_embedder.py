from __future__ import annotations

import numpy as np
from sentence_transformers import SentenceTransformer

from memcube.embedder import packaged_minilm_path

TEXTS = [
    "I adopted a golden retriever called Max.",
    "short",
    "A much longer sentence about hiking in the mountains near Grenoble with old friends, "
    "which keeps going so that padding inside a batch actually matters for the result.",
]


def test_vectors_match_sentence_transformers(embedder):
    reference = SentenceTransformer(packaged_minilm_path(), device="cpu").encode(
        TEXTS, normalize_embeddings=True
    )
    ours = embedder.embed(TEXTS)
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.einsum("ij,ij->i", ours, reference), 1.0, atol=1e-5)


def test_batch_order_and_single_query_agree(embedder):
    batch = embedder.embed(TEXTS)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(embedder.embed_one(text), batch[i], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)
    assert embedder.fingerprint == "all-MiniLM-L6-v2:torch:384"
