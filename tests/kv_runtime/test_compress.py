"""KIVI assembly (sinks | quantized span | residual), clipping, and compression settings."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import kernels
from kv_runtime import NO_COMPRESSION, CompressionConfig, InvalidArgument, KVCache, Runtime
from kv_runtime.clipping import clip_groups
from kv_runtime.compress import compress, decompress, split_spans

# Quantize most of the ~90-token test context: 4 sinks, one or two 32-token key groups.
SMALL = {"group_size": 32, "residual_tokens": 16, "sink_tokens": 4}


@pytest.mark.parametrize(
    ("kept", "settings", "spans"),
    [
        (100, CompressionConfig(bits=4, residual_tokens=32, sink_tokens=4), (4, 64, 32)),
        (101, CompressionConfig(bits=4, residual_tokens=32, sink_tokens=4), (4, 64, 33)),
        (2048, CompressionConfig(bits=2), (4, 1984, 60)),
        (2048, CompressionConfig(bits=2, sink_tokens=0, residual_tokens=0), (0, 2048, 0)),
        (30, CompressionConfig(bits=4), (4, 0, 26)),
        (100, CompressionConfig(bits=16), (0, 0, 100)),
    ],
)  # fmt: skip
def test_spans_fill_whole_key_groups_and_the_remainder_joins_the_residual(
    kept: int, settings: CompressionConfig, spans: tuple[int, int, int]
) -> None:
    assert split_spans(kept, settings) == spans


def test_16_bit_is_float16_whatever_the_compute_dtype(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int]
) -> None:
    compressed = compress(kv, NO_COMPRESSION)
    assert compressed.spans == (0, 0, kv.length) and compressed.dtype == torch.float32
    elements = 2 * kv.layers * kv.kv_heads * kv.length * kv.head_dim
    # Two bytes an element, as stored (a float32 cache was stored as float32 before: 2x).
    assert compressed.nbytes() == compressed.fp16_nbytes() == 2 * elements == kv.nbytes() // 2
    layer = compressed.layers[0]
    assert layer.residual_keys.dtype == layer.residual_values.dtype == torch.float16
    restored = decompress(compressed)  # cast back to the runtime's dtype, fresh tensors
    for a, b in zip(restored.keys + restored.values, kv.keys + kv.values, strict=True):
        assert a.dtype == torch.float32 and a.data_ptr() != b.data_ptr()
        assert torch.equal(a, b.half().float())
    # Float16 keeps 11 significant bits, so the continued logits move a little (float32 kept
    # them equal to 1e-4); the greedy answer does not change.
    exact, rounded = runtime.logits(prompt_ids, kv), runtime.logits(prompt_ids, compressed)
    torch.testing.assert_close(rounded, exact, atol=0.02, rtol=0)  # measured: 4.5e-3
    assert bool((rounded.argmax(-1) == exact.argmax(-1)).all())
    greedy = runtime.generate(prompt_ids, kv=kv, max_tokens=8).collect().token_ids
    assert runtime.generate(prompt_ids, kv=compressed, max_tokens=8).collect().token_ids == greedy


def test_quantized_layout(kv: KVCache) -> None:
    settings = CompressionConfig(bits=8, clip_keys=False, **SMALL)
    compressed = compress(kv, settings)
    sink, span, residual = compressed.spans
    assert (sink, span, residual) == (4, 64, kv.length - 68)
    layer, k, v = compressed.layers[7], kv.keys[7], kv.values[7]
    # Sinks and residual are float16 copies of the originals.
    assert layer.sink_keys.dtype == torch.float16
    assert torch.equal(layer.sink_keys, k[:, :, :4].half())
    assert torch.equal(layer.residual_values, v[:, :, 68:].half())
    # The span is KIVI: keys per channel in 32-token groups, values per token (64 channels).
    assert layer.keys is not None and layer.values is not None
    assert (layer.keys.axis, layer.keys.group_size, layer.keys.bits) == ("channel", 32, 8)
    assert (layer.values.axis, layer.values.group_size) == ("token", 64)
    restored = decompress(compressed)
    error = (restored.keys[7][:, :, 4:68] - k[:, :, 4:68]).abs()
    bound = layer.keys.scale.repeat_interleave(32, dim=2) / 2 + 1e-5
    assert bool((error <= bound).all())
    assert compressed.nbytes() < kv.nbytes() / 2  # 8-bit codes + fp16 edges vs fp32


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_decompress_fills_each_layer_span_by_span_as_the_parts_would_join(
    kv: KVCache, bits: int
) -> None:
    compressed = compress(kv, CompressionConfig(bits=bits, **SMALL))
    sink, span, _ = compressed.spans
    restored = decompress(compressed)
    for layer, k, v in zip(compressed.layers, restored.keys, restored.values, strict=True):
        for q, head, tail, got in (
            (layer.keys, layer.sink_keys, layer.residual_keys, k),
            (layer.values, layer.sink_values, layer.residual_values, v),
        ):
            parts = [head.float()]
            if q is not None:
                parts.append(kernels.dequantize(q, dtype=torch.float32))
            parts.append(tail.float())
            assert got.is_contiguous() and got.dtype == torch.float32
            assert torch.equal(got, torch.cat(parts, dim=2))
    assert restored.kept == sink + span + compressed.spans[2] and restored.nbytes() == kv.nbytes()


def test_scales_are_stored_as_float16_at_2_and_4_bits_only(kv: KVCache) -> None:
    for bits, dtype in ((2, torch.float16), (4, torch.float16), (8, torch.float32)):
        layer = compress(kv, CompressionConfig(bits=bits, **SMALL)).layers[0]
        stored = layer.stored()
        assert stored["keys.scale"].dtype == stored["values.minimum"].dtype == dtype
        assert stored["keys.packed"].dtype == torch.uint8


def test_8_bit_keeps_the_top_1_of_the_uncompressed_cache(
    runtime: Runtime, kv: KVCache, prompt_ids: list[int]
) -> None:
    compressed = runtime.compress(kv, CompressionConfig(bits=8, **SMALL))
    assert compressed.spans[1] == 64
    exact = runtime.generate(prompt_ids, kv=kv, max_tokens=8).collect()
    quantized = runtime.generate(prompt_ids, kv=compressed, max_tokens=8).collect()
    assert quantized.token_ids == exact.token_ids
    forced = [*prompt_ids, *exact.token_ids]
    reference, ours = runtime.logits(forced, kv), runtime.logits(forced, compressed)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_clipping_never_adds_error_and_trims_an_outlier() -> None:
    def error(x: torch.Tensor, grid: torch.Tensor) -> float:
        low, high = grid.amin(2, keepdim=True), grid.amax(2, keepdim=True)
        scale = (high - low) / 3
        codes = torch.floor((grid - low) / scale + 0.5).clamp(0, 3)
        return float((codes * scale + low - x).square().sum())

    levels = torch.tensor([0.0, 1.0]).repeat(16)  # min-max represents it exactly
    outlier = torch.cat([torch.linspace(0, 1, 31), torch.tensor([10.0])])
    x = torch.stack([levels, outlier]).T.reshape(1, 1, 32, 2).contiguous()  # two channels
    clipped = clip_groups(x, bits=2, group_size=32, axis="channel")
    assert clipped.shape == x.shape and clipped.dtype == x.dtype
    assert torch.equal(clipped[..., 0], x[..., 0])  # nothing to gain: left as it was
    assert float(clipped[..., 1].max()) < 10.0 and float(clipped[..., 1].min()) >= 0.0
    assert error(x[..., 1:], clipped[..., 1:]) < error(x[..., 1:], x[..., 1:]) / 2


def test_bad_settings_are_refused_naming_the_value() -> None:
    with pytest.raises(ValidationError, match="scorer='h2o' is unknown; valid:"):
        CompressionConfig(scorer="h2o")
    with pytest.raises(ValidationError, match="budget_tokens=10 is below"):
        CompressionConfig(budget_tokens=10, sink_tokens=4, window_tokens=32)
    with pytest.raises(ValidationError, match="group_size=48 must be a power of two"):
        CompressionConfig(group_size=48)
    with pytest.raises(ValidationError, match="bits"):
        CompressionConfig(bits=3)
    odd = torch.zeros(1, 2, 40, 48)  # head_dim 48: 32-channel value groups do not fit
    cache = KVCache(keys=(odd,), values=(odd,), token_ids=tuple(range(40)))
    with pytest.raises(InvalidArgument, match="value_group_size=32 does not divide head_dim=48"):
        compress(cache, CompressionConfig(bits=4, value_group_size=32))
