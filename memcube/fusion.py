"""Fusion policies: combine several retrievers' scores for one candidate set into one score.

A search gathers candidates from each retriever (dense, BM25), scores every candidate on every
signal, then asks a fusion policy for one score per candidate. A policy is a small object with
`fuse(signals) -> scores`; policies are registered by name and chosen in
`RetrievalConfig.fusion`.

- `zscore` (default): each signal standardised over the candidates, then a weighted sum. It
  keeps how far ahead a candidate is, which rank fusion throws away. Measured on LoCoMo
  (docs/benchmarks.md): recall@10 0.697 with RRF (k=60) against 0.750 with z-scores.
- `rrf`: reciprocal rank fusion over the candidates each retriever matched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from memcube.errors import InvalidArgument


@dataclass(frozen=True)
class Signal:
    """One retriever's view of the candidates.

    scores: (candidates,) float — the signal's raw score for every candidate (cosine, BM25);
    matched: (candidates,) bool — whether the retriever itself returned the candidate (BM25
    matches only candidates that share a term with the query).
    """

    scores: np.ndarray
    matched: np.ndarray


class Fusion(Protocol):
    def fuse(self, signals: Mapping[str, Signal]) -> np.ndarray:
        """signal name -> Signal over the same candidates. Returns (candidates,) float64 fused
        scores, higher is better."""
        ...


@dataclass(frozen=True)
class ZScoreFusion:
    """sum_s w_s * max(floor, (x_s - mean_s) / std_s) over the candidates (a constant signal
    adds 0). The floor keeps one retriever's indifference from cancelling another's strong
    match: a unique exact-token hit that only BM25 found must not sink for its low cosine."""

    weights: Mapping[str, float] = field(default_factory=dict)
    floor: float = -1.0

    def fuse(self, signals: Mapping[str, Signal]) -> np.ndarray:
        fused = np.zeros(len(next(iter(signals.values())).scores), dtype=np.float64)
        for name, signal in signals.items():
            scores = signal.scores.astype(np.float64)
            std = scores.std()
            if std > 0:
                z = np.maximum((scores - scores.mean()) / std, self.floor)
                fused += self.weights.get(name, 1.0) * z
        return fused


@dataclass(frozen=True)
class ReciprocalRankFusion:
    """RRF (Cormack et al., SIGIR 2009): sum_s w_s / (k + rank_s), rank from 1 among the
    candidates signal s matched, best score first (ties keep candidate order)."""

    k: float = 60.0
    weights: Mapping[str, float] = field(default_factory=dict)

    def fuse(self, signals: Mapping[str, Signal]) -> np.ndarray:
        fused = np.zeros(len(next(iter(signals.values())).scores), dtype=np.float64)
        for name, signal in signals.items():
            matched = np.flatnonzero(signal.matched)
            order = matched[np.argsort(-signal.scores[matched], kind="stable")]
            ranks = np.arange(1, len(order) + 1, dtype=np.float64)
            fused[order] += self.weights.get(name, 1.0) / (self.k + ranks)
        return fused


FUSIONS: dict[str, Callable[[float, Mapping[str, float]], Fusion]] = {
    "zscore": lambda k, weights: ZScoreFusion(weights=dict(weights)),
    "rrf": lambda k, weights: ReciprocalRankFusion(k=k, weights=dict(weights)),
}


def make_fusion(name: str, k: float, weights: Mapping[str, float]) -> Fusion:
    try:
        factory = FUSIONS[name]
    except KeyError:
        raise InvalidArgument(f"unknown fusion {name!r}; valid: {sorted(FUSIONS)}") from None
    return factory(k, weights)
