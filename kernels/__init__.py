"""Triton kernels with pure-torch references: KIVI quantize+pack and unpack+dequantize.

KIVI (https://arxiv.org/abs/2402.02750): keys per-channel (axis="channel"), values per-token
(axis="token"), asymmetric min/scale in groups, 2/4/8 bits packed densely into uint8. This package
knows nothing but tensors; keeping a residual window of recent tokens in full precision is the
caller's business.
"""

from kernels.dispatch import BACKENDS, dequantize, quantize, resolve_backend, triton_available
from kernels.errors import QuantizationError
from kernels.layout import (
    AXES,
    SUPPORTED_BITS,
    SUPPORTED_DTYPES,
    Axis,
    meta_dtype,
    meta_shape,
    packed_shape,
    validate_bits,
)
from kernels.quantized import Quantized
from kernels.reference import dequantize_reference, quantize_reference

__all__ = [
    "AXES",
    "BACKENDS",
    "SUPPORTED_BITS",
    "SUPPORTED_DTYPES",
    "Axis",
    "QuantizationError",
    "Quantized",
    "dequantize",
    "dequantize_reference",
    "meta_dtype",
    "meta_shape",
    "packed_shape",
    "quantize",
    "quantize_reference",
    "resolve_backend",
    "triton_available",
    "validate_bits",
]
