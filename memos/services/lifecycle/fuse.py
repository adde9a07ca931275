"""The `fuse` job: near-duplicate notes of a cube merged into one canonical note.

Groups are found two ways (and joined when they overlap): notes joined by a `duplicate` link
(enrichment made it: the same speaker in a session said nearly the same again), and notes of
the same speaker whose stored vectors are at least the policy's `fuse.threshold` apart in
cosine. The earliest note of a group (by `seq`) survives; in one transaction per group:

- the survivor gets the union of the group's keywords and tags (its own first), a context
  merged from theirs (each distinct one once), their recalls added to its own, a vector
  embedded again from that enrichment, and a history row `fused from [<id>, ...]`;
- every link to or from the others is re-pointed to the survivor (a link between two members
  disappears, one the survivor already has is kept once with the higher score);
- the others are soft-deleted with history `fused into <survivor id>`, so their words stay in
  history until the retention purges them, and search shows the survivor only.

Notes whose enrichment is still to run are left for a later run (enrichment would overwrite
the merged keywords). Each group is re-read in its transaction and skipped if a member changed
since it was planned, so a concurrent edit wins and a rerun (or a run after a kill) fuses
exactly what is left.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import delete, or_, select

from memcube.notes import to_doc
from memos.db.engine import Database
from memos.db.locking import lock_cube
from memos.db.models import Link, Memory
from memos.db.types import utcnow
from memos.services.indexes import IndexRegistry
from memos.services.lifecycle.policy import PolicyService
from memos.services.repository import bump_generation, enriched_text, history_row
from memos.settings import LifecycleConfig

Embed = Callable[[Sequence[str]], np.ndarray]
CHUNK = 512  # rows of the cosine matrix computed at once
LISTED = 100  # fusions named one by one in a run's result


@dataclass(frozen=True)
class Group:
    seqs: tuple[int, ...]  # sorted: the first survives
    why: str


@dataclass
class FuseReport:
    cubes: int = 0  # cubes whose policy fuses
    groups: int = 0  # groups fused
    notes: int = 0  # notes fused into a survivor (soft-deleted)
    skipped: int = 0  # groups left for the next run (a member changed, or is not enriched)
    fused: list[dict[str, Any]] = field(default_factory=list)  # the first LISTED
    took_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Sets:
    """Union-find over seqs."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        found: dict[int, list[int]] = {}
        for x in self.parent:
            found.setdefault(self.find(x), []).append(x)
        return sorted(sorted(g) for g in found.values() if len(g) > 1)


class Fuser:
    def __init__(
        self,
        db: Database,
        policies: PolicyService,
        indexes: IndexRegistry,
        embed: Embed,
        config: LifecycleConfig,
        enrichment_enabled: bool,
        pause: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.db = db
        self.pause = pause  # before each group: step aside while searches run
        self.policies = policies
        self.indexes = indexes
        self.embed = embed
        self.config = config
        # With enrichment off, "pending" is final: such notes may fuse too.
        self.unsettled = ("pending", "retrying") if enrichment_enabled else ("retrying",)
        self.totals: Counter[str] = Counter()  # since start, for /metrics: groups, notes

    def run(self, cube_id: str | None = None) -> FuseReport:
        started = time.perf_counter()
        report = FuseReport()
        left = self.config.max_items_per_run
        for cid, cube_policy in self.policies.in_force().items():
            if (cube_id is not None and cid != cube_id) or not cube_policy.fuse.enabled:
                continue
            report.cubes += 1
            for group in self.groups(cid, cube_policy.fuse.threshold):
                if left <= 0:
                    break
                fused = self._fuse(cid, group)
                if fused is None:
                    report.skipped += 1
                    continue
                left -= len(fused["fused"])
                report.groups += 1
                report.notes += len(fused["fused"])
                if len(report.fused) < LISTED:
                    report.fused.append(fused)
        report.took_ms = round((time.perf_counter() - started) * 1000, 3)
        self.totals.update(groups=report.groups, notes=report.notes)
        return report

    # -- finding groups ---------------------------------------------------------------------

    def groups(self, cube_id: str, threshold: float) -> list[Group]:
        """The cube's groups of near-duplicates, in seq order of their survivors."""
        with self.db.read() as s:
            notes = s.execute(
                select(Memory.seq, Memory.speaker, Memory.embedding)
                .where(Memory.cube_id == cube_id, Memory.deleted_at.is_(None))
                .order_by(Memory.seq)
                .limit(self.config.fuse_max_notes)
            ).all()
            live = {seq for seq, _, _ in notes}
            links = s.execute(
                select(Link.src_seq, Link.dst_seq).where(
                    Link.cube_id == cube_id,
                    Link.kind == "duplicate",
                    Link.src_seq.in_(live),
                    Link.dst_seq.in_(live),
                )
            ).all()
        sets = _Sets()
        linked: set[int] = set()
        for src, dst in links:
            sets.join(src, dst)
            linked |= {src, dst}
        similar: set[int] = set()
        by_speaker: dict[str, list[tuple[int, bytes]]] = {}
        for seq, speaker, vector in notes:
            if speaker:
                by_speaker.setdefault(speaker, []).append((seq, vector))
        for members in by_speaker.values():
            for a, b in _close_pairs(members, threshold):
                sets.join(a, b)
                similar |= {a, b}
        groups = []
        for seqs in sets.groups():
            kinds = []
            if linked & set(seqs):
                kinds.append("duplicate links")
            if similar & set(seqs):
                kinds.append(f"same speaker, cosine >= {threshold:g}")
            groups.append(Group(tuple(seqs), " and ".join(kinds)))
        return groups

    # -- fusing one group -------------------------------------------------------------------

    def _fuse(self, cube_id: str, group: Group) -> dict[str, Any] | None:
        """Fuse one group in one transaction; None when it must wait (see the module doc)."""
        with self.db.read() as s:
            rows = list(
                s.scalars(select(Memory).where(Memory.seq.in_(group.seqs)).order_by(Memory.seq))
            )
            if len(rows) < 2 or any(
                r.deleted_at is not None or r.enrichment in self.unsettled for r in rows
            ):
                return None
            survivor = rows[0]
            keywords = _union([r.keywords or [] for r in rows])
            tags = _union([r.tags or [] for r in rows])
            context = " ".join(_union([[r.context] for r in rows if r.context]))
            text = enriched_text(s, survivor, keywords, tags, context)
            versions = {r.seq: r.version for r in rows}
        vector = self.embed([text])[0].astype(np.float32)  # pauses for searches itself
        self.pause()
        others = [r.id for r in rows[1:]]
        with self.indexes.writing(cube_id) as index:
            with self.db.write() as s:
                lock_cube(s, cube_id)  # before its memories (memos/db/locking.py)
                fresh = list(
                    s.scalars(
                        select(Memory)
                        .where(Memory.cube_id == cube_id, Memory.seq.in_(group.seqs))
                        .order_by(Memory.seq)
                        .with_for_update()
                    )
                )
                if [(r.seq, r.version, r.deleted_at) for r in fresh] != [
                    (seq, version, None) for seq, version in versions.items()
                ]:
                    return None  # changed since it was planned: the next run sees it anew
                keep, gone = fresh[0], fresh[1:]
                generation = bump_generation(s, cube_id, live_delta=-len(gone))
                now = utcnow()
                self._repoint(s, cube_id, keep.seq, [r.seq for r in gone])
                keep.keywords, keep.tags, keep.context = keywords, tags, context
                keep.embedding = vector.tobytes()
                keep.recalls = sum(r.recalls for r in fresh)
                keep.version += 1
                keep.change_seq = generation
                keep.updated_at = now
                s.add(history_row(keep, f"fused from {others}"))
                for row in gone:
                    row.version += 1
                    row.change_seq = generation
                    row.updated_at = row.deleted_at = now
                    s.add(history_row(row, f"fused into {keep.id}"))
                s.flush()
                doc = to_doc(keep)
            index.apply([doc], [r.seq for r in gone], generation)
        return {"survivor": keep.id, "fused": others, "why": group.why}

    @staticmethod
    def _repoint(s: Any, cube_id: str, keep: int, gone: list[int]) -> None:
        """Every link to or from `gone` now to or from `keep`; none between group members."""
        members = {keep, *gone}
        touching = s.execute(
            select(Link.src_seq, Link.dst_seq, Link.kind, Link.score).where(
                Link.cube_id == cube_id, or_(Link.src_seq.in_(gone), Link.dst_seq.in_(gone))
            )
        ).all()
        s.execute(
            delete(Link).where(
                Link.cube_id == cube_id, or_(Link.src_seq.in_(gone), Link.dst_seq.in_(gone))
            )
        )
        wanted: dict[tuple[int, int, str], float] = {}
        for src, dst, kind, score in touching:
            src, dst = (keep if src in members else src), (keep if dst in members else dst)
            if src != dst:
                wanted[(src, dst, kind)] = max(score, wanted.get((src, dst, kind), score))
        if not wanted:
            return
        existing = {
            (src, dst, kind): (link_id, score)
            for link_id, src, dst, kind, score in s.execute(
                select(Link.id, Link.src_seq, Link.dst_seq, Link.kind, Link.score).where(
                    Link.cube_id == cube_id, or_(Link.src_seq == keep, Link.dst_seq == keep)
                )
            )
        }
        for (src, dst, kind), score in sorted(wanted.items()):
            found = existing.get((src, dst, kind))
            if found is None:
                s.add(Link(cube_id=cube_id, src_seq=src, dst_seq=dst, kind=kind, score=score))
            elif score > found[1]:
                s.get(Link, found[0]).score = score


def _union(lists: Sequence[Sequence[str]]) -> list[str]:
    """Items of every list once, in order of first appearance."""
    seen: dict[str, None] = {}
    for items in lists:
        for item in items:
            seen.setdefault(item, None)
    return list(seen)


def _close_pairs(members: list[tuple[int, bytes]], threshold: float) -> list[tuple[int, int]]:
    """Pairs (a < b) of these notes whose unit vectors' cosine is >= threshold; the matrix is
    computed CHUNK rows at a time, so memory stays CHUNK x len(members) floats."""
    if len(members) < 2:
        return []
    seqs = np.array([seq for seq, _ in members])
    vectors = np.stack([np.frombuffer(v, dtype=np.float32) for _, v in members])
    pairs = []
    for start in range(0, len(members), CHUNK):
        block = vectors[start : start + CHUNK] @ vectors.T  # (chunk, n)
        rows, cols = np.nonzero(block >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if start + r < c:
                pairs.append((int(seqs[start + r]), int(seqs[c])))
    return pairs
