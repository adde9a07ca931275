"""Process-edge configuration: one `Settings`, from `MEMOS_*` env vars and an optional TOML file.

Each subsystem gets its own typed, range-checked config object from here; no other module reads
the environment. Nested fields use a double underscore: `MEMOS_EMBEDDER__BACKEND=torch-int8`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from kv_runtime.config import RuntimeConfig
from memcube.embedder import EmbedderConfig
from memcube.enrichment import LlmEnricherConfig, LocalEnricherConfig
from memcube.linking import LinkingConfig
from memcube.policies import policy
from memcube.retrieval import RetrievalConfig
from memcube.vector_index import HnswConfig


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "memosd"


class LimitsConfig(BaseModel):
    """Input limits; anything beyond them is refused with 413 and changes nothing."""

    max_batch_items: int = Field(1000, ge=1, le=100_000)
    max_content_bytes: int = Field(1 << 20, ge=1, le=64 << 20)
    # A request body is read whole before it is parsed; 32 MiB is 1000 memories of ~32 KB or
    # ~30 at the content limit (max_batch_items x max_content_bytes would be 1 GiB).
    max_body_bytes: int = Field(32 << 20, ge=1 << 20, le=4 << 30)
    max_top_k: int = Field(500, ge=1, le=10_000)


class IndexCacheConfig(BaseModel):
    """Loaded cube indexes (rows, BM25, HNSW graph) stay in memory up to this budget; past it
    the least recently used are unloaded (saved first) and load again on their next use."""

    max_loaded_bytes: int = Field(2 << 30, ge=1 << 20, le=1 << 40)


class QuotasConfig(BaseModel):
    """Per-user limits, counted against the owner of the cube written to; 0 = unlimited.
    Beyond one: 429 `quota_exceeded` naming the limit, and nothing is written."""

    max_cubes_per_user: int = Field(0, ge=0, le=1_000_000_000)
    max_memories_per_user: int = Field(0, ge=0, le=1_000_000_000_000)
    max_activation_bytes_per_user: int = Field(0, ge=0, le=1 << 50)
    max_keys_per_user: int = Field(100, ge=1, le=100_000, description="active API keys")


class RateLimitConfig(BaseModel):
    """A token bucket per API key on the /v1 routes: `requests_per_s` refill, `burst` size.
    Beyond it: 429 `rate_limited` with `Retry-After`. 0 requests per second turns it off."""

    requests_per_s: float = Field(0.0, ge=0, le=1_000_000)
    burst: int = Field(50, ge=1, le=1_000_000)
    max_keys: int = Field(100_000, ge=1, le=10_000_000, description="buckets kept (LRU)")


class SchedulerConfig(BaseModel):
    enabled: bool = True
    cron: dict[str, str] = Field(
        default_factory=dict,
        description="job name -> crontab expression (5 fields, UTC; weekdays as cron reads "
        "them) that replaces the job's interval, e.g. MEMOS_SCHEDULER__CRON__EVICT='0 3 * * *'",
    )
    index_maintenance_interval_s: int = Field(300, ge=5, le=7 * 86_400)
    enrichment_retry_interval_s: int = Field(
        60, ge=1, le=7 * 86_400, description="how often notes whose enrichment failed are retried"
    )
    chat_prefix_save_interval_s: int = Field(
        60, ge=5, le=7 * 86_400, description="how often idle chat prefixes are saved to disk"
    )
    usage_flush_interval_s: int = Field(
        30, ge=1, le=86_400, description="how often recall and use counts are written"
    )
    unload_idle_interval_s: int = Field(
        60, ge=1, le=86_400, description="how often idle activation caches leave RAM"
    )
    evict_interval_s: int = Field(
        600, ge=5, le=7 * 86_400, description="how often budgets, TTLs and retention are kept"
    )
    fuse_interval_s: int = Field(
        3600, ge=5, le=7 * 86_400, description="how often near-duplicate notes are fused"
    )
    migrate_interval_s: int = Field(
        3600, ge=5, le=7 * 86_400, description="how often hot sessions are promoted to "
        "activations, cold activations demoted and idle loaded caches unloaded",
    )  # fmt: skip

    @field_validator("cron")
    @classmethod
    def _crontabs_parse(cls, cron: dict[str, str]) -> dict[str, str]:
        from memos.scheduler.crontab import cron_trigger

        for name, expr in cron.items():
            try:
                cron_trigger(expr)
            except Exception as exc:  # InvalidArgument: its message names the field
                raise ValueError(f"scheduler.cron.{name}: {exc}") from None
        return cron


class FuseConfig(BaseModel):
    """Fusing near-duplicate notes of a cube into one (the `fuse` job)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    threshold: float = Field(
        0.95, ge=0.5, le=1.0, description="least cosine of two notes of one speaker to fuse"
    )


class LifecyclePolicy(BaseModel):
    """A cube's lifecycle policy (`GET`/`PUT /v1/cubes/{cube_id}/policy`); the defaults of
    every cube are in `LifecycleConfig`, which extends this with the daemon-wide settings."""

    model_config = ConfigDict(extra="forbid")

    activation_bytes_max: int | None = Field(
        None, ge=0, le=1 << 50, description="a cube's activations on disk; null: daemon-wide only"
    )
    memory_ttl_days: float | None = Field(
        None, gt=0, le=36_500, description="notes older than this are soft-deleted; null: never"
    )
    deleted_retention_days: float = Field(
        30.0, ge=0, le=36_500, description="soft-deleted notes are erased for good after this"
    )
    hot_recalls: int = Field(5, ge=1, le=1_000_000, description="recalls that make a note hot")
    demote_after_days: float = Field(
        7.0, gt=0, le=36_500, description="an activation unused this long is cold"
    )
    fuse: FuseConfig = FuseConfig()
    eviction: str = Field("gdsf", description="eviction policy: lru, lfu or gdsf")

    @field_validator("eviction")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        policy(name)  # ValueError naming the valid ones
        return name


class LifecycleConfig(LifecyclePolicy):
    """Every cube's lifecycle policy until its owner sets its own, and the daemon-wide budget
    over all cubes. The budget for loaded caches in RAM is `activations.loaded_cache_bytes`
    (+ `dequantized_cache_bytes`), kept by those caches on every load."""

    activation_disk_bytes: int = Field(
        0, ge=0, le=1 << 50, description="all activations on disk, daemon-wide; 0: no limit"
    )
    max_items_per_run: int = Field(
        10_000, ge=1, le=10_000_000, description="notes one job run expires, purges or fuses"
    )
    fuse_max_notes: int = Field(
        5_000, ge=2, le=1_000_000, description="notes of one speaker compared in one fuse run"
    )
    # The `migrate` job (memos/services/lifecycle/migrate.py).
    promote_bits: Literal[2, 4, 8, 16] = Field(
        16, description="bits of an activation promoted from a hot session (demotion steps "
        "down from there)",
    )  # fmt: skip
    promote_episodic_tokens: int = Field(
        2048, ge=1, le=1 << 24, description="a hot session longer than this (tokens) is "
        "promoted to an episodic activation; shorter ones to a plain one",
    )  # fmt: skip
    promote_episodes: int = Field(4, ge=1, le=64, description="episodes of a promoted session")
    promote_episode_budget_tokens: int = Field(
        512, ge=64, le=1 << 20, description="tokens each episode of a promoted session keeps"
    )
    promote_max_per_run: int = Field(
        8, ge=0, le=10_000, description="activations one migrate run promotes (builds queued)"
    )
    unload_idle_s: float = Field(
        1800.0, ge=0, le=30 * 86_400, description="loaded (and dequantized) caches unused this "
        "long are unloaded from RAM by migrate; 0: never",
    )  # fmt: skip


class EnrichmentConfig(BaseModel):
    """Notes are enriched and linked by a background worker, off the request path."""

    enabled: bool = True
    enricher: str = "local"
    # Notes per batch, and per commit: a commit cannot step aside for searches midway.
    batch_size: int = Field(default=16, ge=1, le=4096)
    yield_ms: int = Field(
        default=100,
        ge=0,
        le=10_000,
        description="before each step (an embedding chunk, a commit) enrichment waits while a "
        "search is in flight, at most this long; 0: never waits",
    )
    neighbours: int = Field(default=8, ge=0, le=100, description="dense neighbours considered")
    # Cosine between enriched vectors (content, context and keywords), which run higher than
    # between raw contents: on LoCoMo the median of a note's 8 nearest is 0.69, 0.6 linked
    # nearly all of them, 0.75 links about a quarter.
    similar_threshold: float = Field(default=0.75, ge=-1, le=1)
    idle_poll_s: float = Field(default=2.0, gt=0, le=3600)
    # A note whose enrichment failed (even `local` raised) is retried by the `enrichment_retry`
    # job after retry_base_s, then 2x, 4x, ... (at most retry_max_s), and parked as "failed"
    # after max_attempts failed attempts.
    max_attempts: int = Field(default=5, ge=1, le=100)
    retry_base_s: float = Field(default=60.0, ge=0, le=86_400)
    retry_max_s: float = Field(default=6 * 3600.0, ge=0, le=30 * 86_400)
    retry_max_notes: int = Field(
        default=1024, ge=1, le=100_000, description="notes one retry run takes at most"
    )
    local: LocalEnricherConfig = LocalEnricherConfig()
    llm: LlmEnricherConfig = LlmEnricherConfig()
    linking: LinkingConfig = LinkingConfig()


class ActivationsConfig(BaseModel):
    """Activation memory: KV caches of the local runtime, built, stored and reused; and the
    bounds on the work they take (build queue, generations, memory)."""

    enabled: bool = Field(True, description="serve the activation and generate routes")
    inline_max_tokens: int = Field(
        1024, ge=0, le=1_048_576, description="larger builds run as a background job"
    )
    inline_wait_s: float = Field(
        10.0,
        ge=0,
        le=600,
        description="a short build runs inside its request only when the model work ahead of "
        "it and its own are estimated within this; otherwise it builds in the background",
    )
    max_text_bytes: int = Field(
        1 << 20, ge=1, le=64 << 20, description="an activation's rendered text, before tokenizing"
    )
    max_source_memories: int = Field(
        10_000, ge=1, le=1_000_000, description="memories one activation is built from"
    )
    max_generate_tokens: int = Field(1024, ge=1, le=65_536)
    max_prompt_bytes: int = Field(64 << 10, ge=1, le=16 << 20, description="a generate prompt")
    loaded_cache_bytes: int = Field(
        512 << 20, ge=0, le=1 << 40, description="loaded activations kept in memory, in bytes"
    )
    dequantized_cache_bytes: int = Field(
        512 << 20,
        ge=0,
        le=1 << 40,
        description="recently used activations kept dequantized (full precision), in bytes",
    )
    build_workers: int = Field(1, ge=1, le=64, description="background builds run at once")
    max_episodes: int = Field(
        16, ge=1, le=256, description="episodes of one episodic activation (one prefill each)"
    )
    max_episodic_tokens: int = Field(
        131_072, ge=1, le=1 << 24, description="an episodic activation's conversation, in "
        "tokens (each episode prefills all of it; 413 beyond)"
    )  # fmt: skip
    max_queued_builds: int = Field(
        16, ge=1, le=100_000, description="builds queued or running, daemon-wide (429 beyond)"
    )
    max_queued_builds_per_user: int = Field(
        4, ge=1, le=100_000, description="builds queued or running per cube owner (429 beyond)"
    )
    build_retry_after_s: int = Field(10, ge=1, le=3600, description="Retry-After of a 429")
    # A 2-core machine decodes one SmolLM2-135M token in tens of ms idle and a few hundred ms
    # when shared; more generations at once only interleave on the one model lock.
    max_generations: int = Field(2, ge=1, le=1024, description="generations decoding at once")
    max_waiting_generations: int = Field(
        4, ge=0, le=100_000, description="generations waiting for a slot (429 beyond)"
    )
    generation_wait_s: float = Field(
        10.0,
        ge=0,
        le=600,
        description="the wait budget: a generation is refused at once (429) when the model work "
        "ahead of it is estimated above this, and waits for a slot at most this long",
    )
    generation_kv_bytes: int = Field(
        2 << 30,
        ge=1 << 20,
        le=1 << 44,
        description="full-precision caches of the running generations together, in bytes",
    )
    # Notes as activation memory (issue 12): per-note KV chunks, blended into prompts.
    note_chunk_bits: Literal[16, 8, 4, 2] = Field(
        16, description="how a note's KV chunk is stored: 16 (float16) or KIVI 8/4/2 bits"
    )
    max_note_chunks: int = Field(
        64, ge=1, le=10_000, description="notes one per_memory build may chunk (413 beyond)"
    )
    blend_recompute_ratio: float = Field(
        0.15,
        ge=0,
        le=1,
        description="CacheBlend's r: the share of a blended note chunk's tokens recomputed in "
        "every layer (1: exact, a full prefill's; 0: re-rotated only). 0.15 per "
        "docs/benchmarks.md (3.3x less notes-block compute on SmolLM2-135M)",
    )


class ChatEndpointConfig(BaseModel):
    """An OpenAI-compatible endpoint chats may answer with instead of the local runtime."""

    url: str | None = Field(None, description="base URL, e.g. http://host:8000/v1")
    model: str = Field("default", description="model name sent to the endpoint")
    api_key: SecretStr | None = None
    timeout_s: float = Field(120.0, gt=0, le=3600)
    context_tokens: int = Field(
        8192, ge=256, le=1 << 24, description="the endpoint model's context, for the prompt budget"
    )


class ChatsConfig(BaseModel):
    """Chat sessions: recall, the verbatim window, replies and the loaded KV prefixes."""

    backend: Literal["local", "openai"] = Field(
        "local", description="what answers a chat that names no backend"
    )
    openai: ChatEndpointConfig = ChatEndpointConfig()

    default_max_context_tokens: int = Field(
        2048, ge=64, le=1 << 20, description="verbatim window of a chat that names none"
    )
    default_recall_top_k: int = Field(5, ge=0, le=100, description="notes recalled a turn")
    max_recall_top_k: int = Field(50, ge=0, le=1000)
    recall_tokens: int = Field(
        1024, ge=0, le=1 << 20, description="at most this many tokens of recalled notes a turn"
    )
    default_max_tokens: int = Field(256, ge=1, le=65_536, description="a reply's default length")
    prefix_cache_bytes: int = Field(
        1 << 30, ge=0, le=1 << 44, description="loaded chat prefixes kept in memory, in bytes"
    )
    save_idle_s: float = Field(
        120.0, ge=0, le=7 * 86_400, description="a prefix idle this long is saved to disk"
    )
    episodic_episodes: int = Field(
        4,
        ge=0,
        le=64,
        description="episodes of a long chat's old part (turns before its window); 0: none",
    )
    episodic_budget_tokens: int = Field(
        512, ge=64, le=1 << 20, description="tokens each episode of a chat's old part keeps"
    )
    episodic_block_tokens: int | None = Field(
        None, ge=1, le=1 << 20, description="block size of the old part's budgeted prefill"
    )
    episodic_rebuild_share: float = Field(
        0.25,
        gt=0,
        le=100,
        description="the old part is built again once it has grown by this share of its turns",
    )


class OpenAIConfig(BaseModel):
    """The OpenAI-compatible routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`).
    Their prompts, tokens and generations are bounded by `activations` like `generate`'s; a
    chat with the `memos` extension recalls as the chat sessions do (`chats`)."""

    max_prompts: int = Field(
        16, ge=1, le=1024, description="prompts in one /v1/completions request (422 beyond)"
    )


class HeapConfig(BaseModel):
    """The C heap of `memos serve` (glibc only; see memos/heap.py): fewer malloc arenas, and
    freed memory given back to the system, so RSS follows what is in use."""

    arena_max: int = Field(
        2, ge=0, le=1024, description="malloc arenas at most; 0: glibc's default (8 a core)"
    )
    trim_interval_s: float = Field(
        10.0, ge=0, le=3600, description="how often free heap memory is given back; 0: never"
    )


class FleetConfig(BaseModel):
    """Several daemons on one PostgreSQL database (and one Redis): see docs/deploy.md."""

    instance_id: str | None = Field(
        None,
        max_length=40,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="this daemon's id in the fleet; default: generated once, kept in "
        "<data_dir>/instance_id",
    )
    lease_s: float = Field(
        15.0, ge=1, le=3600, description="how long a silent daemon keeps its work before "
        "another daemon may take it over",
    )  # fmt: skip
    heartbeat_s: float = Field(
        5.0, gt=0, le=600, description="how often a daemon renews its lease (under lease_s)"
    )
    url: str | None = Field(
        None, max_length=300, description="how the fleet reaches this daemon (shown in /healthz)"
    )
    changes_listen: bool = Field(
        True, description="on PostgreSQL, LISTEN for other daemons' writes (memos_changes) and "
        "catch the loaded indexes up at once; off, only the poll below does",
    )  # fmt: skip
    changes_poll_s: float = Field(
        2.0, ge=0.05, le=600, description="how often the loaded cubes' generations are checked "
        "against the database (the fallback for missed notifications, and SQLite's only way)",
    )  # fmt: skip
    changes_reconnect_max_s: float = Field(
        10.0, ge=0.1, le=600, description="the longest wait between attempts to LISTEN again "
        "after the connection was lost (the wait doubles from 0.1 s up to this)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _beat_inside_lease(self) -> FleetConfig:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError("fleet.heartbeat_s must be shorter than fleet.lease_s")
        return self


class BlobsConfig(BaseModel):
    """Where activation files live (see memos/services/blobs/ and README.md "Fleet: the shared
    activation tier"): a directory, written through to Redis when `redis_url` is set."""

    directory: Path | None = Field(
        None, description="activation files' root; a directory every daemon mounts makes it "
        "shared. Default: <data_dir>/activations",
    )  # fmt: skip
    redis_max_bytes: int = Field(
        64 << 20, ge=0, le=1 << 34, description="an activation's files larger than this are "
        "not written to Redis (other daemons answer it 503 activation_unavailable)",
    )  # fmt: skip
    redis_ttl_s: int = Field(
        7 * 86400, ge=1, le=365 * 86400, description="an activation left in Redis this long "
        "without a fetch expires there (refreshed on every fetch)",
    )  # fmt: skip
    redis_timeout_s: float = Field(
        1.0, gt=0, le=30, description="Redis connect and socket timeout for blob calls"
    )
    redis_retry_s: float = Field(
        2.0, ge=0, le=600, description="after Redis failed, blob calls skip it this long "
        "before trying again (so Redis down never stalls a request)",
    )  # fmt: skip
    retry_after_s: int = Field(
        5, ge=1, le=3600, description="Retry-After of a 503 activation_unavailable"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MEMOS_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65_535)
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None
    # Redis as the fleet's shared hot tier (activation blobs, chat turn locks), e.g.
    # redis://127.0.0.1:6379/0; unset, nothing uses Redis.
    redis_url: str | None = None
    admin_key: SecretStr | None = None
    log_level: str = "info"
    config_file: Path | None = None

    embedder: EmbedderConfig = EmbedderConfig()
    hnsw: HnswConfig = HnswConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    indexes: IndexCacheConfig = IndexCacheConfig()
    limits: LimitsConfig = LimitsConfig()
    quotas: QuotasConfig = QuotasConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    enrichment: EnrichmentConfig = EnrichmentConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    activations: ActivationsConfig = ActivationsConfig()
    chats: ChatsConfig = ChatsConfig()
    openai: OpenAIConfig = OpenAIConfig()
    heap: HeapConfig = HeapConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    fleet: FleetConfig = FleetConfig()
    blobs: BlobsConfig = BlobsConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments (CLI flags) > env > TOML file named by MEMOS_CONFIG_FILE.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("MEMOS_CONFIG_FILE")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @model_validator(mode="after")
    def _derived_paths(self) -> Settings:
        if self.embedder.cache_dir is None:
            self.embedder.cache_dir = self.data_dir / "models"
        if self.runtime.cache_dir is None:  # frozen: replaced, not mutated
            self.runtime = self.runtime.model_copy(update={"cache_dir": self.data_dir / "models"})
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'memos.db'}"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "indexes"

    @property
    def activation_dir(self) -> Path:
        return self.blobs.directory or self.data_dir / "activations"

    def public_summary(self) -> dict[str, Any]:
        """What `/healthz` and the start-up log may show: no secrets."""
        url = self.resolved_database_url
        return {
            "data_dir": str(self.data_dir),
            "database": url.split("://", 1)[0],
            "embedder": self.embedder.model_dump(),
        }
