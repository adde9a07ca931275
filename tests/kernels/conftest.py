"""Shared grid and factories for the kernels tests.

Triton runs in its CPU interpreter unless a GPU is present: TRITON_INTERPRET must be set before
`kernels.triton_quant` is imported (Triton reads it when a kernel is decorated), so it is set here,
at import time. With a GPU and TRITON_INTERPRET unset, tensors live on CUDA and the compiled
kernels run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

BITS = (2, 4, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AXES = ("token", "channel")
# (batch, kv_heads, tokens, head_dim) -> group sizes to try. (1, 2, 48, 96) has neither a
# power-of-two head_dim nor power-of-two groups, so the kernels' masks are exercised.
SHAPES: dict[tuple[int, int, int, int], tuple[int, ...]] = {
    (1, 3, 64, 64): (32, 64),
    (2, 2, 128, 128): (32, 64, 128),
    (1, 1, 32, 64): (32, 64),
    (1, 2, 48, 96): (16, 48),
}


@pytest.fixture(scope="package", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """Run these tests' small tensors on one CPU thread, restoring the setting afterwards.

    The tensors here are tiny: with several intra-op threads on a busy machine, OpenMP
    hand-offs cost ~100x the arithmetic (0.7 s vs 5 ms per grid case on 2 shared cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layout_cases() -> list[object]:
    """pytest params (shape, group_size, axis) for every valid combination in SHAPES."""
    cases: list[object] = []
    for shape, groups in SHAPES.items():
        for group_size in groups:
            for axis in AXES:
                grouped_dim = shape[2] if axis == "channel" else shape[3]
                if grouped_dim % group_size == 0:
                    name = f"{'x'.join(map(str, shape))}-g{group_size}-{axis}"
                    cases.append(pytest.param(shape, group_size, axis, id=name))
    return cases


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_kv(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, device: torch.device = DEVICE
) -> torch.Tensor:
    """Normal data with a few outlier channels (as KIVI observes in keys), in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[..., :: max(1, shape[-1] // 4)] *= 8.0
    return x.to(dtype=dtype, device=device).contiguous()


def expand_meta(meta: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """Broadcast per-group scale/minimum back to the (batch, kv_heads, tokens, head_dim) shape."""
    dim = 2 if axis == "channel" else 3
    return meta.repeat_interleave(group_size, dim=dim)
