"""The JSONL import format, checked line by line without a daemon (the CLI tests use one)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from memos.client import Memory
from memos.jsonl_format import (
    MAX_REPORTED,
    Limits,
    Line,
    differences,
    parse_timestamp,
    read_jsonl,
    summarize,
)


def _file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_good_lines_become_items_with_aware_utc_timestamps(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        '{"content": "one", "timestamp": "2023-05-08T13:56:00+02:00", "metadata": {"k": [1]}}',
        "",
        '{"content": "two", "session_id": "s1", "speaker": "Ann", "timestamp": null}',
        '{"content": "three", "timestamp": "2023-05-08T13:56:00Z", "id": "mem_x", "version": 3}',
    )
    read = read_jsonl(path)
    assert read.problems == [] and read.unknown_fields == {}
    assert [line.lineno for line in read.lines] == [1, 3, 4]
    one, two, three = (line.item for line in read.lines)
    assert one.timestamp == datetime(2023, 5, 8, 11, 56, tzinfo=UTC)
    assert one.metadata == {"k": [1]}
    assert (two.content, two.session_id, two.speaker, two.timestamp) == ("two", "s1", "Ann", None)
    assert three.timestamp == datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    assert read.lines[2].payload == {"content": "three", "timestamp": "2023-05-08T13:56:00Z"}


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("{not json", "not JSON: Expecting property name enclosed in double quotes (column 2)"),
        ('["a list"]', "expected a JSON object, got list"),
        ('{"speaker": "Ann"}', "content: required"),
        ('{"content": 5}', "content: expected a string, got int"),
        ('{"content": ""}', "content: empty or only invisible characters"),
        ('{"content": " \\u200b\\t\\n "}', "content: empty or only invisible characters"),
        ('{"content": "a\\u0000b"}', "content: contains a NUL character"),
        ('{"content": "\\ud800"}', "content: not valid Unicode (a lone surrogate)"),
        ('{"content": "x", "speaker": 7}', "speaker: expected a string, got int"),
        ('{"content": "x", "session_id": "' + "s" * 201 + '"}',
         "session_id: 201 characters; at most 200 allowed"),
        ('{"content": "x", "timestamp": "2023-05-08T13:56:00"}',
         "timestamp: '2023-05-08T13:56:00' has no time zone (the API refuses naive times); "
         "write it with one, e.g. '2023-05-08T13:56:00Z' or '2023-05-08T13:56:00+02:00'"),
        ('{"content": "x", "timestamp": "2023-05-08"}',
         "timestamp: '2023-05-08' has no time zone"),
        ('{"content": "x", "timestamp": "soon"}', "timestamp: 'soon' is not an ISO 8601 time"),
        ('{"content": "x", "timestamp": 1683554160}',
         "timestamp: expected an ISO 8601 string, got int"),
        ('{"content": "x", "metadata": [1]}', "metadata: expected a JSON object, got list"),
        ('{"content": "x", "metadata": {"a": NaN}}', "NaN is not a JSON number"),
        ('{"content": "x", "metadata": {"a": {"b": "\\u0000"}}}',
         "metadata.a.b: contains a NUL character"),
        ('{"content": "x", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}",
         "nested too deeply"),
    ],
)  # fmt: skip
def test_bad_line_is_named_with_its_number(tmp_path: Path, line: str, complaint: str) -> None:
    read = read_jsonl(_file(tmp_path, '{"content": "fine"}', line))
    assert [line.lineno for line in read.lines] == [1]
    (problem,) = read.problems
    assert problem.lineno == 2
    assert problem.message.startswith(complaint), problem.message
    assert str(problem) == f"{tmp_path / 'in.jsonl'}:2: {problem.message}"


def test_content_size_is_measured_in_utf8_bytes(tmp_path: Path) -> None:
    path = _file(tmp_path, json.dumps({"content": "é" * 5}), json.dumps({"content": "é" * 6}))
    read = read_jsonl(path, Limits(max_content_bytes=10))
    assert [line.lineno for line in read.lines] == [1]
    assert [p.message for p in read.problems] == ["content: 12 bytes; at most 10 allowed"]


def test_every_bad_line_is_reported(tmp_path: Path) -> None:
    lines = ['{"content": "ok"}' if i % 2 else '{"content": ""}' for i in range(60)]
    read = read_jsonl(_file(tmp_path, *lines))
    assert [p.lineno for p in read.problems] == list(range(1, 61, 2))
    shown = summarize(read.problems)
    assert len(shown) == MAX_REPORTED + 1 and shown[-1] == "... and 10 more"


def test_line_numbers_follow_newlines_only(tmp_path: Path) -> None:
    # U+2028 is legal raw inside a JSON string; `str.splitlines` would split the line there.
    path = tmp_path / "in.jsonl"
    path.write_text('{"content": "a\u2028b"}\r\n{"content": ""}\n', encoding="utf-8")
    read = read_jsonl(path)
    assert [line.item.content for line in read.lines] == ["a\u2028b"]
    assert [p.lineno for p in read.problems] == [2]


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"content": "ok"}\n{"content": "\xff"}\n')
    (problem,) = read_jsonl(path).problems
    assert (problem.lineno, problem.message) == (2, "not UTF-8 (byte 31 of the file)")


def test_unknown_fields_are_counted_export_fields_are_not(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        '{"content": "a", "speakr": "Ann", "keywords": ["x"], "enrichment": "done"}',
        '{"content": "b", "speakr": "Ben", "sesion": "s"}',
    )
    assert read_jsonl(path).unknown_fields == {"speakr": 2, "sesion": 1}


def test_parse_timestamp() -> None:
    assert parse_timestamp("2023-05-08T13:56:00-05:00") == datetime(2023, 5, 8, 18, 56, tzinfo=UTC)
    assert parse_timestamp("2023-05-08T13:56Z").tzinfo is UTC
    with pytest.raises(ValueError, match="outside the range"):
        parse_timestamp("0001-01-01T00:00:00+01:00")


def _memory(**fields: object) -> Memory:
    base: dict[str, object] = {
        "id": "mem_1", "cube_id": "cube_1", "content": "a", "session_id": None, "speaker": None,
        "timestamp": "2023-05-08T13:56:00Z", "metadata": {}, "version": 1,
        "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
    }  # fmt: skip
    return Memory.model_validate({**base, **fields})


def test_differences(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        '{"content": "a", "timestamp": "2023-05-08T15:56:00+02:00"}',
        '{"content": "a"}',
        '{"content": "a", "speaker": "Ann", "metadata": {"k": 1}}',
    )
    stamped, unstamped, labelled = read_jsonl(path).lines
    assert differences(_memory(), stamped) == []
    assert differences(_memory(timestamp="2023-05-08T13:57:00Z"), stamped) == ["timestamp"]
    later = datetime(2031, 1, 1, tzinfo=timezone(timedelta(hours=3)))
    assert differences(_memory(timestamp=later.isoformat()), unstamped) == []
    assert differences(_memory(content="b"), unstamped) == ["content"]
    assert differences(_memory(), labelled) == ["speaker", "metadata"]
    assert differences(_memory(speaker="Ann", metadata={"k": 1}), labelled) == []


def test_line_payload_is_what_the_api_takes(tmp_path: Path) -> None:
    (line,) = read_jsonl(_file(tmp_path, '{"content": "x", "metadata": {}}')).lines
    assert isinstance(line, Line) and line.payload == {"content": "x", "metadata": {}}
