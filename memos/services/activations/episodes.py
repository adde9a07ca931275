"""Episodic activations (EpiCache): one bounded KV cache per episode of a conversation.

Building one (a background build, `builds.Builder` hands it here): the conversation's windows
(`memcube.episodes`, fixed when the build was accepted) are embedded with the daemon's embedder
and clustered into episodes; then, for each episode, the WHOLE conversation is prefilled block
by block under the budget (`Runtime.prefill_budgeted`), every cached token scored by the
attention it gets from the episode's patched prompt, rendered as a user turn after the context
just as a question will be. Each episode's cache is compressed (KIVI, the activation's bits)
and all of them are stored as one activation (`kv_runtime.save_episodes`), with each episode's
centroid, windows and medoids in its manifest and the embedder's fingerprint beside them.

Answering from one: the prompt is embedded on the query lane and the episode with the nearest
centroid is continued (`route`). Centroids from another embedder would route by noise, so an
activation built with another embedder is refused like one built by another model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import kv_runtime
from kv_runtime import ActivationManifest, CompressionConfig, Runtime
from memcube import episodes
from memcube.embedder import Embedder
from memcube.episodes import Utterance, Window
from memcube.errors import Conflict
from memos.db.models import Memory

# Sinks and recent tokens are always kept (4 + 32 in `Runtime.prefill_budgeted`); a budget
# must leave room for scored tokens beside them.
MIN_BUDGET_TOKENS = 64
# A patched prompt's medoid windows together (~600 tokens at most) and the default block of an
# episode's budgeted prefill: with them an episode's build holds budget + block + prompt, about a
# third of a full prefill's KV at budget 1,024 on a 6.5K-token conversation (benchmarks/episodic.py,
# docs/benchmarks.md); 8,000 characters and blocks of 1,024 held ~0.63 of it.
PATCH_MAX_CHARS = 2_000
DEFAULT_BLOCK_TOKENS = 512
# How an episode's cache chooses its tokens: the larger of the attention its patched prompt pays
# and KVzip's reconstruction attention (kv_runtime.block_scorers). On LoCoMo at M = 1,024 it beat
# the patched prompt alone (EpiCache's scorer) and a single KVzip cache; the figures are in
# docs/benchmarks.md ("Episodic caches against single bounded caches", benchmarks/episodic.py).
EPISODE_SCORER = "prompt+kvzip"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EpisodicSettings:
    """What the request asked for: E episodes, M kept tokens each, blocks of B tokens."""

    episodes: int
    budget_tokens: int
    block_tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes,
            "budget_tokens": self.budget_tokens,
            "block_tokens": self.block_tokens,
        }


@dataclass(frozen=True)
class EpisodicPlan:
    """An accepted episodic build: its settings and the conversation's windows."""

    settings: EpisodicSettings
    windows: tuple[Window, ...]


@dataclass(frozen=True)
class EpisodeSummary:
    """What the activation's view shows of one episode."""

    index: int
    windows: tuple[int, ...]
    kept_tokens: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "windows": list(self.windows),
            "kept_tokens": self.kept_tokens,
            "bytes": self.bytes,
        }


def plan(rows: Sequence[Memory], settings: EpisodicSettings) -> EpisodicPlan:
    """The windows of a conversation's memories (their speakers and contents, in order)."""
    utterances = [Utterance(row.speaker, row.content, row.timestamp) for row in rows]
    return EpisodicPlan(settings, tuple(episodes.segment(utterances)))


def build(
    runtime: Runtime,
    embedder: Embedder,
    plan: EpisodicPlan,
    token_ids: Sequence[int],
    messages: Sequence[Mapping[str, str]],
    compression: CompressionConfig,
    directory: Path,
    progress: Progress,
) -> tuple[ActivationManifest, list[EpisodeSummary]]:
    """Embed, cluster, prefill each episode under the budget, compress (`compression`: bits
    only, the budget is the episodes'), store all as one.
    `progress(done, total)` is called between and inside the prefills; raising from it aborts
    the build (nothing is written until every episode is done)."""
    assert compression.budget_tokens is None, "the service refuses a second budget"
    settings = plan.settings
    vectors = embedder.embed_background([w.text for w in plan.windows])
    found = episodes.cluster(vectors, settings.episodes)
    total = len(found) * len(token_ids)
    caches, metas = [], []
    for n, episode in enumerate(found):
        patch = episodes.patched_prompt(plan.windows, episode, PATCH_MAX_CHARS)
        query_ids = runtime.template.render_delta(messages, [{"role": "user", "content": patch}])

        def step(done: int, _total: int, before: int = n * len(token_ids)) -> None:
            progress(before + done, total)

        budgeted = runtime.prefill_budgeted(
            token_ids,
            budget_tokens=settings.budget_tokens,
            block_tokens=settings.block_tokens or DEFAULT_BLOCK_TOKENS,
            query_ids=query_ids,
            scorer=EPISODE_SCORER,
            progress=step,
        )
        caches.append(runtime.compress(budgeted.kv, compression))  # KIVI; nothing evicted
        metas.append(
            {
                "centroid": [float(x) for x in episode.centroid],
                "windows": list(episode.windows),
                "medoids": list(episode.medoids),
                "peak_kv_bytes": budgeted.peak_kv_bytes,
                "embedder": embedder.fingerprint,
            }
        )
    progress(total, total)  # the last look for a cancellation before writing
    manifest = kv_runtime.save_episodes(
        directory, caches, metas, runtime.fingerprint, messages, token_ids
    )
    assert manifest.episodes is not None
    summaries = [
        EpisodeSummary(e.index, tuple(e.meta["windows"]), e.kept_tokens, e.kv_bytes)
        for e in manifest.episodes
    ]
    return manifest, summaries


def continues_at(tokens: int, kept_tokens: int, max_positions: int) -> int:
    """The position a generation on an episodic activation continues at, at most. A context
    that fits the model keeps its tokens' original positions (it continues after the whole
    context); a longer one is re-positioned to 0..kept-1 (`Runtime.prefill_budgeted`'s "auto"),
    so each episode continues after its own kept tokens, at most the largest's."""
    return tokens if tokens <= max_positions else kept_tokens


@dataclass(frozen=True)
class Router:
    """An episodic activation's centroids (unit rows) and the embedder they came from."""

    centroids: np.ndarray
    embedder: str

    @classmethod
    def of(cls, manifest: ActivationManifest) -> Router:
        assert manifest.episodes is not None, "a plain activation has no episodes"
        centroids = np.array([e.meta["centroid"] for e in manifest.episodes], dtype=np.float32)
        return cls(centroids, str(manifest.episodes[0].meta["embedder"]))

    def route(self, embedder: Embedder, activation_id: str, prompt: str) -> int:
        """The episode whose centroid is nearest the prompt (embedded on the query lane)."""
        if embedder.fingerprint != self.embedder:
            raise Conflict(
                f"activation {activation_id!r} was clustered with embedder {self.embedder!r}; "
                f"this daemon embeds with {embedder.fingerprint!r}; build it again",
                code="activation_mismatch",
            )
        return episodes.route(embedder.embed_query(prompt), self.centroids)
