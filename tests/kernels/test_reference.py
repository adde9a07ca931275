"""The pure-torch reference on its own: exact answers, error bounds, exact code round trips."""

from __future__ import annotations

import pytest
import torch

from kernels import dequantize_reference, quantize_reference
from kernels.pack import unpack_codes
from tests.kernels.conftest import (
    BITS,
    DEVICE,
    DTYPES,
    dtype_id,
    expand_meta,
    layout_cases,
    random_kv,
)

FP32_EPS = torch.finfo(torch.float32).eps


def test_two_bit_known_answer() -> None:
    # One token, one group of 4 channels: min 0, max 3 -> scale 1, codes = values.
    # Codes [0, 3, 1, 2] pack to 0b10_01_11_00 = 0x9C.
    x = torch.tensor([0.0, 3.0, 1.0, 2.0], device=DEVICE).view(1, 1, 1, 4)
    q = quantize_reference(x, bits=2, group_size=4, axis="token")
    assert q.packed.tolist() == [[[[0x9C]]]]
    assert q.scale.tolist() == [[[[1.0]]]] and q.minimum.tolist() == [[[[0.0]]]]
    assert torch.equal(dequantize_reference(q), x)


def test_channel_known_answer() -> None:
    # axis="channel": 4 tokens of 4 channels; channel c holds [c, c + 2, c + 4, c + 6] over tokens
    # (scale 2, min c) except channel 3, which is constant (scale 0, codes 0).
    x = torch.tensor(
        [[0.0, 1.0, 2.0, 5.0], [2.0, 3.0, 4.0, 5.0], [4.0, 5.0, 6.0, 5.0], [6.0, 7.0, 8.0, 5.0]],
        device=DEVICE,
    ).view(1, 1, 4, 4)
    q = quantize_reference(x, bits=2, group_size=4, axis="channel")
    assert q.scale.tolist() == [[[[2.0, 2.0, 2.0, 0.0]]]]
    assert q.minimum.tolist() == [[[[0.0, 1.0, 2.0, 5.0]]]]
    # Token t has codes [t, t, t, 0]: bytes t | t<<2 | t<<4 = 21 * t.
    assert q.packed.view(4).tolist() == [0, 21, 42, 63]
    assert torch.equal(dequantize_reference(q), x)


def test_float16_scale_rounds_up() -> None:
    # Range [0, 1] at 2 bits: scale 1/3, which float16 can't hold; nearest is 0.33325195 (below),
    # stored is the next float16 up, 0.33349609, so the maximum is not clipped.
    x = torch.tensor([0.0, 1.0, 0.5, 0.25], device=DEVICE).view(1, 1, 1, 4).half()
    q = quantize_reference(x, bits=2, group_size=4, axis="token")
    assert q.scale.dtype == torch.float16
    assert q.scale.item() == 0.333496093750 > 1 / 3 > torch.tensor(1 / 3).half().item()
    assert unpack_codes(q.packed, 2).view(4).tolist() == [0, 3, 1, 1]
    # 0.25 / 0.3335 = 0.7496 -> 1; float16 input keeps float16 metadata, the rest float32.
    for dtype, meta in [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)]:
        q = quantize_reference(x.to(dtype), bits=2, group_size=4, axis="token")
        assert q.scale.dtype == q.minimum.dtype == meta


def test_rounds_half_up() -> None:
    # 2 bits over [0, 3]: 0.5 -> 1 and 1.5 -> 2 (not to even, as torch.round would).
    x = torch.tensor([0.0, 0.5, 1.5, 3.0], device=DEVICE).view(1, 1, 1, 4)
    q = quantize_reference(x, bits=2, group_size=4, axis="token")
    assert unpack_codes(q.packed, 2).view(4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("shape", "group_size", "axis"), layout_cases())
def test_grid(
    shape: tuple[int, ...], group_size: int, axis: str, bits: int, dtype: torch.dtype
) -> None:
    x = random_kv(shape, dtype)
    q = quantize_reference(x, bits=bits, group_size=group_size, axis=axis)  # type: ignore[arg-type]
    maxq = (1 << bits) - 1
    # Sizes are exact: numel * bits / 8 bytes of codes, one scale and min per group, float16
    # for float16 input and float32 otherwise.
    groups = x.numel() // group_size
    meta_bytes = 2 if dtype == torch.float16 else 4
    assert q.packed.numel() == x.numel() * bits // 8
    assert q.scale.numel() == q.minimum.numel() == groups
    assert q.scale.element_size() == q.minimum.element_size() == meta_bytes
    assert q.nbytes() == x.numel() * bits // 8 + groups * 2 * meta_bytes
    assert (q.shape, q.dtype, q.bits, q.axis) == (shape, dtype, bits, axis)

    # Every element is within half a step of its group's grid, up to float32 rounding.
    x32 = x.float()
    scale = expand_meta(q.scale.float(), group_size, axis)
    minimum = expand_meta(q.minimum.float(), group_size, axis)
    x_hat = dequantize_reference(q, dtype=torch.float32)
    slack = 4 * FP32_EPS * (x32.abs() + minimum.abs() + scale * maxq)
    assert bool(((x32 - x_hat).abs() <= scale / 2 + slack).all())
    # Each group's min maps to code 0 and reconstructs exactly; its max maps to the top code.
    codes = unpack_codes(q.packed, bits).view(shape)
    assert torch.equal(torch.where(x32 == minimum, x_hat, minimum), minimum)
    assert bool((codes[x32 == minimum + scale * maxq] == maxq).all())
    # In the input dtype the error gains at most half an ulp of the output.
    out = dequantize_reference(q)
    assert out.dtype == dtype and out.shape == shape
    ulp = torch.finfo(dtype).eps * x_hat.abs()
    assert bool(((x32 - out.float()).abs() <= scale / 2 + slack + ulp).all())

    # Re-quantizing the dequantized tensor gives back the same codes, bit for bit.
    again = quantize_reference(x_hat, bits=bits, group_size=group_size, axis=axis)  # type: ignore[arg-type]
    assert torch.equal(again.packed, q.packed)
    torch.testing.assert_close(again.scale, q.scale.float())
    assert torch.equal(again.minimum, q.minimum.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_constant_groups(axis: str, bits: int, dtype: torch.dtype) -> None:
    # Constant along the grouped axis: scale 0, all codes 0, dequantization exact.
    values = torch.arange(8, dtype=torch.float32, device=DEVICE) - 3.25
    if axis == "channel":
        x = values.view(1, 1, 1, 8).expand(1, 1, 32, 8)  # each channel constant over tokens
    else:
        x = values.view(1, 1, 8, 1).expand(1, 1, 8, 32)  # each token constant over channels
    x = x.to(dtype).contiguous()
    q = quantize_reference(x, bits=bits, group_size=8 if axis == "token" else 32, axis=axis)  # type: ignore[arg-type]
    assert bool((q.scale == 0).all())
    assert bool((q.packed == 0).all())
    assert torch.equal(dequantize_reference(q), x)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("dtype", "big"),
    [(torch.float16, 65504.0), (torch.bfloat16, 1e38), (torch.float32, 1e38)],
    ids=["float16-max", "bfloat16-1e38", "float32-1e38"],
)
def test_extreme_values(dtype: torch.dtype, big: float, bits: int) -> None:
    # Groups spanning [-big, big] plus a group of tiny values next to one huge one.
    gen = torch.Generator().manual_seed(bits)
    x = (torch.rand(1, 1, 4, 64, generator=gen) * 2 - 1) * big
    x[..., 0, :2] = torch.tensor([-big, big])
    x[..., 1, :] = 1e-3
    x[..., 1, 5] = big
    x = x.to(dtype).to(DEVICE)
    q = quantize_reference(x, bits=bits, group_size=32, axis="token")
    x_hat = dequantize_reference(q, dtype=torch.float32)
    assert bool(torch.isfinite(q.scale).all() and torch.isfinite(x_hat).all())
    scale = expand_meta(q.scale.float(), 32, "token")
    slack = 8 * FP32_EPS * (x.float().abs() + scale * ((1 << bits) - 1))
    assert bool(((x.float() - x_hat).abs() <= scale / 2 + slack).all())
    # In the input dtype everything stays finite (float16: the rounded-up scale puts the top code
    # at 65536 for 2 bits, clamped to 65504) and the extremes come back within a few ulps.
    out = dequantize_reference(q)
    assert bool(torch.isfinite(out).all())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out[0, 0, 0, :2], x[0, 0, 0, :2], rtol=4 * eps, atol=0)
