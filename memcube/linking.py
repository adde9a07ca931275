"""How a new note relates to an older neighbour, and how the neighbour evolves (A-MEM).

The enrichment worker finds a new note's dense neighbours; these rules decide, without an LLM,
- `duplicate`: the same speaker in the same session said (nearly) the same thing again. Search
  shows only the best-ranked of a duplicate group, so repeats do not crowd the top hits.
- `updates`: the same speaker, later, on the same subject (close vectors, a keyword word shared),
  with wording that revises ("now", "no longer", "actually", "moved", ...). The older note then
  evolves: its context records the revision and it gains the new note's tags, so a reader of
  the old fact is pointed at the new one (and the old note's vector moves with it).
The rules are deliberately conservative: a missed link costs little, a wrong one misleads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from difflib import SequenceMatcher

from pydantic import BaseModel, Field

from memcube.enrichment.dates import human_date, reference_date

# Wording that revises an earlier statement. Deliberately narrow: "new", a bare "now" and
# "actually" are in every other chat line ("Anything new?"), and a question revises nothing.
_REVISION_CUE = re.compile(
    r"\b(no longer|anymore|any more|changed|switched|moved|instead|turns out|these days|"
    r"from now on|used to|quit|stopped|gave up|(?:i|we)(?: a|')?(?:m|re)? now)\b",
    re.IGNORECASE,
)
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[^\W\d_]+")
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")


class LinkingConfig(BaseModel):
    duplicate_similarity: float = Field(
        0.9, ge=0, le=1, description="text similarity (difflib ratio) for a near-duplicate"
    )
    updates_threshold: float = Field(
        0.55, ge=-1, le=1, description="least cosine between a revision and what it revises"
    )
    max_tags: int = Field(3, ge=1, le=10, description="tags an evolved note may carry")


@dataclass(frozen=True)
class NoteFacts:
    """What the rules look at in a note."""

    seq: int
    content: str
    speaker: str | None
    session_id: str | None
    timestamp: datetime
    keywords: frozenset[str]
    tags: tuple[str, ...]
    context: str


@dataclass(frozen=True)
class Evolution:
    """New tags and context for an older note, and why."""

    tags: tuple[str, ...]
    context: str
    reason: str


def _normal(text: str) -> str:
    return _SPACE.sub(" ", text.casefold()).strip()


def near_duplicate(new: NoteFacts, old: NoteFacts, config: LinkingConfig) -> float | None:
    """The text similarity of two notes if `new` repeats `old`, else None."""
    if new.speaker != old.speaker or new.session_id != old.session_id:
        return None
    ratio = SequenceMatcher(None, _normal(new.content), _normal(old.content)).ratio()
    return ratio if ratio >= config.duplicate_similarity else None


def _words(keywords: frozenset[str]) -> set[str]:
    """The words of keyphrases ("children's hospital" -> {"children", "hospital"})."""
    return {w for phrase in keywords for w in _WORD.findall(phrase.casefold()) if len(w) > 2}


def revises(new: NoteFacts, old: NoteFacts, cosine: float, config: LinkingConfig) -> bool:
    """Whether `new` revises a fact `old` stated (see the module docstring)."""
    return (
        new.speaker is not None
        and new.speaker == old.speaker
        and old.timestamp <= new.timestamp
        and cosine >= config.updates_threshold
        and bool(_words(new.keywords) & _words(old.keywords))
        and _states_a_revision(new.content)
    )


def _states_a_revision(text: str) -> bool:
    """A revising cue in a sentence that is not a question."""
    return any(
        _REVISION_CUE.search(sentence) and not sentence.rstrip().endswith("?")
        for sentence in _SENTENCE.findall(text)
    )


def evolve(old: NoteFacts, new: NoteFacts, new_id: str, config: LinkingConfig) -> Evolution:
    """The older note's tags and context once `new` (memory `new_id`) revises it."""
    tags = list(old.tags)
    for tag in new.tags:
        if tag not in tags and len(tags) < config.max_tags:
            tags.append(tag)
    topics = ", ".join(sorted(_words(new.keywords) & _words(old.keywords)))
    note = f"Revised on {human_date(reference_date(new.timestamp))} ({topics})."
    context = f"{old.context} {note}".strip() if note not in old.context else old.context
    return Evolution(tuple(tags), context, f"evolved: revised by {new_id}")
