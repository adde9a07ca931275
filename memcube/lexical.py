"""BM25 over one cube, updated in place as memories come and go.

Postings are growable numpy arrays per term, so a query costs a few vectorised passes over the
postings of its terms instead of a Python loop over documents (~1 ms at 100K memories).
Rows are the cube index's internal row numbers; a removed row is masked out, and its terms'
document frequencies are decremented so idf stays exact.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

TOKEN_RE = re.compile(r"[^\W_]+", re.UNICODE)

# Function words that carry no topical signal; dropping them keeps postings short.
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not now of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your yours
    yourself yourselves s t d ll m re ve
    """.split()
)


def normalize_token(token: str) -> str:
    """A light stemmer: plural endings only (Porter step 1a), for precision over recall."""
    if token.endswith("sses"):
        return token[:-2]
    if len(token) > 4 and token.endswith("ies"):
        return token[:-3] + "y"
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


def tokenize(text: str) -> list[str]:
    return [normalize_token(t) for t in TOKEN_RE.findall(text.lower()) if t not in STOPWORDS]


class _Postings:
    __slots__ = ("rows", "tfs", "size")

    def __init__(self) -> None:
        self.rows = np.empty(4, dtype=np.int32)
        self.tfs = np.empty(4, dtype=np.float32)
        self.size = 0

    def append(self, row: int, tf: float) -> int:
        """Returns the bytes this append allocated (the arrays double when full)."""
        grown = 0
        if self.size == len(self.rows):
            grown = self.rows.nbytes + self.tfs.nbytes
            self.rows = np.resize(self.rows, self.size * 2)
            self.tfs = np.resize(self.tfs, self.size * 2)
        self.rows[self.size] = row
        self.tfs[self.size] = tf
        self.size += 1
        return grown

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.tfs.nbytes


class BM25Index:
    """Okapi BM25 (k1, b) with Lucene's non-negative idf."""

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b
        self._postings: dict[str, _Postings] = {}
        self._df: Counter[str] = Counter()
        self._doc_terms: dict[int, tuple[str, ...]] = {}
        self._lengths = np.zeros(1024, dtype=np.float32)
        self._total_length = 0.0
        # Kept up to date on every change, so reading the footprint costs nothing.
        self._postings_count = 0
        self._postings_bytes = 0

    @property
    def doc_count(self) -> int:
        return len(self._doc_terms)

    def add(self, row: int, text: str) -> None:
        assert row not in self._doc_terms, f"row {row} is already indexed"
        tokens = tokenize(text)
        counts = Counter(tokens)
        if row >= len(self._lengths):
            self._lengths = np.resize(self._lengths, max(row + 1, len(self._lengths) * 2))
        self._lengths[row] = len(tokens)
        self._total_length += len(tokens)
        for term, tf in counts.items():
            postings = self._postings.get(term)
            if postings is None:
                postings = self._postings[term] = _Postings()
                self._postings_bytes += postings.nbytes
            self._postings_bytes += postings.append(row, tf)
        self._postings_count += len(counts)
        self._df.update(counts.keys())
        self._doc_terms[row] = tuple(counts)

    def remove(self, row: int) -> None:
        """Forget a row; its postings stay but are masked by the caller's live mask."""
        terms = self._doc_terms.pop(row, None)
        if terms is None:
            return
        self._total_length -= float(self._lengths[row])
        self._lengths[row] = 0.0
        for term in terms:
            self._df[term] -= 1

    @property
    def term_count(self) -> int:
        return len(self._postings)

    @property
    def postings_count(self) -> int:
        """Entries in all postings lists, live rows' and dead rows' alike."""
        return self._postings_count

    @property
    def nbytes(self) -> int:
        """Bytes of the postings and length arrays (allocated), not counting Python containers."""
        return self._postings_bytes + self._lengths.nbytes

    def compact(self, remap: np.ndarray) -> None:
        """Follow a row table compaction: remap (old rows,) int64 gives each old row's new
        number, -1 for a dropped row. Dropped rows' postings go; so do terms left without any."""
        postings: dict[str, _Postings] = {}
        for term, old in self._postings.items():
            rows = remap[old.rows[: old.size]]
            kept = rows >= 0
            if not kept.any():
                continue
            fresh = postings[term] = _Postings()
            fresh.size = int(kept.sum())
            # The capacity appends would have grown to (4, 8, 16, ...), as in a fresh index.
            capacity = max(4, 1 << (fresh.size - 1).bit_length())
            fresh.rows = np.zeros(capacity, dtype=np.int32)
            fresh.tfs = np.zeros(capacity, dtype=np.float32)
            fresh.rows[: fresh.size] = rows[kept]
            fresh.tfs[: fresh.size] = old.tfs[: old.size][kept]
        self._postings = postings
        self._postings_count = sum(p.size for p in postings.values())
        self._postings_bytes = sum(p.nbytes for p in postings.values())
        self._df = Counter({term: df for term, df in self._df.items() if df > 0})
        self._doc_terms = {int(remap[row]): terms for row, terms in self._doc_terms.items()}
        live = np.flatnonzero(remap >= 0)
        lengths = np.zeros(max(1024, len(live)), dtype=np.float32)
        lengths[remap[live]] = self._lengths[live]
        self._lengths = lengths

    def coverage(self, query: str, row: int) -> float:
        """The idf-weighted share of the query's distinct terms that `row` contains, in [0, 1]:
        1.0 when it holds every term, whatever their frequencies; 0.0 for a query of stopwords."""
        terms = set(tokenize(query))
        present = set(self._doc_terms.get(row, ()))
        n_docs = self.doc_count
        total = got = 0.0
        for term in terms:
            df = self._df.get(term, 0)
            idf = math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
            total += idf
            got += idf if term in present else 0.0
        return got / total if total > 0 else 0.0

    def prune(self) -> int:
        """Drop the postings of terms no live row has any more (an erasure must not leave its
        words in the vocabulary); returns how many terms went."""
        dead = [term for term, df in self._df.items() if df <= 0]
        for term in dead:
            del self._df[term]
            self._postings.pop(term, None)
        return len(dead)

    def scores(self, query: str, n_rows: int, mask: np.ndarray) -> np.ndarray:
        """query -> (n_rows,) float32 BM25 scores, zero where `mask` (n_rows,) bool is False."""
        out = np.zeros(n_rows, dtype=np.float32)
        n_docs = self.doc_count
        if n_docs == 0:
            return out
        avgdl = max(self._total_length / n_docs, 1e-6)
        lengths = self._lengths[:n_rows]
        for term, qtf in Counter(tokenize(query)).items():
            postings = self._postings.get(term)
            df = self._df.get(term, 0)
            if postings is None or df <= 0:
                continue
            idf = math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
            rows = postings.rows[: postings.size]
            tfs = postings.tfs[: postings.size]
            norm = self.k1 * (1.0 - self.b + self.b * lengths[rows] / avgdl)
            out[rows] += qtf * idf * tfs * (self.k1 + 1.0) / (tfs + norm)
        out *= mask
        return out
