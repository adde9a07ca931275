"""How one cube's index ranks: fusion, weights, link expansion, compaction (from settings)."""

from __future__ import annotations

from pydantic import BaseModel, Field

SEARCH_MODES = ("hybrid", "dense", "lexical")


class RetrievalConfig(BaseModel):
    # Defaults measured on LoCoMo (docs/benchmarks.md); see memcube/fusion.py.
    fusion: str = "zscore"
    rrf_k: float = Field(60.0, gt=0, description="k of the rrf fusion")
    dense_weight: float = Field(0.55, ge=0)
    lexical_weight: float = Field(0.45, ge=0)
    temporal_weight: float = Field(
        1.0,
        ge=0,
        description="bonus for notes in a time the query names (memcube/temporal.py), in units "
        "of the fused score: 1.0 is one standard deviation under zscore; far less suits rrf",
    )
    candidates: int = Field(50, ge=1, le=10_000, description="depth of each ranked list fused")
    exact_max_rows: int = Field(
        4096, ge=0, description="search exactly when at most this many rows pass the filters"
    )
    link_from: int = Field(
        5, ge=0, le=100, description="link expansion: how many top hits spread score to links"
    )
    link_weights: dict[str, float] = Field(
        # Measured on LoCoMo (docs/benchmarks.md): follows 0.5 lifts recall@10 0.6005 -> 0.6475;
        # similar or same_entity at 0.3 on top lower it to ~0.55, so they stay off.
        default_factory=lambda: {"follows": 0.5, "similar": 0.0, "same_entity": 0.0},
        description="share of a top hit's score each linked note gains, by link kind",
    )
    compact_min_dead: int = Field(
        1024,
        ge=1,
        le=1 << 30,
        description="compact a cube's index once its dead rows (edited, deleted) outnumber the "
        "live ones and are at least this many",
    )
    bm25_k1: float = Field(1.2, gt=0)
    bm25_b: float = Field(0.75, ge=0, le=1)
