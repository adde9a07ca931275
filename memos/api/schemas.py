"""Request and response bodies of the REST contract (`shared/spec/rest-api.md`)."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    model_validator,
)


def _clean_text(value: str) -> str:
    """Text every store can hold: no lone UTF-16 surrogates, no NUL (PostgreSQL refuses it)."""
    if "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


def _clean_json(value: Any) -> Any:
    """Metadata as plain JSON: clean text, finite numbers (JSON has no NaN or Infinity)."""
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite (JSON has no NaN or Infinity)")
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    if isinstance(value, dict):
        return {_clean_text(k): _clean_json(v) for k, v in value.items()}
    return value


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp is outside the range that can be stored") from None


Text = Annotated[StrictStr, AfterValidator(_clean_text)]
Json = Annotated[dict[str, Any], AfterValidator(_clean_json)]
Moment = Annotated[AwareDatetime, AfterValidator(_utc)]


class Strict(BaseModel):
    """Request bodies: unknown fields are refused, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# -- users and cubes ----------------------------------------------------------------------


class UserCreate(Strict):
    name: Text = Field(min_length=1, max_length=200)


class UserOut(Out):
    id: str
    name: str
    api_key: str


class CubeCreate(Strict):
    name: Text = Field(min_length=1, max_length=200)
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
    content: Text
    session_id: Text | None = Field(None, max_length=200)
    speaker: Text | None = Field(None, max_length=200)
    timestamp: Moment | None = None
    metadata: Json = Field(default_factory=dict)


class MemoryBatch(Strict):
    items: list[MemoryIn]


class MemoryPatch(Strict):
    content: Text | None = None
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
        "pending",
        description="extension: pending, retrying, done or failed (keywords, tags, dates, links)",
    )
    dates: list[date] = Field(
        default_factory=list,
        description="extension: absolute dates the content speaks of, resolved by enrichment",
    )
    enrichment_attempts: int = Field(
        0, description="extension: failed enrichment attempts of the current content"
    )
    enrichment_error: str | None = Field(
        None, description="extension: why the last attempt failed (retrying or failed)"
    )


class MemoryList(BaseModel):
    items: list[MemoryOut]
    next_cursor: str | None = None


class HistoryOut(Out):
    version: int
    content: str
    keywords: list[str]
    dates: list[date] = Field(default_factory=list, description="extension")
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
    query: Text = Field(min_length=1, max_length=10_000)
    top_k: int = Field(10, ge=1)
    filters: SearchFiltersIn = Field(default_factory=SearchFiltersIn)
    mode: Literal["hybrid", "dense", "lexical"] = Field(
        "hybrid", description="extension: rank by one signal alone (diagnosis, benchmarks)"
    )
    exact: bool = Field(False, description="extension: brute-force dense search instead of ANN")


class HitOut(Out):
    memory: MemoryOut
    score: float = Field(
        ge=0.0,
        le=1.0,
        description="relevance in [0, 1]: the better of the hit's cosine similarity to the query "
        "and the idf-weighted share of the query's terms it contains, capped by the score of the "
        "hit ranked above it (1.0: every term, or the same meaning)",
    )
    signals: dict[str, float] = Field(
        default_factory=dict,
        description="raw score of each retriever that found the hit (`dense`: cosine, "
        "`lexical`: BM25, `temporal`, `links`), and `rank`: the fused score hits are ordered by",
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
    budget_tokens: int | None = Field(None, ge=1, le=1_048_576)


class ActivationCreate(Strict):
    """Exactly one of `text`, `memory_ids` and `session_id`."""

    text: Text | None = None
    memory_ids: list[StrictStr] | None = Field(None, min_length=1, max_length=10_000)
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
    prompt: Text
    activation_id: StrictStr | None = None
    max_tokens: int = Field(64, ge=1)
    stream: bool = Field(
        False, description="server-sent events: `piece` events with text, then one `done`"
    )


class GenerateResponse(Out):
    text: str
    ttft_ms: float
    prompt_tokens: int
    reused_tokens: int
    activation_id: str | None
    finish_reason: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
