"""Request and response bodies of the REST contract (`shared/spec/rest-api.md`)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    model_validator,
)

from memos.api.fields import Ids, Json, JsonInt, JsonNumber, Moment, Text, Visible


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

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["content"], "properties": {"content": {"type": "string"}}},
                {"required": ["metadata"], "properties": {"metadata": {"type": "object"}}},
            ]
        },
    )

    content: Visible | None = None
    metadata: Json | None = None

    @model_validator(mode="after")
    def _something(self) -> MemoryPatch:
        if self.content is None and self.metadata is None:
            raise ValueError("nothing to update: give content and/or metadata")
        return self


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
    has_kv: bool = Field(
        False, description="extension: a KV chunk of this version of the note is stored "
        "(`per_memory` activations); chat turns and generate blend it instead of prefilling"
    )  # fmt: skip


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
    query: Visible = Field(max_length=10_000)
    top_k: JsonInt = Field(10, ge=1, le=10_000, description="at most `limits.max_top_k`")
    filters: SearchFiltersIn = Field(default_factory=SearchFiltersIn)
    mode: Literal["hybrid", "dense", "lexical"] = Field(
        "hybrid", description="extension: rank by one signal alone (diagnosis, benchmarks)"
    )
    exact: StrictBool = Field(
        False, description="extension: brute-force dense search instead of ANN"
    )


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
    schedule: str = Field(
        description="extension: `every N s`, or `cron <expr>` (UTC) from `scheduler.cron`"
    )
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_status: str | None


class JobList(BaseModel):
    items: list[JobOut]


class JobRunBody(Strict):
    cube_id: str | None = Field(None, description="run on this cube only (evict, fuse, migrate)")


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
    instance_id: str | None = Field(None, description="the daemon that ran it")


class RunList(BaseModel):
    items: list[RunOut]
    next_cursor: str | None


class FleetMember(BaseModel):
    id: str
    host: str
    pid: int
    url: str | None
    started_at: datetime
    heartbeat_at: datetime
    self: bool = Field(description="the daemon that answered")


class FleetOut(BaseModel):
    instance: str = Field(description="the daemon that answered")
    members: list[FleetMember] = Field(description="daemons whose lease has not expired")
    scheduler_leader: str | None = Field(
        description="the daemon whose scheduler runs the scheduled jobs (None between leaders)"
    )


# -- activations --------------------------------------------------------------------------


class CompressionIn(Strict):
    bits: Literal[16, 8, 4, 2] = 16
    budget_tokens: JsonInt | None = Field(None, ge=1, le=1_048_576)
    scorer: Literal["kvzip", "snapkv", "recent", "knorm"] | None = Field(
        None,
        description="extension: how the tokens kept under `budget_tokens` are chosen (default "
        "kvzip, query-agnostic, scored while the context is prefilled; snapkv for budgets "
        "under 37 tokens)",
    )

    @model_validator(mode="after")
    def _scorer_needs_budget(self) -> CompressionIn:
        if self.scorer is not None and self.budget_tokens is None:
            raise ValueError("compression.scorer needs compression.budget_tokens")
        return self


def _one_of(*sources: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """JSON Schema for "exactly one of these fields is present and not null"."""
    return {"oneOf": [{"required": [name], "properties": {name: s}} for name, s in sources]}


class EpisodicIn(Strict):
    """Extension: an episodic activation (EpiCache), one bounded cache per episode."""

    episodes: JsonInt = Field(
        4, ge=1, le=256, description="E: episodes the conversation is clustered into (at "
        "most `activations.max_episodes`; fewer when it has fewer windows of 4 utterances)"
    )  # fmt: skip
    budget_tokens: JsonInt = Field(
        ge=64, le=1_048_576, description="M: tokens each episode's cache keeps (below the "
        "model's positions)"
    )  # fmt: skip
    block_tokens: JsonInt | None = Field(
        None, ge=16, le=1_048_576, description="the conversation is prefilled in blocks of "
        "this many tokens, evicting to M after each (default 1024)"
    )  # fmt: skip


class ActivationCreate(Strict):
    """Exactly one of `text`, `memory_ids`, `session_id` and `session_ids`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_one_of(
            ("text", {"type": "string"}),
            ("memory_ids", {"type": "array"}),
            ("session_id", {"type": "string"}),
            ("session_ids", {"type": "array"}),
        ),
    )

    text: Visible | None = Field(
        None, description="at most `activations.max_text_bytes` UTF-8 bytes (413 beyond)"
    )
    memory_ids: Ids | None = Field(None, min_length=1, max_length=10_000)
    session_id: Text | None = Field(None, max_length=200)
    session_ids: list[Annotated[Text, Field(max_length=200)]] | None = Field(
        None, min_length=1, max_length=1000, description="extension: several sessions, each "
        "one's memories in stored order, the sessions in the order given"
    )  # fmt: skip
    compression: CompressionIn = Field(default_factory=CompressionIn)
    episodic: EpisodicIn | None = Field(
        None, description="extension: build an episodic activation from a conversation "
        "(session_id, session_ids or memory_ids); not with `compression.budget_tokens`"
    )  # fmt: skip
    per_memory: StrictBool = Field(
        False, description="extension: with `memory_ids`, one KV chunk per note (kind "
        "`note`), built now; notes that have a current chunk keep it. The answer is then a "
        "list. `compression.bits` default: `activations.note_chunk_bits`; no `budget_tokens`, "
        "no `episodic`"
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_source(self) -> ActivationCreate:
        names = ("text", "memory_ids", "session_id", "session_ids")
        given = [n for n in names if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of text, memory_ids, session_id, session_ids (got "
                f"{given or 'none'})"
            )
        return self


class EpisodeOut(Out):
    index: int
    windows: list[int] = Field(description="the conversation's windows (of 4 utterances) in it")
    kept_tokens: int
    bytes: int


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
    episodes: list[EpisodeOut] | None = Field(
        None, description="extension: an episodic activation's episodes (empty while it is "
        "built); null for a plain activation"
    )  # fmt: skip
    kind: Literal["context", "episodic", "chat_prefix", "note"] = Field(
        "context", description="extension: built from a context (text, memories, sessions), "
        "episodic, a chat's saved prefix, or one note's KV chunk (`per_memory`)"
    )  # fmt: skip
    memory_id: str | None = Field(None, description="extension: a `note` chunk's note")
    scorer: str | None = Field(
        None, description="extension: how `budget_tokens` chose the kept tokens (kvzip, snapkv, "
        "recent, knorm; `prompt+kvzip` for an episodic activation's episodes, `prompt` for one "
        "built before 2026-12); null without a budget"
    )  # fmt: skip


class ActivationList(BaseModel):
    items: list[ActivationOut]


class GenerateRequest(Strict):
    prompt: Visible
    activation_id: StrictStr | None = None
    memory_ids: Ids | None = Field(
        None, min_length=1, max_length=10_000, description="extension: notes the prompt "
        "carries (a chat turn's notes block, in this order; at most "
        "`activations.max_note_chunks`); those with a KV chunk are blended in (CacheBlend), "
        "the others prefilled. Not with `activation_id`"
    )  # fmt: skip
    max_tokens: JsonInt = Field(
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
    episode: int | None = Field(
        None, description="extension: the episode of an episodic activation that answered "
        "(the one nearest the prompt); null otherwise"
    )  # fmt: skip
    recomputed_tokens: int = Field(
        0, description="extension: with `memory_ids`, the notes' KV-chunk tokens the blend "
        "recomputed (`reused_tokens`: those it kept)"
    )  # fmt: skip


# -- chats --------------------------------------------------------------------------------


class RecallIn(Strict):
    top_k: JsonInt = Field(
        5, ge=0, le=1000, description="notes recalled a turn (0: none); at most "
        "`chats.max_recall_top_k`"
    )  # fmt: skip
    filters: SearchFiltersIn = Field(default_factory=SearchFiltersIn)


class SamplingIn(Strict):
    temperature: JsonNumber = Field(0.0, ge=0, le=2, description="0: greedy")
    top_p: JsonNumber = Field(1.0, gt=0, le=1)
    seed: JsonInt | None = Field(None, ge=0, le=2**63 - 1, description="reproducible sampling")


class ChatCreate(Strict):
    system: Visible | None = Field(None, description="the system prompt; none: the model's own")
    session_id: Text | None = Field(
        None, min_length=1, max_length=200, description="the session whose memories are the "
        "chat's turns; defaults to the chat's id. An existing session is continued."
    )  # fmt: skip
    recall: RecallIn | None = None
    max_context_tokens: JsonInt | None = Field(
        None, ge=64, le=1 << 20, description="the verbatim window, in tokens (default "
        "`chats.default_max_context_tokens`; at most half the model's positions)"
    )  # fmt: skip
    sampling: SamplingIn = Field(default_factory=SamplingIn)
    backend: Literal["local", "openai"] | None = Field(
        None, description="`local` (the daemon's model, with KV reuse) or `openai` (the "
        "endpoint in `chats.openai`); default `chats.backend`"
    )  # fmt: skip


class RecallOut(Out):
    top_k: int
    filters: dict[str, Any]


class SamplingOut(Out):
    temperature: float
    top_p: float
    seed: int | None


class ChatOut(Out):
    id: str
    cube_id: str
    session_id: str
    system: str | None
    recall: RecallOut
    max_context_tokens: int
    sampling: SamplingOut
    backend: Literal["local", "openai"]
    turns: int = Field(description="memories in the chat's session (both sides of each turn)")
    created_at: datetime
    last_active_at: datetime


class ChatList(BaseModel):
    items: list[ChatOut]
    next_cursor: str | None


class ChatMessageOut(Out):
    memory_id: str
    role: Literal["user", "assistant"]
    speaker: str | None
    content: str
    timestamp: datetime


class ChatMessageList(BaseModel):
    items: list[ChatMessageOut]
    next_cursor: str | None


class ChatMessageIn(Strict):
    content: Visible = Field(description="at most `activations.max_prompt_bytes` UTF-8 bytes")
    speaker: Text | None = Field(None, max_length=200, description='default "user"')
    timestamp: Moment | None = Field(None, description="when it was said; default now")
    max_tokens: JsonInt | None = Field(
        None, ge=1, le=65_536, description="the reply's length (default "
        "`chats.default_max_tokens`; at most `activations.max_generate_tokens`)"
    )  # fmt: skip
    stream: StrictBool = Field(
        False, description="server-sent events: `piece` events with text, then one `done`"
    )


class RecalledOut(Out):
    memory_id: str
    score: float


class ChatReply(Out):
    reply: str
    user_memory_id: str | None = Field(description="null when the turn was not stored")
    assistant_memory_id: str | None
    recalled: list[RecalledOut]
    ttft_ms: float
    prompt_tokens: int = Field(description="tokens of the whole prompt (history included)")
    reused_tokens: int = Field(
        description="of those, already in the chat's KV prefix, plus the recalled notes' "
        "KV-chunk tokens blended in and not recomputed"
    )
    finish_reason: str = Field(
        description="`stop` or `length` (the turn is stored), `cancelled` (not stored)"
    )
    recomputed_tokens: int = Field(
        0, description="extension: recalled notes' KV-chunk tokens recomputed by the blend "
        "(`activations.blend_recompute_ratio` of them); 0 when no note had a chunk"
    )  # fmt: skip
    episode: int | None = Field(
        None,
        description="the episode of the chat's old part (turns before its window, an episodic "
        "activation of them) the prompt stood on; null when none was used",
    )


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
