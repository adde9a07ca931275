"""`Quantized`: a tensor quantized in groups with asymmetric min/scale, codes packed into uint8.

Scale and minimum are float16 for float16 input (as in KIVI) and float32 for bfloat16 and float32
input; `kernels.layout.meta_dtype` says why. Either way every element dequantizes to within half
a stored step of its input (|x - dequant| <= scale / 2, up to float32 rounding), and `nbytes`
counts the metadata at its real size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.errors import QuantizationError
from kernels.layout import (
    Axis,
    meta_dtype,
    meta_shape,
    packed_shape,
    validate_dtype,
    validate_layout,
)


@dataclass(frozen=True)
class Quantized:
    """A tensor quantized in groups with asymmetric min/scale, codes packed densely into uint8.

    packed:  (batch, kv_heads, tokens, head_dim * bits // 8) uint8; `8 // bits` codes
             a byte along head_dim, code `i` of a byte at bit `bits * i` (see `kernels.layout`).
    scale:   `meta_dtype(dtype)` (float16 for float16 input, else float32), one per group;
             shape `meta_shape(shape, group_size, axis)`, i.e.
             (batch, kv_heads, tokens // group_size, head_dim) for axis="channel" and
             (batch, kv_heads, tokens, head_dim // group_size) for axis="token".
    minimum: same dtype and shape as scale. An element dequantizes to `code * scale + minimum`.
    shape:   the original (batch, kv_heads, tokens, head_dim).
    dtype:   the original dtype, which `dequantize` returns by default.
    packed, scale and minimum are contiguous and on one device.

    Construction checks that the fields agree (shapes, dtypes, devices) and raises
    QuantizationError otherwise, so a `Quantized` rebuilt from storage is checked too.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    group_size: int
    axis: Axis
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        validate_layout(shape, bits=self.bits, group_size=self.group_size, axis=self.axis)
        validate_dtype(self.dtype)
        want_packed = packed_shape(shape, bits=self.bits)
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != want_packed:
            raise QuantizationError(
                f"packed has dtype={self.packed.dtype} shape={tuple(self.packed.shape)}; "
                f"expected torch.uint8 {want_packed}"
            )
        want_meta = meta_shape(shape, group_size=self.group_size, axis=self.axis)
        want_dtype = meta_dtype(self.dtype)
        for name, meta in (("scale", self.scale), ("minimum", self.minimum)):
            if meta.dtype != want_dtype or tuple(meta.shape) != want_meta:
                raise QuantizationError(
                    f"{name} has dtype={meta.dtype} shape={tuple(meta.shape)}; "
                    f"expected {want_dtype} {want_meta}"
                )
        for name, t in (("packed", self.packed), ("scale", self.scale), ("minimum", self.minimum)):
            if not t.is_contiguous():
                raise QuantizationError(f"{name} must be contiguous")
            if t.device != self.packed.device:
                raise QuantizationError(
                    f"{name} is on {t.device} but packed is on {self.packed.device}"
                )
        object.__setattr__(self, "shape", shape)

    @property
    def device(self) -> torch.device:
        """Where the packed codes (and scale, minimum) live."""
        return self.packed.device

    def nbytes(self) -> int:
        """Bytes held: packed codes plus scale plus minimum."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.minimum))
