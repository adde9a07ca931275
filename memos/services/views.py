"""What services hand to the API layer: small frozen dataclasses, never ORM rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:  # not imported at run time: views are light (the SDK and CLI read them)
    from kv_runtime import TokenLogprob

T = TypeVar("T")


class Role(IntEnum):
    """Ordered: a higher role can do everything a lower one can."""

    READER = 1
    WRITER = 2
    OWNER = 3


@dataclass(frozen=True)
class Principal:
    user_id: str
    is_admin: bool


@dataclass(frozen=True)
class UserView:
    id: str
    name: str
    api_key: str | None = None


@dataclass(frozen=True)
class CubeStats:
    memories: int
    activations: int
    bytes: int
    enrichment_pending: int = 0


@dataclass(frozen=True)
class CubeView:
    id: str
    name: str
    description: str
    owner_id: str
    created_at: datetime
    role: str
    stats: CubeStats | None = None


@dataclass(frozen=True)
class GrantView:
    cube_id: str
    user_id: str
    role: str
    created_at: datetime


@dataclass(frozen=True)
class KeyView:
    """An API key as its owner sees it: never the secret, except `api_key` once at creation."""

    id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class UserSummary:
    id: str
    name: str
    is_admin: bool
    created_at: datetime


@dataclass(frozen=True)
class LinkView:
    id: str
    kind: str
    score: float


@dataclass(frozen=True)
class MemoryView:
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
    links: list[LinkView]
    version: int
    created_at: datetime
    updated_at: datetime
    enrichment: str = "pending"  # "pending", "retrying", "done" or "failed"
    dates: list[date] = field(default_factory=list)  # resolved by enrichment, in mention order
    enrichment_attempts: int = 0  # failed enrichment attempts of this content
    enrichment_error: str | None = None  # the last attempt's error, while retrying or failed
    has_kv: bool = False  # a KV chunk of this version is stored (activations.notes)


@dataclass(frozen=True)
class HistoryView:
    version: int
    content: str
    keywords: list[str]
    dates: list[date]
    tags: list[str]
    context: str
    metadata: dict[str, Any]
    changed_at: datetime
    reason: str


@dataclass(frozen=True)
class HitView:
    memory: MemoryView
    score: float
    signals: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class NewMemory:
    """A validated memory to add (the API has already checked types and sizes)."""

    content: str
    session_id: str | None
    speaker: str | None
    timestamp: datetime
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ActivationView:
    id: str
    cube_id: str
    model: str
    tokens: int
    kept_tokens: int
    bits: int
    bytes: int
    state: str  # "building", "ready", "failed", "corrupt"
    progress: float
    error: str | None
    created_at: datetime
    last_used_at: datetime | None
    # An episodic activation's episodes (empty until built); None for a plain activation.
    episodes: tuple[EpisodeView, ...] | None = None
    # "context" (text, memories, sessions), "episodic", "chat_prefix" or "note" (one note's KV
    # chunk, for blending; `memory_id` names the note).
    kind: str = "context"
    memory_id: str | None = None
    scorer: str | None = None  # how a budget chose the kept tokens; None without a budget


@dataclass(frozen=True)
class EpisodeView:
    index: int
    windows: tuple[int, ...]  # the conversation's windows (of 4 utterances) in the episode
    kept_tokens: int
    bytes: int  # its tensors' bytes


@dataclass(frozen=True)
class GenerationView:
    text: str
    ttft_ms: float
    prompt_tokens: int
    reused_tokens: int
    activation_id: str | None
    finish_reason: str
    episode: int | None = None  # the episode an episodic activation answered from
    token_ids: tuple[int, ...] = ()  # the generated tokens (an end-of-sequence token is not)
    logprobs: tuple[TokenLogprob, ...] | None = None  # when asked for: of `token_ids`
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # when the prompt is scored
    recomputed_tokens: int = 0  # blended note chunks' tokens recomputed (activations.blending)


@dataclass(frozen=True)
class ChatView:
    id: str
    cube_id: str
    session_id: str
    system: str | None
    recall: dict[str, Any]  # {"top_k", "filters"}
    max_context_tokens: int
    sampling: dict[str, Any]  # {"temperature", "top_p", "seed"}
    backend: str  # "local" or "openai"
    turns: int  # live memories of the chat's session
    created_at: datetime
    last_active_at: datetime


@dataclass(frozen=True)
class ChatMessageView:
    memory_id: str
    role: str  # "user" or "assistant"
    speaker: str | None
    content: str
    timestamp: datetime


@dataclass(frozen=True)
class RecalledView:
    memory_id: str
    score: float


@dataclass(frozen=True)
class ChatReplyView:
    """One finished (or failed) turn. The memory ids are None when nothing was stored."""

    reply: str
    user_memory_id: str | None
    assistant_memory_id: str | None
    recalled: list[RecalledView]
    ttft_ms: float
    prompt_tokens: int
    reused_tokens: int
    finish_reason: str
    completion_tokens: int = 0  # the reply's tokens (an end-of-sequence token is not)
    recomputed_tokens: int = 0  # blended note chunks' tokens recomputed (activations.blending)
    # The episode of the chat's old part (its episodic activation) the turn stood on; None
    # when no old part was used.
    episode: int | None = None
