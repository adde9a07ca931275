"""The loaded-activation cache is bounded by bytes: exact eviction order and totals."""

from __future__ import annotations

import time

from memos.services.activations.loaded import ByteBoundedLRU, episode_key


def test_least_recently_used_entries_go_until_the_bytes_fit() -> None:
    cache: ByteBoundedLRU[str] = ByteBoundedLRU(max_bytes=100)
    assert cache.put(("c1", "a"), "A", 40) == []
    assert cache.put(("c1", "b"), "B", 40) == []
    assert cache.get(("c1", "a")) == "A"  # a is now the most recently used
    assert cache.put(("c2", "c"), "C", 30) == [("c1", "b")]  # 110 > 100: b (LRU) goes
    assert (cache.order(), cache.bytes) == ([("c1", "a"), ("c2", "c")], 70)
    assert cache.put(("c2", "d"), "D", 100) == [("c1", "a"), ("c2", "c")]  # exactly the budget
    assert (cache.order(), cache.bytes) == ([("c2", "d")], 100)
    assert cache.get(("c1", "b")) is None


def test_an_entry_larger_than_the_budget_is_not_kept_and_replacing_one_counts_once() -> None:
    cache: ByteBoundedLRU[str] = ByteBoundedLRU(max_bytes=100)
    cache.put(("c1", "a"), "A", 60)
    assert cache.put(("c1", "huge"), "H", 101) == []
    assert (cache.order(), cache.bytes) == ([("c1", "a")], 60)
    cache.put(("c1", "a"), "A2", 90)  # the same key again: its old size is given back first
    assert (cache.get(("c1", "a")), cache.bytes) == ("A2", 90)
    disabled: ByteBoundedLRU[str] = ByteBoundedLRU(max_bytes=0)
    disabled.put(("c1", "a"), "A", 1)
    assert (disabled.order(), disabled.bytes) == ([], 0)


def test_a_deleted_cube_and_a_deleted_activation_leave_the_cache() -> None:
    cache: ByteBoundedLRU[str] = ByteBoundedLRU(max_bytes=1000)
    for key in (("c1", "a"), ("c2", "b"), ("c1", "c"), ("c2", "d")):
        cache.put(key, key[1], 10)
    cache.drop_cube("c1")
    assert (cache.order(), cache.bytes) == ([("c2", "b"), ("c2", "d")], 20)
    cache.pop(("c2", "b"))
    cache.pop(("c2", "zzz"))  # absent: nothing happens
    assert (cache.order(), cache.bytes) == ([("c2", "d")], 10)


def test_forgetting_an_activation_forgets_its_episodes_and_nothing_else() -> None:
    cache: ByteBoundedLRU[str] = ByteBoundedLRU(max_bytes=100)
    for key in (episode_key("c1", "act_a", 0), episode_key("c1", "act_a", 1), ("c1", "act_a"),
                episode_key("c1", "act_ab", 0), episode_key("c2", "act_a", 0)):  # fmt: skip
        cache.put(key, "kv", 10)
    cache.pop(("c1", "act_a"))
    assert cache.order() == [("c1", "act_ab#0"), ("c2", "act_a#0")]
    assert cache.bytes == 20


def test_entries_unused_for_long_are_unloaded_and_a_get_keeps_one() -> None:
    cache: ByteBoundedLRU[str] = ByteBoundedLRU(max_bytes=100)
    cache.put(("c1", "a"), "A", 10)
    cache.put(("c1", "b"), "B", 20)
    time.sleep(0.2)
    assert cache.get(("c1", "a")) == "A"  # used again: not idle
    assert cache.unload_idle(0.1) == [(("c1", "b"), 20)]
    assert (cache.order(), cache.bytes) == ([("c1", "a")], 10)
    assert cache.unload_idle(60) == []  # nothing idle that long
