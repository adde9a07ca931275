"""Chunked prefill: run a context through the model and capture its KV cache.

Chunks bound the attention's working memory and let a long build report progress; each chunk
takes the model lock separately, so a long build never holds off short requests for its whole
duration.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import DynamicCache

from kv_runtime.cache import KVCache
from kv_runtime.errors import InvalidArgument
from kv_runtime.forward import ModelRunner, ProgressCallback


def prefill(
    runner: ModelRunner,
    token_ids: Sequence[int],
    *,
    chunk_tokens: int,
    on_progress: ProgressCallback | None = None,
) -> KVCache:
    """Prefill `token_ids` (at positions 0..n-1) and return the captured cache.

    returns: KVCache with keys/values (1, kv_heads, n, head_dim) per layer in the model dtype.
    `on_progress(done_tokens, total_tokens)` is called after every chunk; an exception it
    raises aborts the prefill (how a job is cancelled).
    """
    if not token_ids:
        raise InvalidArgument("cannot prefill an empty context: token_ids is empty")
    assert chunk_tokens > 0, "chunk_tokens must be positive"
    cache = DynamicCache()
    total = len(token_ids)
    for start in range(0, total, chunk_tokens):
        piece = token_ids[start : start + chunk_tokens]
        runner.forward(piece, cache, start)
        if on_progress is not None:
            on_progress(start + len(piece), total)
    return KVCache.from_transformers(cache, token_ids)
