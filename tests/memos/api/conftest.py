"""A daemon with small activation limits, for the tests of its bounds (real HTTP, in process)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import LiveServer, _start_live_server, free_port

LIMITS = {
    "inline_max_tokens": 32,  # anything longer builds on the (one) worker thread
    "max_text_bytes": 3000,
    "max_source_memories": 3,
    "max_prompt_bytes": 200,
    "max_generate_tokens": 1000,
    "loaded_cache_bytes": 23_040 * 150,  # 150 tokens of a 16-bit SmolLM2 cache
    "dequantized_cache_bytes": 46_080 * 150,  # 150 tokens of it dequantized (float32)
    "max_queued_builds": 3,
    "max_queued_builds_per_user": 2,
    "build_retry_after_s": 7,
    "max_generations": 1,
    "max_waiting_generations": 1,
    "generation_wait_s": 60,
    "generation_kv_bytes": 12 << 20,
}


@pytest.fixture(scope="session")
def limited(tmp_path_factory, embedder) -> Iterator[LiveServer]:
    """A daemon (SQLite, real port) whose activation limits are small enough to reach."""
    from memos.settings import Settings

    settings = Settings(
        data_dir=tmp_path_factory.mktemp("daemon-limited"),
        admin_key=f"admin-{secrets.token_hex(8)}",
        port=free_port(),
        enrichment={"enabled": False},
        activations=LIMITS,
        # Short contexts and small chunks: a build checks for cancellation every 16 tokens.
        runtime={"max_context": 1024, "prefill_chunk": 16},
    )
    yield from _start_live_server(settings, embedder, "sqlite")


@pytest.fixture
def limited_tenant(limited: LiveServer) -> Iterator[tuple[httpx.Client, str]]:
    _, key = limited.new_user()
    with limited.client(key) as client:
        cube = client.post("/v1/cubes", json={"name": "main"}).json()
        yield client, cube["id"]


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when the family has no such sample yet)."""
    text = httpx.get(f"{server.url}/metrics", timeout=60).text
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{inner}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def wait_until(check: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Poll until `check()`; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


@contextmanager
def model_held(server: LiveServer) -> Iterator[None]:
    """Hold the model's lock: every forward pass (build or generation) waits until released."""
    lock = server.daemon.runtime.get().runner.lock  # loads (and warms up) the model first
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def in_thread(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out
