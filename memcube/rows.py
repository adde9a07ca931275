"""The row table of one cube's in-memory index: vectors and filterable facets per row.

Every live memory occupies one row. A changed memory gets a fresh row (its old row is masked),
so append-only structures such as BM25 postings never need in-place edits. The table answers
two questions fast: "which rows pass these filters?" (a bool mask) and "what are the exact
nearest rows to this vector?" (brute force, for small or heavily filtered candidate sets).
"""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

import faiss
import numpy as np

from memcube.enrichment.dates import reference_date
from memcube.types import IndexedDoc, SearchFilters


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _facet_key(key: str, value: Any) -> tuple[str, str]:
    return key, json.dumps(value, sort_keys=True, separators=(",", ":"))


class RowTable:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.size = 0
        cap = 256
        self.vectors = np.zeros((cap, dim), dtype=np.float32)  # (rows, dim)
        self.live = np.zeros(cap, dtype=bool)
        self.seqs = np.zeros(cap, dtype=np.int64)
        self.times = np.zeros(cap, dtype=np.int64)  # timestamps, microseconds since epoch
        self.sessions = np.full(cap, -1, dtype=np.int32)  # session codes, -1 for none
        self.days: list[tuple[date, ...]] = []  # per row: its timestamp's date and its dates
        self.row_of: dict[int, int] = {}
        self._session_codes: dict[str, int] = {}
        self._facets: dict[tuple[str, str], list[int]] = {}

    @property
    def live_count(self) -> int:
        return len(self.row_of)

    def _grow(self, needed: int) -> None:
        cap = len(self.live)
        if needed <= cap:
            return
        new_cap = max(needed, cap * 2)
        self.vectors = np.resize(self.vectors, (new_cap, self.dim))
        for name in ("live", "seqs", "times", "sessions"):
            setattr(self, name, np.resize(getattr(self, name), new_cap))
        self.live[cap:] = False

    def add(self, doc: IndexedDoc) -> int:
        """Append the doc as a new row (masking the seq's previous row) and return the row."""
        self.remove(doc.seq)
        row = self.size
        self._grow(row + 1)
        self.size += 1
        self.vectors[row] = doc.embedding
        self.live[row] = True
        self.seqs[row] = doc.seq
        self.times[row] = _micros(doc.timestamp)
        self.days.append((reference_date(doc.timestamp), *doc.dates))
        if doc.session_id is None:
            self.sessions[row] = -1
        else:
            code = self._session_codes.setdefault(doc.session_id, len(self._session_codes))
            self.sessions[row] = code
        for key, value in doc.metadata.items():
            self._facets.setdefault(_facet_key(key, value), []).append(row)
        self.row_of[doc.seq] = row
        return row

    @property
    def dead_count(self) -> int:
        return self.size - len(self.row_of)

    @property
    def nbytes(self) -> int:
        """Bytes of the row arrays (allocated capacity), not counting Python containers."""
        arrays = (self.vectors, self.live, self.seqs, self.times, self.sessions)
        return sum(a.nbytes for a in arrays)

    def compact(self) -> np.ndarray:
        """Drop dead rows and shrink the arrays to fit the live ones.

        Returns (old size,) int64: each old row's new number, -1 for a dropped row, so the
        structures keyed by row (BM25 postings) can follow.
        """
        keep = np.flatnonzero(self.live[: self.size])
        remap = np.full(self.size, -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        cap = 256  # the capacity appends would have grown to, as in a fresh table
        while cap < len(keep):
            cap *= 2
        for name in ("vectors", "live", "seqs", "times", "sessions"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), dtype=old.dtype)
            new[: len(keep)] = old[keep]
            setattr(self, name, new)
        self.size = len(keep)
        self.days = [self.days[r] for r in keep.tolist()]
        self.row_of = {int(seq): row for row, seq in enumerate(self.seqs[: self.size].tolist())}
        # Session codes of dropped rows go too: renumber from the live rows.
        names = {code: name for name, code in self._session_codes.items()}
        codes: dict[str, int] = {}
        for row in range(self.size):
            old_code = int(self.sessions[row])
            if old_code >= 0:
                self.sessions[row] = codes.setdefault(names[old_code], len(codes))
        self._session_codes = codes
        facets = {}
        for key, rows in self._facets.items():
            kept = [int(r) for r in remap[rows].tolist() if r >= 0]
            if kept:
                facets[key] = kept
        self._facets = facets
        return remap

    def remove(self, seq: int) -> int | None:
        row = self.row_of.pop(seq, None)
        if row is not None:
            self.live[row] = False
        return row

    def erase(self, seqs: list[int]) -> None:
        """Forget these seqs' rows of every version: vectors, times, sessions, dates and metadata
        facets cleared (the rows stay, masked, so row numbers elsewhere keep their meaning)."""
        for seq in seqs:
            self.remove(seq)
        rows = np.flatnonzero(np.isin(self.seqs[: self.size], np.asarray(seqs, dtype=np.int64)))
        if len(rows) == 0:
            return
        self.vectors[rows] = 0.0
        self.times[rows] = 0
        self.sessions[rows] = -1
        gone = set(rows.tolist())
        for row in gone:
            self.days[row] = ()
        for key in list(self._facets):
            kept = [row for row in self._facets[key] if row not in gone]
            if kept:
                self._facets[key] = kept
            else:
                del self._facets[key]

    def mask(self, filters: SearchFilters) -> np.ndarray:
        """(size,) bool: live rows that pass every filter."""
        mask = self.live[: self.size].copy()
        if filters.session_id is not None:
            code = self._session_codes.get(filters.session_id)
            if code is None:
                return np.zeros(self.size, dtype=bool)
            mask &= self.sessions[: self.size] == code
        if filters.since is not None:
            mask &= self.times[: self.size] >= _micros(filters.since)
        if filters.until is not None:
            mask &= self.times[: self.size] < _micros(filters.until)
        for key, value in filters.metadata.items():
            rows = self._facets.get(_facet_key(key, value), [])
            facet = np.zeros(self.size, dtype=bool)
            facet[rows] = True
            mask &= facet
        return mask

    def exact_search(
        self, query: np.ndarray, k: int, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """query (dim,) float32 -> (seqs, cosine scores) of the k best rows where mask is True.

        Brute force with faiss (BLAS inner products and a C++ top-k heap): exact, and faster
        than ANN when few rows pass the filters.
        """
        rows = np.flatnonzero(mask)
        if len(rows) == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        k = min(k, len(rows))
        candidates = self.vectors[: self.size] if len(rows) == self.size else self.vectors[rows]
        scores, found = faiss.knn(
            query.reshape(1, -1), candidates, k, metric=faiss.METRIC_INNER_PRODUCT
        )
        return self.seqs[rows[found[0]]], scores[0].astype(np.float32)
