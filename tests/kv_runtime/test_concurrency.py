"""Copy-on-read: requests never change a stored cache, and concurrent requests are safe."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from kv_runtime import CompressionConfig, GenerationResult, KVCache, Runtime, load_activation


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
