"""Request and response bodies of the REST contract (`shared/spec/rest-api.md`)."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Hashable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

# Metadata is a small JSON object for filtering and display, not a document store: deeper or
# larger objects are refused with 422 before anything walks them recursively or stores them.
MAX_METADATA_DEPTH = 16  # nested objects and arrays, the metadata object itself being level 1
MAX_METADATA_BYTES = 64 << 10  # its compact JSON encoding, in UTF-8 bytes

# Characters that are letters or symbols to Unicode yet draw nothing.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_PRINTABLE_ASCII = re.compile(r"[!-~]")


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
    """Text that shows something: at least one letter, digit, punctuation mark or symbol.

    Whitespace, zero-width and other format characters (U+200B, U+FEFF, U+2060, ...), control
    characters and lone combining marks alone would store a note nobody can see or search for.
    """
    if _PRINTABLE_ASCII.search(value):
        return value
    for char in value:
        if unicodedata.category(char)[0] in "LNPS" and char not in _BLANK_GLYPHS:
            return value
    raise ValueError(
        "text is empty or made only of invisible characters (whitespace, zero-width or "
        "format characters); give some visible text"
    )


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


Text = Annotated[StrictStr, AfterValidator(_clean_text)]
Visible = Annotated[
    StrictStr,
    AfterValidator(_clean_text),
    AfterValidator(_visible),
    Field(min_length=1, description="at least one visible character"),
]
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


class Strict(BaseModel):
    """Request bodies: unknown fields are refused, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# -- users and cubes ----------------------------------------------------------------------


class UserCreate(Strict):
    name: Visible = Field(max_length=200)


class UserOut(Out):
    id: str
    name: str
    api_key: str


class CubeCreate(Strict):
    name: Visible = Field(max_length=200)
    description: Text = Field("", max_length=10_000)


class CubeStatsOut(Out):
    memories: int
    activations: int
    bytes: int
    enrichment_pending: int = Field(0, description="extension: notes not yet enriched")


class CubeOut(Out):
    id: str
    name: str
    description: str
    owner_id: str
    created_at: datetime
    role: str
    stats: CubeStatsOut | None = None


class CubeList(BaseModel):
    items: list[CubeOut]
    next_cursor: str | None


class GrantCreate(Strict):
    user_id: StrictStr = Field(min_length=1)
    role: Literal["reader", "writer"]


class GrantOut(BaseModel):
    cube_id: str
    user_id: str
    role: str


# -- memories -----------------------------------------------------------------------------


class MemoryIn(Strict):
    content: Visible = Field(
        description="at least one visible character; at most `limits.max_content_bytes` UTF-8 "
        "bytes (413 beyond)"
    )
    session_id: Text | None = Field(None, max_length=200)
    speaker: Text | None = Field(None, max_length=200)
    timestamp: Moment | None = None
    metadata: Json = Field(default_factory=dict)


class MemoryBatch(Strict):
    items: list[MemoryIn] = Field(
        min_length=1, description="at most `limits.max_batch_items` (413 beyond); all or nothing"
    )


class MemoryPatch(Strict):
    """At least one of `content` and `metadata`."""

    content: Visible | None = None
    metadata: Json | None = None


class LinkOut(Out):
    id: str
    kind: str
    score: float


class MemoryOut(Out):
    id: str
    cube_id: str
    content: str
    session_id: str | None
    speaker: str | None
    timestamp: datetime
    metadata: dict[str, Any]
    keywords: list[str]
    tags: list[str]
    context: str
    links: list[LinkOut]
    version: int
    created_at: datetime
    updated_at: datetime
    enrichment: str = Field(
        "pending", description="extension: pending, done or failed (keywords, tags, links)"
    )


class MemoryList(BaseModel):
    items: list[MemoryOut]
    next_cursor: str | None = None


class HistoryOut(Out):
    version: int
    content: str
    keywords: list[str]
    tags: list[str]
    context: str
    metadata: dict[str, Any]
    changed_at: datetime
    reason: str


class HistoryList(BaseModel):
    items: list[HistoryOut]


# -- search -------------------------------------------------------------------------------


class SearchFiltersIn(Strict):
    session_id: Text | None = None
    since: Moment | None = None
    until: Moment | None = None
    metadata: Json = Field(default_factory=dict)


class SearchRequest(Strict):
    query: Visible = Field(max_length=10_000)
    top_k: StrictInt = Field(10, ge=1, le=10_000, description="at most `limits.max_top_k`")
    filters: SearchFiltersIn = Field(default_factory=SearchFiltersIn)
    mode: Literal["hybrid", "dense", "lexical"] = Field(
        "hybrid", description="extension: rank by one signal alone (diagnosis, benchmarks)"
    )
    exact: StrictBool = Field(
        False, description="extension: brute-force dense search instead of ANN"
    )


class HitOut(Out):
    memory: MemoryOut
    score: float
    signals: dict[str, float] = Field(
        default_factory=dict, description="raw score of each retriever that found the hit"
    )


class SearchResponse(BaseModel):
    hits: list[HitOut]
    took_ms: float


# -- operations ---------------------------------------------------------------------------


class JobOut(Out):
    name: str
    description: str
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_status: str | None


class JobList(BaseModel):
    items: list[JobOut]


class RunAccepted(BaseModel):
    run_id: str


class RunOut(Out):
    run_id: str
    name: str
    trigger: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    result: dict[str, Any]
    error: str | None


# -- activations --------------------------------------------------------------------------


class CompressionIn(Strict):
    bits: Literal[16, 8, 4, 2] = 16
    budget_tokens: StrictInt | None = Field(None, ge=1, le=1_048_576)


def _one_of(*sources: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """JSON Schema for "exactly one of these fields is present and not null"."""
    return {"oneOf": [{"required": [name], "properties": {name: s}} for name, s in sources]}


class ActivationCreate(Strict):
    """Exactly one of `text`, `memory_ids` and `session_id`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_one_of(
            ("text", {"type": "string"}),
            ("memory_ids", {"type": "array"}),
            ("session_id", {"type": "string"}),
        ),
    )

    text: Visible | None = Field(
        None, description="at most `activations.max_text_bytes` UTF-8 bytes (413 beyond)"
    )
    memory_ids: Ids | None = Field(None, min_length=1, max_length=10_000)
    session_id: Text | None = Field(None, max_length=200)
    compression: CompressionIn = Field(default_factory=CompressionIn)

    @model_validator(mode="after")
    def _one_source(self) -> ActivationCreate:
        given = [n for n in ("text", "memory_ids", "session_id") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of text, memory_ids, session_id (got {given or 'none'})"
            )
        return self


class ActivationOut(Out):
    id: str
    cube_id: str
    model: str
    tokens: int
    kept_tokens: int
    bits: int
    bytes: int
    state: str
    progress: float
    error: str | None
    created_at: datetime
    last_used_at: datetime | None


class ActivationList(BaseModel):
    items: list[ActivationOut]


class GenerateRequest(Strict):
    prompt: Visible
    activation_id: StrictStr | None = None
    max_tokens: StrictInt = Field(
        64, ge=1, le=65_536, description="at most `activations.max_generate_tokens`"
    )
    stream: StrictBool = Field(
        False, description="server-sent events: `piece` events with text, then one `done`"
    )


class GenerateResponse(Out):
    text: str
    ttft_ms: float
    prompt_tokens: int
    reused_tokens: int
    activation_id: str | None
    finish_reason: str


class FieldProblem(BaseModel):
    field: str = Field(description="where in the request, e.g. `items[0].content`")
    problem: str


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(
        pattern=r"^[a-z][a-z0-9_]*$",
        description="stable snake_case name, e.g. `validation_error`, `cube_not_found`",
    )
    message: str = Field(description="a sentence naming what is wrong and what is allowed")
    details: list[FieldProblem] | None = Field(
        None, description="`validation_error` only: each refused field (the first 20)"
    )
    retry_after: int | None = Field(
        None, description="429 only, when known: seconds to wait, as in `Retry-After`"
    )


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer has this body."""

    error: ErrorDetail
