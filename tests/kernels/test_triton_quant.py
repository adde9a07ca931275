"""Triton kernels against the pure-torch oracle, on the same grid as `test_reference`.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest); with a GPU
they run compiled on CUDA tensors. Codes, scales and minimums must match the oracle bit for bit
(both do the same float32 operations with round-to-nearest division); dequantized values may
differ by one ulp of the output dtype (a fused multiply-add on GPU, and the interpreter truncates
float32 -> bfloat16 instead of rounding), which `assert_close`'s default tolerances cover.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from kernels import dequantize, dequantize_reference, quantize, quantize_reference
from tests.kernels.conftest import BITS, DEVICE, DTYPES, ON_GPU, dtype_id, layout_cases, random_kv

pytestmark = pytest.mark.skipif(
    not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
triton_quant = pytest.importorskip("kernels.triton_quant")


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("shape", "group_size", "axis"), layout_cases())
def test_matches_reference(
    shape: tuple[int, ...], group_size: int, axis: str, bits: int, dtype: torch.dtype
) -> None:
    x = random_kv(shape, dtype, seed=bits)
    options = {"bits": bits, "group_size": group_size, "axis": axis}
    expected = quantize_reference(x, **options)  # type: ignore[arg-type]
    actual = quantize(x, **options, backend="triton")  # type: ignore[arg-type]

    assert actual.packed.numel() == x.numel() * bits // 8
    assert torch.equal(actual.packed, expected.packed)
    exact(actual.scale, expected.scale)
    exact(actual.minimum, expected.minimum)
    assert (actual.shape, actual.dtype, actual.axis) == (expected.shape, expected.dtype, axis)

    x_hat = dequantize(actual, backend="triton")
    assert x_hat.dtype == dtype and x_hat.is_contiguous()
    torch.testing.assert_close(x_hat, dequantize_reference(expected))
    torch.testing.assert_close(
        dequantize(actual, dtype=torch.float32, backend="triton"),
        dequantize_reference(expected, dtype=torch.float32),
    )


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_constant_and_extreme_groups(axis: str) -> None:
    # Constant groups (scale 0) next to groups spanning the whole float16 range.
    x = torch.zeros(1, 1, 32, 32)
    x[..., :16, :] = 1.5
    x[..., 16:, :16] = torch.linspace(-65504.0, 65504.0, 16 * 16).view(16, 16)
    x = x.to(torch.float16).to(DEVICE)
    for bits in BITS:
        options = {"bits": bits, "group_size": 16, "axis": axis}
        expected = quantize_reference(x, **options)  # type: ignore[arg-type]
        actual = quantize(x, **options, backend="triton")  # type: ignore[arg-type]
        assert torch.equal(actual.packed, expected.packed)
        exact(actual.scale, expected.scale)
        exact(actual.minimum, expected.minimum)
        assert bool((actual.scale == 0).any())
        x_hat = dequantize(actual, backend="triton")
        assert bool(torch.isfinite(x_hat).all())
        torch.testing.assert_close(x_hat, dequantize_reference(expected))


def test_two_bit_known_answer() -> None:
    x = torch.tensor([0.0, 3.0, 1.0, 2.0, 3.0, 2.0, 1.0, 0.0], device=DEVICE).view(1, 1, 1, 8)
    q = quantize(x, bits=2, group_size=4, axis="token", backend="triton")
    # [0, 3, 1, 2] -> 0b10_01_11_00 = 0x9C; [3, 2, 1, 0] -> 0b00_01_10_11 = 0x1B.
    assert q.packed.view(2).tolist() == [0x9C, 0x1B]
    assert torch.equal(dequantize(q, backend="triton"), x)


def test_rejects_tensors_triton_cannot_reach() -> None:
    x = torch.zeros(1, 1, 32, 64, device="meta")
    message = (
        "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones); "
        "got a tensor on meta"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        quantize(x, bits=4, group_size=32, axis="token", backend="triton")
