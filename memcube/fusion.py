"""Rank fusion policies: combine ranked lists from several retrievers into one.

A policy is a small object with `fuse(rankings) -> {seq: score}`; policies are registered by
name and chosen in `RetrievalConfig.fusion`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from memcube.errors import InvalidArgument


class Fusion(Protocol):
    def fuse(self, rankings: Mapping[str, Sequence[int]]) -> dict[int, float]:
        """rankings: signal name -> seqs best first. Returns seq -> fused score (higher wins)."""
        ...


@dataclass(frozen=True)
class ReciprocalRankFusion:
    """RRF (Cormack et al., SIGIR 2009): score = sum_i w_i / (k + rank_i), rank from 1."""

    k: float = 60.0
    weights: Mapping[str, float] | None = None

    def fuse(self, rankings: Mapping[str, Sequence[int]]) -> dict[int, float]:
        fused: dict[int, float] = {}
        for signal, ranked in rankings.items():
            weight = 1.0 if self.weights is None else self.weights.get(signal, 1.0)
            for rank, seq in enumerate(ranked, start=1):
                fused[seq] = fused.get(seq, 0.0) + weight / (self.k + rank)
        return fused


FUSIONS = {"rrf": ReciprocalRankFusion}


def make_fusion(name: str, k: float, weights: Mapping[str, float]) -> Fusion:
    try:
        factory = FUSIONS[name]
    except KeyError:
        raise InvalidArgument(f"unknown fusion {name!r}; valid: {sorted(FUSIONS)}") from None
    return factory(k=k, weights=dict(weights))
