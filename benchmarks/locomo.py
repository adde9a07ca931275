"""Reader for LoCoMo-format conversation files (snap-research/LoCoMo, `data/locomo10.json`).

A file is a JSON list of samples. Each sample has a `sample_id`, a `conversation` object
(`speaker_a`, `speaker_b`, `session_<n>`: list of turns, `session_<n>_date_time`: "1:56 pm on
8 May, 2023") and a `qa` list of questions whose `evidence` names the turns that answer them by
dia_id (`"D<session>:<turn>"`). Everything else in a sample (summaries, observations) is ignored.

The published file has a few quirks this reader absorbs so callers never see them:

- some evidence entries are malformed (`"D:11:26"`, `"D8:6; D9:17"`, a bare `"D"`); they are
  normalised to canonical `D<int>:<int>` ids by `normalize_evidence`, unparseable ones dropped;
- some samples carry `session_<n>_date_time` keys for sessions that have no turns (ignored);
- adversarial questions (category 5) have `adversarial_answer` (the trap) and usually no `answer`;
- a few answers are JSON numbers (`2022`); answers are always strings here.

The session dates carry no time zone; they are read as UTC so that every `Turn.timestamp` is aware.
The data set is licensed for evaluation only: read it from where it lies, never copy it into the
repository.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CATEGORY_NAMES: Mapping[int, str] = {
    1: "multi-hop",
    2: "temporal",
    3: "open-domain",
    4: "single-hop",
    5: "adversarial",
}

_SESSION_KEY = re.compile(r"session_(\d+)")
# Tolerates a stray colon after the D ("D:11:26") and leading zeros ("D30:05"); case-insensitive.
_EVIDENCE_ID = re.compile(r"D:?(\d+):(\d+)", re.IGNORECASE)
_EVIDENCE_SEPARATORS = re.compile(r"[;,\s]+")
_DATE_FORMAT = "%I:%M %p on %d %B, %Y"


@dataclass(frozen=True)
class Turn:
    """One utterance. `index` is its 1-based position in its session (the dia_id's `<turn>`)."""

    dia_id: str
    session: int
    index: int
    speaker: str
    text: str
    timestamp: datetime  # the session's date, aware, UTC
    caption: str | None = None  # BLIP caption of the image the speaker shared, if any

    def render(self) -> str:
        """The memory content for this turn: its text, plus the shared image's caption.

        Several answers live only in the caption ("what did Melanie paint?"), so it is kept
        in the text that gets embedded rather than in metadata.
        """
        if not self.caption:
            return self.text
        photo = f"[shares a photo: {self.caption}]"
        return f"{self.text} {photo}" if self.text else photo


@dataclass(frozen=True)
class Question:
    """A QA item. `answer` is None for adversarial questions that have none in the file."""

    text: str
    answer: str | None
    evidence: tuple[str, ...]  # canonical dia_ids, e.g. ("D1:3", "D2:8")
    category: int
    adversarial_answer: str | None = None

    @property
    def category_name(self) -> str:
        return CATEGORY_NAMES.get(self.category, f"category-{self.category}")


@dataclass(frozen=True)
class Conversation:
    sample_id: str
    speakers: tuple[str, str]
    turns: tuple[Turn, ...]  # session order, then turn order
    questions: tuple[Question, ...]


def load_locomo(path: str | Path) -> list[Conversation]:
    """Read a LoCoMo JSON file. Raises ValueError naming the sample when its shape is wrong."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(raw).__name__}")
    return [parse_sample(sample) for sample in raw]


def parse_sample(sample: Mapping[str, Any]) -> Conversation:
    """Turn one sample object of a LoCoMo file into a `Conversation`."""
    sample_id = str(sample.get("sample_id", "?"))
    try:
        conv = sample["conversation"]
        speakers = (str(conv["speaker_a"]), str(conv["speaker_b"]))
        turns = tuple(_parse_turns(conv))
        questions = tuple(_parse_question(q) for q in sample.get("qa", []))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"LoCoMo sample {sample_id}: {exc!r}") from exc
    return Conversation(sample_id, speakers, turns, questions)


def parse_session_date(text: str) -> datetime:
    """`"1:56 pm on 8 May, 2023"` -> 2023-05-08 13:56 UTC (the file has no zone; UTC is assumed)."""
    return datetime.strptime(text.strip(), _DATE_FORMAT).replace(tzinfo=UTC)


def normalize_evidence(raw: str | Iterable[str]) -> tuple[str, ...]:
    """Canonical `D<session>:<turn>` ids from one evidence entry or a list of them.

    Handles the malformed forms found in the published file: ids joined with `;`, `,` or spaces,
    a stray colon (`"D:11:26"`), leading zeros (`"D30:05"`) and lower case. Entries that name no
    turn at all (a bare `"D"`) are dropped. Order is kept and duplicates removed.
    """
    entries = [raw] if isinstance(raw, str) else list(raw)
    out: dict[str, None] = {}
    for entry in entries:
        for token in _EVIDENCE_SEPARATORS.split(str(entry)):
            match = _EVIDENCE_ID.fullmatch(token)
            if match:
                out[f"D{int(match[1])}:{int(match[2])}"] = None
    return tuple(out)


def _parse_turns(conv: Mapping[str, Any]) -> Iterable[Turn]:
    sessions = sorted(int(m[1]) for key in conv if (m := _SESSION_KEY.fullmatch(key)))
    for n in sessions:
        date_key = f"session_{n}_date_time"
        if date_key not in conv:
            raise ValueError(f"session_{n} has no {date_key}")
        when = parse_session_date(conv[date_key])
        for index, turn in enumerate(conv[f"session_{n}"], start=1):
            ids = normalize_evidence(turn.get("dia_id", ""))
            yield Turn(
                dia_id=ids[0] if ids else f"D{n}:{index}",
                session=n,
                index=index,
                speaker=str(turn["speaker"]),
                text=str(turn.get("text", "")),
                timestamp=when,
                caption=turn.get("blip_caption") or None,
            )


def _parse_question(q: Mapping[str, Any]) -> Question:
    return Question(
        text=str(q["question"]),
        answer=_optional_str(q.get("answer")),
        evidence=normalize_evidence(q.get("evidence", [])),
        category=int(q["category"]),
        adversarial_answer=_optional_str(q.get("adversarial_answer")),
    )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)
