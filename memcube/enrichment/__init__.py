"""Note enrichment: keywords, tags, a one-sentence context and resolved dates for each memory.

Memories become A-MEM notes (Xu et al., 2025, https://arxiv.org/abs/2502.12110): each carries
keywords, tags and a context that later linking and retrieval use. Enrichment runs off the
request path, over batches of new notes, through a small plug-in protocol; enrichers are
registered by name in `ENRICHERS` and chosen in config. The default, `local`, uses no LLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

import numpy as np

from memcube.errors import InvalidArgument

# texts -> (n, dim) float32 unit vectors (all-MiniLM-L6-v2: dim 384), e.g. `Embedder.embed`.
EmbedFn = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class NoteInput:
    content: str
    speaker: str | None
    session_id: str | None
    timestamp: datetime  # aware, UTC: when it was said (naive is read as UTC)


@dataclass(frozen=True)
class Enrichment:
    keywords: tuple[str, ...]  # 3-8 keyphrases (fewer if the content has fewer), lowercase,
    # most salient first, no near-duplicates; () for empty content
    tags: tuple[str, ...]  # 1-3 labels from `taxonomy.LABELS`, best first
    context: str  # one sentence: who, where, when, about what, which dates
    dates: tuple[date, ...]  # absolute dates of the content's time expressions, in order
    enricher: str = "local"  # the plug-in that wrote it
    # Why the configured enricher did not (its error, "<Type>: <message>"), when another
    # wrote it instead: `llm` hands a note it fails to `local` and says why here.
    fallback: str | None = None


class Enricher(Protocol):
    name: str

    def enrich(self, notes: Sequence[NoteInput]) -> list[Enrichment]:
        """One enrichment per note, in input order. May raise: the caller then retries the
        notes one by one, so one note that breaks an enricher never fails its batch."""
        ...


# Implementations import the seams above, so they are imported after them.
from memcube.enrichment.llm import (  # noqa: E402
    Complete,
    LlmEnricher,
    LlmEnricherConfig,
    OpenAICompatible,
)
from memcube.enrichment.local import LocalEnricher, LocalEnricherConfig  # noqa: E402

ENRICHERS = ("local", "llm")


def make_enricher(
    name: str,
    embed: EmbedFn,
    local: LocalEnricherConfig | None = None,
    llm: LlmEnricherConfig | None = None,
    runtime_complete: Complete | None = None,
) -> Enricher:
    """The enricher called `name`. `llm` falls back to `local` note by note; its `runtime`
    backend needs `runtime_complete` (the daemon's local model), `openai` needs `llm.url`."""
    if name not in ENRICHERS:
        raise InvalidArgument(f"unknown enricher {name!r}; valid: {sorted(ENRICHERS)}")
    fallback = LocalEnricher(embed, local)
    if name == "local":
        return fallback
    llm = llm or LlmEnricherConfig()
    if llm.backend == "openai":
        return LlmEnricher(OpenAICompatible(llm), fallback)
    if runtime_complete is None:
        raise InvalidArgument(
            "enricher 'llm' with backend 'runtime' needs the local runtime; "
            "set enrichment.llm.backend='openai' and a url, or enable the runtime"
        )
    return LlmEnricher(runtime_complete, fallback)


__all__ = [
    "ENRICHERS",
    "Complete",
    "EmbedFn",
    "Enricher",
    "Enrichment",
    "LlmEnricher",
    "LlmEnricherConfig",
    "LocalEnricher",
    "LocalEnricherConfig",
    "NoteInput",
    "OpenAICompatible",
    "make_enricher",
]
