"""Eviction policies: which stored items to drop first when a byte budget is passed.

Each policy is a small dataclass with one method, `rank`, that orders items for eviction (first
out first), as SGLang's radix-cache eviction policies and kvpress's presses are. Policies are
pure: they see only `Item`s (no rows, no files), so a test can craft a usage history and check
the exact order. The evictor (memos/services/lifecycle/evict.py) drops items in that order
until the budget holds.

- `lru`: least recently used first (never used: by creation time).
- `lfu`: least frequently used first, ties by recency.
- `gdsf`: GreedyDual-Size-Frequency (Cherkasova 1998, "Improving WWW proxies performance with
  Greedy-Dual-Size-Frequency caching policy"): value = clock + hits x cost / bytes, lowest out
  first. `cost` is what rebuilding the item takes (an activation's prefill tokens), so a large
  cache of a short text goes before a small cache of a long one. The clock L ("inflation")
  rises to the value of each evicted item; an item's value keeps the clock of its last use, so
  items not used since older evictions age out even if they were once hot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol


@dataclass(frozen=True)
class Item:
    """An evictable item as policies see it."""

    key: str
    bytes: int  # what dropping it frees
    hits: int  # times it was used
    cost: float  # what rebuilding it takes (prefill tokens)
    last_used: float  # seconds since the epoch of its last use (its creation if never used)
    clock: float = 0.0  # GDSF: the clock when it was last used (0: before any eviction)


class EvictionPolicy(Protocol):
    name: ClassVar[str]

    def rank(self, items: Sequence[Item]) -> list[Item]:
        """The items, first to evict first."""
        ...


@dataclass(frozen=True)
class Lru:
    name: ClassVar[str] = "lru"

    def rank(self, items: Sequence[Item]) -> list[Item]:
        return sorted(items, key=lambda i: (i.last_used, i.key))


@dataclass(frozen=True)
class Lfu:
    name: ClassVar[str] = "lfu"

    def rank(self, items: Sequence[Item]) -> list[Item]:
        return sorted(items, key=lambda i: (i.hits, i.last_used, i.key))


@dataclass(frozen=True)
class Gdsf:
    name: ClassVar[str] = "gdsf"

    @staticmethod
    def value(item: Item) -> float:
        """clock + frequency x cost / size; a never-used item counts one hit (its build)."""
        return item.clock + (item.hits + 1) * max(item.cost, 1.0) / max(item.bytes, 1)

    def rank(self, items: Sequence[Item]) -> list[Item]:
        return sorted(items, key=lambda i: (self.value(i), i.last_used, i.key))


POLICIES: dict[str, EvictionPolicy] = {p.name: p for p in (Lru(), Lfu(), Gdsf())}


def policy(name: str) -> EvictionPolicy:
    """The policy registered under `name`; ValueError naming the valid ones otherwise."""
    found = POLICIES.get(name)
    if found is None:
        raise ValueError(f"eviction policy {name!r} is not one of {sorted(POLICIES)}")
    return found


def select_victims(
    policy: EvictionPolicy, items: Sequence[Item], budget_bytes: int
) -> tuple[list[Item], float]:
    """The items to evict, in order, so that the rest fit `budget_bytes`, and the GDSF clock
    after them (the largest value evicted; 0 when nothing is)."""
    held = sum(i.bytes for i in items)
    victims: list[Item] = []
    clock = 0.0
    for item in policy.rank(items):
        if held <= budget_bytes:
            break
        victims.append(item)
        held -= item.bytes
        clock = max(clock, Gdsf.value(item))
    return victims, clock
