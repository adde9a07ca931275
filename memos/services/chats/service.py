"""`ChatService`: chats as routes and jobs see them; one turn at a time per chat.

catalogue  chat rows (system prompt, recall, window, sampling, saved prefix)
history    a chat's turns: the memories of its session, in stored order
prompt     system + window (the stable prefix), then notes and the new message
prefixes   loaded prefixes under a byte budget; saved as activations, loaded back
episodes   a long chat's old part (turns before the window) as an episodic activation
turns      one turn: recall, prompt, prefix, generation, both turns stored
turnlock   the fleet-wide turn lock: a lease on the chat's row

Any daemon of a fleet may serve any chat. A turn holds its chat in this daemon (a set) and in
the database (`TurnLocks`), so a second turn of that chat on any daemon is refused 409
chat_busy. The prefix a daemon keeps loaded may fall behind the chat's history when another
daemon served turns of it since: at the start of a turn (under the lock) the loaded prefix's
messages are compared with the history read from the database, and a prefix that is behind is
weighed against the saved one; either way it is synced by tokens to the history (only what it
lacks is prefilled), so the reply is the one a single daemon would give.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from kv_runtime import Runtime
from kv_runtime.prefix import common_prefix
from memcube.errors import Conflict, DomainError, InvalidArgument, TooLarge, Unavailable
from memcube.types import SearchFilters
from memos.db.engine import Database
from memos.services.activations import ActivationService
from memos.services.activations.admission import Refusal, Slot, refused
from memos.services.activations.blending import Blended, blend_prompt
from memos.services.chats.catalogue import ChatCatalogue, ChatRecord, ChatSpec
from memos.services.chats.episodes import ChatEpisodes, OldPart
from memos.services.chats.history import ChatHistory, Message, Turn
from memos.services.chats.prefixes import LoadedPrefix, LoadedPrefixes, PrefixStore, QuotaCheck
from memos.services.chats.prompt import (
    MESSAGE_OVERHEAD,
    Note,
    TurnPrompt,
    assemble,
    window_start,
)
from memos.services.chats.remote import RemoteTurn, estimate_tokens, remote_prompt
from memos.services.chats.turnlock import TurnLocks
from memos.services.chats.turns import ChatTurn, TurnRequest
from memos.services.cubes import CubeService
from memos.services.memories import MemoryService
from memos.services.search import SearchService
from memos.services.views import (
    ChatMessageView,
    ChatView,
    NewMemory,
    Page,
    Principal,
    Role,
)
from memos.settings import ChatsConfig

log = logging.getLogger("memos.chats")


@dataclass(frozen=True)
class ChatStats:
    """For /metrics."""

    loaded: int
    loaded_bytes: int
    busy: int
    turns: dict[str, int]  # finish reason (or "failed") -> count since start


def behind(held: Sequence[Message], history: Sequence[Message]) -> bool:
    """A prefix holding the messages `held` lacks some of `history`'s newest ones."""
    return len(held) < len(history) and tuple(history[: len(held)]) == tuple(held)


def filters_json(filters: SearchFilters) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if filters.session_id is not None:
        out["session_id"] = filters.session_id
    if filters.since is not None:
        out["since"] = filters.since.isoformat()
    if filters.until is not None:
        out["until"] = filters.until.isoformat()
    if filters.metadata:
        out["metadata"] = filters.metadata
    return out


def filters_of(raw: dict[str, Any]) -> SearchFilters:
    return SearchFilters(
        session_id=raw.get("session_id"),
        since=datetime.fromisoformat(raw["since"]) if raw.get("since") else None,
        until=datetime.fromisoformat(raw["until"]) if raw.get("until") else None,
        metadata=dict(raw.get("metadata") or {}),
    )


class ChatService:
    def __init__(
        self,
        db: Database,
        cubes: CubeService,
        memories: MemoryService,
        search: SearchService,
        activations: ActivationService,
        config: ChatsConfig,
        locks: TurnLocks,
        check_quota: QuotaCheck | None = None,
    ) -> None:
        self.cubes, self.memories, self.search = cubes, memories, search
        self.activations, self.config = activations, config
        self.catalogue = ChatCatalogue(db)
        self.history = ChatHistory(db)
        self.loaded = LoadedPrefixes(config.prefix_cache_bytes)
        self.store = PrefixStore(self.catalogue, activations.catalogue, check_quota)
        self.episodes = ChatEpisodes(db, activations, self.history, config)
        self.locks = locks  # the fleet-wide turn lock, held as this daemon's instance
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._turns: dict[str, int] = {}
        self._client: httpx.Client | None = None  # to the OpenAI-compatible endpoint, if used

    # -- chats ------------------------------------------------------------------------------

    def create(
        self,
        principal: Principal,
        cube_id: str,
        *,
        session_id: str | None = None,
        system: str | None = None,
        recall_top_k: int | None = None,
        recall_filters: SearchFilters | None = None,
        max_context_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        backend: str | None = None,
    ) -> ChatView:
        self.cubes.require(principal, cube_id, Role.WRITER)
        config = self.config
        backend = backend or config.backend
        if backend == "openai" and not config.openai.url:
            raise InvalidArgument(
                "backend openai needs an endpoint: set MEMOS_CHATS__OPENAI__URL",
                code="chat_backend_unavailable",
            )
        top_k = config.default_recall_top_k if recall_top_k is None else recall_top_k
        if not 0 <= top_k <= config.max_recall_top_k:
            raise InvalidArgument(
                f"recall.top_k is {top_k}; it must be between 0 and {config.max_recall_top_k}"
            )
        window = max_context_tokens or config.default_max_context_tokens
        if backend == "openai":
            positions = config.openai.context_tokens
        else:
            positions = self.activations.runtime.get().info.max_positions
        if not 64 <= window <= positions // 2:
            raise InvalidArgument(
                f"max_context_tokens is {window}; it must be between 64 and {positions // 2} "
                "(half the model's positions, leaving room for notes, the message and the reply)"
            )
        if system is not None:
            self.activations.prompts.check_prompt(system)
        filters = recall_filters or SearchFilters()
        if filters.since and filters.until and filters.since >= filters.until:
            raise InvalidArgument("recall.filters.since must be earlier than until")
        spec = ChatSpec(
            system=system,
            recall={"top_k": top_k, "filters": filters_json(filters)},
            max_context_tokens=window,
            sampling={"temperature": temperature, "top_p": top_p, "seed": seed},
            backend=backend,
        )
        return self.catalogue.create(cube_id, session_id, spec)

    def get(self, principal: Principal, cube_id: str, chat_id: str) -> ChatView:
        self.cubes.require(principal, cube_id, Role.READER)
        return self.catalogue.view(cube_id, chat_id)

    def page(
        self, principal: Principal, cube_id: str, limit: int, cursor: str | None
    ) -> Page[ChatView]:
        self.cubes.require(principal, cube_id, Role.READER)
        return self.catalogue.page(cube_id, limit, cursor)

    def messages(
        self, principal: Principal, cube_id: str, chat_id: str, limit: int, cursor: str | None
    ) -> Page[ChatMessageView]:
        self.cubes.require(principal, cube_id, Role.READER)
        chat = self.catalogue.record(cube_id, chat_id)
        return self.history.page(cube_id, chat.session_id, limit, cursor)

    def delete(self, principal: Principal, cube_id: str, chat_id: str, purge: bool) -> None:
        """The chat and its saved prefix; its turns too with `purge` (soft-deleted, as a
        memory DELETE does). A turn running on it is refused 409 chat_busy instead."""
        self.cubes.require(principal, cube_id, Role.WRITER)
        self.catalogue.record(cube_id, chat_id)  # 404 before 409
        self._take(chat_id)
        try:
            chat = self.catalogue.delete(cube_id, chat_id)
            self.loaded.pop(chat_id)
            self.store.remove(cube_id, chat.prefix_activation_id)
            self.episodes.remove(chat)
            if purge:
                self.memories.delete_session(principal, cube_id, chat.session_id)
        finally:
            self._give(chat_id)

    # -- turns ------------------------------------------------------------------------------

    def send(
        self,
        principal: Principal,
        cube_id: str,
        chat_id: str,
        content: str,
        *,
        speaker: str | None = None,
        timestamp: datetime | None = None,
        max_tokens: int | None = None,
        cancel: threading.Event | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> ChatTurn | RemoteTurn:
        """Check, recall, admit, bring the prefix up to date and start decoding; every refusal
        is raised here, before any text. Iterate the turn, `finish()` it, `close()` it.
        `sampling` ({"temperature", "top_p", "seed"}, any of them) overrides the chat's own
        for this turn (an OpenAI request that names them)."""
        started = time.perf_counter()
        cancel = cancel or threading.Event()
        self.cubes.require(principal, cube_id, Role.WRITER)
        chat = self.catalogue.record(cube_id, chat_id)
        limit = self.activations.config.max_generate_tokens
        max_tokens = max_tokens or min(self.config.default_max_tokens, limit)
        if not 1 <= max_tokens <= limit:
            raise InvalidArgument(f"max_tokens is {max_tokens}; it must be between 1 and {limit}")
        self.activations.prompts.check_prompt(content)
        self.memories.check_content(content, "content")
        runtime = self.activations.runtime.get() if chat.spec.backend == "local" else None
        self._take(chat_id)
        entry: LoadedPrefix | None = None
        slot = None
        try:
            # Read again under the lock: another daemon's turn may have moved the window.
            chat = self.catalogue.record(cube_id, chat_id)
            sampling = {**chat.spec.sampling, **(sampling or {})}
            request = TurnRequest(
                chat_id=chat.id,
                cube_id=cube_id,
                session_id=chat.session_id,
                content=content,
                speaker=speaker,
                timestamp=timestamp,
                max_tokens=max_tokens,
                temperature=float(sampling.get("temperature", 0.0)),
                top_p=float(sampling.get("top_p", 1.0)),
                seed=sampling.get("seed"),
            )
            user = {"role": "user", "content": content}
            if speaker and speaker != "user":
                user["content"] = f"{speaker}: {content}"

            def store(items: list[NewMemory]) -> list[str]:
                if not self.locks.confirm(chat_id):
                    raise Conflict(
                        f"chat {chat_id!r} was taken over by another daemon while this turn "
                        "ran (its lease lapsed); this turn was not stored",
                        code="chat_busy",
                    )
                return [view.id for view in self.memories.add(principal, cube_id, items)]

            if runtime is None:  # an OpenAI-compatible endpoint answers
                window, notes = self._context(principal, chat, content, estimate_tokens)
                endpoint = self.config.openai
                messages, kept = remote_prompt(
                    chat.spec.system, window, user, notes,
                    recall_tokens=self.config.recall_tokens,
                    context_tokens=endpoint.context_tokens, max_tokens=max_tokens,
                )  # fmt: skip
                slot = self._admit(None, 0, cancel, 0, 0)  # a remote turn: a slot, no model work
                return RemoteTurn(
                    self._endpoint(), endpoint, request, messages, user, kept, slot, cancel,
                    store, self._turn_ended, started,
                )  # fmt: skip

            window, notes = self._context(
                principal, chat, content, lambda text: len(runtime.tokenize(text))
            )
            chat = self.catalogue.record(cube_id, chat_id)  # the window may have moved
            self.episodes.ensure(principal, chat)
            old = self.episodes.part(runtime, chat, content)
            prompt = assemble(
                runtime, chat.spec.system, window, user, notes,
                recall_tokens=self.config.recall_tokens, max_tokens=max_tokens,
                before=old.messages if old else (), base_length=old.kv.length if old else 0,
            )  # fmt: skip
            base = old.kv.kept if old else 0
            tokens = base + len(prompt.history_ids) + len(prompt.turn_ids) + max_tokens
            entry = self._entry(runtime, chat, old, prompt)
            cached = common_prefix(entry.prefix.token_ids, prompt.history_ids)
            prefill = len(prompt.history_ids) - cached + len(prompt.turn_ids)
            slot = self._admit(runtime, tokens * runtime.kv_bytes_per_token, cancel, prefill,
                               max_tokens)  # fmt: skip
            reused = entry.prefix.sync(prompt.history_ids, cancel.is_set)
            slot.work.advance(len(prompt.history_ids) - reused)
            entry.messages = prompt.history
            blended = self._blend(runtime, cube_id, entry, prompt)
            return ChatTurn(
                runtime, request, prompt, entry, slot, cancel, store, self._turn_ended,
                started, base + reused, blended, old.episode if old else None,
            )  # fmt: skip
        except BaseException:
            if slot is not None:
                slot.release()
            if entry is not None:
                self._keep(chat_id, entry)
            self._give(chat_id)
            self._count("failed")
            raise

    def _blend(
        self, runtime: Runtime, cube_id: str, entry: LoadedPrefix, prompt: TurnPrompt
    ) -> Blended | None:
        """The turn's cache with its recalled notes taken from their KV chunks, on a snapshot
        of the prefix (which keeps no note); None when no note has a usable chunk."""
        if entry.prefix.has_base:  # its snapshot cannot stand alone: the notes are prefilled
            return None
        notes = self.activations.notes
        chunks = [
            chunk
            for note in prompt.notes
            if note.has_kv
            and (chunk := notes.load(runtime, cube_id, note.memory_id, note.version)) is not None
        ]
        if not chunks:
            return None
        ratio = self.activations.config.blend_recompute_ratio
        return blend_prompt(runtime, entry.prefix.snapshot(), prompt.turn_ids, chunks, ratio)

    def _admit(
        self,
        runtime: Runtime | None,
        kv_bytes: int,
        cancel: threading.Event,
        prefill: int,
        decode: int,
    ) -> Slot:
        """A generation slot for a turn that will prefill and decode that many tokens on
        `runtime` (None: a remote turn), refused at once (429) when the model's work ahead
        would make it wait too long."""
        gate = self.activations.gate
        if kv_bytes > gate.limits.max_kv_bytes:
            raise TooLarge(
                f"this turn's cache would take {kv_bytes} bytes; generations may take "
                f"{gate.limits.max_kv_bytes} (a smaller max_context_tokens or max_tokens)",
                code="generation_too_large",
            )
        if runtime is None:
            admitted = gate.acquire(kv_bytes, cancel.is_set)
        else:
            admitted = gate.acquire(
                kv_bytes, cancel.is_set, prefill=prefill, decode=decode,
                estimate=runtime.throughput.seconds,
            )  # fmt: skip
        if isinstance(admitted, Refusal):
            raise refused(gate.limits, admitted)
        return admitted

    def _endpoint(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                endpoint = self.config.openai
                if not endpoint.url:
                    raise Unavailable(
                        "no chat endpoint is configured (MEMOS_CHATS__OPENAI__URL)",
                        code="chat_backend_unavailable",
                    )
                headers = {}
                if endpoint.api_key is not None:
                    headers["Authorization"] = f"Bearer {endpoint.api_key.get_secret_value()}"
                self._client = httpx.Client(
                    base_url=endpoint.url.rstrip("/"), headers=headers, timeout=endpoint.timeout_s
                )
            return self._client

    def _context(
        self,
        principal: Principal,
        chat: ChatRecord,
        content: str,
        measure: Callable[[str], int],
    ) -> tuple[list[Turn], list[Note]]:
        """The verbatim window (moved forward when it outgrew its budget) and the notes
        recalled for `content`, not counting those already in the window."""
        spec = chat.spec
        budget = spec.max_context_tokens
        if spec.system:
            budget -= measure(spec.system) + MESSAGE_OVERHEAD
        # At most a token a turn: more turns than the budget can never all fit.
        window = self.history.recent(chat.cube_id, chat.session_id, chat.window_from_seq,
                                     max(1, spec.max_context_tokens))  # fmt: skip
        sizes = [measure(t.message()["content"]) + MESSAGE_OVERHEAD for t in window]
        start = window_start(sizes, max(0, budget))
        if start:
            window = window[start:]
            from_seq = window[0].seq if window else chat.window_from_seq
            self.catalogue.move_window(chat.id, from_seq)
        notes = self._recall(principal, chat, content, {t.memory_id for t in window})
        return window, notes

    def _recall(
        self, principal: Principal, chat: ChatRecord, query: str, shown: set[str]
    ) -> list[Note]:
        """The chat's top_k notes for `query`, as a search with that top_k ranks them; only
        when some of those are turns already in the window is a larger pool asked for (the
        ranking depends on the pool: fusion standardises over the candidates it scores)."""
        top_k = int(chat.spec.recall.get("top_k", 0))
        if top_k <= 0 or not query.strip():
            return []
        filters = filters_of(chat.spec.recall.get("filters", {}))
        search = self.search.search
        hits = search(principal, chat.cube_id, query, top_k, filters, count=False).hits
        if any(h.memory.id in shown for h in hits):
            pool = min(self.search.max_top_k, top_k + len(shown))
            hits = search(principal, chat.cube_id, query, pool, filters, count=False).hits
        notes = [
            Note(
                h.memory.id,
                h.score,
                h.memory.speaker,
                h.memory.timestamp,
                h.memory.content,
                h.memory.version,
                h.memory.has_kv,
            )  # fmt: skip
            for h in hits
            if h.memory.id not in shown
        ][:top_k]
        self.search.record([note.memory_id for note in notes])  # what the prompt recalls
        return notes

    def _entry(
        self, runtime: Runtime, chat: ChatRecord, old: OldPart | None, prompt: TurnPrompt
    ) -> LoadedPrefix:
        """The chat's prefix, standing on `old`'s episode (or on nothing): the loaded one when
        it stands there already (or the saved one, when the loaded one fell behind and the
        saved one holds more of `prompt`'s history), else the saved one (no base only), else a
        new one."""
        base = old.key if old is not None else None
        entry = self.loaded.take(chat.id)
        if entry is not None and entry.base == base:
            if base is None and behind(entry.messages, prompt.history):
                return self._fresher(runtime, chat, entry, prompt)
            return entry
        if old is not None:  # another episode (or none before): the window goes on this one
            return LoadedPrefix(chat.cube_id, chat.session_id,
                                runtime.prefix_cache(base=old.kv), base=base)  # fmt: skip
        entry = self._load_saved(runtime, chat)
        if entry is None:
            entry = LoadedPrefix(chat.cube_id, chat.session_id, runtime.prefix_cache())
        return entry

    def _fresher(
        self, runtime: Runtime, chat: ChatRecord, entry: LoadedPrefix, prompt: TurnPrompt
    ) -> LoadedPrefix:
        """Turns were added to the chat that this daemon's loaded prefix does not hold (another
        daemon served them, or they were added as memories): the saved prefix, when it holds
        more of the history (another daemon saved it since), else the loaded one. Either is
        then synced to the history by tokens. A saved prefix this daemon cannot read (its
        files are elsewhere, or gone) leaves the loaded one."""
        fields = {"chat_id": chat.id, "held": len(entry.messages), "history": len(prompt.history)}
        saved = self._load_saved(runtime, chat)
        if saved is not None and saved.base is None:
            ours = common_prefix(entry.prefix.token_ids, prompt.history_ids)
            theirs = common_prefix(saved.prefix.token_ids, prompt.history_ids)
            if theirs > ours:
                log.info("loaded chat prefix behind; the saved one is used",
                         extra={"fields": {**fields, "tokens": theirs}})  # fmt: skip
                return saved
        log.info("loaded chat prefix behind; it is extended",
                 extra={"fields": fields})  # fmt: skip
        return entry

    def _load_saved(self, runtime: Runtime, chat: ChatRecord) -> LoadedPrefix | None:
        """The chat's saved prefix, when this daemon can read it. In a fleet it may have been
        saved by another daemon: its files come through the blob store (Redis, a shared
        directory); when they cannot (not there, Redis away) that is no corruption, the
        prefix is simply prefilled again (`PrefixStore.load` answers None)."""
        return self.store.load(runtime, chat)

    def _turn_ended(
        self, chat_id: str, outcome: str, stored: bool, entry: LoadedPrefix | None
    ) -> None:
        self._count(outcome)
        try:
            if stored:
                self.catalogue.touch(chat_id)
            if entry is not None:
                self._keep(chat_id, entry)
        finally:
            self._give(chat_id)

    def _keep(self, chat_id: str, entry: LoadedPrefix) -> None:
        """Back into the loaded map; what that evicts is saved to disk."""
        entry.used_at = time.monotonic()
        for evicted_id, evicted in self.loaded.give(chat_id, entry):
            self._save(evicted_id, evicted)

    def _save(self, chat_id: str, entry: LoadedPrefix) -> bool:
        try:
            return self.store.save(self.activations.runtime.get(), chat_id, entry)
        except Exception:
            log.exception("saving a chat prefix failed", extra={"fields": {"chat_id": chat_id}})
            return False

    # -- the one-turn-per-chat rule ----------------------------------------------------------

    def _take(self, chat_id: str) -> None:
        """This daemon's lock on the chat, then the fleet's (409 chat_busy if either is held)."""
        self._take_here(chat_id)
        try:
            taken = self.locks.take(chat_id)
        except BaseException:
            self._give_here(chat_id)
            raise
        if not taken:
            self._give_here(chat_id)
            raise self._busy_error(chat_id)

    def _give(self, chat_id: str) -> None:
        try:
            self.locks.give(chat_id)
        finally:
            self._give_here(chat_id)

    @staticmethod
    def _busy_error(chat_id: str) -> Conflict:
        return Conflict(
            f"chat {chat_id!r} is answering another message; send this one when that "
            "turn has finished",
            code="chat_busy",
        )

    def _take_here(self, chat_id: str) -> None:
        with self._lock:
            if chat_id in self._busy:
                raise self._busy_error(chat_id)
            self._busy.add(chat_id)

    def _give_here(self, chat_id: str) -> None:
        with self._lock:
            self._busy.discard(chat_id)

    def _try_take_here(self, chat_id: str) -> bool:
        """For saving a loaded prefix: no turn of this daemon changes it meanwhile (a turn on
        another daemon does not touch this daemon's copy)."""
        try:
            self._take_here(chat_id)
        except Conflict:
            return False
        return True

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._turns[outcome] = self._turns.get(outcome, 0) + 1

    # -- the daemon's side --------------------------------------------------------------------

    def save_idle(self, idle_s: float | None = None) -> dict[str, int]:
        """Save the prefixes unused for `idle_s` (default `chats.save_idle_s`) that changed
        since they were last saved; they stay loaded. The `chat_prefix_save` job."""
        idle = self.config.save_idle_s if idle_s is None else idle_s
        return self._save_each(self.loaded.idle(idle))

    def save_all(self) -> dict[str, int]:
        """Every unsaved loaded prefix (at shutdown)."""
        return self._save_each(self.loaded.dirty())

    def _save_each(self, chat_ids: list[str]) -> dict[str, int]:
        saved = skipped = 0
        for chat_id in chat_ids:
            if not self._try_take_here(chat_id):  # a turn is running: it keeps the prefix fresh
                skipped += 1
                continue
            try:
                entry = self.loaded.take(chat_id)
                if entry is None:
                    continue
                if self._stale(chat_id, entry):  # dropped: the fleet's saved one stays
                    skipped += 1
                    continue
                if self._save(chat_id, entry):
                    saved += 1
                else:
                    skipped += 1
                self.loaded.give(chat_id, entry, if_absent=True)
            finally:
                self._give_here(chat_id)
        return {"saved": saved, "skipped": skipped}

    def _stale(self, chat_id: str, entry: LoadedPrefix) -> bool:
        """The chat is gone, or its window's turns in the database are not the ones this loaded
        prefix holds: another daemon served turns of it since (and may have saved a longer
        prefix, which this one must not overwrite), or some were erased there (their KV must
        not be saved here). Such a prefix is dropped; a turn would have synced it anyway."""
        try:
            chat = self.catalogue.record(entry.cube_id, chat_id)
            held = [m for m in entry.messages if m.get("role") != "system"]
            turns = self.history.recent(chat.cube_id, chat.session_id, chat.window_from_seq,
                                        len(held) + 1)  # fmt: skip
        except DomainError:
            return True  # the chat was deleted (on another daemon)
        except Exception:
            log.warning("could not check a chat prefix before saving it", exc_info=True)
            return False
        if [turn.message() for turn in turns] != held:
            log.info("loaded chat prefix no longer the chat's; dropped, not saved",
                     extra={"fields": {"chat_id": chat_id}})  # fmt: skip
            return True
        return False

    def close(self) -> None:
        """At shutdown, after `save_all`."""
        self.locks.close()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def drop_cube(self, cube_id: str) -> None:
        """After a cube is deleted (its chats cascade; its activation files are removed)."""
        self.loaded.drop(lambda _, entry: entry.cube_id != cube_id)

    def drop_session(self, cube_id: str, session_id: str) -> None:
        """After a memory of the session is erased: its KV must not outlive it in memory."""
        self.loaded.drop(lambda _, e: not (e.cube_id == cube_id and e.session_id == session_id))

    def stats(self) -> ChatStats:
        with self._lock:
            busy, turns = len(self._busy), dict(self._turns)
        return ChatStats(len(self.loaded), self.loaded.bytes, busy, turns)
