"""Token log-probabilities: of a scored prompt (teacher forcing) and of generated tokens."""

from __future__ import annotations

import pytest
import torch

from kv_runtime import InvalidArgument, KVCache, Runtime
from kv_runtime.logprobs import token_logprobs
from kv_runtime.sampling import SamplingParams


def test_token_logprobs_are_log_softmax_with_the_top_alternatives() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    rows = token_logprobs(logits, [1, 2], top=2)
    expected = torch.log_softmax(logits, dim=-1)
    assert [r.token_id for r in rows] == [1, 2]
    assert rows[0].logprob == pytest.approx(float(expected[0, 1]))
    assert [t for t, _ in rows[0].top] == [0, 1] and [t for t, _ in rows[1].top] == [2, 0]
    # The chosen token's value is the very float listed among the alternatives.
    assert rows[0].logprob == dict(rows[0].top)[1]
    assert token_logprobs(logits, [1, 2], top=0)[1].top == ()


def test_a_scored_prompt_has_the_logprobs_of_the_runtime_logits(
    runtime: Runtime, context_ids: list[int], prompt_ids: list[int]
) -> None:
    prompt_ids = [*context_ids, *prompt_ids]  # ~100 tokens: two prefill chunks of 64
    assert len(prompt_ids) > 64
    result = runtime.generate(prompt_ids, max_tokens=0, prompt_logprobs=3).collect()
    assert result.token_ids == () and result.text == "" and result.finish_reason == "length"
    scored = result.prompt_logprobs
    assert scored is not None and len(scored) == len(prompt_ids) and scored[0] is None
    expected = torch.log_softmax(runtime.logits(prompt_ids), dim=-1)
    for i, row in enumerate(scored[1:], start=1):
        assert row is not None and row.token_id == prompt_ids[i]
        assert row.logprob == pytest.approx(float(expected[i - 1, prompt_ids[i]]), abs=1e-4)
        assert [t for t, _ in row.top] == expected[i - 1].topk(3).indices.tolist()


def test_after_a_cache_every_prompt_token_is_scored_as_in_a_full_prefill(
    runtime: Runtime, kv: KVCache, context_ids: list[int], prompt_ids: list[int]
) -> None:
    """After a reused cache the first prompt token is scored too: its distribution is the
    context's last token's."""
    scored = runtime.generate(prompt_ids, kv, max_tokens=0, prompt_logprobs=1).collect()
    assert scored.prompt_logprobs is not None and len(scored.prompt_logprobs) == len(prompt_ids)
    whole = [*context_ids, *prompt_ids]
    expected = torch.log_softmax(runtime.logits(whole), dim=-1)
    start = len(context_ids)
    for i, row in enumerate(scored.prompt_logprobs):
        assert row is not None
        target = expected[start + i - 1, prompt_ids[i]]
        assert row.logprob == pytest.approx(float(target), abs=1e-4)
    assert kv.length == len(context_ids)  # the shared cache was not changed


def test_generated_tokens_carry_their_logprobs_and_greedy_picks_the_top_one(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int]
) -> None:
    result = runtime.generate(prompt_ids, kv, max_tokens=6, logprobs=2).collect()
    plain = runtime.generate(prompt_ids, kv, max_tokens=6).collect()
    assert result.token_ids == plain.token_ids and result.text == plain.text
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids)
    for row, token in zip(result.logprobs, result.token_ids, strict=True):
        assert row.token_id == token and row.top[0] == (token, row.logprob)
        assert len(row.top) == 2 and row.top[1][1] <= row.logprob <= 0
    # Teacher forcing the generated tokens gives the same numbers.
    forced = torch.log_softmax(runtime.logits([*prompt_ids, *result.token_ids[:-1]], kv), -1)
    n = len(prompt_ids)
    for i, row in enumerate(result.logprobs):
        assert row.logprob == pytest.approx(float(forced[n - 1 + i, row.token_id]), abs=1e-4)


def test_max_tokens_zero_is_only_for_scoring() -> None:
    with pytest.raises(InvalidArgument, match="0 only when scoring"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidArgument, match="logprobs=21 must be in 0..20"):
        SamplingParams(logprobs=21)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0
