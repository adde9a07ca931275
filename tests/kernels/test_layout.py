"""Validation shared by both backends: each caller mistake raises QuantizationError, exactly."""

from __future__ import annotations

import re

import pytest
import torch

from kernels import QuantizationError, meta_shape, packed_shape, validate_bits
from kernels.layout import validate_input


def rejects(x: torch.Tensor, message: str, **kwargs: object) -> None:
    options: dict[str, object] = {"bits": 4, "group_size": 32, "axis": "token", **kwargs}
    with pytest.raises(QuantizationError, match=f"^{re.escape(message)}$"):
        validate_input(x, **options)  # type: ignore[arg-type]


def test_validate_bits() -> None:
    assert [validate_bits(b) for b in (2, 4, 8)] == [2, 4, 8]
    for bad in (1, 3, 16, True, 4.0):
        with pytest.raises(QuantizationError, match=re.escape("allowed: (2, 4, 8)")):
            validate_bits(bad)  # type: ignore[arg-type]


def test_error_is_a_value_error() -> None:
    assert issubclass(QuantizationError, ValueError)


X = torch.zeros(1, 2, 64, 64)


def test_bad_bits() -> None:
    rejects(X, "bits=3 is not supported; allowed: (2, 4, 8)", bits=3)


def test_bad_axis() -> None:
    rejects(X, "axis='head' is not supported; allowed: ('token', 'channel')", axis="head")


def test_bad_group_size() -> None:
    rejects(X, "group_size=0 must be a positive int", group_size=0)
    rejects(X, "group_size=32.0 must be a positive int", group_size=32.0)


def test_wrong_rank() -> None:
    rejects(
        torch.zeros(64, 64),
        "shape=(64, 64) has 2 dims; expected 4: (batch, kv_heads, tokens, head_dim)",
    )


def test_empty_dim() -> None:
    rejects(torch.zeros(1, 2, 0, 64), "shape=(1, 2, 0, 64) has an empty dim; all dims must be >= 1")


def test_tokens_not_multiple_of_group() -> None:
    rejects(
        torch.zeros(1, 2, 40, 64),
        "tokens=40 is not a multiple of group_size=32; axis='channel' groups consecutive tokens "
        "(quantize a multiple of group_size tokens, keep the rest in full precision)",
        axis="channel",
    )


def test_head_dim_not_multiple_of_group() -> None:
    rejects(
        torch.zeros(1, 2, 64, 48),
        "head_dim=48 is not a multiple of group_size=32; axis='token' groups consecutive channels",
    )


def test_head_dim_must_fill_bytes() -> None:
    rejects(
        torch.zeros(1, 2, 64, 6),
        "head_dim=6 must be a multiple of 4 to pack 2-bit codes densely along it",
        bits=2,
        group_size=2,
        axis="channel",
    )


def test_token_group_must_not_straddle_bytes() -> None:
    rejects(
        torch.zeros(1, 2, 8, 8),
        "group_size=2 must be a multiple of 4 for 2-bit codes with axis='token', "
        "so that no byte straddles two groups",
        bits=2,
        group_size=2,
    )


def test_bad_dtype() -> None:
    allowed = "(torch.float16, torch.bfloat16, torch.float32)"
    rejects(X.double(), f"dtype=torch.float64 is not supported; allowed: {allowed}")
    rejects(X.to(torch.int8), f"dtype=torch.int8 is not supported; allowed: {allowed}")


def test_non_contiguous() -> None:
    sliced = torch.zeros(1, 2, 128, 64)[:, :, :64]
    rejects(
        sliced,
        "x with shape=(1, 2, 64, 64) and stride=(16384, 8192, 64, 1) is not contiguous; "
        "call .contiguous() first",
    )
    rejects(
        X.transpose(2, 3),
        "x with shape=(1, 2, 64, 64) and stride=(8192, 4096, 1, 64) is not contiguous; "
        "call .contiguous() first",
    )


def test_not_a_tensor() -> None:
    rejects([[1.0]], "x must be a torch.Tensor, got list")  # type: ignore[arg-type]


def test_shapes() -> None:
    shape = (2, 3, 128, 64)
    assert meta_shape(shape, group_size=32, axis="channel") == (2, 3, 4, 64)
    assert meta_shape(shape, group_size=32, axis="token") == (2, 3, 128, 2)
    assert packed_shape(shape, bits=2) == (2, 3, 128, 16)
    assert packed_shape(shape, bits=4) == (2, 3, 128, 32)
    assert packed_shape(shape, bits=8) == (2, 3, 128, 64)
