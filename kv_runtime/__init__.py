"""Local inference runtime: model loading, prefill, KV capture, compression, persistence, reuse.

The facade is `Runtime` (kv_runtime.runtime); activations are stored and verified by
`save_activation` / `load_activation` (kv_runtime.store). This package knows nothing of HTTP or
SQL; its errors carry a `code` the API layer maps to a status.

Modules, one concept each:
    config      RuntimeConfig, CompressionConfig (frozen pydantic, ranges checked)
    model       GGUF conversion cached as safetensors, Fingerprint
    forward     ModelRunner: the model lock, forward passes, query capture
    turns       ModelLock: the model handed over in turn, interactive before background
    throughput  the model's measured speed (moving averages), for estimates of work
    cache       KVCache: per-layer keys/values, token ids, original positions
    prefill     chunked prefill with progress
    prefix      PrefixCache: a conversation's cache, grown in place by its owner
    rope        moving cached keys to new positions with the model's rotary tables
    blend       chunk caches blended into a prompt at new positions (CacheBlend)
    eviction    budgeted token eviction; scorers (snapkv, recent, knorm) as plug-ins
    episodic    block-wise prefill under a KV budget (EpiCache); prompt and kvzip scorers
    compress    KIVI assembly: sinks | quantized span | residual, via `kernels`
    store       safetensors + JSON manifest, checksums, atomic writes; episodic activations
    sampling    greedy / temperature / top-p
    logprobs    a token's log-probability and the most likely alternatives
    generate    streaming generation on a copied cache, cancellable
    detokenize  incremental detokenization (O(1) a token)
    template    a conversation's new turns as the tokens that follow its history
    text        thread-safe tokenizer and chat template
"""

from kv_runtime.blend import BlendResult, ChunkKV
from kv_runtime.block_scorers import BLOCK_SCORERS
from kv_runtime.cache import KVCache
from kv_runtime.compress import CompressedKV
from kv_runtime.config import NO_COMPRESSION, CompressionConfig, RuntimeConfig
from kv_runtime.episodic import BudgetedPrefill
from kv_runtime.errors import (
    ActivationCorrupt,
    ActivationMismatch,
    InvalidArgument,
    KVRuntimeError,
    ModelUnavailable,
)
from kv_runtime.eviction import SCORERS
from kv_runtime.generate import CancelHook, Generation, GenerationResult
from kv_runtime.logprobs import TokenLogprob
from kv_runtime.model import Fingerprint
from kv_runtime.prefix import PrefixCache
from kv_runtime.runtime import ModelInfo, Runtime
from kv_runtime.store import (
    ActivationManifest,
    EpisodeManifest,
    delete_activation,
    load_activation,
    open_activation,
    open_episodes,
    read_manifest,
    save_activation,
    save_episodes,
)
from kv_runtime.template import ChatTemplate
from kv_runtime.throughput import Speed, Throughput

__all__ = [
    "BLOCK_SCORERS",
    "NO_COMPRESSION",
    "SCORERS",
    "ActivationCorrupt",
    "ActivationManifest",
    "ActivationMismatch",
    "BlendResult",
    "BudgetedPrefill",
    "CancelHook",
    "ChatTemplate",
    "ChunkKV",
    "CompressedKV",
    "CompressionConfig",
    "EpisodeManifest",
    "Fingerprint",
    "Generation",
    "GenerationResult",
    "InvalidArgument",
    "KVCache",
    "KVRuntimeError",
    "ModelInfo",
    "ModelUnavailable",
    "PrefixCache",
    "Runtime",
    "RuntimeConfig",
    "TokenLogprob",
    "Speed",
    "Throughput",
    "delete_activation",
    "load_activation",
    "open_activation",
    "open_episodes",
    "read_manifest",
    "save_activation",
    "save_episodes",
]
