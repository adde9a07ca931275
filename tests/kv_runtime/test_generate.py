"""Prefill, continuation from a cache, and decoding on the real model."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import torch

from kv_runtime import Generation, InvalidArgument, KVCache, Runtime
from kv_runtime.prefill import prefill
from kv_runtime.sampling import SamplingParams
from kv_runtime.text import TextCodec


def test_continuing_from_a_cache_gives_the_logits_of_a_full_prefill(
    runtime: Runtime, kv: KVCache, context_ids: list[int], prompt_ids: list[int]
) -> None:
    full = runtime.logits([*context_ids, *prompt_ids])[len(context_ids) :]
    continued = runtime.logits(prompt_ids, kv)
    assert continued.shape == (len(prompt_ids), 49152) and continued.dtype == torch.float32
    torch.testing.assert_close(continued, full, atol=1e-4, rtol=0)


def test_chunked_prefill_captures_the_same_cache_and_reports_progress(
    runtime: Runtime, kv: KVCache, context_ids: list[int]
) -> None:
    calls: list[tuple[int, int]] = []
    chunked = prefill(
        runtime.runner, context_ids, chunk_tokens=32, on_progress=lambda *a: calls.append(a)
    )
    n = len(context_ids)
    assert calls == [(32, n), (64, n), (n, n)]
    assert chunked.token_ids == tuple(context_ids) and chunked.positions is None
    assert (chunked.layers, chunked.kv_heads, chunked.kept, chunked.head_dim) == (30, 3, n, 64)
    for a, b in zip(chunked.keys + chunked.values, kv.keys + kv.values, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_a_raising_progress_callback_aborts_the_prefill(
    runtime: Runtime, context_ids: list[int]
) -> None:
    def cancel(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runtime.prefill(context_ids, on_progress=cancel)


def test_greedy_generation_is_deterministic_and_reuse_changes_nothing(
    runtime: Runtime, kv: KVCache, context_ids: list[int], prompt_ids: list[int]
) -> None:
    fresh = runtime.generate([*context_ids, *prompt_ids], max_tokens=8).collect()
    again = runtime.generate([*context_ids, *prompt_ids], max_tokens=8).collect()
    reused = runtime.generate(prompt_ids, kv=kv, max_tokens=8).collect()
    assert fresh.token_ids == again.token_ids == reused.token_ids
    assert fresh.text == reused.text and fresh.text.startswith(" her old telescope")
    assert (fresh.prompt_tokens, fresh.reused_tokens) == (len(context_ids) + len(prompt_ids), 0)
    assert (reused.prompt_tokens, reused.reused_tokens) == (len(prompt_ids), len(context_ids))
    assert fresh.finish_reason == "length" and len(fresh.token_ids) == 8
    assert 0 < reused.ttft_ms <= reused.total_ms


def test_an_empty_prompt_continues_straight_after_the_context(
    runtime: Runtime, kv: KVCache, context_ids: list[int]
) -> None:
    direct = runtime.generate(context_ids, max_tokens=4).collect()
    reused = runtime.generate("", kv=kv, max_tokens=4).collect()
    assert reused.token_ids == direct.token_ids
    with pytest.raises(InvalidArgument, match="nothing to continue"):
        runtime.generate("", max_tokens=4)


def test_streamed_pieces_add_up_to_the_text(runtime: Runtime, kv: KVCache, prompt_ids) -> None:
    generation = runtime.generate(prompt_ids, kv=kv, max_tokens=8)
    pieces = list(generation)
    assert generation.result is not None
    assert len(pieces) > 1 and "".join(pieces) == generation.result.text
    assert generation.result.text == runtime.detokenize(generation.result.token_ids)


def test_the_end_of_sequence_token_stops_generation(runtime: Runtime) -> None:
    chat = runtime.render_chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    )
    assert chat.endswith("<|im_start|>assistant\n")
    result = runtime.generate(chat, max_tokens=30).collect()
    assert result.finish_reason == "stop"
    assert result.text == "The capital of France is Paris."
    assert not set(result.token_ids) & runtime.eos_token_ids  # the stop token is not returned


def test_a_stop_token_ends_generation_without_being_returned(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int]
) -> None:
    free = runtime.generate(prompt_ids, kv=kv, max_tokens=6).collect()
    stopped = runtime.generate(
        prompt_ids, kv=kv, max_tokens=6, stop_token_ids=[free.token_ids[3]]
    ).collect()
    assert stopped.token_ids == free.token_ids[:3] and stopped.finish_reason == "stop"
    assert stopped.text == runtime.detokenize(free.token_ids[:3])


def test_a_stop_string_ends_the_text_before_it(runtime: Runtime, kv: KVCache, prompt_ids) -> None:
    generation = runtime.generate(prompt_ids, kv=kv, max_tokens=8, stop=["telescope"])
    pieces = list(generation)
    result = generation.result
    assert result is not None
    assert result.text == " her old " and "".join(pieces) == result.text
    assert result.finish_reason == "stop"


def test_max_tokens_bounds_the_answer(runtime: Runtime, kv: KVCache, prompt_ids) -> None:
    result = runtime.generate(prompt_ids, kv=kv, max_tokens=3).collect()
    assert len(result.token_ids) == 3 and result.finish_reason == "length"
    with pytest.raises(InvalidArgument, match="max_tokens=0"):
        runtime.generate(prompt_ids, kv=kv, max_tokens=0)
    with pytest.raises(InvalidArgument, match="exceeds the model's 8192 positions"):
        runtime.generate(prompt_ids, kv=kv, max_tokens=8100)


def test_sampling_is_reproducible_with_a_seed(runtime: Runtime, kv: KVCache, prompt_ids) -> None:
    def sample(seed: int, top_p: float = 1.0) -> tuple[int, ...]:
        generation = runtime.generate(
            prompt_ids, kv=kv, max_tokens=6, temperature=1.0, top_p=top_p, seed=seed
        )
        return generation.collect().token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    greedy = runtime.generate(prompt_ids, kv=kv, max_tokens=6).collect().token_ids
    assert sample(3, top_p=1e-6) == greedy  # a nucleus that small holds only the argmax


def test_a_cancel_hook_ends_decoding_at_the_next_token(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int]
) -> None:
    greedy = runtime.generate(prompt_ids, kv=kv, max_tokens=8).collect()
    checks = [0]

    def cancel() -> bool:  # checked once before the prompt's one chunk, then before each step
        checks[0] += 1
        return checks[0] > 3

    generation = runtime.generate(prompt_ids, kv=kv, max_tokens=8, cancel=cancel)
    pieces = list(generation)
    result = generation.result
    assert result is not None and result.finish_reason == "cancelled"
    assert result.token_ids == greedy.token_ids[:3] and checks[0] == 4
    assert "".join(pieces) == result.text == runtime.detokenize(greedy.token_ids[:3])


def test_a_cancel_hook_is_checked_between_prefill_chunks(
    runtime: Runtime, context_ids: list[int]
) -> None:
    checks = [0]

    def cancel() -> bool:  # the ~90-token prompt runs in two 64-token chunks
        checks[0] += 1
        return checks[0] > 1

    result = runtime.generate(context_ids, max_tokens=8, cancel=cancel).collect()
    assert (result.finish_reason, result.token_ids, result.text) == ("cancelled", (), "")
    assert checks[0] == 2  # the second chunk never ran


class _CountingCodec(TextCodec):
    """The runtime's tokenizer, recording how many tokens each decode call is given."""

    def __init__(self, base: TextCodec) -> None:
        super().__init__(base.tokenizer, sorted(base.eos_token_ids))
        self.sizes: list[int] = []

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(token_ids))
        return super().decode(token_ids, skip_special_tokens)


def test_decoding_a_step_does_not_decode_the_whole_answer_again(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int]
) -> None:
    codec = _CountingCodec(runtime._codec)
    params = SamplingParams(max_tokens=24, stop_token_ids=frozenset(runtime.eos_token_ids))
    generation = Generation(
        runtime.runner, codec, prompt_ids, kv, params, chunk_tokens=64, max_positions=8192
    )
    result = generation.collect()
    assert len(result.token_ids) == 24 and result.finish_reason == "length"
    assert result.text == runtime.detokenize(result.token_ids)
    # A few tokens a call whatever the answer's length (decoding it all each step: up to 24).
    assert max(codec.sizes) <= 3


def test_a_cancelled_request_stops_while_waiting_for_the_model(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int]
) -> None:
    stop = threading.Event()
    results = []
    with runtime.runner.lock:  # another request's long prefill chunk holds the model
        worker = threading.Thread(
            target=lambda: results.append(
                runtime.generate(prompt_ids, kv=kv, max_tokens=8, cancel=stop.is_set).collect()
            )
        )
        worker.start()
        stop.set()
        worker.join(60)  # ends while the model is still held: it never needed it
        assert not worker.is_alive()
    assert [(r.finish_reason, r.token_ids) for r in results] == [("cancelled", ())]
