"""Chat prefixes: loaded in memory under a byte budget, saved to disk as activations.

`LoadedPrefixes` keeps each chat's `PrefixCache` between turns, least recently used out first
once their bytes pass `chats.prefix_cache_bytes`. A turn *takes* its chat's entry out for its
whole run and gives it back when it ends, so what the map holds is never being changed and an
entry can be saved or evicted without a lock on the chat.

`PrefixStore` saves a prefix as an ordinary activation of the chat's cube (16 bits, the same
store, fingerprint and checksums; its source names the chat and its session) and loads it back
after a restart or an eviction. One activation per chat, replaced atomically at each save. A
prefix that cannot be loaded (deleted, corrupt, another model) is simply prefilled again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import kv_runtime
from kv_runtime import CompressionConfig, PrefixCache, Runtime
from memcube.errors import DomainError
from memos.db.models import Activation
from memos.db.types import utcnow
from memos.services.activations.catalogue import Catalogue
from memos.services.blobs import BlobUnavailable
from memos.services.chats.catalogue import ChatCatalogue, ChatRecord
from memos.services.chats.history import Message
from memos.services.ids import new_id

log = logging.getLogger("memos.chats")
STORED_BITS = 16  # a chat's prefix is stored losslessly (float16 of the model's cache)

QuotaCheck = Callable[[str, int], None]


@dataclass
class LoadedPrefix:
    """A chat's prefix and the messages it holds (system + window + finished turns)."""

    cube_id: str
    session_id: str
    prefix: PrefixCache
    messages: tuple[Message, ...] = ()
    used_at: float = field(default_factory=time.monotonic)
    saved_ids: tuple[int, ...] | None = None  # the tokens on disk, when known
    # (activation id, episode) of the old-part episode the prefix stands on (`chats.episodes`)
    base: tuple[str, int] | None = None

    @property
    def dirty(self) -> bool:
        """Unsaved changes. A prefix on a base is never saved (its base is stored already)."""
        if self.base is not None:
            return False
        return self.prefix.length > 0 and self.saved_ids != self.prefix.token_ids


class LoadedPrefixes:
    """Thread-safe, byte-bounded map chat id -> `LoadedPrefix` of chats not in a turn."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[LoadedPrefix, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, chat_id: str) -> LoadedPrefix | None:
        """Remove and return the chat's entry (the caller now owns it)."""
        with self._lock:
            return self._pop(chat_id)

    def give(
        self, chat_id: str, entry: LoadedPrefix, if_absent: bool = False
    ) -> list[tuple[str, LoadedPrefix]]:
        """Keep `entry` as the most recently used (unless `if_absent` and the chat has one);
        the entries evicted to make room, which the caller may save."""
        size = entry.prefix.nbytes()
        with self._lock:
            if if_absent and chat_id in self._entries:
                return []
            self._pop(chat_id)
            if size > self.max_bytes:
                return [(chat_id, entry)]
            self._entries[chat_id] = (entry, size)
            self._bytes += size
            evicted = []
            while self._bytes > self.max_bytes:
                old = next(iter(self._entries))
                popped = self._pop(old)
                assert popped is not None
                evicted.append((old, popped))
            return evicted

    def pop(self, chat_id: str) -> LoadedPrefix | None:
        with self._lock:
            return self._pop(chat_id)

    def drop(self, keep: Callable[[str, LoadedPrefix], bool]) -> None:
        """Forget every entry `keep` says no to (a deleted cube's, an erased session's)."""
        with self._lock:
            for chat_id in [c for c, (e, _) in self._entries.items() if not keep(c, e)]:
                self._pop(chat_id)

    def idle(self, older_than_s: float) -> list[str]:
        """Chats whose entry is unsaved and has not been used for `older_than_s`."""
        cutoff = time.monotonic() - older_than_s
        with self._lock:
            return [c for c, (e, _) in self._entries.items() if e.dirty and e.used_at <= cutoff]

    def dirty(self) -> list[str]:
        with self._lock:
            return [c for c, (e, _) in self._entries.items() if e.dirty]

    def _pop(self, chat_id: str) -> LoadedPrefix | None:
        entry = self._entries.pop(chat_id, None)
        if entry is None:
            return None
        self._bytes -= entry[1]
        return entry[0]

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


class PrefixStore:
    """Saves and loads chat prefixes as activations."""

    def __init__(
        self,
        chats: ChatCatalogue,
        activations: Catalogue,
        check_quota: QuotaCheck | None = None,
    ) -> None:
        self.chats, self.activations, self.check_quota = chats, activations, check_quota

    def load(self, runtime: Runtime, chat: ChatRecord) -> LoadedPrefix | None:
        """The chat's saved prefix, or None (never saved, deleted, unreadable)."""
        activation_id = chat.prefix_activation_id
        if activation_id is None or not self.activations.exists(activation_id):
            return None
        try:  # from the blob store: a prefix another daemon saved is fetched
            path = self.activations.fetch(chat.cube_id, activation_id)
            compressed, manifest = runtime.open_activation(path)
        except kv_runtime.ActivationCorrupt as exc:
            self.activations.mark_corrupt(activation_id, exc.message)
            log.warning("chat prefix corrupt", extra={"fields": {"chat_id": chat.id}})
            return None
        except (kv_runtime.ActivationMismatch, OSError, BlobUnavailable) as exc:
            log.info("chat prefix not loaded: %s", exc, extra={"fields": {"chat_id": chat.id}})
            return None
        self.activations.loaded(activation_id)
        self.activations.touch(activation_id)
        return LoadedPrefix(
            chat.cube_id,
            chat.session_id,
            runtime.prefix_cache(compressed),
            tuple(dict(m) for m in manifest.messages or ()),
            saved_ids=compressed.token_ids,
        )

    def save(self, runtime: Runtime, chat_id: str, entry: LoadedPrefix) -> bool:
        """Write the entry's prefix as the chat's activation; False when it was not written
        (empty, over the owner's quota, or the chat is gone)."""
        kv = entry.prefix.snapshot()
        if kv is None or not entry.dirty:
            return False
        compressed = runtime.compress(kv, CompressionConfig(bits=STORED_BITS))
        if self.check_quota is not None:
            try:
                self.check_quota(entry.cube_id, compressed.fp16_nbytes())
            except DomainError as exc:
                log.info("chat prefix not saved: %s", exc.message)
                return False
        try:
            record = self.chats.record(entry.cube_id, chat_id)
        except DomainError:
            return False
        activation_id = record.prefix_activation_id
        fresh = activation_id is None or not self.activations.exists(activation_id)
        if fresh:
            activation_id = new_id("act")
        assert activation_id is not None
        # In flight here: the orphan sweep must not fail the row or take its files meanwhile.
        with self.activations.building_inline(activation_id):
            if fresh:
                row = self._row(runtime, activation_id, chat_id, entry, kv.length)
                self.activations.insert(row)
            path = self.activations.path(entry.cube_id, activation_id)
            try:
                manifest = runtime.save_activation(path, compressed, entry.messages or None)
            except BaseException:
                if fresh:
                    self.activations.mark_failed(
                        activation_id, "the chat prefix could not be saved"
                    )
                raise
            self.activations.mark_saved(activation_id, manifest.tokens, manifest.kept_tokens,
                                        manifest.bytes)  # fmt: skip
        entry.saved_ids = kv.token_ids
        if fresh and not self.chats.set_prefix(chat_id, activation_id):  # deleted meanwhile
            self.remove(entry.cube_id, activation_id)
            return False
        return True

    def remove(self, cube_id: str, activation_id: str | None) -> None:
        if activation_id is None:
            return
        self.activations.delete_if_exists(activation_id)
        self.activations.remove_files(cube_id, activation_id)

    @staticmethod
    def _row(
        runtime: Runtime, activation_id: str, chat_id: str, entry: LoadedPrefix, tokens: int
    ) -> Activation:
        return Activation(
            id=activation_id,
            cube_id=entry.cube_id,
            model=runtime.fingerprint.model,
            source={"chat_id": chat_id, "session_id": entry.session_id},
            compression=CompressionConfig(bits=STORED_BITS).model_dump(),
            tokens=tokens,
            bits=STORED_BITS,
            state="building",
            progress=0.0,
            created_at=utcnow(),
        )
