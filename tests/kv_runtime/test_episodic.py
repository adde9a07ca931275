"""Block-wise prefill under a budget: bounded memory, exactness without eviction, the scorers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kv_runtime import CompressionConfig, InvalidArgument, KVCache, Runtime
from kv_runtime.block_scorers import (
    BLOCK_SCORERS,
    KVZIP_CONTINUE_PROMPT,
    KVZIP_PROMPT,
    KVzipScorer,
    make_block_scorer,
)
from kv_runtime.episodic import BudgetedPrefill, _Rotary, prefill_under_budget
from kv_runtime.errors import Cancelled

BLOCK, BUDGET = 32, 48


def _held_bound(runtime: Runtime, tokens: int) -> int:
    return tokens * runtime.kv_bytes_per_token


def test_peak_is_bounded_by_budget_and_block_whatever_the_context_length(
    runtime: Runtime, context_ids: list[int]
) -> None:
    """Peak KV is budget + block (+ the scoring prompt), never the context: at 1x and 3x the
    context, and the kept entries are BUDGET per layer and head either way."""
    query = runtime.tokenize(" Caroline's telescope")
    peaks = []
    for ids in (context_ids, context_ids * 3):
        built = runtime.prefill_budgeted(
            ids, budget_tokens=BUDGET, block_tokens=BLOCK, scorer="prompt", query_ids=query,
            recent_tokens=8,
        )  # fmt: skip
        assert built.kv.kept == BUDGET and built.original_positions.max() == len(ids) - 1
        assert built.prefilled_tokens == len(ids)
        assert built.peak_kv_bytes <= _held_bound(runtime, BUDGET + BLOCK + len(query))
        peaks.append(built.peak_kv_bytes)
    # A full block on a full budget is reached in the longer context: exactly the bound.
    assert peaks[1] == _held_bound(runtime, BUDGET + BLOCK + len(query))
    plain = runtime.prefill(context_ids * 3).nbytes()
    assert peaks[1] < plain / 2


@pytest.mark.parametrize("scorer", ["prompt", "kvzip", "snapkv"])
def test_a_budget_above_the_context_is_a_plain_prefill(
    runtime: Runtime, context_ids: list[int], kv: KVCache, scorer: str
) -> None:
    query = runtime.tokenize(" telescope") if scorer == "prompt" else None
    built = runtime.prefill_budgeted(
        context_ids, budget_tokens=len(context_ids), block_tokens=BLOCK, scorer=scorer,
        query_ids=query,
    )  # fmt: skip
    assert built.kv.positions is None and built.kv.kept == kv.length
    for mine, theirs in zip(built.kv.keys, kv.keys, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    prompt = runtime.tokenize(" Caroline will bring")
    torch.testing.assert_close(
        runtime.logits(prompt, built.kv), runtime.logits(prompt, kv), atol=1e-3, rtol=1e-3
    )


def test_kept_entries_keep_their_original_positions(
    runtime: Runtime, context_ids: list[int], kv: KVCache
) -> None:
    """A kept entry's key is the full prefill's key at its original position (keys carry RoPE),
    sinks and the last recent tokens are kept, and positions ascend per head."""
    built = runtime.prefill_budgeted(
        context_ids, budget_tokens=BUDGET, block_tokens=BLOCK, scorer="snapkv", recent_tokens=8,
        positions="original",
    )  # fmt: skip
    assert not built.compacted and built.kv.length == len(context_ids)
    positions = built.kv.positions
    assert positions is not None and torch.equal(positions, built.original_positions)
    assert (positions.diff(dim=-1) > 0).all()
    assert (positions[..., :4] == torch.arange(4)).all()
    assert (positions[..., -8:] == torch.arange(kv.length - 8, kv.length)).all()
    # Layer 0's keys depend on the token and its position only: equal to the full prefill's at
    # the original positions. Deeper layers saw an evicted past after the first block, so only
    # the first block's entries are equal there.
    index = positions[0][None, :, :, None].expand(1, kv.kv_heads, BUDGET, kv.head_dim)
    torch.testing.assert_close(built.kv.keys[0], kv.keys[0].gather(2, index), atol=1e-4, rtol=0)
    first = positions[29, 0] < BLOCK
    torch.testing.assert_close(
        built.kv.keys[29][:, 0, first], kv.keys[29][:, 0, positions[29, 0][first]], atol=1e-4,
        rtol=0,
    )  # fmt: skip
    result = runtime.generate(" Caroline will bring", kv=built.kv, max_tokens=3).collect()
    assert result.text


def _retention(built: BudgetedPrefill, span: range) -> float:
    """The share of the span's tokens kept, over layers and KV heads."""
    inside = (built.original_positions >= span.start) & (built.original_positions < span.stop)
    layers, heads, _ = built.original_positions.shape
    return float(inside.sum()) / (len(span) * layers * heads)


def test_the_prompt_scorer_keeps_what_the_prompt_attends_to(
    runtime: Runtime, context_ids: list[int]
) -> None:
    """A prompt that repeats a distinctive passage keeps more of that passage than SnapKV does
    (SnapKV reads what the context's own tail attends to)."""
    passage = "The secret password of the lighthouse keeper is violet harmonica seventeen."
    head, body = runtime.tokenize(passage), context_ids
    ids = head + body
    span = range(4, len(head))  # the passage minus the sinks
    prompt = runtime.tokenize("The secret password of the lighthouse keeper is violet harmonica")
    by_prompt = runtime.prefill_budgeted(
        ids, budget_tokens=BUDGET, block_tokens=BLOCK, scorer="prompt", query_ids=prompt,
        recent_tokens=8,
    )  # fmt: skip
    by_snapkv = runtime.prefill_budgeted(
        ids, budget_tokens=BUDGET, block_tokens=BLOCK, scorer="snapkv", recent_tokens=8
    )
    assert _retention(by_prompt, span) > _retention(by_snapkv, span)
    assert _retention(by_prompt, span) > BUDGET / len(ids)  # more than a uniform choice keeps


def test_kvzip_runs_bounded_by_one_reconstruction_chunk(
    runtime: Runtime, context_ids: list[int]
) -> None:
    repeat = runtime.tokenize(KVZIP_PROMPT)
    again = runtime.tokenize(KVZIP_CONTINUE_PROMPT)
    ids = context_ids * 2
    built = runtime.prefill_budgeted(
        ids, budget_tokens=BUDGET, block_tokens=BLOCK, scorer="kvzip", recent_tokens=8
    )
    assert built.kv.kept == BUDGET
    # One block is repeated in one chunk here: the pass is the repeat prompt plus the block.
    assert built.peak_kv_bytes == _held_bound(runtime, BUDGET + 2 * BLOCK + len(repeat))
    # In chunks of 8 (each after the continue prompt and 4 tokens of overlap), the transient KV
    # is one chunk, not the block.
    chunked = prefill_under_budget(
        runtime.runner, ids, budget_tokens=BUDGET, block_tokens=BLOCK, recent_tokens=8,
        scorer=KVzipScorer(
            repeat_ids=tuple(repeat), continue_ids=tuple(again), chunk_tokens=8, overlap_tokens=4
        ),
    )  # fmt: skip
    transient = max(len(repeat) + 8, len(again) + 4 + 8)
    assert chunked.peak_kv_bytes == _held_bound(runtime, BUDGET + BLOCK + transient)
    # Query-agnostic, but not recency: it keeps other entries than StreamingLLM does.
    recent = runtime.prefill_budgeted(
        ids, budget_tokens=BUDGET, block_tokens=BLOCK, scorer="recent", recent_tokens=8
    )
    assert not torch.equal(built.original_positions, recent.original_positions)


def test_progress_is_reported_per_block_and_cancel_stops_the_build(
    runtime: Runtime, context_ids: list[int]
) -> None:
    seen: list[tuple[int, int]] = []
    runtime.prefill_budgeted(
        context_ids, budget_tokens=BUDGET, block_tokens=BLOCK, scorer="recent", recent_tokens=8,
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    n = len(context_ids)
    assert seen == [(min(end, n), n) for end in range(BLOCK, n + BLOCK, BLOCK)]
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        runtime.prefill_budgeted(
            context_ids, budget_tokens=BUDGET, block_tokens=BLOCK, scorer="recent", cancel=cancel,
            recent_tokens=8,
        )  # fmt: skip


def test_compacted_positions_move_keys_exactly(runtime: Runtime, kv: KVCache) -> None:
    """Re-rotating a post-RoPE key by a position difference gives the key at the new position:
    rotating position p's keys by -p and then by +p is the identity, and moving the whole cache
    to consecutive positions keeps the next-token logits when nothing was evicted."""
    rotary = _Rotary.of(runtime.runner)
    delta = torch.full((kv.kv_heads, kv.length), 37)
    back = rotary.rotate(rotary.rotate(kv.keys[3], delta), -delta)
    torch.testing.assert_close(back, kv.keys[3], atol=1e-5, rtol=1e-5)
    # Layer 0's keys depend on the token and its position only: the context prefilled 37
    # positions later has exactly the keys rotated by 37.
    later = DynamicCache()
    runtime.runner.forward(list(kv.token_ids), later, 37)
    moved_keys = later.layers[0].keys
    torch.testing.assert_close(rotary.rotate(kv.keys[0], delta), moved_keys, atol=1e-4, rtol=0)
    # Shifting every key by the same amount leaves relative positions, hence attention, intact.
    shifted = KVCache(
        keys=tuple(rotary.rotate(k, torch.full_like(delta, 5)) for k in kv.keys),
        values=kv.values,
        token_ids=kv.token_ids,
    )
    prompt = runtime.tokenize(" Caroline will bring")
    cache = shifted.to_transformers()
    moved = runtime.runner.forward(prompt, cache, kv.length + 5, all_logits=True)
    torch.testing.assert_close(moved, runtime.logits(prompt, kv), atol=1e-3, rtol=1e-3)


def test_compacted_builds_stay_below_budget_plus_block_positions(
    runtime: Runtime, context_ids: list[int]
) -> None:
    built = prefill_under_budget(
        runtime.runner,
        context_ids * 3,
        budget_tokens=BUDGET,
        block_tokens=BLOCK,
        recent_tokens=8,
        scorer=make_block_scorer("snapkv"),
        positions="compacted",
    )
    assert built.compacted and built.kv.positions is not None
    assert (built.kv.positions == torch.arange(BUDGET)).all()  # the slots, still marked evicted
    assert built.kv.length == built.kv.kept == BUDGET  # the next token goes at BUDGET
    # The last token is kept in the last slot: a generation re-feeds it there.
    assert (built.original_positions[..., -1] == 3 * len(context_ids) - 1).all()
    assert built.kv.token_ids[-1] == context_ids[-1]
    result = runtime.generate(" Caroline will bring", kv=built.kv, max_tokens=3).collect()
    assert result.text


def test_invalid_arguments_are_refused(runtime: Runtime, context_ids: list[int]) -> None:
    assert BLOCK_SCORERS == ("prompt", "kvzip", "prompt+kvzip", "snapkv", "recent", "knorm")
    bad = [
        ({"budget_tokens": 10}, "budget_tokens=10 must exceed"),
        ({"budget_tokens": BUDGET, "block_tokens": 0}, "block_tokens=0"),
        ({"budget_tokens": BUDGET, "recent_tokens": 0}, "recent_tokens=0 must be >= 1"),
        (
            {"budget_tokens": 8000, "block_tokens": 1024, "positions": "compacted"},
            "exceeds the model.s 8192 positions",
        ),
        ({"budget_tokens": BUDGET, "scorer": "h2o"}, "scorer='h2o' is unknown"),
        ({"budget_tokens": BUDGET, "scorer": "prompt"}, "needs query_ids"),
        ({"budget_tokens": BUDGET, "scorer": "prompt+kvzip"}, "needs query_ids"),
        ({"budget_tokens": BUDGET, "layer_budgets": [BUDGET] * 29}, "has 29 entries; the model"),
        ({"budget_tokens": BUDGET, "layer_budgets": [36] + [BUDGET] * 29}, "more than sink_tok"),
        ({"budget_tokens": BUDGET, "scorer": "snapkv", "query_ids": [1]}, "only used by"),
        ({"budget_tokens": BUDGET, "positions": "sideways"}, "positions='sideways'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            runtime.prefill_budgeted(context_ids, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="empty"):
        runtime.prefill_budgeted([], budget_tokens=BUDGET)
    with pytest.raises(InvalidArgument, match="token ids must lie"):
        runtime.prefill_budgeted([runtime.vocab_size], budget_tokens=BUDGET)
    with pytest.raises(InvalidArgument, match="budget_tokens \\+ block_tokens = 8200"):
        runtime.prefill_budgeted(
            context_ids, budget_tokens=BUDGET, block_tokens=100,
            layer_budgets=[BUDGET] * 29 + [8100],
        )  # fmt: skip
    with pytest.raises(InvalidArgument, match="exceeds the model's 64 positions"):
        prefill_under_budget(
            runtime.runner, context_ids, budget_tokens=BUDGET, scorer=make_block_scorer("recent"),
            max_positions=64,
        )  # fmt: skip


@pytest.mark.parametrize("positions", ["original", "compacted"])
def test_a_budgeted_cache_is_stored_and_continued_like_any_activation(
    runtime: Runtime, context_ids: list[int], tmp_path: Path, positions: str
) -> None:
    """KIVI-compressed, saved and loaded, it continues like the cache it was built as."""
    built = runtime.prefill_budgeted(
        context_ids * 2, budget_tokens=BUDGET, block_tokens=BLOCK, scorer="snapkv",
        recent_tokens=8, positions=positions,  # type: ignore[arg-type]
    )  # fmt: skip
    compressed = runtime.compress(built.kv, CompressionConfig(bits=16, residual_tokens=8))
    runtime.save_activation(tmp_path / "a", compressed)
    loaded = runtime.load_activation(tmp_path / "a")
    assert loaded.length == built.kv.length and loaded.positions is not None
    prompt = runtime.tokenize(" Caroline will bring")
    torch.testing.assert_close(
        runtime.logits(prompt, loaded), runtime.logits(prompt, built.kv), atol=2e-2, rtol=0
    )
