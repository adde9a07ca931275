"""Moving cached keys to new positions: rotary position embeddings (RoPE), undone and redone.

A cached key is stored after RoPE: k_p = R(p) k, where R(p) rotates each channel pair
(i, i + head_dim/2) by the angle p * theta_i. A chunk prefilled at positions p0.. can therefore be
placed at p1.. by rotating every key by R(p1) R(p0)^-1 = R(p1 - p0) (RoFormer,
https://arxiv.org/abs/2104.09864; CacheBlend stores keys before RoPE for the same reason). Values
carry no position and need no change.

Why not one rotation by the delta: the model computes the angle p * theta_i itself, in float32,
and a key rotated by (p1 - p0) * theta_i differs from the model's own R(p1) k by the rounding of
two different products. Undoing R(p0) and applying R(p1) with the very cos/sin tables the model's
rotary module produces reproduces the model's key for position p1 to float32 rounding, at any
offset. The arithmetic runs in float32 whatever the model dtype.

Only rotary embeddings whose frequencies do not depend on the sequence length can be moved
(`default`, `linear`, `llama3`, `yarn`, ...); `dynamic` and `longrope` rescale with the length,
so a key's rotation is not a function of its position alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kv_runtime.errors import ModelUnavailable

_LENGTH_DEPENDENT = frozenset({"dynamic", "longrope"})


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): the pair (a, b) at (i, i + d/2) becomes (-b, a) (a 90° turn)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """The model's own rotary embedding, as cos/sin tables for any positions."""

    def __init__(self, model: Any) -> None:
        """`model`: a transformers causal LM whose decoder (`model.model`) has `rotary_emb`."""
        embedding = getattr(getattr(model, "model", None), "rotary_emb", None)
        if embedding is None:
            raise ModelUnavailable(
                f"{type(model).__name__} has no shared rotary embedding (model.model.rotary_emb); "
                "cached keys cannot be moved to new positions"
            )
        kind = str(getattr(embedding, "rope_type", "default"))
        if kind in _LENGTH_DEPENDENT:
            raise ModelUnavailable(
                f"rope_type={kind!r} rescales with the sequence length; cached keys cannot be "
                "moved to new positions"
            )
        self._embedding = embedding

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (1, 1, n, head_dim) float32 for `positions` (n,) int64, on their device."""
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        with torch.no_grad():
            cos, sin = self._embedding(probe, positions[None])
        return cos[:, None].float(), sin[:, None].float()

    def embeddings(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (1, n, head_dim) in `dtype`, what the decoder layers take as
        `position_embeddings` for tokens at `positions` (n,) int64."""
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        with torch.no_grad():
            cos, sin = self._embedding(probe, positions[None])
        return cos, sin

    def move(
        self, keys: Sequence[torch.Tensor], source: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Keys rotated for `source` positions, re-rotated for `target` positions.

        keys: per layer (1, kv_heads, n, head_dim), any float dtype, one device;
        source, target: (n,) int64. returns: new tensors, same shapes and dtypes (the tables
        are computed once for all layers). Source == target gives the keys back up to float32
        rounding (not bit-identical: use the keys themselves then).
        """
        assert all(k.shape[2] == source.numel() == target.numel() for k in keys), (
            "one position per key"
        )
        if not keys:
            return ()
        device = keys[0].device
        cos0, sin0 = self.tables(source.to(device))
        cos1, sin1 = self.tables(target.to(device))
        norm = cos0 * cos0 + sin0 * sin0  # 1 unless the rope type scales attention
        moved = []
        for key in keys:
            k = key.float()
            plain = (k * cos0 - rotate_half(k) * sin0) / norm  # R(p0)^-1: transpose over norm
            moved.append((plain * cos1 + rotate_half(plain) * sin1).to(key.dtype))
        return tuple(moved)
