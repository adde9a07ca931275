"""Small frozen value types passed between the daemon and the cube domain."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IndexedDoc:
    """One live memory as the retrieval indexes see it.

    `seq` is the memory's integer key (stable for its life, used as the ANN label);
    `embedding` is a (dim,) float32 unit vector; `text` is what lexical search indexes;
    `dates` are the absolute dates its content speaks of (from enrichment), for the temporal
    signal alongside the date of `timestamp`.
    """

    seq: int
    text: str
    embedding: np.ndarray
    session_id: str | None
    timestamp: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    dates: tuple[date, ...] = ()


@dataclass(frozen=True)
class SearchFilters:
    """Contract filters: all given conditions must hold (`since` inclusive, `until` exclusive)."""

    session_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return (
            self.session_id is None
            and self.since is None
            and self.until is None
            and not self.metadata
        )


@dataclass(frozen=True)
class ScoredSeq:
    """A retrieval result: the memory's seq, its fused score, and each signal's raw score."""

    seq: int
    score: float
    signals: dict[str, float] = field(default_factory=dict)
