"""What a cube index reports about itself: drift against the database, and its footprint."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DriftReport:
    missing: int  # live in the database, absent from the ANN index
    stale: int  # present but its vector differs from the database's
    extra: int  # live in the ANN index, deleted or unknown in the database

    @property
    def clean(self) -> bool:
        return self.missing == self.stale == self.extra == 0


@dataclass(frozen=True)
class IndexFootprint:
    """What one cube's index holds: element counts, and the bytes its arrays allocate (the
    ANN graph's as hnswlib lays it out; Python containers add roughly `PER_ROW_OVERHEAD` per
    row on top, which `bytes` includes as an estimate)."""

    live: int  # memories searchable
    rows: int  # row slots used, live and dead (an edit masks one row and appends another)
    postings: int  # BM25 postings entries, live and dead rows'
    terms: int  # distinct BM25 terms
    ann_elements: int  # HNSW elements, deleted ones included
    ann_deleted: int
    bytes: int


# dicts, tuples and date objects per row (row_of, BM25 doc terms, days), measured roughly
# with tracemalloc on synthetic notes: an estimate, for the memory budget only.
PER_ROW_OVERHEAD = 400
