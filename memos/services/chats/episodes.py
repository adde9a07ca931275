"""A long chat's old part: the turns that left its window, as an episodic activation.

A chat keeps its newest turns verbatim (`prompt.window_start`); older ones leave the window and
were, until now, only recallable as notes. EpiCache (issue 10) gives them back as KV: the
session's turns BEFORE the window are clustered into episodes, each with a bounded cache
(`activations.episodes`), and a turn stands its prompt on the episode its message is nearest:

    [episode cache: kept tokens of the old part] + [system + window] + [notes + message]
     the base (frozen, stored)                     the chat's prefix    prefilled each turn

Decisions, and why:

- Only the part before the window. The window is exact and already a growing prefix; putting
  it into the episodes too would spend their budget on turns the prompt holds verbatim.
- Built through the ordinary build queue (`ActivationService.create` with a `memory_ids`
  source and `episodic` settings), as the chat's writer, in the background: a turn never waits
  for it, and quotas, admission and the build bounds apply as for any activation. Until one is
  ready, turns run as before (no base, `episode` null).
- Which activation a chat uses is recorded in the activation itself: its source names the chat
  (`chat_id`) and how many old turns it was built from (`old_turns`), so no schema change is
  needed and a restart finds it again. The newest ready one is used; once a newer one is ready
  the older ones are deleted (bounded storage).
- Rebuilt when the old part has grown by `chats.episodic_rebuild_share` of the turns the last
  build (ready, failed, or refused) saw: the window moves in large steps, and building E
  budgeted prefills of the whole old part at every move would keep the model busy for nothing.
  A failed or refused build is not retried before that growth either (no hot loop).
- The prefix cache is keyed by (activation, episode): a turn routed to the episode the loaded
  prefix stands on prefills only its new tokens; routed elsewhere, the window is prefilled on
  the new episode's cache, and `reused_tokens` counts only that episode's kept tokens. A prefix
  on a base is not saved to disk (the base is stored already; the window is bounded by
  `max_context_tokens`, one prefill to rebuild).
- Nothing here may fail a turn: a build refused (quota, queue, bounds), an activation deleted,
  corrupt, refused (mismatch) or whose embedder is gone is skipped with a log line, and the
  turn runs without an old part.
- Old turns: at most `activations.max_source_memories` (the newest of them), the bound every
  memories source has; longer conversations keep their newest old turns in episodes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from kv_runtime import KVCache, Runtime
from memcube.errors import DomainError
from memos.db.engine import Database
from memos.db.models import Activation
from memos.services.activations import ActivationService
from memos.services.activations.episodes import EpisodicSettings
from memos.services.activations.prompts import ActivationSource
from memos.services.chats.catalogue import ChatRecord
from memos.services.chats.history import ChatHistory, Message
from memos.services.chats.prefixes import STORED_BITS
from memos.services.views import Principal
from memos.settings import ChatsConfig

log = logging.getLogger("memos.chats")

# Fewer old turns than one window of utterances (memcube.episodes: 4) make no episode worth
# a cache; the window's own verbatim turns serve them.
MIN_OLD_TURNS = 4


@dataclass(frozen=True)
class OldPart:
    """One episode of a chat's old part, ready to stand a prompt on."""

    activation_id: str
    episode: int
    kv: KVCache  # the episode's cache (read-only, shared)
    messages: tuple[Message, ...]  # what its tokens render

    @property
    def key(self) -> tuple[str, int]:
        return (self.activation_id, self.episode)


@dataclass(frozen=True)
class _Built:
    """One of the chat's episodic activations, as its row says."""

    id: str
    state: str
    old_turns: int


class ChatEpisodes:
    def __init__(
        self,
        db: Database,
        activations: ActivationService,
        history: ChatHistory,
        config: ChatsConfig,
    ) -> None:
        self.db, self.activations, self.history, self.config = db, activations, history, config
        self._refused: dict[str, int] = {}  # chat id -> old turns of a build that was refused
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.episodic_episodes > 0 and self.activations.embedder is not None

    def builds(self, chat: ChatRecord) -> list[_Built]:
        """The chat's episodic activations (not deleted), oldest first."""
        with self.db.read() as s:
            rows = s.execute(
                select(Activation.id, Activation.state, Activation.source)
                .where(Activation.cube_id == chat.cube_id)
                .order_by(Activation.created_at, Activation.id)
            ).all()
        out = []
        for activation_id, state, source in rows:
            source = source or {}
            if source.get("chat_id") == chat.id and "old_turns" in source:
                out.append(_Built(str(activation_id), str(state), int(source["old_turns"])))
        return out

    def ensure(self, principal: Principal, chat: ChatRecord) -> None:
        """Start a build of the old part when there is none yet, or when it has grown by the
        rebuild share; delete what a newer ready build replaced. Never raises a domain error."""
        if not self.enabled or chat.window_from_seq <= 0:
            return
        try:
            self._ensure(principal, chat)
        except DomainError as exc:  # refused (quota, queue, bounds): logged, the turn goes on
            log.info("chat old part not built: %s", exc.message,
                     extra={"fields": {"chat_id": chat.id}})  # fmt: skip
        except Exception:  # a bug here must not cost the turn either
            log.exception("chat old part not built", extra={"fields": {"chat_id": chat.id}})

    def _ensure(self, principal: Principal, chat: ChatRecord) -> None:
        old = self.history.count_before(chat.cube_id, chat.session_id, chat.window_from_seq)
        if old < MIN_OLD_TURNS:
            return
        builds = self.builds(chat)
        ready = [b for b in builds if b.state == "ready"]
        for stale in ready[:-1]:  # a newer one replaced them
            self.activations.discard(chat.cube_id, stale.id)
        for failed in [b for b in builds if b.state in ("failed", "corrupt")][:-1]:
            self.activations.discard(chat.cube_id, failed.id)
        if any(b.state == "building" for b in builds):
            return
        seen = [b.old_turns for b in builds]
        with self._lock:
            if chat.id in self._refused:
                seen.append(self._refused[chat.id])
        basis = max(seen, default=0)
        if basis and old < basis * (1 + self.config.episodic_rebuild_share):
            return
        self._build(principal, chat, old)

    def _build(self, principal: Principal, chat: ChatRecord, old: int) -> None:
        limit = self.activations.config.max_source_memories
        turns = self.history.before(chat.cube_id, chat.session_id, chat.window_from_seq, limit)
        settings = EpisodicSettings(
            episodes=self.config.episodic_episodes,
            budget_tokens=self.config.episodic_budget_tokens,
            block_tokens=self.config.episodic_block_tokens,
        )
        note: dict[str, Any] = {  # the session too: erasing it drops this activation
            "chat_id": chat.id,
            "session_id": chat.session_id,
            "old_turns": old,
            "until_seq": chat.window_from_seq,
        }
        source = ActivationSource(memory_ids=tuple(t.memory_id for t in turns))
        try:
            view = self.activations.create(
                principal, chat.cube_id, source, STORED_BITS, None, settings, note
            )
        except DomainError:
            with self._lock:
                self._refused[chat.id] = old
            raise
        log.info("chat old part building", extra={"fields": {
            "chat_id": chat.id, "activation_id": view.id, "old_turns": old}})  # fmt: skip

    def part(self, runtime: Runtime, chat: ChatRecord, content: str) -> OldPart | None:
        """The episode of the chat's newest ready old part nearest `content`; None when there
        is none, or it cannot be used now (deleted, corrupt, another model or embedder)."""
        if not self.enabled or chat.window_from_seq <= 0:
            return None
        ready = [b for b in self.builds(chat) if b.state == "ready"]
        if not ready:
            return None
        activation_id = ready[-1].id
        try:
            row = self.activations.catalogue.view(chat.cube_id, activation_id)
            if row.episodes is None or row.state != "ready":
                return None
            kv, episode, messages = self.activations.generations.episode(runtime, row, content)
        except DomainError as exc:
            fields = {"chat_id": chat.id, "activation_id": activation_id}
            log.info("chat old part not used: %s", exc.message, extra={"fields": fields})
            return None
        except Exception:  # unreadable files and the like: the turn goes on without it
            fields = {"chat_id": chat.id, "activation_id": activation_id}
            log.exception("chat old part not used", extra={"fields": fields})
            return None
        return OldPart(activation_id, episode, kv, tuple(dict(m) for m in messages))

    def remove(self, chat: ChatRecord) -> None:
        """With the chat: its old part's activations."""
        for built in self.builds(chat):
            self.activations.discard(chat.cube_id, built.id)
        with self._lock:
            self._refused.pop(chat.id, None)
