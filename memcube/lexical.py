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

    def append(self, row: int, tf: float) -> None:
        if self.size == len(self.rows):
            self.rows = np.resize(self.rows, self.size * 2)
            self.tfs = np.resize(self.tfs, self.size * 2)
        self.rows[self.size] = row
        self.tfs[self.size] = tf
        self.size += 1


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
            postings.append(row, tf)
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
