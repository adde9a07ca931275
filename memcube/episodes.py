"""Episodes of a conversation (EpiCache): windows of utterances, clustered by meaning.

A long conversation does not fit one bounded KV cache, and which of its tokens matter depends
on what will be asked. EpiCache (arXiv 2509.17396) splits the conversation into windows of a
few utterances, clusters their embeddings into episodes, and builds one bounded cache per
episode, scored by the episode's *patched prompt*: the windows nearest its centroid, in time
order, behind an instruction to extract essential information. A question is answered from
the episode whose centroid is nearest to it.

This module is that bookkeeping and nothing else: no model, no database. Windows are written
as the reference code writes them (`{speaker} said, "{text}"`, one line each); clustering is
spherical k-means (faiss), seeded, so the same conversation always gives the same episodes,
and centroids are unit vectors, so "nearest" is the largest cosine for clustering, medoids and
routing alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import faiss
import numpy as np

WINDOW_UTTERANCES = 4  # the reference's conv_window
EPISODES = 4  # E in the published scripts
MEDOIDS = 8  # windows per patched prompt in the published scripts
SEED = 1234
# The reference's instruction (its "clustering" scoring method), word for word.
INSTRUCTION = (
    "Extract essential information from this conversation segment. Identify speaker names, "
    "personas, key events with dates/times, personal details, commitments, opinions, "
    "relationships, emotional moments, and unique experiences."
)


@dataclass(frozen=True)
class Utterance:
    speaker: str | None
    text: str
    timestamp: datetime | None = None


@dataclass(frozen=True)
class Window:
    """`count` utterances from `first` on (indexes into the conversation), as one text."""

    index: int
    first: int
    count: int
    text: str


@dataclass(frozen=True)
class Episode:
    """One cluster: its unit centroid, its windows and its medoids (both in time order)."""

    index: int
    centroid: np.ndarray  # (dim,) float32, unit length
    windows: tuple[int, ...]
    medoids: tuple[int, ...]


def utterance_line(utterance: Utterance) -> str:
    speaker = utterance.speaker or "Someone"
    return f'{speaker} said, "{utterance.text}"'


def segment(utterances: Sequence[Utterance], size: int = WINDOW_UTTERANCES) -> list[Window]:
    """Consecutive windows of `size` utterances (the last may be shorter), in time order."""
    if size < 1:
        raise ValueError(f"window size must be >= 1, not {size}")
    out: list[Window] = []
    for first in range(0, len(utterances), size):
        chunk = utterances[first : first + size]
        text = "".join(utterance_line(u) + "\n" for u in chunk)
        out.append(Window(len(out), first, len(chunk), text))
    return out


def cluster(
    embeddings: np.ndarray,
    episodes: int = EPISODES,
    *,
    medoids: int = MEDOIDS,
    seed: int = SEED,
    iterations: int = 25,
) -> list[Episode]:
    """Cluster window embeddings ((windows, dim), unit rows) into at most `episodes` episodes.

    E is capped by the number of windows; a cluster left without windows (identical windows
    can leave one empty) is dropped, so fewer episodes may come back, indexed 0.. in order of
    their first window. Each window belongs to the episode with the nearest centroid; the
    medoids are its `medoids` windows nearest the centroid, returned in time order.
    """
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2 or not len(vectors):
        raise ValueError("cluster needs a (windows, dim) array with at least one window")
    if episodes < 1 or medoids < 1:
        raise ValueError("episodes and medoids must be >= 1")
    k = min(episodes, len(vectors))
    if k == 1:
        centroids = _unit(vectors.mean(axis=0, keepdims=True))
    else:
        kmeans = faiss.Kmeans(
            vectors.shape[1], k, niter=iterations, seed=seed, spherical=True,
            min_points_per_centroid=1, verbose=False,
        )  # fmt: skip
        kmeans.train(vectors)
        centroids = _unit(np.asarray(kmeans.centroids, dtype=np.float32))
    similarity = vectors @ centroids.T  # (windows, k)
    labels = similarity.argmax(axis=1)
    found = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if not len(members):
            continue
        nearest = members[np.argsort(-similarity[members, c], kind="stable")[:medoids]]
        found.append((int(members[0]), c, members, nearest))
    found.sort()  # by first window: stable episode numbers for the same conversation
    return [
        Episode(
            index=i,
            centroid=centroids[c].copy(),
            windows=tuple(int(w) for w in members),
            medoids=tuple(sorted(int(w) for w in nearest)),
        )
        for i, (_, c, members, nearest) in enumerate(found)
    ]


def patched_prompt(
    windows: Sequence[Window], episode: Episode, max_chars: int | None = None
) -> str:
    """The instruction, then the episode's medoid windows in time order, a blank line apart.
    With `max_chars`, each window is cut to an equal share of it, so the prompt stays bounded
    whatever the utterances' lengths."""
    share = None if max_chars is None else max(1, max_chars // len(episode.medoids))
    parts = [windows[w].text[:share].rstrip("\n") for w in episode.medoids]
    return INSTRUCTION + "\n\n" + "\n\n".join(parts)


def route(query: np.ndarray, centroids: np.ndarray) -> int:
    """The episode (row of `centroids`) nearest a unit query vector: the largest cosine."""
    return int(np.argmax(np.asarray(centroids, dtype=np.float32) @ np.asarray(query)))


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)
