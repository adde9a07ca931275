"""ORM models. Changing one means adding an Alembic migration in `migrations/versions/`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from memos.db.types import BigIntKey, JsonValue, UTCDateTime, utcnow


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """API keys are stored as SHA-256 digests: keys are 256-bit random, so no salt is needed."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Cube(Base):
    __tablename__ = "cubes"
    __table_args__ = (UniqueConstraint("owner_id", "name", name="uq_cube_owner_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Bumped by every change to the cube's memories; memory rows record the value of their
    # last change, which is how an index knows exactly what it has not seen yet.
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    # The embedder vector space of the stored embeddings (e.g. "all-MiniLM-L6-v2:fp32:384");
    # a daemon running another space re-embeds the cube before using it. NULL: not yet known.
    embedder: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Live (not deleted) memories, kept by every write transaction (`bump_generation`), so the
    # memory quota sums a few counters instead of counting rows.
    live_memories: Mapped[int] = mapped_column(BigInteger, default=0)


class Grant(Base):
    __tablename__ = "grants"

    cube_id: Mapped[str] = mapped_column(
        ForeignKey("cubes.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Memory(Base):
    __tablename__ = "memories"
    __table_args__ = (
        Index("ix_memories_cube_seq", "cube_id", "seq"),
        Index("ix_memories_cube_change", "cube_id", "change_seq"),
        Index("ix_memories_cube_session", "cube_id", "session_id", "seq"),
        Index("ix_memories_enrichment", "enrichment", "seq"),
    )

    seq: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    cube_id: Mapped[str] = mapped_column(ForeignKey("cubes.id", ondelete="CASCADE"))
    content: Mapped[str] = mapped_column(Text)
    session_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    speaker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JsonValue, default=dict)
    keywords: Mapped[list[str]] = mapped_column(JsonValue, default=list)
    # ISO dates ("2023-05-07") enrichment resolved in the content, in order of mention.
    dates: Mapped[list[str]] = mapped_column(JsonValue, default=list)
    tags: Mapped[list[str]] = mapped_column(JsonValue, default=list)
    context: Mapped[str] = mapped_column(Text, default="")
    # float32 little-endian unit vector; the ANN index is rebuilt from these.
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    version: Mapped[int] = mapped_column(Integer, default=1)
    change_seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # "pending" until the enrichment worker has added keywords, tags, context and links;
    # "done" after; a user edit of the content makes it "pending" again. An attempt that
    # failed makes it "retrying" (the `enrichment_retry` job tries again at
    # `enrichment_next_at`, with exponential backoff), and "failed" after the last attempt.
    enrichment: Mapped[str] = mapped_column(String(16), default="pending")
    enriched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    enrichment_attempts: Mapped[int] = mapped_column(Integer, default=0)  # failed ones
    enrichment_next_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    enrichment_error: Mapped[str | None] = mapped_column(Text, nullable=True)  # the last one
    # The daemon enriching it now, until when (a lease: past it, another daemon may take it).
    claimed_by: Mapped[str | None] = mapped_column(String(40), nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Usage, for the lifecycle jobs: times the note was among a search's top k or recalled
    # into a chat, and the last time. Counted in memory and flushed in batches
    # (memos/services/lifecycle/usage.py), so a search never writes.
    recalls: Mapped[int] = mapped_column(BigInteger, default=0)
    last_recalled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class MemoryHistory(Base):
    """One row per version of a memory, including its creation and its deletion."""

    __tablename__ = "memory_history"
    __table_args__ = (UniqueConstraint("memory_seq", "version", name="uq_history_version"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    memory_seq: Mapped[int] = mapped_column(
        ForeignKey("memories.seq", ondelete="CASCADE"), index=True
    )
    version: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JsonValue, default=dict)
    keywords: Mapped[list[str]] = mapped_column(JsonValue, default=list)
    dates: Mapped[list[str]] = mapped_column(JsonValue, default=list)
    tags: Mapped[list[str]] = mapped_column(JsonValue, default=list)
    context: Mapped[str] = mapped_column(Text, default="")
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    reason: Mapped[str] = mapped_column(String(200))


class Link(Base):
    __tablename__ = "links"
    __table_args__ = (UniqueConstraint("src_seq", "dst_seq", "kind", name="uq_link"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    cube_id: Mapped[str] = mapped_column(ForeignKey("cubes.id", ondelete="CASCADE"), index=True)
    src_seq: Mapped[int] = mapped_column(ForeignKey("memories.seq", ondelete="CASCADE"), index=True)
    dst_seq: Mapped[int] = mapped_column(ForeignKey("memories.seq", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobRun(Base):
    __tablename__ = "job_runs"
    __table_args__ = (Index("ix_job_runs_name_started", "job_name", "started_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_name: Mapped[str] = mapped_column(String(100))
    trigger: Mapped[str] = mapped_column(String(16))  # "schedule" or "manual"
    status: Mapped[str] = mapped_column(String(16))  # "running", "ok", "error"
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    instance_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # who ran it


class SchedulerJob(Base):
    """APScheduler's job store, as JSON (see `memos/scheduler/jobstore.py`): no pickle."""

    __tablename__ = "scheduler_jobs"

    id: Mapped[str] = mapped_column(String(191), primary_key=True)
    next_run_time: Mapped[float | None] = mapped_column(Float, index=True, nullable=True)
    job_state: Mapped[str] = mapped_column(Text)


class Activation(Base):
    """A stored KV cache of the local model (activation memory); the tensors live on disk
    under `<data_dir>/activations/<id>/` (kv_runtime.store), this row is its catalogue entry."""

    __tablename__ = "activations"
    __table_args__ = (Index("ix_activations_cube_created", "cube_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    cube_id: Mapped[str] = mapped_column(ForeignKey("cubes.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(200))
    # What it was built from: {"text_chars": n} | {"memory_ids": [...]} | {"session_id": s}.
    source: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    compression: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    tokens: Mapped[int] = mapped_column(Integer)
    kept_tokens: Mapped[int] = mapped_column(Integer, default=0)
    bits: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # "building" (with `progress` 0..1), "ready", "failed" (with `error`), "corrupt".
    state: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Times it served a generation or a chat (`uses`, with `last_used_at`) and times its files
    # were read from disk (`loads`: a miss of the loaded cache); eviction policies rank by them.
    uses: Mapped[int] = mapped_column(BigInteger, default=0)
    loads: Mapped[int] = mapped_column(BigInteger, default=0)
    instance_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # its builder


class CubePolicy(Base):
    """A cube's lifecycle policy, one row per change: the newest version is in force (none:
    the daemon's defaults), the older ones are its history."""

    __tablename__ = "cube_policies"

    cube_id: Mapped[str] = mapped_column(
        ForeignKey("cubes.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    changed_by: Mapped[str] = mapped_column(String(40))
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Chat(Base):
    """A conversation held through the chat routes. Its turns are memories of `session_id`
    (in `seq` order); this row holds only how the chat is run and where its KV prefix went."""

    __tablename__ = "chats"
    __table_args__ = (Index("ix_chats_cube_created", "cube_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    cube_id: Mapped[str] = mapped_column(ForeignKey("cubes.id", ondelete="CASCADE"))
    session_id: Mapped[str] = mapped_column(String(200))
    system: Mapped[str | None] = mapped_column(Text, nullable=True)
    # {"top_k": int, "filters": {...}} (top_k 0: no recall)
    recall: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    max_context_tokens: Mapped[int] = mapped_column(Integer)
    sampling: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    # What answers: "local" (the runtime, with KV reuse) or "openai" (the configured endpoint).
    backend: Mapped[str] = mapped_column(String(16), default="local")
    # The first memory (by seq) of the verbatim window; older turns are left to recall. Moved
    # forward in large steps so the window's tokens stay a stable prefix between moves.
    window_from_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # The activation holding the chat's saved KV prefix, if one was saved.
    prefix_activation_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # The daemon running a turn of this chat now, until when (a lease; see services/fleet).
    turn_holder: Mapped[str | None] = mapped_column(String(40), nullable=True)
    turn_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_active_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Instance(Base):
    """A daemon of the fleet sharing this database, and its lease (renewed by its heartbeat).
    Work recorded with an instance id is that daemon's until its lease expires."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    url: Mapped[str | None] = mapped_column(String(300), nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_until: Mapped[datetime] = mapped_column(UTCDateTime)


class Lease(Base):
    """A named fleet-wide lease (e.g. the scheduler's leadership): held by one instance until
    `expires_at`, renewed by its holder, taken over by another once expired."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(40))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
