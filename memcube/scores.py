"""What a search hit's `score` means, as a user reads it.

Ranking runs on fused scores (`memcube/fusion.py`: weighted z-scores over the candidates, plus
the temporal bonus and link gains): they order hits well but are relative to one query's
candidates, unbounded, can be negative, and are 0.0 for the only candidate. So the score a
hit shows is separate and absolute:

    relevance = max(cosine, coverage), clipped to [0, 1]

where `cosine` is the similarity of the hit's vector to the query's (for a note, 1.0 means the
same meaning; unrelated text scores ~0.0-0.2 with MiniLM) and `coverage` is the idf-weighted
share of the query's terms the hit contains (1.0: every term). The score shown is then the
running minimum of relevance down the ranking, so scores never rise down the list and
thresholding them keeps a prefix of the ranking: the ranking itself is untouched. The raw
per-retriever scores stay in the hit's `signals`, with the fused score as `rank`.
"""

from __future__ import annotations

from collections.abc import Sequence


def relevance(cosine: float, coverage: float) -> float:
    """cosine in [-1, 1], coverage in [0, 1] -> relevance in [0, 1]."""
    return min(1.0, max(0.0, cosine, coverage))


def shown(relevances: Sequence[float]) -> list[float]:
    """Relevance of each hit in ranking order -> the score each shows: the running minimum,
    so the list reads in the order it is ranked."""
    out: list[float] = []
    for value in relevances:
        out.append(min(value, out[-1]) if out else value)
    return out
