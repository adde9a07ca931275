"""Blending chunk caches: exact where the maths says it must be, and honest about the rest.

What holds exactly (to float rounding), and is asserted as such:
- a re-rotated chunk equals, in every layer, a prefill of the same tokens (after the same
  preamble) started at the new position: attention only sees relative positions;
- recompute_ratio = 1 equals a full prefill of the whole prompt (logits and cache);
- layer 0 never depends on context, so even unrecomputed chunks match a full prefill there;
- with a ratio in between, layers 0..check_layer match a full prefill, the rest of the chunk
  entries are either the cached ones (bit for bit) or recomputed, as counted.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from kv_runtime import InvalidArgument, KVCache, Runtime
from kv_runtime.blend import BlendResult, ChunkKV, build_chunk, rerotate
from kv_runtime.rope import Rotary

PREFIX = "<|im_start|>system\nAnswer from the notes below."
NOTE_A = "\nNote: Caroline keeps her old telescope in the attic of the blue house."
NOTE_B = "\nNote: Melanie teaches a pottery class on Tuesday evenings."
QUESTION = "\nQuestion: What does Melanie teach? Answer:"
TOL = {"atol": 2e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def ids(runtime: Runtime) -> dict[str, list[int]]:
    return {name: runtime.tokenize(text) for name, text in
            {"pre": PREFIX, "a": NOTE_A, "b": NOTE_B, "q": QUESTION}.items()}  # fmt: skip


@pytest.fixture(scope="module")
def chunks(runtime: Runtime, ids: dict[str, list[int]]) -> dict[str, ChunkKV]:
    return {"a": runtime.build_chunk(ids["a"]), "b": runtime.build_chunk(ids["b"])}


@pytest.fixture(scope="module")
def prefix(runtime: Runtime, ids: dict[str, list[int]]) -> KVCache:
    return runtime.prefill(ids["pre"])


@pytest.fixture(scope="module")
def full(runtime: Runtime, ids: dict[str, list[int]]) -> tuple[KVCache, torch.Tensor]:
    """A full prefill of prefix + note A + note B + question, and its last token's logits."""
    whole = ids["pre"] + ids["a"] + ids["b"] + ids["q"]
    return runtime.prefill(whole), runtime.logits(whole)[-1]


def _blend(
    runtime: Runtime,
    prefix: KVCache,
    chunks: dict[str, ChunkKV],
    ids: dict[str, list[int]],
    **options: Any,
) -> BlendResult:
    """prefix | note A | note B | question, the notes from their chunks."""
    return runtime.blend([chunks["a"], chunks["b"], ids["q"]], prefix, **options)


def _span(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return tensor[:, :, start:stop]


def _prefill_at(runtime: Runtime, token_ids: list[int], start: int) -> KVCache:
    """The tokens prefilled alone, their positions starting at `start`."""
    cache = DynamicCache()
    runtime.runner.forward(token_ids, cache, start)
    return KVCache.from_transformers(cache, token_ids)


# -- re-rotation ----------------------------------------------------------------------------


def test_a_rerotated_chunk_equals_a_prefill_at_its_new_position(
    runtime: Runtime, ids: dict[str, list[int]], chunks: dict[str, ChunkKV]
) -> None:
    rotary = Rotary(runtime.runner.model)
    moved = rerotate(chunks["a"], 37, rotary)
    there = _prefill_at(runtime, ids["a"], 37)
    assert moved.start == 37 and moved.token_ids == tuple(ids["a"])
    for layer in range(there.layers):
        torch.testing.assert_close(moved.kv.keys[layer], there.keys[layer], **TOL)
        torch.testing.assert_close(moved.kv.values[layer], there.values[layer], **TOL)
        # Without the rotation the keys are far off: the test above could fail.
        assert (chunks["a"].kv.keys[layer] - there.keys[layer]).abs().max() > 0.1
    back = rerotate(moved, 0, rotary)
    for layer in range(there.layers):
        torch.testing.assert_close(back.kv.keys[layer], chunks["a"].kv.keys[layer], **TOL)
    assert rerotate(chunks["a"], 0, rotary) is chunks["a"]


def test_a_chunk_built_after_a_preamble_moves_with_it(
    runtime: Runtime, ids: dict[str, list[int]]
) -> None:
    preamble = ids["pre"]
    chunk = runtime.build_chunk(ids["b"], preamble=preamble)
    assert chunk.start == len(preamble) and chunk.length == len(ids["b"])
    moved = rerotate(chunk, 50, Rotary(runtime.runner.model))
    # The same preamble + chunk, prefilled so that the chunk starts at 50.
    there = _prefill_at(runtime, preamble + ids["b"], 50 - len(preamble))
    cut = len(preamble)
    for layer in range(there.layers):
        torch.testing.assert_close(moved.kv.keys[layer], there.keys[layer][:, :, cut:], **TOL)
        torch.testing.assert_close(moved.kv.values[layer], there.values[layer][:, :, cut:], **TOL)


# -- blending -------------------------------------------------------------------------------


def test_recomputing_every_token_equals_a_full_prefill(
    runtime: Runtime,
    ids: dict[str, list[int]],
    chunks: dict[str, ChunkKV],
    prefix: KVCache,
    full: tuple[KVCache, torch.Tensor],
) -> None:
    kept = [t.clone() for t in (*chunks["a"].kv.keys, *chunks["b"].kv.values)]
    result = _blend(runtime, prefix, chunks, ids, recompute_ratio=1.0)
    cache, logits = full
    assert result.kv.token_ids == cache.token_ids
    assert result.logits is not None
    torch.testing.assert_close(result.logits, logits, atol=1e-3, rtol=1e-4)
    for layer in range(cache.layers):
        torch.testing.assert_close(result.kv.keys[layer], cache.keys[layer], **TOL)
        torch.testing.assert_close(result.kv.values[layer], cache.values[layer], **TOL)
    chunk_tokens = len(ids["a"]) + len(ids["b"])
    assert (result.recomputed_tokens, result.reused_tokens, result.new_tokens) == (
        chunk_tokens,
        len(ids["pre"]),
        len(ids["q"]),
    )
    start = len(ids["pre"])
    assert result.recomputed == tuple(range(start, start + chunk_tokens))
    # The chunks' own tensors were read, never written.
    after = (*chunks["a"].kv.keys, *chunks["b"].kv.values)
    assert all(torch.equal(a, b) for a, b in zip(after, kept, strict=True))


def test_a_generation_continues_a_blend_like_a_full_prompt(
    runtime: Runtime, ids: dict[str, list[int]], chunks: dict[str, ChunkKV], prefix: KVCache
) -> None:
    whole = ids["pre"] + ids["a"] + ids["b"] + ids["q"]
    expected = runtime.generate(whole, max_tokens=8).collect().token_ids
    blended = _blend(runtime, prefix, chunks, ids, recompute_ratio=1.0)
    assert runtime.generate([], kv=blended.kv, max_tokens=8).collect().token_ids == expected
    assert len(expected) > 0


def test_new_text_between_chunks_without_a_prefix_is_exact_at_ratio_one(
    runtime: Runtime, ids: dict[str, list[int]], chunks: dict[str, ChunkKV]
) -> None:
    result = runtime.blend([chunks["a"], ids["b"], chunks["a"], ids["q"]], recompute_ratio=1.0)
    whole = ids["a"] + ids["b"] + ids["a"] + ids["q"]
    assert result.logits is not None
    torch.testing.assert_close(result.logits, runtime.logits(whole)[-1], atol=1e-3, rtol=1e-4)
    assert result.new_tokens == len(ids["b"]) + len(ids["q"])
    assert result.recomputed_tokens == 2 * len(ids["a"]) and result.reused_tokens == 0


def test_no_recompute_keeps_the_cached_entries_and_prefills_new_text_on_them(
    runtime: Runtime,
    ids: dict[str, list[int]],
    chunks: dict[str, ChunkKV],
    prefix: KVCache,
    full: tuple[KVCache, torch.Tensor],
) -> None:
    result = _blend(runtime, prefix, chunks, ids, recompute_ratio=0.0)
    a0 = len(ids["pre"])
    b0 = a0 + len(ids["a"])
    q0 = b0 + len(ids["b"])
    rotary = Rotary(runtime.runner.model)
    placed_a, placed_b = rerotate(chunks["a"], a0, rotary), rerotate(chunks["b"], b0, rotary)
    for layer in range(result.kv.layers):
        keys, values = result.kv.keys[layer], result.kv.values[layer]
        assert torch.equal(_span(keys, a0, b0), placed_a.kv.keys[layer])
        assert torch.equal(_span(keys, b0, q0), placed_b.kv.keys[layer])
        assert torch.equal(_span(values, a0, b0), chunks["a"].kv.values[layer])
        assert torch.equal(_span(values, b0, q0), chunks["b"].kv.values[layer])
        assert torch.equal(_span(keys, 0, a0), prefix.keys[layer])
    # Layer 0 is context-free: the unrecomputed chunks match a full prefill there, not above.
    cache, logits = full
    torch.testing.assert_close(
        _span(result.kv.keys[0], a0, q0), _span(cache.keys[0], a0, q0), **TOL
    )
    top = cache.layers - 1
    assert (
        _span(result.kv.values[top], b0, q0) - _span(cache.values[top], b0, q0)
    ).abs().max() > 0.1
    assert result.logits is not None
    assert (result.logits - logits).abs().max() > 0.1
    # The question was prefilled normally on top of the reused entries.
    reused = KVCache(
        keys=tuple(_span(k, 0, q0) for k in result.kv.keys),
        values=tuple(_span(v, 0, q0) for v in result.kv.values),
        token_ids=result.kv.token_ids[:q0],
    )
    torch.testing.assert_close(
        result.logits, runtime.logits(ids["q"], reused)[-1], atol=1e-3, rtol=1e-4
    )
    assert (result.recomputed_tokens, result.reused_tokens, result.new_tokens) == (
        0,
        q0,
        len(ids["q"]),
    )
    # A chunk last and not recomputed has no logits of its own.
    assert runtime.blend([chunks["a"]], prefix, recompute_ratio=0.0).logits is None


@pytest.mark.parametrize("ratio", [0.3, 0.05])
def test_a_partial_recompute_replaces_exactly_the_most_deviating_tokens(
    runtime: Runtime,
    ids: dict[str, list[int]],
    chunks: dict[str, ChunkKV],
    prefix: KVCache,
    full: tuple[KVCache, torch.Tensor],
    ratio: float,
) -> None:
    result = _blend(runtime, prefix, chunks, ids, recompute_ratio=ratio, check_layer=1)
    cache, _ = full
    a0 = len(ids["pre"])
    q0 = a0 + len(ids["a"]) + len(ids["b"])
    chunk_tokens = q0 - a0
    expected = math.floor(ratio * chunk_tokens)
    assert result.recomputed_tokens == len(result.recomputed) == expected > 0
    assert result.reused_tokens == a0 + chunk_tokens - expected
    assert all(a0 <= p < q0 for p in result.recomputed)
    # Layers 0 and 1 (the check layer) were recomputed for every token: a full prefill's.
    for layer in (0, 1):
        torch.testing.assert_close(result.kv.values[layer], cache.values[layer], **TOL)
        torch.testing.assert_close(result.kv.keys[layer], cache.keys[layer], **TOL)
    # The selection: the chunk tokens whose layer-1 values moved most from the cached ones.
    cached = torch.cat([chunks["a"].kv.values[1], chunks["b"].kv.values[1]], dim=2).float()
    fresh = _span(cache.values[1], a0, q0).float()
    deviation = ((fresh - cached) ** 2).sum(dim=(0, 1, 3))
    top = {a0 + int(i) for i in torch.topk(deviation, expected).indices}
    assert set(result.recomputed) == top
    # Above the check layer: recomputed entries changed, every other chunk entry is the cache's.
    placed = _blend(runtime, prefix, chunks, ids, recompute_ratio=0.0).kv
    picked = torch.tensor(result.recomputed)
    others = torch.tensor([p for p in range(a0, q0) if p not in top])
    for layer in range(2, result.kv.layers):
        values, cached_values = result.kv.values[layer], placed.values[layer]
        assert torch.equal(values[:, :, others], cached_values[:, :, others])
        assert torch.equal(result.kv.keys[layer][:, :, others], placed.keys[layer][:, :, others])
        moved = (values[:, :, picked] - cached_values[:, :, picked]).abs().amax(dim=(0, 1, 3))
        assert bool((moved > 0).all()), f"layer {layer}: a recomputed entry kept its cached value"


def test_naive_concatenation_keeps_the_positions_chunks_were_computed_at(
    runtime: Runtime, ids: dict[str, list[int]], chunks: dict[str, ChunkKV], prefix: KVCache
) -> None:
    naive = _blend(runtime, prefix, chunks, ids, recompute_ratio=0.0, rerotate=False)
    rotated = _blend(runtime, prefix, chunks, ids, recompute_ratio=0.0)
    b0 = len(ids["pre"]) + len(ids["a"])
    q0 = b0 + len(ids["b"])
    for layer in range(naive.kv.layers):
        assert torch.equal(_span(naive.kv.keys[layer], b0, q0), chunks["b"].kv.keys[layer])
        assert torch.equal(_span(naive.kv.values[layer], b0, q0), chunks["b"].kv.values[layer])
        assert not torch.allclose(
            _span(naive.kv.keys[layer], b0, q0), _span(rotated.kv.keys[layer], b0, q0), **TOL
        )
    assert naive.logits is not None and rotated.logits is not None
    assert (naive.logits - rotated.logits).abs().max() > 0.1


def test_bad_arguments_are_refused_by_name(
    runtime: Runtime, ids: dict[str, list[int]], chunks: dict[str, ChunkKV]
) -> None:
    layers = runtime.fingerprint.layers
    cases = [
        ({"segments": [chunks["a"]], "recompute_ratio": 1.5}, "recompute_ratio=1.5"),
        ({"segments": [chunks["a"]], "recompute_ratio": -0.1}, "recompute_ratio=-0.1"),
        ({"segments": [chunks["a"]], "check_layer": layers}, f"check_layer={layers}"),
        ({"segments": []}, "segments is empty"),
        ({"segments": [chunks["a"], []]}, "segments[1] is empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidArgument, match=message.replace("[", r"\[")):
            runtime.blend(**kwargs)  # type: ignore[arg-type]
    a = chunks["a"].kv
    shallow = ChunkKV(KVCache(keys=a.keys[:2], values=a.values[:2], token_ids=a.token_ids))
    with pytest.raises(InvalidArgument, match=r"segments\[0\] has 2 layers"):
        runtime.blend([shallow, ids["q"]])
    with pytest.raises(InvalidArgument, match="token_ids is empty"):
        build_chunk(runtime.runner, [])
    too_long = [ids["q"][0]] * (runtime.info.max_positions + 1)
    with pytest.raises(InvalidArgument, match="exceeds"):
        runtime.blend([chunks["a"], too_long])
    with pytest.raises(InvalidArgument, match="new_start"):
        rerotate(chunks["a"], -1, Rotary(runtime.runner.model))
