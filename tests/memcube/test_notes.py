"""What a stored note is to retrieval: its keyphrases, its dates, its embedding text."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np

from memcube.notes import embedding_text, note_dates, note_keywords, to_doc


@dataclass
class Row:
    seq: int = 7
    content: str = "I flew to Paris yesterday."
    speaker: str | None = "Caroline"
    session_id: str | None = "s1"
    timestamp: datetime = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    embedding: bytes = np.ones(4, np.float32).tobytes()
    keywords: Any = field(default_factory=lambda: ["paris", "flew"])
    dates: Any = field(default_factory=lambda: ["2023-05-07", "2022-01-01"])
    metadata_: Any = None


def test_keywords_and_dates_come_from_their_own_fields():
    row = Row()
    assert note_keywords(row) == ["paris", "flew"]
    assert note_dates(row) == (date(2023, 5, 7), date(2022, 1, 1))
    doc = to_doc(row)
    assert (doc.seq, doc.text, doc.dates) == (
        7, "Caroline: I flew to Paris yesterday.", (date(2023, 5, 7), date(2022, 1, 1))
    )  # fmt: skip
    assert note_dates(Row(dates=None)) == () and note_keywords(Row(keywords=None)) == []


def test_the_embedding_text_of_an_enriched_note():
    text = embedding_text("I flew to Paris yesterday.", ["paris", "flew"], ["travel"],
                          "Caroline, on 8 May 2023, talks about Paris.", "Any news?")  # fmt: skip
    assert text == (
        "Any news?\nI flew to Paris yesterday.\nKeywords: paris, flew\nTags: travel\n"
        "Caroline, on 8 May 2023, talks about Paris."
    )
    assert embedding_text("Just content.") == "Just content."
