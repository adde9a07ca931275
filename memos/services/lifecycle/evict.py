"""The `evict` job: every cube within its budgets and retention, the daemon within its own.

One run, in this order (each step its own short transactions, so a search never waits long
and a `kill -9` anywhere leaves a state the next run simply continues from):

1. expire: live notes older than their cube's `memory_ttl_days` (by `created_at`, when the
   daemon stored them) are soft-deleted, history reason `expired: ...`;
2. purge: notes soft-deleted longer ago than `deleted_retention_days` are erased for good, as
   `?erase=true` erases one (content, history, links, vectors in the index, activations built
   from them: `ErasureService.purge`);
3. sweep: activation files without a row removed, rows without files failed (the orphan sweep);
4. budgets: each cube's activations within its `activation_bytes_max`, by its eviction policy;
   then all activations within `lifecycle.activation_disk_bytes`, by the default policy.
   Corrupt ones (unreadable) go first; building ones are never touched.

Rerunning it at once finds nothing left to do: expiry and purge select by time, and a budget
that holds evicts nothing. The result says what was done and why, item by item (bounded).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from memcube.policies import Item, policy, select_victims
from memos.db.engine import Database
from memos.db.models import Activation, Memory
from memos.db.types import utcnow
from memos.services.activations import ActivationService
from memos.services.erasure import ErasureService
from memos.services.lifecycle.policy import PolicyService
from memos.services.memories import MemoryService
from memos.settings import LifecycleConfig, LifecyclePolicy

BATCH = 200  # notes per transaction
LISTED = 100  # evictions named one by one in a run's result; the rest are counted
EVICTABLE = ("ready", "corrupt")


class GdsfClock:
    """GDSF's inflation value L, and the value it had at any moment since the daemon started,
    so an item's value keeps the clock of its last use (`Item.clock`). In memory: after a
    restart every item starts again from 0, as a fresh cache does."""

    def __init__(self, keep: int = 4096) -> None:
        self._times: list[float] = []
        self._values: list[float] = []
        self._keep = keep
        self._lock = threading.Lock()

    @property
    def value(self) -> float:
        with self._lock:
            return self._values[-1] if self._values else 0.0

    def at(self, moment: float) -> float:
        """L as it was at `moment` (seconds since the epoch)."""
        with self._lock:
            i = bisect.bisect_right(self._times, moment)
            return self._values[i - 1] if i else 0.0

    def advance(self, value: float, moment: float) -> None:
        with self._lock:
            if value <= (self._values[-1] if self._values else 0.0):
                return
            self._times.append(moment)
            self._values.append(value)
            if len(self._times) > self._keep:
                del self._times[0], self._values[0]


@dataclass
class EvictReport:
    expired: dict[str, int] = field(default_factory=dict)  # cube id -> notes soft-deleted
    purged: dict[str, dict[str, int]] = field(default_factory=dict)  # cube id -> counts
    swept: dict[str, int] = field(default_factory=dict)
    evicted: list[dict[str, Any]] = field(default_factory=list)  # the first LISTED
    evicted_count: int = 0
    evicted_bytes: int = 0
    held_bytes: int = 0  # activations on disk after the run
    gdsf_clock: float = 0.0
    took_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Stored:
    """An activation as the budgets see it."""

    cube_id: str
    item: Item
    corrupt: bool


class Evictor:
    def __init__(
        self,
        db: Database,
        policies: PolicyService,
        memories: MemoryService,
        erasure: ErasureService,
        activations: ActivationService,
        config: LifecycleConfig,
        pause: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.db = db
        self.pause = pause  # before each transaction: step aside while searches run
        self.policies = policies
        self.memories = memories
        self.erasure = erasure
        self.activations = activations
        self.config = config
        self.clock = GdsfClock()
        # Since start, for /metrics: expired, purged, evicted, evicted_bytes.
        self.totals: Counter[str] = Counter()

    def run(self, cube_id: str | None = None, now: datetime | None = None) -> EvictReport:
        """One run over every cube (or one cube: then the daemon-wide budget is left alone)."""
        started = time.perf_counter()
        now = now or utcnow()
        report = EvictReport()
        policies = self.policies.in_force()
        if cube_id is not None:
            policies = {cube_id: policies[cube_id]} if cube_id in policies else {}
        left = self.config.max_items_per_run
        for cid, cube_policy in policies.items():
            left -= self._expire(cid, cube_policy, now, left, report)
        left = self.config.max_items_per_run
        for cid, cube_policy in policies.items():
            left -= self._purge(cid, cube_policy, now, left, report)
        report.swept = self.activations.sweep().as_dict()
        stored = self._stored()
        for cid, cube_policy in policies.items():
            budget = cube_policy.activation_bytes_max
            if budget is not None:
                mine = [a for a in stored if a.cube_id == cid]
                why = f"cube {cid} over its activation_bytes_max {budget}"
                gone = self._enforce(mine, budget, cube_policy, why, report)
                stored = [a for a in stored if a.item.key not in gone]
        if cube_id is None and self.config.activation_disk_bytes > 0:
            why = f"daemon over lifecycle.activation_disk_bytes {self.config.activation_disk_bytes}"
            self._enforce(stored, self.config.activation_disk_bytes, self.config, why, report)
        report.held_bytes = sum(a.item.bytes for a in self._stored())
        report.gdsf_clock = self.clock.value
        report.took_ms = round((time.perf_counter() - started) * 1000, 3)
        self.totals.update(
            expired=sum(report.expired.values()),
            purged=sum(c["memories"] for c in report.purged.values()),
            evicted=report.evicted_count,
            evicted_bytes=report.evicted_bytes,
        )
        return report

    def held_bytes(self) -> int:
        """Activation bytes on disk now (ready or corrupt rows)."""
        return sum(a.item.bytes for a in self._stored())

    # -- notes ------------------------------------------------------------------------------

    def _expire(
        self, cube_id: str, cube_policy: LifecyclePolicy, now: datetime, left: int,
        report: EvictReport,
    ) -> int:  # fmt: skip
        ttl = cube_policy.memory_ttl_days
        if ttl is None or left <= 0:
            return 0
        cutoff = now - timedelta(days=ttl)
        reason = f"expired: stored over memory_ttl_days={ttl:g} ago"
        done = 0
        while done < left:
            with self.db.read() as s:
                ids = list(
                    s.scalars(
                        select(Memory.id)
                        .where(
                            Memory.cube_id == cube_id,
                            Memory.deleted_at.is_(None),
                            Memory.created_at < cutoff,
                        )
                        .order_by(Memory.seq)
                        .limit(min(BATCH, left - done))
                    )
                )
            if not ids:
                break
            self.pause()
            done += len(self.memories.retire(cube_id, ids, reason))
        if done:
            report.expired[cube_id] = done
        return done

    def _purge(
        self, cube_id: str, cube_policy: LifecyclePolicy, now: datetime, left: int,
        report: EvictReport,
    ) -> int:  # fmt: skip
        cutoff = now - timedelta(days=cube_policy.deleted_retention_days)
        counts: dict[str, int] = defaultdict(int)
        while counts["memories"] < left:
            with self.db.read() as s:
                ids = list(
                    s.scalars(
                        select(Memory.id)
                        .where(
                            Memory.cube_id == cube_id,
                            Memory.deleted_at.is_not(None),
                            Memory.deleted_at < cutoff,
                        )
                        .order_by(Memory.seq)
                        .limit(min(BATCH, left - counts["memories"]))
                    )
                )
            if not ids:  # nothing due: no pause (a pause per cube added up to seconds a run)
                break
            self.pause()
            erased = self.erasure.purge(cube_id, ids)
            if erased is None:
                break
            counts["memories"] += len(erased.memory_ids)
            counts["history_rows"] += erased.history_rows
            counts["links"] += erased.links
            counts["activations"] += len(erased.activations)
        if counts["memories"]:
            report.purged[cube_id] = dict(counts)
        return counts["memories"]

    # -- activations ------------------------------------------------------------------------

    def _stored(self) -> list[Stored]:
        with self.db.read() as s:
            rows = s.execute(
                select(
                    Activation.id, Activation.cube_id, Activation.state, Activation.bytes,
                    Activation.uses, Activation.tokens, Activation.created_at,
                    Activation.last_used_at,
                ).where(Activation.state.in_(EVICTABLE))
            ).all()  # fmt: skip
        stored = []
        for aid, cid, state, size, uses, tokens, created, used in rows:
            moment = (used or created).timestamp()
            item = Item(aid, int(size), int(uses), float(tokens), moment, self.clock.at(moment))
            stored.append(Stored(cid, item, state == "corrupt"))
        return stored

    def _enforce(
        self, stored: list[Stored], budget: int, cube_policy: LifecyclePolicy, why: str,
        report: EvictReport,
    ) -> set[str]:  # fmt: skip
        """Evict corrupt activations, then by the policy, until `stored` fits `budget`."""
        if sum(a.item.bytes for a in stored) <= budget:
            return set()
        corrupt = [a.item for a in stored if a.corrupt]  # unreadable: no use keeping them
        healthy = [a.item for a in stored if not a.corrupt]
        victims, clock = select_victims(policy(cube_policy.eviction), healthy, budget)
        cube_of = {a.item.key: a.cube_id for a in stored}
        gone: set[str] = set()
        for item, reason in [(i, "corrupt") for i in corrupt] + [
            (i, cube_policy.eviction) for i in victims
        ]:
            if not self.activations.discard(cube_of[item.key], item.key):
                continue
            gone.add(item.key)
            report.evicted_count += 1
            report.evicted_bytes += item.bytes
            if len(report.evicted) < LISTED:
                report.evicted.append({
                    "activation_id": item.key, "cube_id": cube_of[item.key],
                    "bytes": item.bytes, "hits": item.hits, "policy": reason, "why": why,
                })  # fmt: skip
        if victims:
            self.clock.advance(clock, time.time())
        return gone
