"""Pure-torch KIVI quantization: the CPU default, and the oracle the Triton kernels are tested on.

KIVI (Liu et al. 2024, https://arxiv.org/abs/2402.02750) quantizes keys per-channel (a group is
`group_size` consecutive tokens of one channel, axis="channel") because key outliers sit in fixed
channels, and values per-token (a group is `group_size` consecutive channels of one token,
axis="token"). Each group is quantized asymmetrically:

    minimum = min(group), scale = (max(group) - minimum) / (2**bits - 1)
    code    = clamp(floor((x - minimum) / scale + 0.5), 0, 2**bits - 1)   (0 where scale == 0)
    x_hat   = code * scale + minimum

all in float32, with the scale first rounded up to its storage dtype (`kernels.layout.meta_dtype`)
so that codes are computed against the scale that dequantization will use. Rounding is
floor(v + 0.5) rather than round-half-even so that the Triton kernels, which do the same float32
operations in the same order, produce identical codes. Inputs must be finite, with |x| < ~1.7e38
so that max - min fits float32. The residual window of recent full-precision tokens is the
caller's business.
"""

from __future__ import annotations

import torch

from kernels.layout import Axis, meta_dtype, validate_dtype, validate_input
from kernels.pack import pack_codes, unpack_codes
from kernels.quantized import Quantized


def _grouped_view(x: torch.Tensor, group_size: int, axis: str) -> tuple[torch.Tensor, int]:
    """View (batch, kv_heads, tokens, head_dim) with groups on their own dim; return the dim.

    axis="channel": (batch, kv_heads, tokens // group_size, group_size, head_dim), dim 3.
    axis="token":   (batch, kv_heads, tokens, head_dim // group_size, group_size), dim 4.
    """
    batch, heads, tokens, head_dim = x.shape
    if axis == "channel":
        return x.view(batch, heads, tokens // group_size, group_size, head_dim), 3
    return x.view(batch, heads, tokens, head_dim // group_size, group_size), 4


def round_scale_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest `dtype` value >= each float32 scale (scale: any shape, float32, >= 0).

    Rounding up, not to nearest, keeps (max - min) / scale <= 2**bits - 1, so the group's maximum
    is never clipped and the half-step error bound holds for the stored scale.
    """
    if dtype == torch.float32:
        return scale
    assert dtype == torch.float16, f"no scale rounding for {dtype}"
    nearest = scale.to(dtype)
    # Non-negative float16 values are ordered like their bit patterns: +1 is the next value up.
    above = (nearest.view(torch.int16) + 1).view(dtype)
    return torch.where(nearest.to(torch.float32) < scale, above, nearest)


def quantize_reference(x: torch.Tensor, *, bits: int, group_size: int, axis: Axis) -> Quantized:
    """Quantize `x` in groups along `axis` and pack the codes.

    x: (batch, kv_heads, tokens, head_dim), float16 / bfloat16 / float32, contiguous, any device.
    returns: Quantized with packed (batch, kv_heads, tokens, head_dim * bits // 8) uint8 and
             scale/minimum of shape `kernels.layout.meta_shape`, dtype `meta_dtype(x.dtype)`.
    Raises QuantizationError for unsupported bits, axis, group size, shape, dtype or layout.
    """
    validate_input(x, bits=bits, group_size=group_size, axis=axis)
    maxq = (1 << bits) - 1
    grouped, dim = _grouped_view(x.to(torch.float32), group_size, axis)
    store = meta_dtype(x.dtype)
    minimum = grouped.amin(dim=dim, keepdim=True)  # an input value: exact in `store`
    stored = round_scale_up((grouped.amax(dim=dim, keepdim=True) - minimum) / maxq, store)
    scale = stored.to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.floor((grouped - minimum) / safe + 0.5).clamp_(0, maxq).to(torch.uint8)
    return Quantized(
        packed=pack_codes(codes.view(x.shape), bits),
        scale=stored.squeeze(dim).contiguous(),
        minimum=minimum.squeeze(dim).to(store).contiguous(),
        bits=bits,
        group_size=group_size,
        axis=axis,
        shape=tuple(x.shape),
        dtype=x.dtype,
    )


def dequantize_reference(
    q: Quantized, *, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Unpack and dequantize: code * scale + minimum, computed in float32, clamped to the finite
    range of the output dtype.

    q: a Quantized from either backend.
    out: optional q.shape tensor of the output dtype on q's device to write into (a view of a
         larger tensor is fine), checked by the caller (`kernels.dequantize`).
    returns: q.shape tensor of `dtype` (default q.dtype) on q's device: `out`, or a new
             contiguous one.

    The float32 work happens in place in one buffer (`out` itself for float32 output), with
    the same operations in the same order as code.float() * scale + minimum, so the values
    are bit-identical to that expression.
    """
    out_dtype = q.dtype if dtype is None else validate_dtype(dtype)
    if out is None:
        out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    work = out if out.dtype == torch.float32 else torch.empty(q.shape, device=q.device)
    unpack_codes(q.packed, q.bits, out=work)  # float32 codes
    grouped, dim = _grouped_view(work, q.group_size, q.axis)
    scale, minimum = q.scale.to(torch.float32), q.minimum.to(torch.float32)
    grouped.mul_(scale.unsqueeze(dim)).add_(minimum.unsqueeze(dim))
    # A rounded-up float16 scale can put the top code just past the group's maximum; at the edge
    # of float16's range that would overflow to inf, so clamp to the output's finite range.
    limit = torch.finfo(out_dtype).max
    work.clamp_(-limit, limit)
    return out if work is out else out.copy_(work)
