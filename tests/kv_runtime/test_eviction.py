"""Token eviction: exact selection, the scorers, and RoPE positions after eviction."""

from __future__ import annotations

import pytest
import torch

from kv_runtime import CompressionConfig, InvalidArgument, KVCache, Runtime
from kv_runtime.eviction import (
    SCORERS,
    RecentScorer,
    SnapKVScorer,
    evict,
    make_scorer,
    select,
    window_attention,
)

BUDGET, SINKS, WINDOW = 40, 4, 16


def test_select_keeps_sinks_window_and_the_best_scores_in_position_order() -> None:
    scores = torch.tensor([[[0.0, 0.1, 9.0, 0.2, 8.0, 0.3, 7.0, 0.0, 0.0, 0.0]]])
    assert select(scores, budget=5, sink_tokens=1, window_tokens=2).tolist() == [[0, 2, 4, 8, 9]]
    assert select(scores, budget=10, sink_tokens=1, window_tokens=2).tolist() == [list(range(10))]
    per_head = torch.tensor([[[5.0, 1.0, 2.0, 0.0], [5.0, 2.0, 1.0, 0.0]]])
    assert select(per_head, budget=2, sink_tokens=0, window_tokens=1).tolist() == [[0, 3], [0, 3]]
    assert select(per_head, budget=3, sink_tokens=0, window_tokens=1).tolist() == [
        [0, 2, 3],
        [0, 1, 3],
    ]


def test_unknown_scorers_are_refused_with_the_valid_names() -> None:
    assert sorted(SCORERS) == ["knorm", "recent", "snapkv"]
    with pytest.raises(InvalidArgument, match=r"scorer='h2o' is unknown; valid scorers: \['knorm'"):
        make_scorer("h2o")


def test_window_attention_is_the_models_own_attention(runtime: Runtime, kv: KVCache) -> None:
    """The captured queries reproduce the attention weights of eager attention exactly."""
    window, n = 8, kv.length
    queries = runtime.window_queries(kv, window)
    assert [tuple(q.shape) for q in queries] == [(1, 9, window, 64)] * 30
    model = runtime.runner.model
    with runtime.runner.lock, torch.no_grad():
        model.config._attn_implementation = "eager"
        try:
            out = model(
                input_ids=torch.tensor([kv.token_ids[n - window :]]),
                position_ids=torch.arange(n - window, n)[None],
                past_key_values=kv.head(n - window).to_transformers(),
                output_attentions=True,
            )
        finally:
            model.config._attn_implementation = "sdpa"
    for layer in (0, 14, 29):
        expected = out.attentions[layer].float()
        torch.testing.assert_close(
            window_attention(kv.keys[layer], queries[layer]), expected, atol=1e-5, rtol=0
        )


def test_snapkv_keeps_sinks_recent_window_and_top_scored_tokens_exactly(
    runtime: Runtime, kv: KVCache
) -> None:
    queries = runtime.window_queries(kv, WINDOW)
    scorer = SnapKVScorer()
    evicted = evict(
        kv, scorer, budget=BUDGET, sink_tokens=SINKS, window_tokens=WINDOW, queries=queries
    )
    n = kv.length
    assert evicted.positions is not None and evicted.positions.shape == (30, 3, BUDGET)
    assert (evicted.kept, evicted.length, evicted.token_ids) == (BUDGET, n, kv.token_ids)
    for layer in range(30):
        scores = scorer.score(kv.keys[layer], kv.values[layer], queries[layer])[0]
        for head in range(3):
            middle = sorted(range(SINKS, n - WINDOW), key=lambda i: -float(scores[head, i]))
            best = middle[: BUDGET - SINKS - WINDOW]
            expected = sorted([*range(SINKS), *best, *range(n - WINDOW, n)])
            assert evicted.positions[layer, head].tolist() == expected
            assert torch.equal(evicted.keys[layer][0, head], kv.keys[layer][0, head, expected])
            assert torch.equal(evicted.values[layer][0, head], kv.values[layer][0, head, expected])


def test_recent_scorer_keeps_sinks_and_the_newest_tokens(kv: KVCache) -> None:
    evicted = evict(
        kv, RecentScorer(), budget=BUDGET, sink_tokens=SINKS, window_tokens=WINDOW, queries=None
    )
    n = kv.length
    expected = [*range(SINKS), *range(n - (BUDGET - SINKS), n)]
    assert evicted.positions is not None
    assert (evicted.positions == torch.tensor(expected)).all()


def test_eviction_needs_an_unevicted_cache_and_is_a_no_op_within_budget(kv: KVCache) -> None:
    same = evict(kv, RecentScorer(), budget=kv.length, sink_tokens=4, window_tokens=4, queries=None)
    assert same is kv
    evicted = evict(kv, RecentScorer(), budget=20, sink_tokens=4, window_tokens=4, queries=None)
    with pytest.raises(InvalidArgument, match="already evicted"):
        evict(evicted, RecentScorer(), budget=10, sink_tokens=4, window_tokens=4, queries=None)


def test_tokens_after_an_evicted_cache_get_their_original_positions(
    runtime: Runtime, kv: KVCache, context_ids: list[int], prompt_ids: list[int]
) -> None:
    settings = CompressionConfig(
        bits=16, budget_tokens=BUDGET, sink_tokens=SINKS, window_tokens=WINDOW
    )
    compressed = runtime.compress(kv, settings)
    evicted = runtime.decompress(compressed)
    n, p = kv.length, len(prompt_ids)
    assert (compressed.kept, evicted.kept, evicted.length) == (BUDGET, BUDGET, n)

    # The runtime's continuation equals a manual forward with explicit position ids n..n+p-1 ...
    ours = runtime.logits(prompt_ids, compressed)
    model, ids = runtime.runner.model, torch.tensor([prompt_ids])
    with torch.no_grad():
        manual = model(
            input_ids=ids,
            position_ids=torch.arange(n, n + p)[None],
            past_key_values=evicted.to_transformers(),
        ).logits[0]
        # ... and not the default, which would number them after the kept entries.
        shifted = model(input_ids=ids, past_key_values=evicted.to_transformers()).logits[0]
    torch.testing.assert_close(ours, manual.float(), atol=1e-5, rtol=0)
    assert (ours - shifted.float()).abs().max() > 0.1

    # Layer 0's keys depend only on token and position: the prompt's keys after the evicted
    # cache are those of a full prefill at positions n.. (RoPE saw the original positions).
    cache = evicted.to_transformers()
    runtime.runner.forward(prompt_ids, cache, n)
    full = runtime.prefill([*context_ids, *prompt_ids])
    first = KVCache.from_transformers(cache, [*context_ids[:BUDGET], *prompt_ids])
    torch.testing.assert_close(
        first.keys[0][:, :, BUDGET:], full.keys[0][:, :, n:], atol=1e-5, rtol=0
    )
