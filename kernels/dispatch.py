"""Public entry points: `quantize` / `dequantize` with backend selection.

Backends: "torch" (the pure-torch reference, the CPU default), "triton" (CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1), and "auto" = "triton" when the tensor is on CUDA and triton
imports, else "torch". Both backends produce identical codes, scales and minimums.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from kernels.errors import QuantizationError
from kernels.layout import Axis, validate_dtype, validate_input
from kernels.quantized import Quantized
from kernels.reference import dequantize_reference, quantize_reference

BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@functools.cache
def _triton_module() -> ModuleType | None:
    """The Triton kernels module, or None when triton is not installed (imported once)."""
    try:
        from kernels import triton_quant
    except ImportError:
        return None
    return triton_quant


def triton_available() -> bool:
    """Whether the Triton backend can be used at all (triton imports)."""
    return _triton_module() is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to "torch" or "triton" for tensors on `device`."""
    if backend not in BACKENDS:
        raise QuantizationError(f"backend={backend!r} is unknown; allowed: {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise QuantizationError(
            "backend='triton' is unavailable: triton is not installed; use 'torch' or 'auto'"
        )
    return backend


def quantize(
    x: torch.Tensor, *, bits: int, group_size: int, axis: Axis, backend: str = "auto"
) -> Quantized:
    """Quantize KIVI-style and pack densely; see `kernels.reference` for the math.

    x: (batch, kv_heads, tokens, head_dim), float16 / bfloat16 / float32, contiguous.
    axis="channel" (keys): groups of `group_size` tokens per channel; tokens % group_size == 0.
    axis="token" (values): groups of `group_size` channels per token; head_dim % group_size == 0.
    returns: Quantized (packed uint8 codes; scale/minimum per group, float16 for float16
    input, else float32).
    Raises QuantizationError for unsupported bits, axis, group size, shape, dtype, layout,
    device or backend.
    """
    validate_input(x, bits=bits, group_size=group_size, axis=axis)
    if resolve_backend(backend, x.device) == "torch":
        return quantize_reference(x, bits=bits, group_size=group_size, axis=axis)
    module = _triton_module()
    assert module is not None, "resolve_backend returned 'triton' without triton"
    return module.quantize_triton(x, bits=bits, group_size=group_size, axis=axis)


def dequantize(
    q: Quantized,
    *,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpack and dequantize (code * scale + minimum, in float32).

    q: a Quantized from either backend.
    out: optional q.shape tensor of `dtype` on q's device to write into; a view of a larger
         tensor is fine (e.g. the quantized span of a whole layer's keys), which saves the copy
         of assembling the layer afterwards.
    returns: q.shape tensor of `dtype` (default q.dtype) on q's device: `out` when given, else
             a new contiguous tensor.
    Raises QuantizationError for an unsupported dtype, an `out` of another shape, dtype or
    device, or an unknown backend.
    """
    out_dtype = q.dtype if dtype is None else validate_dtype(dtype)
    if out is not None and (
        tuple(out.shape) != q.shape or out.dtype != out_dtype or out.device != q.device
    ):
        raise QuantizationError(
            f"out is {out.dtype} {tuple(out.shape)} on {out.device}; expected {out_dtype} "
            f"{q.shape} on {q.device}"
        )
    if resolve_backend(backend, q.device) == "torch":
        return dequantize_reference(q, dtype=out_dtype, out=out)
    module = _triton_module()
    assert module is not None, "resolve_backend returned 'triton' without triton"
    result = module.dequantize_triton(q, dtype=out_dtype)
    return result if out is None else out.copy_(result)
