"""Dense bit packing of integer codes into uint8, in pure torch (the reference for the kernels).

Layout (shared with the Triton kernels, see `kernels.layout`): along the last dim, `8 // bits`
consecutive codes share a byte, little-endian within it: code `i` of a byte sits at bit
`bits * i`. E.g. 2-bit codes [1, 2, 3, 0] pack into 0b00_11_10_01 = 0x39.
"""

from __future__ import annotations

import torch

from kernels.layout import codes_per_byte


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    """(8 // bits,) int32: the bit offset of each code slot within a byte."""
    return torch.arange(0, 8, bits, dtype=torch.int32, device=device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes densely along the last dim.

    codes: (..., n) uint8 with every value < 2**bits; n a multiple of `8 // bits`.
    returns: (..., n * bits // 8) uint8, contiguous.
    """
    per_byte = codes_per_byte(bits)
    assert codes.dtype == torch.uint8, f"codes must be uint8, got {codes.dtype}"
    assert codes.shape[-1] % per_byte == 0, (
        f"last dim {codes.shape[-1]} is not a multiple of {per_byte} codes per byte"
    )
    if per_byte == 1:
        return codes.contiguous()
    slots = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    # Slots occupy disjoint bits, so the sum is the bitwise OR and stays below 256.
    packed = (slots.to(torch.int32) << _shifts(bits, codes.device)).sum(dim=-1)
    return packed.to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`.

    packed: (..., m) uint8.
    returns: (..., m * 8 // bits) uint8 codes, each < 2**bits.
    """
    per_byte = codes_per_byte(bits)
    assert packed.dtype == torch.uint8, f"packed must be uint8, got {packed.dtype}"
    if per_byte == 1:
        return packed.contiguous()
    mask = (1 << bits) - 1
    slots = (packed.to(torch.int32).unsqueeze(-1) >> _shifts(bits, packed.device)) & mask
    return slots.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)
