"""Field types request bodies are built from: what text, numbers, ids and metadata the API takes.

Each type validates in Python and states the same rule in its JSON Schema, so `/openapi.json`
describes what the daemon accepts (a request its schema allows is not refused for its shape):

- `Text`: a JSON string every store can hold (no NUL, which PostgreSQL refuses; no lone
  surrogates). `Visible`: the same, with at least one character outside `INVISIBLE` (whitespace,
  control and format characters, zero-width joiners, fillers, variation selectors, tags).
- `JsonInt`: a JSON number that is a whole number (`5` or `5.0`, as JSON Schema's `integer`);
  never a string (`"5"`) or a boolean (`true`), which lax parsing would turn into 5 and 1.
- `Ids`: a list of ids, each at most once.
- `Json`: a metadata object at most `MAX_METADATA_DEPTH` levels deep and `MAX_METADATA_BYTES`
  long, checked before anything walks it recursively or stores it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Hashable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, StrictStr

MAX_METADATA_DEPTH = 16  # nested objects and arrays, the metadata object itself being level 1
MAX_METADATA_BYTES = 64 << 10  # its compact JSON encoding, in UTF-8 bytes

# Code points that draw nothing on their own: a fixed table, so the rule (and the schema's
# pattern) does not change with the Unicode tables of the Python that runs the daemon.
INVISIBLE: tuple[tuple[int, int], ...] = (
    (0x0000, 0x0020),  # C0 controls (tab, newlines, ...) and space
    (0x007F, 0x00A0),  # delete, C1 controls, no-break space
    (0x00AD, 0x00AD),  # soft hyphen
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x061C, 0x061C),  # Arabic letter mark
    (0x115F, 0x1160),  # Hangul choseong and jungseong fillers
    (0x1680, 0x1680),  # Ogham space mark
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian variation selectors and vowel separator
    (0x2000, 0x200F),  # spaces, zero-width space, non-joiner, joiner, direction marks
    (0x2028, 0x202F),  # line and paragraph separators, embeddings, narrow no-break space
    (0x205F, 0x206F),  # math space, word joiner, invisible operators, isolates
    (0x2800, 0x2800),  # blank Braille pattern
    (0x3000, 0x3000),  # ideographic space
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFEFF, 0xFEFF),  # zero-width no-break space (byte order mark)
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xFFF9, 0xFFFB),  # interlinear annotation controls
    (0x13430, 0x1343F),  # Egyptian hieroglyph format controls
    (0x1BCA0, 0x1BCA3),  # shorthand format controls
    (0x1D173, 0x1D17A),  # musical symbol format controls
    (0xE0000, 0xE007F),  # tags
    (0xE0100, 0xE01EF),  # variation selectors supplement
)


def _class_body(ranges: tuple[tuple[int, int], ...]) -> str:
    """A regex character class body: the characters themselves, no escapes that differ
    between Python's `re` and ECMA-262 (which JSON Schema patterns follow)."""
    special = set("\\]^-[")
    parts = []
    for low, high in ranges:
        a, b = (("\\" + c if c in special else c) for c in (chr(low), chr(high)))
        parts.append(a if low == high else f"{a}-{b}")
    return "".join(parts)


_INVISIBLE = _class_body(INVISIBLE)
_VISIBLE_CHAR = re.compile(f"[^{_INVISIBLE}]")
NO_NUL_PATTERN = "^[^\x00]*$"
# Invisible characters but NUL, then one visible character, then anything but NUL: linear.
VISIBLE_PATTERN = f"^[{_class_body(((0x01, 0x20), *INVISIBLE[1:]))}]*[^{_INVISIBLE}][^\x00]*$"


def _clean_text(value: str) -> str:
    """Text every store can hold: no lone UTF-16 surrogates, no NUL (PostgreSQL refuses it)."""
    if "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


def _visible(value: str) -> str:
    """Text that shows something: text of only whitespace, zero-width and other invisible
    characters would store a note nobody can see or search for."""
    if _VISIBLE_CHAR.search(value) is None:
        raise ValueError(
            "text is empty or made only of invisible characters (whitespace, zero-width, "
            "control or format characters); give some visible text"
        )
    return value


def _json_int(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON number without a fraction, not a string or a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    return value


def _json_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON number, not a string or a boolean")
    return float(value)


def _clean_json(value: Any, depth: int = 1) -> Any:
    """Metadata as plain JSON: clean text, finite numbers (JSON has no NaN or Infinity), at most
    `MAX_METADATA_DEPTH` levels deep (checked before descending, so no recursion runs away)."""
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite (JSON has no NaN or Infinity)")
    if isinstance(value, list | dict) and depth > MAX_METADATA_DEPTH:
        raise ValueError(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, list):
        return [_clean_json(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {_clean_text(k): _clean_json(v, depth + 1) for k, v in value.items()}
    return value


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    cleaned: dict[str, Any] = _clean_json(value)
    size = len(json.dumps(cleaned, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES} allowed")
    return cleaned


H = TypeVar("H", bound=Hashable)


def _unique(values: list[H]) -> list[H]:
    seen: set[H] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{value!r} is listed twice; give each id once")
        seen.add(value)
    return values


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp is outside the range that can be stored") from None


Text = Annotated[
    StrictStr, AfterValidator(_clean_text), Field(json_schema_extra={"pattern": NO_NUL_PATTERN})
]
Visible = Annotated[
    StrictStr,
    AfterValidator(_clean_text),
    AfterValidator(_visible),
    Field(
        min_length=1,
        description="at least one visible character",
        json_schema_extra={"pattern": VISIBLE_PATTERN},
    ),
]
JsonInt = Annotated[int, BeforeValidator(_json_int)]
JsonNumber = Annotated[float, BeforeValidator(_json_number)]
Json = Annotated[
    dict[str, Any],
    AfterValidator(_metadata),
    Field(
        description=f"a JSON object at most {MAX_METADATA_DEPTH} levels deep and "
        f"{MAX_METADATA_BYTES} bytes long as compact JSON"
    ),
]
Ids = Annotated[
    list[StrictStr], AfterValidator(_unique), Field(json_schema_extra={"uniqueItems": True})
]
Moment = Annotated[AwareDatetime, AfterValidator(_utc)]
