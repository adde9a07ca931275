"""The JSONL format of `memos import` and `memos export`: read a whole file, check every line.

One JSON object per line; blank lines are skipped. The fields a line may carry, as the API's
`POST /v1/cubes/{id}/memories` item takes them (README, "JSONL import and export"):

- `content`: string, required; not empty nor only invisible characters; at most
  `max_content_bytes` in UTF-8 (the daemon's `MEMOS_LIMITS__MAX_CONTENT_BYTES`).
- `session_id`, `speaker`: string of at most 200 characters, or null / absent.
- `timestamp`: ISO 8601 string WITH a time zone (`2023-05-08T13:56:00Z`, `...+02:00`), or null /
  absent (the daemon then uses the time of the import). A time without a zone is refused, as the
  API refuses it: guessing its zone would silently shift every memory.
- `metadata`: a JSON object, or null / absent.

Text is refused where no store could keep it (NUL, lone surrogates), numbers where JSON has none
(NaN, Infinity). Every other field, such as the `id`, `version` or `keywords` that `memos export`
writes, is ignored, so an export imports as it is; fields that are in neither the import nor the
export format are reported (`unknown_fields`) because they are usually typos.

Nothing here talks to a daemon: `read_jsonl` checks the whole file and reports every bad line
(up to `MAX_REPORTED`), so an import can refuse before it writes anything.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memos.client import Memory, MemoryInput

INPUT_FIELDS = ("content", "session_id", "speaker", "timestamp", "metadata")
# What `memos export` writes beyond the input fields (the SDK's `Memory`, plus server extensions).
EXPORT_FIELDS = frozenset(Memory.model_fields) | {"enrichment", "dates"}
MAX_LABEL_CHARS = 200  # session_id and speaker, as the API bounds them
MAX_REPORTED = 20  # bad lines listed before "and N more"


@dataclass(frozen=True)
class Limits:
    max_content_bytes: int = 1 << 20  # the daemon's default MEMOS_LIMITS__MAX_CONTENT_BYTES


@dataclass(frozen=True)
class Line:
    """One checked line: where it came from and the memory it asks for (timestamp aware)."""

    lineno: int
    item: MemoryInput

    @property
    def payload(self) -> dict[str, Any]:
        """The item as the API takes it (what is sent, and what a batch's size is measured on)."""
        return self.item.model_dump(mode="json", exclude_none=True)


@dataclass(frozen=True)
class Problem:
    path: Path
    lineno: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.message}"


@dataclass
class JsonlFile:
    path: Path
    lines: list[Line] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    unknown_fields: Counter[str] = field(default_factory=Counter)  # field -> lines using it


class InvalidLine(ValueError):
    pass


def parse_timestamp(value: str) -> datetime:
    """An ISO 8601 time with a zone, as a UTC datetime; ValueError saying what is wrong."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    if parsed.utcoffset() is None:
        raise ValueError(
            f"{value!r} has no time zone (the API refuses naive times); write it with one, "
            f"e.g. '{parsed.isoformat()}Z' or '{parsed.isoformat()}+02:00'"
        )
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value!r} is outside the range that can be stored") from None


def summarize(problems: Sequence[Problem]) -> list[str]:
    """The problems as lines for a terminal, at most `MAX_REPORTED`, then how many more."""
    shown = [str(p) for p in problems[:MAX_REPORTED]]
    if len(problems) > MAX_REPORTED:
        shown.append(f"... and {len(problems) - MAX_REPORTED} more")
    return shown


def read_jsonl(path: Path, limits: Limits = Limits()) -> JsonlFile:
    """Every line of `path` checked; `problems` is empty when the whole file is importable."""
    result = JsonlFile(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        result.problems.append(Problem(path, lineno, f"not UTF-8 (byte {exc.start} of the file)"))
        return result
    # Split on "\n" only: `splitlines` would also split inside strings at U+2028 and friends,
    # which JSON allows raw, and line numbers would no longer match the editor's.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj, item = _parse_line(raw, limits)
        except InvalidLine as exc:
            result.problems.append(Problem(path, lineno, str(exc)))
            continue
        result.lines.append(Line(lineno, item))
        result.unknown_fields.update(obj.keys() - set(INPUT_FIELDS) - EXPORT_FIELDS)
    return result


def differences(stored: Memory, line: Line) -> list[str]:
    """The input fields in which a stored memory differs from the line that should have made it.

    A line without a timestamp matches any (the daemon stamped it with the time of import).
    """
    item = line.item
    out = [
        name
        for name, want, have in [
            ("content", item.content, stored.content),
            ("session_id", item.session_id, stored.session_id),
            ("speaker", item.speaker, stored.speaker),
            ("metadata", item.metadata or {}, stored.metadata),
        ]
        if want != have
    ]
    if item.timestamp is not None and item.timestamp != stored.timestamp:
        out.append("timestamp")
    return out


# --------------------------------------------------------------------------- checks


def _no_constants(name: str) -> Any:
    raise InvalidLine(f"{name} is not a JSON number")


def _parse_line(raw: str, limits: Limits) -> tuple[dict[str, Any], MemoryInput]:
    try:
        obj = json.loads(raw, parse_constant=_no_constants)
        if not isinstance(obj, dict):
            raise InvalidLine(f"expected a JSON object, got {type(obj).__name__}")
        return obj, _check(obj, limits)
    except json.JSONDecodeError as exc:
        raise InvalidLine(f"not JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise InvalidLine("nested too deeply") from None


def _check(obj: Mapping[str, Any], limits: Limits) -> MemoryInput:
    if "content" not in obj:
        raise InvalidLine("content: required")
    content = _text(obj["content"], "content")
    size = len(content.encode("utf-8"))
    if size > limits.max_content_bytes:
        raise InvalidLine(f"content: {size} bytes; at most {limits.max_content_bytes} allowed")
    if not any(ch.isprintable() and not ch.isspace() for ch in content):
        raise InvalidLine("content: empty or only invisible characters")
    labels = {name: _label(obj.get(name), name) for name in ("session_id", "speaker")}
    stamp = obj.get("timestamp")
    if stamp is not None and not isinstance(stamp, str):
        raise InvalidLine(f"timestamp: expected an ISO 8601 string, got {type(stamp).__name__}")
    try:
        timestamp = parse_timestamp(stamp) if stamp is not None else None
    except ValueError as exc:
        raise InvalidLine(f"timestamp: {exc}") from None
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidLine(f"metadata: expected a JSON object, got {type(metadata).__name__}")
    _clean_json(metadata or {}, "metadata")
    return MemoryInput(content=content, timestamp=timestamp, metadata=metadata, **labels)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidLine(f"{where}: expected a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidLine(f"{where}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidLine(f"{where}: not valid Unicode (a lone surrogate)") from None
    return value


def _label(value: Any, where: str) -> str | None:
    if value is None:
        return None
    text = _text(value, where)
    if len(text) > MAX_LABEL_CHARS:
        raise InvalidLine(f"{where}: {len(text)} characters; at most {MAX_LABEL_CHARS} allowed")
    return text


def _clean_json(value: Any, where: str) -> None:
    if isinstance(value, str):
        _text(value, where)
    elif isinstance(value, dict):
        for key, inner in value.items():
            _text(key, f"{where} key")
            _clean_json(inner, f"{where}.{key}")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            _clean_json(inner, f"{where}[{i}]")
