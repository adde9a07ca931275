"""KIVI assembly: split a KV cache into sinks, a quantized span and a full-precision residual.

KIVI (Liu et al. 2024, https://arxiv.org/abs/2402.02750) quantizes keys per channel (outliers
sit in fixed channels) and values per token, and keeps the most recent tokens unquantized. Per
layer, along the token axis:

    [ sinks | quantized span (a multiple of group_size tokens) | residual ]

- sinks: the first `sink_tokens` entries, kept unquantized; the first tokens draw a large share
  of attention and their outlying keys would otherwise set the scale of a whole key group;
- quantized span: keys in groups of `group_size` tokens per channel (ranges MSE-clipped, see
  `kv_runtime.clipping`), values in groups of `min(value_group_size, head_dim)` channels per
  token, via `kernels.quantize`;
- residual: the last `residual_tokens` entries, plus whatever does not fill a whole key group.

"Unquantized" parts are kept in 16 bits: float16 for a float32 model (KIVI's full precision;
float32 is kept for a tensor float16 cannot hold), the model's own 16-bit dtype otherwise
(bfloat16 -> float16 would lose range and save nothing). With `bits=16` nothing is quantized:
a float32 model's cache is stored as float16, half its bytes, and `decompress` casts it back;
float16 keeps 11 significant bits: on the test context the continued logits moved by at most
4.5e-3 (float32 storage: equal to 1e-4) and no greedy token changed.

Scales and minimums: `kernels` computes them in float32. At 2 and 4 bits they are rounded to
float16 values (stored as float16: half the metadata bytes, KIVI's choice); the rounding moves a
reconstructed value by at most ~15 * 2**-11 of a quantization step plus 2**-11 of the minimum,
which measured no difference in agreement or perplexity on the benchmark. At 8 bits, where a
float16 scale's error is a visible fraction of the step, they stay float32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import kernels
from kv_runtime.cache import KVCache
from kv_runtime.clipping import clip_groups
from kv_runtime.config import CompressionConfig
from kv_runtime.errors import InvalidArgument

_FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True, eq=False)
class CompressedLayer:
    """One layer's keys and values in three spans (all (1, kv_heads, span, head_dim))."""

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    keys: kernels.Quantized | None  # None when the quantized span is empty
    values: kernels.Quantized | None
    residual_keys: torch.Tensor
    residual_values: torch.Tensor

    def nbytes(self) -> int:
        """Bytes as stored (scales and minimums that fit float16 count 2 bytes each)."""
        return sum(t.numel() * t.element_size() for t in self.stored().values())

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors as they are written, by name (see `kv_runtime.store`)."""
        out = {
            "sink_keys": self.sink_keys,
            "sink_values": self.sink_values,
            "residual_keys": self.residual_keys,
            "residual_values": self.residual_values,
        }
        for name, q in (("keys", self.keys), ("values", self.values)):
            if q is not None:
                out[f"{name}.packed"] = q.packed
                out[f"{name}.scale"] = stored_meta(q.scale)
                out[f"{name}.minimum"] = stored_meta(q.minimum)
        return out


def stored_meta(meta: torch.Tensor) -> torch.Tensor:
    """A float32 scale/minimum tensor as stored: float16 when that is exact, else unchanged."""
    half = meta.to(torch.float16)
    return half if torch.equal(half.float(), meta) else meta


def _round_meta(q: kernels.Quantized) -> kernels.Quantized:
    """q with scale and minimum rounded to float16 values (kept float32), unless they overflow."""
    scale, minimum = q.scale.to(torch.float16), q.minimum.to(torch.float16)
    if not (torch.isfinite(scale).all() and torch.isfinite(minimum).all()):
        return q
    return dataclasses.replace(q, scale=scale.float(), minimum=minimum.float())


@dataclass(frozen=True, eq=False)
class CompressedKV:
    """A compressed KV cache: what is stored as an activation and loaded for reuse.

    token_ids: the whole original context; positions: (layers, kv_heads, kept) int64 original
    positions of the kept entries, or None when nothing was evicted; dtype: the model dtype
    that `decompress` restores.
    """

    layers: tuple[CompressedLayer, ...]
    token_ids: tuple[int, ...]
    positions: torch.Tensor | None
    settings: CompressionConfig
    dtype: torch.dtype
    kv_heads: int
    head_dim: int

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def spans(self) -> tuple[int, int, int]:
        """(sink, quantized, residual) entries per layer and head."""
        layer = self.layers[0]
        quantized = layer.keys.shape[2] if layer.keys is not None else 0
        return int(layer.sink_keys.shape[2]), int(quantized), int(layer.residual_keys.shape[2])

    @property
    def kept(self) -> int:
        return sum(self.spans)

    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, minimums, unquantized spans, positions)."""
        extra = 0 if self.positions is None else self.positions.numel() * 4  # int32 on disk
        return sum(layer.nbytes() for layer in self.layers) + extra

    def memory_nbytes(self) -> int:
        """Bytes this object holds in memory (scales and minimums are float32 here)."""
        total = 0 if self.positions is None else self.positions.numel() * 8
        for layer in self.layers:
            tensors = [layer.sink_keys, layer.sink_values, layer.residual_keys,
                       layer.residual_values]  # fmt: skip
            for q in (layer.keys, layer.values):
                if q is not None:
                    tensors += [q.packed, q.scale, q.minimum]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def fp16_nbytes(self) -> int:
        """What the kept keys and values would take in float16: the comparison baseline."""
        return 2 * len(self.layers) * self.kv_heads * self.kept * self.head_dim * 2


def _unquantized(x: torch.Tensor) -> torch.Tensor:
    """x as stored unquantized: float16 for a float32 model unless it overflows float16."""
    if x.dtype != torch.float32 or x.numel() == 0:
        return x.contiguous().clone()
    if x.abs().max().item() > _FP16_MAX:
        return x.contiguous().clone()
    return x.to(torch.float16).contiguous()


def split_spans(kept: int, settings: CompressionConfig) -> tuple[int, int, int]:
    """(sink, quantized, residual) sizes for `kept` entries; the quantized span fills groups."""
    sink = min(settings.sink_tokens, kept) if settings.bits < 16 else 0
    rest = kept - sink
    if settings.bits == 16:
        return 0, 0, rest
    span = max(0, rest - settings.residual_tokens) // settings.group_size * settings.group_size
    return sink, span, rest - span


def compress(kv: KVCache, settings: CompressionConfig, backend: str = "auto") -> CompressedKV:
    """Quantize `kv` (already evicted if eviction was asked for) as `settings` say.

    kv: per layer (1, kv_heads, kept, head_dim) in the model dtype.
    """
    if kv.ragged:
        raise InvalidArgument(
            "a cache with per-layer budgets keeps different counts per layer; the KIVI layout "
            f"takes one count for every layer (this one keeps {sorted(set(kv.layer_kept))})"
        )
    value_group = min(settings.value_group_size, kv.head_dim)
    if settings.bits < 16 and kv.head_dim % value_group:
        raise InvalidArgument(
            f"value_group_size={settings.value_group_size} does not divide "
            f"head_dim={kv.head_dim}; use a power of two"
        )
    sink, span, _ = split_spans(kv.kept, settings)
    layers = []
    for k, v in zip(kv.keys, kv.values, strict=True):
        qk = qv = None
        if span:
            bits, group = settings.bits, settings.group_size
            body_k = k[:, :, sink : sink + span].contiguous()
            if settings.clip_keys:
                body_k = clip_groups(body_k, bits=bits, group_size=group, axis="channel")
            body_v = v[:, :, sink : sink + span].contiguous()
            qk = kernels.quantize(
                body_k, bits=bits, group_size=group, axis="channel", backend=backend
            )
            qv = kernels.quantize(
                body_v, bits=bits, group_size=value_group, axis="token", backend=backend
            )
            if bits <= 4:
                qk, qv = _round_meta(qk), _round_meta(qv)
        layers.append(
            CompressedLayer(
                sink_keys=_unquantized(k[:, :, :sink]),
                sink_values=_unquantized(v[:, :, :sink]),
                keys=qk,
                values=qv,
                residual_keys=_unquantized(k[:, :, sink + span :]),
                residual_values=_unquantized(v[:, :, sink + span :]),
            )
        )
    return CompressedKV(
        layers=tuple(layers),
        token_ids=kv.token_ids,
        positions=None if kv.positions is None else kv.positions.clone(),
        settings=settings,
        dtype=kv.dtype,
        kv_heads=kv.kv_heads,
        head_dim=kv.head_dim,
    )


def decompress(
    compressed: CompressedKV, device: torch.device | str = "cpu", backend: str = "auto"
) -> KVCache:
    """Fresh full-precision tensors on `device`: (1, kv_heads, kept, head_dim) per layer.

    Every call allocates new tensors, so a request can never write into a stored activation.
    Each layer's keys (and values) are allocated once and filled span by span: the sinks and the
    residual are converted and moved by one copy each, and the quantized span is dequantized
    straight into its slice, so nothing is assembled (or converted) a second time.
    """
    device = torch.device(device)
    shape = (1, compressed.kv_heads, compressed.kept, compressed.head_dim)
    sink, span, _ = compressed.spans
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for layer in compressed.layers:
        for quantized, head, tail, into in (
            (layer.keys, layer.sink_keys, layer.residual_keys, keys),
            (layer.values, layer.sink_values, layer.residual_values, values),
        ):
            out = torch.empty(shape, dtype=compressed.dtype, device=device)
            out[:, :, :sink].copy_(head)
            if quantized is not None:
                q = _to_device(quantized, device)
                kernels.dequantize(
                    q, dtype=compressed.dtype, backend=backend, out=out[:, :, sink : sink + span]
                )
            out[:, :, sink + span :].copy_(tail)
            into.append(out)
    return KVCache(
        keys=tuple(keys),
        values=tuple(values),
        token_ids=compressed.token_ids,
        positions=compressed.positions,
    )


def _to_device(q: kernels.Quantized, device: torch.device) -> kernels.Quantized:
    if q.device == device:
        return q
    return kernels.Quantized(
        packed=q.packed.to(device),
        scale=q.scale.to(device),
        minimum=q.minimum.to(device),
        bits=q.bits,
        group_size=q.group_size,
        axis=q.axis,
        shape=q.shape,
        dtype=q.dtype,
    )
