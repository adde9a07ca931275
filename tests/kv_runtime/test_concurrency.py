"""Copy-on-read: requests read shared caches without copying them and never change them, and
concurrent requests are safe."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from kv_runtime import (
    CompressionConfig,
    Generation,
    GenerationResult,
    KVCache,
    ModelUnavailable,
    Runtime,
    load_activation,
)
from kv_runtime.runtime import _check_shared_cache
from kv_runtime.sampling import SamplingParams


def _run_together(jobs: list) -> list[GenerationResult]:
    results: list[GenerationResult | None] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        barrier.wait()
        results[i] = jobs[i]()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def test_two_threads_on_one_loaded_activation_match_sequential_runs(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int], tmp_path: Path
) -> None:
    runtime.save_activation(tmp_path, runtime.compress(kv, CompressionConfig(bits=4)))
    activation = load_activation(tmp_path, runtime.fingerprint)
    snapshot = [t.clone() for layer in activation.layers for t in layer.stored().values()]
    other = runtime.tokenize(" The food for the trip will be")

    sequential = [
        runtime.generate(prompt_ids, kv=activation, max_tokens=6).collect(),
        runtime.generate(other, kv=activation, max_tokens=6, temperature=0.8, seed=7).collect(),
    ]
    together = _run_together(
        [
            lambda: runtime.generate(prompt_ids, kv=activation, max_tokens=6).collect(),
            lambda: runtime.generate(
                other, kv=activation, max_tokens=6, temperature=0.8, seed=7
            ).collect(),
        ]
    )
    assert [r.token_ids for r in together] == [r.token_ids for r in sequential]
    assert [r.text for r in together] == [r.text for r in sequential]
    after = [t for layer in activation.layers for t in layer.stored().values()]
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot, strict=True))


def test_generating_from_a_captured_cache_leaves_it_bit_identical(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int]
) -> None:
    snapshot = [t.clone() for t in (*kv.keys, *kv.values)]
    results = _run_together(
        [lambda: runtime.generate(prompt_ids, kv=kv, max_tokens=4).collect() for _ in range(2)]
    )
    assert results[0].token_ids == results[1].token_ids
    assert kv.kept == len(kv.token_ids)
    assert all(torch.equal(a, b) for a, b in zip((*kv.keys, *kv.values), snapshot, strict=True))


def test_a_request_reads_the_shared_tensors_without_copying_them(kv: KVCache) -> None:
    cache = kv.to_transformers()
    assert len(cache.layers) == kv.layers and cache.get_seq_length() == kv.kept
    for layer, k, v in zip(cache.layers, kv.keys, kv.values, strict=True):
        assert layer.keys is k and layer.values is v  # no clone, no torch.cat onto nothing


@pytest.mark.parametrize("prompt", ["chunked", "empty"])
def test_growing_and_cropping_a_request_cache_never_writes_into_the_shared_one(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int], prompt: str
) -> None:
    """The prompt runs in 2-token chunks, then 6 tokens are decoded (each forward appends to
    every layer); the empty prompt crops the last context entry first and re-feeds it."""
    snapshot = [t.clone() for t in (*kv.keys, *kv.values)]
    ids = prompt_ids if prompt == "chunked" else []
    params = SamplingParams(max_tokens=6, stop_token_ids=frozenset(runtime.eos_token_ids))
    shared = Generation(
        runtime.runner, runtime._codec, ids, kv, params, chunk_tokens=2, max_positions=8192
    ).collect()
    assert all(torch.equal(a, b) for a, b in zip((*kv.keys, *kv.values), snapshot, strict=True))
    # The same tokens as a full prefill of context + prompt.
    full = runtime.generate([*kv.token_ids, *ids], max_tokens=6).collect()
    assert shared.token_ids == full.token_ids and len(full.token_ids) == 6


def test_a_dequantized_activation_serves_requests_as_the_compressed_one_did(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int]
) -> None:
    """Dequantized once and shared: every request gets the tokens that dequantizing it for
    that request gives, and the shared tensors stay as they were."""
    compressed = runtime.compress(
        kv, CompressionConfig(bits=4, group_size=32, residual_tokens=16, sink_tokens=4)
    )
    ready = runtime.decompress(compressed)
    snapshot = [t.clone() for t in (*ready.keys, *ready.values)]
    each = runtime.generate(prompt_ids, kv=compressed, max_tokens=6).collect()
    shared = [runtime.generate(prompt_ids, kv=ready, max_tokens=6).collect() for _ in range(2)]
    assert [r.token_ids for r in shared] == [each.token_ids] * 2
    after = (*ready.keys, *ready.values)
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot, strict=True))


def test_a_transformers_cache_that_writes_in_place_is_refused_at_load(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    append = DynamicLayer.update

    def scaling_update(self: DynamicLayer, *args: Any, **kwargs: Any) -> Any:
        if self.is_initialized and self.keys is not None and self.keys.numel():
            self.keys.mul_(2.0)  # what an in-place cache would do to a shared tensor
        return append(self, *args, **kwargs)

    _check_shared_cache(runtime.runner, 0, "smollm")  # the installed transformers: fine
    monkeypatch.setattr(DynamicLayer, "update", scaling_update)
    with pytest.raises(ModelUnavailable, match="wrote into the cache it continued"):
        _check_shared_cache(runtime.runner, 0, "smollm")
