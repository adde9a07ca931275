"""Eviction policies rank a crafted usage history in exactly the expected order."""

from __future__ import annotations

import pytest

from memcube.policies import POLICIES, Gdsf, Item, policy, select_victims

# Four caches, as the evict job sees them: bytes, uses, prefill tokens, last use (epoch s).
# old_big:   large, used often long ago, cheap to rebuild per byte
# hot_small: small, used most, long text: expensive to rebuild per byte
# fresh:     built last, never used
# mid:       used twice, recently
ITEMS = [
    Item("old_big", bytes=8000, hits=9, cost=100, last_used=100.0),
    Item("hot_small", bytes=1000, hits=20, cost=400, last_used=200.0),
    Item("fresh", bytes=2000, hits=0, cost=200, last_used=400.0),
    Item("mid", bytes=3000, hits=2, cost=300, last_used=300.0),
]


def keys(items):
    return [i.key for i in items]


@pytest.mark.parametrize(
    ("name", "order"),
    [
        ("lru", ["old_big", "hot_small", "mid", "fresh"]),
        ("lfu", ["fresh", "mid", "old_big", "hot_small"]),
        # values: old_big 10*100/8000=0.125, fresh 1*200/2000=0.1, mid 3*300/3000=0.3,
        # hot_small 21*400/1000=8.4
        ("gdsf", ["fresh", "old_big", "mid", "hot_small"]),
    ],
)
def test_each_policy_ranks_the_history_in_its_order(name, order):
    assert keys(policy(name).rank(ITEMS)) == order


def test_gdsf_values_keep_the_clock_of_their_last_use():
    # An item last used after the clock rose to 5 outranks a once-hot one used before.
    aged = Item("aged", bytes=1000, hits=20, cost=100, last_used=1.0, clock=0.0)  # 2.1
    recent = Item("recent", bytes=1000, hits=0, cost=100, last_used=9.0, clock=5.0)  # 5.1
    assert Gdsf.value(aged) == pytest.approx(2.1)
    assert keys(Gdsf().rank([recent, aged])) == ["aged", "recent"]


def test_victims_are_taken_in_order_until_the_budget_holds():
    victims, clock = select_victims(policy("gdsf"), ITEMS, budget_bytes=5000)
    # 14000 held: fresh (-2000) = 12000, old_big (-8000) = 4000 <= 5000
    assert keys(victims) == ["fresh", "old_big"]
    assert clock == pytest.approx(0.125)  # the largest value evicted
    assert select_victims(policy("lru"), ITEMS, budget_bytes=14_000) == ([], 0.0)
    everything, _ = select_victims(policy("lru"), ITEMS, budget_bytes=0)
    assert keys(everything) == ["old_big", "hot_small", "mid", "fresh"]


def test_an_unknown_policy_is_refused_with_the_valid_names():
    assert sorted(POLICIES) == ["gdsf", "lfu", "lru"]
    with pytest.raises(ValueError, match=r"'fifo' is not one of \['gdsf', 'lfu', 'lru'\]"):
        policy("fifo")
