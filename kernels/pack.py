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


def unpack_codes(packed: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `pack_codes`.

    packed: (..., m) uint8.
    out:    optional (..., m * 8 // bits) tensor of any dtype (a view is fine) to write the codes
            into, converted as they are written (e.g. float32 codes for dequantization).
    returns: (..., m * 8 // bits) codes, each < 2**bits: `out`, or a new uint8 tensor.

    Each code slot is extracted with uint8 ops straight into its strided slice of the output,
    one pass per slot: ~5x faster on CPU than widening to int32 and broadcasting the shifts,
    and no temporary the size of the output.
    """
    per_byte = codes_per_byte(bits)
    assert packed.dtype == torch.uint8, f"packed must be uint8, got {packed.dtype}"
    shape = (*packed.shape[:-1], packed.shape[-1] * per_byte)
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8, device=packed.device)
    assert tuple(out.shape) == shape, f"out has shape {tuple(out.shape)}; expected {shape}"
    assert out.device == packed.device, f"out is on {out.device}, packed on {packed.device}"
    if per_byte == 1:
        return out.copy_(packed)
    mask = (1 << bits) - 1
    slots = out.view(*packed.shape, per_byte)  # code i of a byte: slot i
    for i in range(per_byte):
        code = packed >> (bits * i) if i else packed
        slots[..., i].copy_(code & mask if i < per_byte - 1 else code)
    return out
