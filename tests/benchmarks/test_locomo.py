"""The LoCoMo reader against the real dev file (counts, quirks) and small synthetic samples."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from benchmarks.locomo import (
    Conversation,
    Turn,
    load_locomo,
    normalize_evidence,
    parse_sample,
    parse_session_date,
)

ROOT = Path(__file__).resolve().parents[2]
# The data set is evaluation-only and lives outside the repository (see ../shared/README.md).
LOCOMO_FILE = Path(
    os.environ.get(
        "MEMOS_LOCOMO_FILE", ROOT.parent / "shared" / "data" / "locomo" / "locomo_dev.json"
    )
)
CANONICAL = re.compile(r"D[1-9]\d*:[1-9]\d*")


@pytest.fixture(scope="module")
def dev() -> list[Conversation]:
    if not LOCOMO_FILE.exists():
        pytest.skip(f"LoCoMo dev file not found at {LOCOMO_FILE} (set MEMOS_LOCOMO_FILE)")
    return load_locomo(LOCOMO_FILE)


def _by_id(dev: list[Conversation]) -> dict[str, Conversation]:
    return {c.sample_id: c for c in dev}


def _question(conv: Conversation, text: str):
    (q,) = [q for q in conv.questions if q.text == text]
    return q


def test_dev_file_counts(dev: list[Conversation]) -> None:
    assert [c.sample_id for c in dev] == [
        "conv-26",
        "conv-30",
        "conv-41",
        "conv-42",
        "conv-43",
        "conv-44",
    ]
    assert sum(len(c.turns) for c in dev) == 3435
    assert sum(len({t.session for t in c.turns}) for c in dev) == 156
    assert sum(len(c.questions) for c in dev) == 1157
    categories = Counter(q.category for c in dev for q in c.questions)
    assert categories == {4: 480, 5: 272, 2: 180, 1: 172, 3: 53}


def test_first_turn_exact(dev: list[Conversation]) -> None:
    conv = dev[0]
    assert conv.speakers == ("Caroline", "Melanie")
    assert conv.turns[0] == Turn(
        dia_id="D1:1",
        session=1,
        index=1,
        speaker="Caroline",
        text="Hey Mel! Good to see you! How have you been?",
        timestamp=datetime(2023, 5, 8, 13, 56, tzinfo=UTC),
        caption=None,
    )
    assert conv.turns[0].render() == "Hey Mel! Good to see you! How have you been?"


def test_turn_ids_match_positions_and_are_ordered(dev: list[Conversation]) -> None:
    for conv in dev:
        assert [t.dia_id for t in conv.turns] == [f"D{t.session}:{t.index}" for t in conv.turns]
        assert [(t.session, t.index) for t in conv.turns] == sorted(
            (t.session, t.index) for t in conv.turns
        )
        assert all(t.timestamp.tzinfo is UTC for t in conv.turns)
        # Within a conversation, sessions are chronological.
        stamps = [t.timestamp for t in conv.turns]
        assert stamps == sorted(stamps)


def test_dates_without_sessions_are_ignored(dev: list[Conversation]) -> None:
    # conv-26 lists session_20..35_date_time but its last session with turns is 19.
    conv = _by_id(dev)["conv-26"]
    assert max(t.session for t in conv.turns) == 19


def test_caption_is_rendered_into_content(dev: list[Conversation]) -> None:
    turn = next(t for t in _by_id(dev)["conv-26"].turns if t.dia_id == "D1:5")
    assert turn.caption == "a photo of a dog walking past a wall with a painting of a woman"
    assert turn.render() == (
        "The transgender stories were so inspiring! I was so happy and thankful for all the "
        "support. [shares a photo: a photo of a dog walking past a wall with a painting of a woman]"
    )
    assert Turn("D1:1", 1, 1, "A", "", turn.timestamp, "a cat").render() == (
        "[shares a photo: a cat]"
    )


def test_malformed_evidence_in_dev_file_is_normalised(dev: list[Conversation]) -> None:
    by_id = _by_id(dev)
    # Raw "D8:6; D9:17": two ids in one string.
    assert _question(by_id["conv-26"], "What did Melanie paint recently?").evidence == (
        "D8:6",
        "D9:17",
    )
    # Raw "D:11:26": stray colon.
    assert "D11:26" in _question(by_id["conv-43"], "What authors has Tim read books from?").evidence
    # Raw bare "D": names no turn, dropped.
    movies = _question(by_id["conv-42"], "What is one of Joanna's favorite movies?")
    assert "D" not in movies.evidence and movies.evidence
    for conv in dev:
        for q in conv.questions:
            assert all(CANONICAL.fullmatch(e) for e in q.evidence), (conv.sample_id, q.evidence)


def test_answers(dev: list[Conversation]) -> None:
    conv = _by_id(dev)["conv-26"]
    # Numbers in the file become strings.
    assert _question(conv, "When did Melanie paint a sunrise?").answer == "2022"
    # Adversarial question with both answers.
    bowl = _question(conv, "Did Caroline make the black and white bowl in the photo?")
    assert (bowl.answer, bowl.adversarial_answer, bowl.category) == ("No", "Yes", 5)
    assert bowl.category_name == "adversarial"
    adversarial = [q for c in dev for q in c.questions if q.category == 5]
    assert sum(q.answer is None for q in adversarial) == 270
    assert all(q.adversarial_answer is not None or q.answer is not None for q in adversarial)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("D1:3", ("D1:3",)),
        ("D:11:26", ("D11:26",)),
        ("D30:05", ("D30:5",)),
        ("d4:7", ("D4:7",)),
        ("D8:6; D9:17", ("D8:6", "D9:17")),
        ("D1:2 D1:3", ("D1:2", "D1:3")),
        ("D1:2,D1:3", ("D1:2", "D1:3")),
        ("D", ()),
        ("", ()),
        (["D2:1", "D:2:1", "D2:01", "D3:4"], ("D2:1", "D3:4")),
    ],
)
def test_normalize_evidence(raw: str | list[str], expected: tuple[str, ...]) -> None:
    assert normalize_evidence(raw) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1:56 pm on 8 May, 2023", datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("12:28 am on 8 November, 2023", datetime(2023, 11, 8, 0, 28, tzinfo=UTC)),
        ("12:09 pm on 1 January, 2024", datetime(2024, 1, 1, 12, 9, tzinfo=UTC)),
        ("10:04 am on 19 December, 2023", datetime(2023, 12, 19, 10, 4, tzinfo=UTC)),
    ],
)
def test_parse_session_date(text: str, expected: datetime) -> None:
    assert parse_session_date(text) == expected


def _sample(**conversation: object) -> dict[str, object]:
    base: dict[str, object] = {"speaker_a": "A", "speaker_b": "B"}
    base.update(conversation)
    return {"sample_id": "s-1", "conversation": base, "qa": [], "observation": {}}


def test_sessions_sorted_numerically(tmp_path: Path) -> None:
    sample = _sample(
        session_10=[{"speaker": "A", "dia_id": "D10:1", "text": "late"}],
        session_10_date_time="9:00 am on 2 March, 2023",
        session_2=[{"speaker": "B", "dia_id": "D2:1", "text": "early"}],
        session_2_date_time="9:00 am on 1 March, 2023",
    )
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps([sample]))
    (conv,) = load_locomo(path)
    assert [t.dia_id for t in conv.turns] == ["D2:1", "D10:1"]
    assert [t.session for t in conv.turns] == [2, 10]


def test_missing_session_date_names_the_sample() -> None:
    sample = _sample(session_1=[{"speaker": "A", "dia_id": "D1:1", "text": "hi"}])
    with pytest.raises(ValueError, match="s-1.*session_1_date_time"):
        parse_sample(sample)


def test_not_a_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_locomo(path)
