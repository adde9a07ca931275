"""Shared fixtures for the runtime tests: the real SmolLM2-135M-Instruct, loaded once a session.

The GGUF -> safetensors conversion takes ~20 s; it is cached in `MEMOS_TEST_MODEL_CACHE` when that
is set (so repeated runs skip it) and in the session's shared model cache otherwise. Data fixtures
(contexts, their caches) are session-scoped too because the caches are never mutated: every test
that could mutate one asserts that it did not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kv_runtime import KVCache, Runtime, RuntimeConfig

CONTEXT = (
    "Caroline met Melanie at the community garden on a rainy Saturday in May. They talked about "
    "the support group Caroline had joined, the pottery class Melanie was teaching, and the "
    "camping trip both families were planning for the summer. Melanie said her kids wanted to "
    "see the stars away from the city lights, and Caroline promised to bring her old telescope. "
    "Before leaving, they agreed to meet again next week to plan the route and the food."
)
PROMPT = " On the camping trip, Caroline will bring"


@pytest.fixture(scope="session")
def model_dir(model_cache: Path) -> Path:
    """`MEMOS_TEST_MODEL_CACHE`, else the session's shared model cache (tests/conftest.py)."""
    configured = os.environ.get("MEMOS_TEST_MODEL_CACHE")
    return Path(configured) if configured else model_cache


@pytest.fixture(scope="session")
def runtime(model_dir: Path) -> Iterator[Runtime]:
    # One intra-op thread: on a shared 2-core machine two OpenMP threads competing with other
    # processes made a 96-token prefill 14x slower (7.2 s vs 0.5 s). Restored afterwards.
    threads = torch.get_num_threads()
    yield Runtime.load(RuntimeConfig(cache_dir=model_dir, prefill_chunk=64, threads=1))
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def context_ids(runtime: Runtime) -> list[int]:
    ids = runtime.tokenize(CONTEXT)
    assert 80 <= len(ids) <= 100, len(ids)  # the span arithmetic in the tests assumes ~90
    return ids


@pytest.fixture(scope="session")
def prompt_ids(runtime: Runtime) -> list[int]:
    return runtime.tokenize(PROMPT)


@pytest.fixture(scope="session")
def kv(runtime: Runtime, context_ids: list[int]) -> KVCache:
    """The context's uncompressed cache. Read-only: tests that use it must not change it."""
    return runtime.prefill(context_ids)
