"""Where a prompt's note chunks sit: found token for token, in order, the rest left as text."""

from __future__ import annotations

import torch

from kv_runtime import ChunkKV, KVCache
from memos.services.activations.blending import find, segments


def chunk(*ids: int) -> ChunkKV:
    shape = (1, 1, len(ids), 2)
    kv = KVCache(keys=(torch.zeros(shape),), values=(torch.zeros(shape),), token_ids=ids)
    return ChunkKV(kv)


def test_find_is_exact_and_starts_where_asked():
    assert find([1, 2, 3, 2, 3], [2, 3], 0) == 1
    assert find([1, 2, 3, 2, 3], [2, 3], 2) == 3
    assert find([1, 2, 3], [3, 4], 0) == -1


def test_chunks_are_placed_in_order_and_the_rest_is_text():
    a, b = chunk(5, 6), chunk(8)
    parts = segments([1, 5, 6, 7, 8, 9], [a, b])
    assert parts == [[1], a, [7], b, [9]]


def test_a_chunk_whose_tokens_do_not_occur_is_left_to_be_computed_as_text():
    a, merged, b = chunk(5, 6), chunk(42), chunk(8)
    assert segments([5, 6, 7, 8], [a, merged, b]) == [a, [7], b]
    # In order only: a chunk found before the one already placed is not taken.
    assert segments([8, 5, 6], [a, b]) == [[8], a]
    assert segments([1, 2], []) == [[1, 2]]
