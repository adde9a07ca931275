"""What a note is to retrieval: the text its vector embeds, the text BM25 indexes, and the
document the cube index holds. Pure: a stored row is read through the `NoteRow` protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Protocol

import numpy as np

from memcube.types import IndexedDoc


class NoteRow(Protocol):
    """The columns of a stored memory that retrieval reads."""

    seq: int
    content: str
    speaker: str | None
    session_id: str | None
    timestamp: datetime
    embedding: bytes
    keywords: Any  # JSON list of keyphrases
    dates: Any  # JSON list of ISO dates ("2023-05-07") enrichment resolved, or None
    metadata_: Any


# Bump when `embedding_text` changes: stored vectors of the old format are then re-embedded.
EMBEDDING_TEXT_FORMAT = "t2"


def embedding_text(
    content: str,
    keywords: Sequence[str] = (),
    tags: Sequence[str] = (),
    context: str = "",
    previous: str | None = None,
) -> str:
    """What the dense vector of a note encodes.

    A raw note: its content. An enriched note (A-MEM): the content of the turn it answers
    (`previous`, the note before it in its session), its content, keywords, tags and context.
    Measured on LoCoMo recall@10 with the same fusion (docs/benchmarks.md): content alone
    0.648, + keywords, tags and context 0.664, + the previous turn as well 0.696. A reply such
    as "Yes, it was amazing!" means little without what it replies to. Prefixing the speaker
    instead lowered recall@10 (adversarial questions name the wrong person). Resolved dates are
    not embedded as such: the context sentence names them in words ("8 May 2023").
    """
    text = f"{previous}\n{content}" if previous else content
    if keywords or tags or context:
        text += f"\nKeywords: {', '.join(keywords)}\nTags: {', '.join(tags)}\n{context}"
    return text


def lexical_text(row: NoteRow) -> str:
    """What BM25 indexes for a memory: who said it and its content.

    Not its keywords and tags, measured: adding them as plain tokens lowered LoCoMo recall@10
    (0.6005 -> 0.5556 with rank fusion, 0.750 -> 0.741 with z-score fusion); taxonomy tags such
    as "family" match far too broadly. They reach retrieval through the dense vector instead.
    """
    return f"{row.speaker}: {row.content}" if row.speaker else row.content


def note_keywords(row: NoteRow) -> list[str]:
    """The note's keyphrases (dates have a field of their own, `note_dates`)."""
    return list(row.keywords or ())


def note_dates(row: NoteRow) -> tuple[date, ...]:
    """The absolute dates enrichment resolved in the note, in order of mention."""
    return tuple(date.fromisoformat(d) for d in row.dates or ())


def to_doc(row: NoteRow) -> IndexedDoc:
    return IndexedDoc(
        seq=row.seq,
        text=lexical_text(row),
        embedding=np.frombuffer(row.embedding, dtype=np.float32),
        session_id=row.session_id,
        timestamp=row.timestamp,
        metadata=row.metadata_ or {},
        dates=note_dates(row),
    )
