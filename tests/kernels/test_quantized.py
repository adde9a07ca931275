"""The Quantized container: field consistency is checked, nbytes is honest."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from kernels import QuantizationError, Quantized, quantize_reference


def make(**overrides: object) -> Quantized:
    fields: dict[str, object] = {
        "packed": torch.zeros(2, 2, 128, 32, dtype=torch.uint8),
        "scale": torch.zeros(2, 2, 4, 128, dtype=torch.float16),
        "minimum": torch.zeros(2, 2, 4, 128, dtype=torch.float16),
        "bits": 2,
        "group_size": 32,
        "axis": "channel",
        "shape": (2, 2, 128, 128),
        "dtype": torch.float16,
        **overrides,
    }
    return Quantized(**fields)  # type: ignore[arg-type]


def test_nbytes_counts_codes_and_meta() -> None:
    # 2*2*128*128 codes at 2 bits = 16384 bytes; 2*2*4*128 groups x (scale + min) x 2 bytes.
    assert make().nbytes() == 16384 + 2048 * 2 * 2 == 24576
    # bfloat16 input keeps float32 metadata: 4 bytes each.
    meta = torch.zeros(2, 2, 4, 128)
    wide = make(dtype=torch.bfloat16, scale=meta, minimum=meta)
    assert wide.nbytes() == 16384 + 2048 * 2 * 4 == 32768


def test_nbytes_of_a_real_quantization() -> None:
    x = torch.randn(1, 2, 64, 128, dtype=torch.float16)
    q = quantize_reference(x, bits=4, group_size=64, axis="token")
    assert q.packed.numel() == x.numel() * 4 // 8 == 8192
    assert q.nbytes() == 8192 + (1 * 2 * 64 * 2) * 2 * 2 == 9216


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make().bits = 4  # type: ignore[misc]


def test_wrong_packed_shape() -> None:
    with pytest.raises(
        QuantizationError,
        match=re.escape(
            "packed has dtype=torch.uint8 shape=(2, 2, 128, 64); "
            "expected torch.uint8 (2, 2, 128, 32)"
        ),
    ):
        make(packed=torch.zeros(2, 2, 128, 64, dtype=torch.uint8))


def test_wrong_meta_dtype() -> None:
    with pytest.raises(
        QuantizationError,
        match=re.escape(
            "scale has dtype=torch.float32 shape=(2, 2, 4, 128); "
            "expected torch.float16 (2, 2, 4, 128)"
        ),
    ):
        make(scale=torch.zeros(2, 2, 4, 128))


def test_wrong_meta_shape_for_axis() -> None:
    with pytest.raises(QuantizationError, match=re.escape("expected torch.float16 (2, 2, 128, 4)")):
        make(axis="token")


def test_layout_rules_apply() -> None:
    with pytest.raises(QuantizationError, match=re.escape("bits=3 is not supported")):
        make(bits=3)


def test_shape_is_a_tuple() -> None:
    assert make(shape=[2, 2, 128, 128]).shape == (2, 2, 128, 128)


def test_meta_must_be_contiguous() -> None:
    with pytest.raises(QuantizationError, match="^minimum must be contiguous$"):
        make(minimum=torch.zeros(2, 2, 4, 256, dtype=torch.float16)[..., ::2])


def test_one_device() -> None:
    with pytest.raises(QuantizationError, match="^scale is on meta but packed is on cpu$"):
        make(scale=torch.zeros(2, 2, 4, 128, dtype=torch.float16, device="meta"))
