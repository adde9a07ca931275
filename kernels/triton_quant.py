"""Triton kernels for KIVI quantize+pack and unpack+dequantize (same math as `kernels.reference`).

Imported lazily by `kernels.dispatch`, so `kernels` works without triton installed. Every
launcher here assumes its input already passed `kernels.layout` validation; it only checks what
a launch needs on top (device, contiguity) and asserts internal invariants.

Tiling. The tensor is seen as a (rows = batch * kv_heads * tokens, head_dim) matrix and the packed
output as (rows, head_dim * bits // 8). A program owns a tile of output *bytes*; for each of the
`8 // bits` code slots of those bytes it loads the matching input elements (a stride of
`8 // bits` elements, so the slots together read whole cache lines) and ORs the shifted codes
into the bytes, which are then stored in one contiguous write.
- axis="token" (groups of G channels in a row): grid (row blocks, head_dim // G); a program holds
  BLOCK_R rows x one group, reduces min/max over the group, then re-reads it to encode.
- axis="channel" (groups of G tokens in a channel): grid (rows // G, byte-column blocks); a
  program holds one token group x BLOCK_C bytes, so every channel's group is in the tile.
Divisions use `div_rn` (IEEE round-to-nearest) so GPU codes match the torch reference bit for bit;
Triton's default float32 `/` on CUDA is an approximate division.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.errors import QuantizationError
from kernels.layout import Axis, codes_per_byte, meta_dtype, meta_shape, packed_shape
from kernels.quantized import Quantized

# Elements per tile: keeps registers per thread modest on GPU and programs few in the interpreter.
_TILE = 4096


@triton.jit
def _stored_scale(mx, mn, MAXQ: tl.constexpr, META_F16: tl.constexpr):
    """(max - min) / MAXQ, rounded up to float16 when META_F16 (see `round_scale_up`); float32."""
    scale = tl.math.div_rn(mx - mn, tl.full(mx.shape, MAXQ, tl.float32))
    if META_F16:
        nearest = scale.to(tl.float16)
        above = (nearest.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
        scale = tl.where(nearest.to(tl.float32) < scale, above, nearest).to(tl.float32)
    return scale


@triton.jit
def _encode(v, mn, safe, MAXQ: tl.constexpr):
    """float32 values -> int32 codes; same operations as the reference, in the same order."""
    code = tl.floor(tl.math.div_rn(v - mn, safe) + 0.5)
    return tl.minimum(tl.maximum(code, 0.0), MAXQ).to(tl.int32)


@triton.jit
def _quantize_token_kernel(
    x_ptr, packed_ptr, scale_ptr, min_ptr, R, D, G,
    BITS: tl.constexpr, META_F16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    PER_BYTE: tl.constexpr = 8 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    group = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = tl.arange(0, BLOCK_B)
    row_ok = rows < R
    ok = row_ok[:, None] & (byte < G // PER_BYTE)[None, :]
    first = rows[:, None].to(tl.int64) * D + group * G + byte[None, :] * PER_BYTE
    mn = tl.full((BLOCK_R,), float("inf"), tl.float32)
    mx = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for j in tl.static_range(PER_BYTE):
        v = tl.load(x_ptr + first + j, mask=ok, other=0.0).to(tl.float32)
        mn = tl.minimum(mn, tl.min(tl.where(ok, v, float("inf")), axis=1))
        mx = tl.maximum(mx, tl.max(tl.where(ok, v, float("-inf")), axis=1))
    scale = _stored_scale(mx, mn, MAXQ, META_F16)
    safe = tl.where(scale > 0, scale, 1.0)
    acc = tl.zeros((BLOCK_R, BLOCK_B), tl.int32)
    for j in tl.static_range(PER_BYTE):
        v = tl.load(x_ptr + first + j, mask=ok, other=0.0).to(tl.float32)
        acc |= _encode(v, mn[:, None], safe[:, None], MAXQ) << (j * BITS)
    out = rows[:, None].to(tl.int64) * (D // PER_BYTE) + group * (G // PER_BYTE) + byte[None, :]
    tl.store(packed_ptr + out, acc.to(tl.uint8), mask=ok)
    meta = rows.to(tl.int64) * (D // G) + group
    tl.store(scale_ptr + meta, scale.to(scale_ptr.dtype.element_ty), mask=row_ok)
    tl.store(min_ptr + meta, mn.to(min_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _quantize_channel_kernel(
    x_ptr, packed_ptr, scale_ptr, min_ptr, D, G,
    BITS: tl.constexpr, META_F16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    PER_BYTE: tl.constexpr = 8 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    group = tl.program_id(0)  # token group over all (batch, head) slices: rows group*G ...
    toks = tl.arange(0, BLOCK_T)
    byte = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    byte_ok = byte < D // PER_BYTE
    ok = (toks < G)[:, None] & byte_ok[None, :]
    rows = group.to(tl.int64) * G + toks
    acc = tl.zeros((BLOCK_T, BLOCK_C), tl.int32)
    for j in tl.static_range(PER_BYTE):
        v = tl.load(x_ptr + rows[:, None] * D + byte[None, :] * PER_BYTE + j, mask=ok, other=0.0)
        v = v.to(tl.float32)
        mn = tl.min(tl.where(ok, v, float("inf")), axis=0)
        mx = tl.max(tl.where(ok, v, float("-inf")), axis=0)
        scale = _stored_scale(mx, mn, MAXQ, META_F16)
        safe = tl.where(scale > 0, scale, 1.0)
        acc |= _encode(v, mn[None, :], safe[None, :], MAXQ) << (j * BITS)
        meta = group.to(tl.int64) * D + byte * PER_BYTE + j
        tl.store(scale_ptr + meta, scale.to(scale_ptr.dtype.element_ty), mask=byte_ok)
        tl.store(min_ptr + meta, mn.to(min_ptr.dtype.element_ty), mask=byte_ok)
    out = rows[:, None] * (D // PER_BYTE) + byte[None, :]
    tl.store(packed_ptr + out, acc.to(tl.uint8), mask=ok)


@triton.jit
def _dequantize_token_kernel(
    packed_ptr, scale_ptr, min_ptr, out_ptr, R, D, G, LIMIT,
    BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    PER_BYTE: tl.constexpr = 8 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    group = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = tl.arange(0, BLOCK_B)
    row_ok = rows < R
    ok = row_ok[:, None] & (byte < G // PER_BYTE)[None, :]
    src = rows[:, None].to(tl.int64) * (D // PER_BYTE) + group * (G // PER_BYTE) + byte[None, :]
    packed = tl.load(packed_ptr + src, mask=ok, other=0).to(tl.int32)
    meta = rows.to(tl.int64) * (D // G) + group
    scale = tl.load(scale_ptr + meta, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    mn = tl.load(min_ptr + meta, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    first = rows[:, None].to(tl.int64) * D + group * G + byte[None, :] * PER_BYTE
    for j in tl.static_range(PER_BYTE):
        code = ((packed >> (j * BITS)) & MAXQ).to(tl.float32)
        x_hat = tl.clamp(code * scale + mn, -LIMIT, LIMIT)
        tl.store(out_ptr + first + j, x_hat.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequantize_channel_kernel(
    packed_ptr, scale_ptr, min_ptr, out_ptr, D, G, LIMIT,
    BITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    PER_BYTE: tl.constexpr = 8 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    group = tl.program_id(0)
    toks = tl.arange(0, BLOCK_T)
    byte = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    byte_ok = byte < D // PER_BYTE
    ok = (toks < G)[:, None] & byte_ok[None, :]
    rows = group.to(tl.int64) * G + toks
    packed = tl.load(packed_ptr + rows[:, None] * (D // PER_BYTE) + byte[None, :], mask=ok, other=0)
    packed = packed.to(tl.int32)
    for j in tl.static_range(PER_BYTE):
        meta = group.to(tl.int64) * D + byte * PER_BYTE + j
        scale = tl.load(scale_ptr + meta, mask=byte_ok, other=0.0).to(tl.float32)[None, :]
        mn = tl.load(min_ptr + meta, mask=byte_ok, other=0.0).to(tl.float32)[None, :]
        x_hat = ((packed >> (j * BITS)) & MAXQ).to(tl.float32) * scale + mn
        x_hat = tl.clamp(x_hat, -LIMIT, LIMIT)
        out = rows[:, None] * D + byte[None, :] * PER_BYTE + j
        tl.store(out_ptr + out, x_hat.to(out_ptr.dtype.element_ty), mask=ok)


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_quantize_token_kernel).__name__ == "InterpretedFunction"


def _check_device(*tensors: torch.Tensor) -> None:
    """Triton needs CUDA tensors, or CPU tensors under the interpreter."""
    for t in tensors:
        if not (t.is_cuda or (_interpreting() and t.device.type == "cpu")):
            raise QuantizationError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones); "
                f"got a tensor on {t.device}"
            )


def _token_blocks(rows: int, group_size: int, bits: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_B) for the token-axis kernels."""
    block_b = triton.next_power_of_2(group_size // codes_per_byte(bits))
    return min(triton.next_power_of_2(rows), max(1, _TILE // block_b)), block_b


def _channel_blocks(head_dim: int, group_size: int, bits: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C) for the channel-axis kernels."""
    block_t = triton.next_power_of_2(group_size)
    block_c = triton.next_power_of_2(head_dim // codes_per_byte(bits))
    return block_t, min(block_c, max(1, _TILE // block_t))


def quantize_triton(x: torch.Tensor, *, bits: int, group_size: int, axis: Axis) -> Quantized:
    """Triton quantize+pack. Same contract as `quantize_reference`; x already validated.

    x: (batch, kv_heads, tokens, head_dim), float16 / bfloat16 / float32, contiguous, CUDA
       (or CPU under TRITON_INTERPRET=1).
    """
    _check_device(x)
    assert x.is_contiguous(), "quantize_triton needs a contiguous input"
    shape = tuple(x.shape)
    rows, head_dim = shape[0] * shape[1] * shape[2], shape[3]
    packed = torch.empty(packed_shape(shape, bits=bits), dtype=torch.uint8, device=x.device)
    meta = meta_shape(shape, group_size=group_size, axis=axis)
    store = meta_dtype(x.dtype)
    scale = torch.empty(meta, dtype=store, device=x.device)
    minimum = torch.empty(meta, dtype=store, device=x.device)
    if axis == "token":
        block_r, block_b = _token_blocks(rows, group_size, bits)
        grid = (triton.cdiv(rows, block_r), head_dim // group_size)
        _quantize_token_kernel[grid](
            x, packed, scale, minimum, rows, head_dim, group_size,
            BITS=bits, META_F16=store == torch.float16, BLOCK_R=block_r, BLOCK_B=block_b,
        )  # fmt: skip
    else:
        block_t, block_c = _channel_blocks(head_dim, group_size, bits)
        grid = (rows // group_size, triton.cdiv(head_dim // codes_per_byte(bits), block_c))
        _quantize_channel_kernel[grid](
            x, packed, scale, minimum, head_dim, group_size,
            BITS=bits, META_F16=store == torch.float16, BLOCK_T=block_t, BLOCK_C=block_c,
        )  # fmt: skip
    return Quantized(packed, scale, minimum, bits, group_size, axis, shape, x.dtype)


def dequantize_triton(q: Quantized, *, dtype: torch.dtype) -> torch.Tensor:
    """Triton unpack+dequantize. Same contract as `dequantize_reference`.

    returns: q.shape tensor of `dtype`, contiguous, on q's device.
    """
    _check_device(q.packed, q.scale, q.minimum)
    assert q.scale.is_contiguous() and q.minimum.is_contiguous(), "Quantized checks contiguity"
    rows, head_dim = q.shape[0] * q.shape[1] * q.shape[2], q.shape[3]
    out = torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    limit = torch.finfo(dtype).max  # see dequantize_reference
    if q.axis == "token":
        block_r, block_b = _token_blocks(rows, q.group_size, q.bits)
        grid = (triton.cdiv(rows, block_r), head_dim // q.group_size)
        _dequantize_token_kernel[grid](
            q.packed, q.scale, q.minimum, out, rows, head_dim, q.group_size, limit,
            BITS=q.bits, BLOCK_R=block_r, BLOCK_B=block_b,
        )  # fmt: skip
    else:
        block_t, block_c = _channel_blocks(head_dim, q.group_size, q.bits)
        grid = (rows // q.group_size, triton.cdiv(head_dim // codes_per_byte(q.bits), block_c))
        _dequantize_channel_kernel[grid](
            q.packed, q.scale, q.minimum, out, head_dim, q.group_size, limit,
            BITS=q.bits, BLOCK_T=block_t, BLOCK_C=block_c,
        )  # fmt: skip
    return out
