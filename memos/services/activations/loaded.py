"""Loaded activations kept in memory, bounded by bytes: least recently used out first.

Two tiers, each a `ByteBoundedLRU` with its own budget:

- loaded: activations as stored (`CompressedKV`, codes and scales). Loading one reads, checks
  and parses its files; keeping recently used ones saves that on the next request.
- dequantized: the full-precision caches of the most recently used ones (`KVCache`, the model's
  dtype, on its device), ready for a request to read without copying. Dequantizing a 2K-token
  4-bit cache costs tens of milliseconds, which a hot activation then pays once, not per
  request. Its size is its tensors' real bytes: up to 8x its loaded entry's (float32 vs 4 bits).

Entries differ in size by orders of magnitude (a 2-bit 100-token cache and a 16-bit 8K-token
one), so the bound is on bytes, not on a number of entries: after every insert the least
recently used entries are dropped until the total fits `max_bytes`. An entry larger than the
whole budget is not kept at all. Each entry remembers when it was last used, so the `migrate`
job can unload what nobody used for long (`idle`), and not only what a new entry pushes out.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from kv_runtime import CompressedKV

if TYPE_CHECKING:
    from memos.services.activations.episodes import Router

V = TypeVar("V")
Key = tuple[str, str]  # (cube id, activation id); an episode's dequantized cache: "<id>#<e>"


@dataclass(frozen=True)
class LoadedActivation:
    """A verified activation in memory and the chat messages its tokens render; an episodic
    one holds a cache per episode and the router that picks one."""

    caches: tuple[CompressedKV, ...]
    history: tuple[Mapping[str, str], ...]
    router: Router | None = None

    @property
    def kv(self) -> CompressedKV:
        assert self.router is None and len(self.caches) == 1, "a plain activation's one cache"
        return self.caches[0]

    def memory_nbytes(self) -> int:
        return sum(c.memory_nbytes() for c in self.caches)


def episode_key(cube_id: str, activation_id: str, episode: int) -> Key:
    return (cube_id, f"{activation_id}#{episode}")


class ByteBoundedLRU(Generic[V]):
    """Thread-safe LRU map whose values' sizes (given with each put) sum to <= `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, tuple[V, int]] = OrderedDict()
        self._used: dict[Key, float] = {}  # monotonic time of each entry's last get or put
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Key) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self._used[key] = time.monotonic()
            return entry[0]

    def put(self, key: Key, value: V, size: int) -> list[Key]:
        """Keep `value` as the most recently used; the keys evicted to make room."""
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return []
            self._entries[key] = (value, size)
            self._used[key] = time.monotonic()
            self._bytes += size
            evicted = []
            while self._bytes > self.max_bytes:
                old, _ = next(iter(self._entries.items()))
                self._pop(old)
                evicted.append(old)
            return evicted

    def pop(self, key: Key) -> None:
        """Forget `key`, and the episodes' entries of the activation it names."""
        with self._lock:
            self._pop(key)
            cube_id, activation_id = key
            for other in [k for k in self._entries if k[0] == cube_id]:
                if other[1].startswith(activation_id + "#"):
                    self._pop(other)

    def drop_cube(self, cube_id: str) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == cube_id]:
                self._pop(key)

    def _pop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        self._used.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]

    def unload_idle(self, idle_s: float) -> list[tuple[Key, int]]:
        """Drop the entries not used for `idle_s` seconds; their keys and sizes."""
        cutoff = time.monotonic() - idle_s
        with self._lock:
            gone = [(k, self._entries[k][1]) for k in self._entries if self._used[k] <= cutoff]
            for key, _ in gone:
                self._pop(key)
        return gone

    def size_of(self, key: Key) -> int | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[1]

    def order(self) -> list[Key]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes
