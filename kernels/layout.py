"""The rules every backend shares: supported bits, dtypes, axes, and the shapes they imply.

Both backends validate through these functions, so an input is accepted or rejected the same way
whichever backend runs it.

Packed layout: codes are packed along the last dim (head_dim), `8 // bits` codes a byte,
little-endian within the byte (code `i` of a byte sits at bit `bits * i`). A row of `head_dim`
codes therefore fills exactly `head_dim * bits // 8` bytes, the packed tensor is
`(batch, kv_heads, tokens, head_dim * bits // 8)` uint8, and its size is exactly
`numel * bits / 8` bytes. Packing along the contiguous dim lets a kernel read a tile of rows and
write whole bytes of the same rows without crossing program boundaries.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from kernels.errors import QuantizationError

Axis = Literal["token", "channel"]
AXES: tuple[Axis, ...] = get_args(Axis)
SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8)
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def validate_bits(bits: int) -> int:
    """Return `bits` if it is one of SUPPORTED_BITS, else raise QuantizationError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise QuantizationError(f"bits={bits!r} is not supported; allowed: {SUPPORTED_BITS}")
    return bits


def validate_axis(axis: str) -> Axis:
    """Return `axis` if it is "token" or "channel", else raise QuantizationError."""
    if axis not in AXES:
        raise QuantizationError(f"axis={axis!r} is not supported; allowed: {AXES}")
    return axis


def codes_per_byte(bits: int) -> int:
    """How many `bits`-wide codes one uint8 holds (4, 2 or 1)."""
    return 8 // validate_bits(bits)


def validate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return `dtype` if it is one of SUPPORTED_DTYPES, else raise QuantizationError."""
    if dtype not in SUPPORTED_DTYPES:
        raise QuantizationError(f"dtype={dtype} is not supported; allowed: {SUPPORTED_DTYPES}")
    return dtype


def meta_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of scale and minimum for an input of `dtype`: float16 for float16, else float32.

    float16 input: the minimum is an input value, so float16 holds it exactly, and the scale is
    rounded *up* to float16, which keeps every element within half a step and never clips the
    group's maximum; it costs +0.6% mean error at 8 bits, G=32, and ~0 at 2 and 4 bits, while
    saving 4 bytes a group (at 2 bits, G=32: 3 instead of 4 bits an element).
    bfloat16 input: float16 cannot hold its range (up to ~3e38, float16 stops at 65504), and a
    bfloat16 scale (8-bit mantissa) is off by up to half a step at 8 bits, so float32.
    """
    return torch.float16 if validate_dtype(dtype) == torch.float16 else torch.float32


def validate_layout(shape: tuple[int, ...], *, bits: int, group_size: int, axis: str) -> None:
    """Check that a (batch, kv_heads, tokens, head_dim) shape can be quantized as asked.

    Rules: 4 dims, none empty; `group_size` a positive int dividing tokens (axis="channel": a
    group is `group_size` consecutive tokens of one channel, the KIVI key layout) or head_dim
    (axis="token": `group_size` consecutive channels of one token, the KIVI value layout);
    head_dim a multiple of `8 // bits` so each row packs into whole bytes; for axis="token" also
    `group_size` a multiple of `8 // bits` so no byte straddles two groups.
    """
    validate_bits(bits)
    validate_axis(axis)
    if len(shape) != 4:
        raise QuantizationError(
            f"shape={tuple(shape)} has {len(shape)} dims; expected 4: "
            "(batch, kv_heads, tokens, head_dim)"
        )
    if any(size <= 0 for size in shape):
        raise QuantizationError(f"shape={tuple(shape)} has an empty dim; all dims must be >= 1")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise QuantizationError(f"group_size={group_size!r} must be a positive int")
    _, _, tokens, head_dim = shape
    per_byte = 8 // bits
    if head_dim % per_byte:
        raise QuantizationError(
            f"head_dim={head_dim} must be a multiple of {per_byte} to pack {bits}-bit codes "
            "densely along it"
        )
    if axis == "channel" and tokens % group_size:
        raise QuantizationError(
            f"tokens={tokens} is not a multiple of group_size={group_size}; axis='channel' "
            "groups consecutive tokens (quantize a multiple of group_size tokens, keep the rest "
            "in full precision)"
        )
    if axis == "token" and head_dim % group_size:
        raise QuantizationError(
            f"head_dim={head_dim} is not a multiple of group_size={group_size}; axis='token' "
            "groups consecutive channels"
        )
    if axis == "token" and group_size % per_byte:
        raise QuantizationError(
            f"group_size={group_size} must be a multiple of {per_byte} for {bits}-bit codes "
            "with axis='token', so that no byte straddles two groups"
        )


def validate_input(x: torch.Tensor, *, bits: int, group_size: int, axis: str) -> None:
    """Check a tensor to quantize: layout rules above, a supported dtype, contiguous memory.

    Non-contiguous input is refused rather than silently copied: a hidden copy of a KV cache
    doubles its memory, so the caller decides whether to call `.contiguous()`.
    """
    if not isinstance(x, torch.Tensor):
        raise QuantizationError(f"x must be a torch.Tensor, got {type(x).__name__}")
    validate_layout(tuple(x.shape), bits=bits, group_size=group_size, axis=axis)
    validate_dtype(x.dtype)
    if not x.is_contiguous():
        raise QuantizationError(
            f"x with shape={tuple(x.shape)} and stride={x.stride()} is not contiguous; "
            "call .contiguous() first"
        )


def meta_shape(shape: tuple[int, ...], *, group_size: int, axis: str) -> tuple[int, ...]:
    """Shape of scale and minimum: one value per group.

    axis="channel": (batch, kv_heads, tokens // group_size, head_dim);
    axis="token":   (batch, kv_heads, tokens, head_dim // group_size).
    """
    batch, heads, tokens, head_dim = shape
    if axis == "channel":
        return (batch, heads, tokens // group_size, head_dim)
    return (batch, heads, tokens, head_dim // group_size)


def packed_shape(shape: tuple[int, ...], *, bits: int) -> tuple[int, ...]:
    """Shape of the packed uint8 codes: (batch, kv_heads, tokens, head_dim * bits // 8)."""
    batch, heads, tokens, head_dim = shape
    assert head_dim * bits % 8 == 0, f"head_dim={head_dim} does not pack into bytes at {bits} bits"
    return (batch, heads, tokens, head_dim * bits // 8)
