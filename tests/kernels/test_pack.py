"""Dense packing: known bytes, exact round trips, exact sizes."""

from __future__ import annotations

import pytest
import torch

from kernels.pack import pack_codes, unpack_codes
from tests.kernels.conftest import BITS, DEVICE


def codes(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=DEVICE)


def test_two_bit_known_bytes() -> None:
    # Little-endian in the byte: code i at bit 2*i.
    # [1, 2, 3, 0] -> 0b00_11_10_01 = 0x39; [0, 1, 2, 3] -> 0b11_10_01_00 = 0xE4.
    packed = pack_codes(codes([1, 2, 3, 0, 0, 1, 2, 3]), bits=2)
    assert packed.tolist() == [0x39, 0xE4]
    assert unpack_codes(packed, bits=2).tolist() == [1, 2, 3, 0, 0, 1, 2, 3]


def test_four_bit_known_bytes() -> None:
    packed = pack_codes(codes([0x3, 0xA, 0xF, 0x0]), bits=4)
    assert packed.tolist() == [0xA3, 0x0F]
    assert unpack_codes(packed, bits=4).tolist() == [0x3, 0xA, 0xF, 0x0]


def test_eight_bit_is_identity() -> None:
    assert pack_codes(codes([0, 7, 200, 255]), bits=8).tolist() == [0, 7, 200, 255]


def test_packs_along_last_dim_only() -> None:
    # Two rows of 2-bit codes pack into two rows of bytes; nothing crosses a row.
    packed = pack_codes(codes([3, 0, 0, 0, 0, 0, 0, 3]).view(2, 4), bits=2)
    assert packed.tolist() == [[0x03], [0xC0]]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 5, 64), (1, 2, 7, 96)])
def test_round_trip_and_size(bits: int, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(bits)
    original = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8).to(DEVICE)
    packed = pack_codes(original, bits)
    assert packed.dtype == torch.uint8 and packed.is_contiguous()
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert packed.numel() == original.numel() * bits // 8
    assert torch.equal(unpack_codes(packed, bits), original)


@pytest.mark.parametrize("bits", BITS)
def test_all_ones_fill_every_bit(bits: int) -> None:
    top = (1 << bits) - 1
    assert pack_codes(codes([top] * 8), bits).tolist() == [0xFF] * bits


@pytest.mark.parametrize("bits", BITS)
def test_unpack_into_a_float_view(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    original = torch.randint(0, 1 << bits, (2, 3, 10, 64), generator=gen, dtype=torch.uint8)
    packed = pack_codes(original.to(DEVICE), bits)
    wide = torch.full((2, 3, 12, 64), -1.0, device=DEVICE)
    out = wide[:, :, 1:11]  # strided along heads, as a layer's span is
    assert unpack_codes(packed, bits, out=out) is out
    assert torch.equal(out, original.to(DEVICE).float())
    assert bool((wide[:, :, 0] == -1).all() and (wide[:, :, 11] == -1).all())
