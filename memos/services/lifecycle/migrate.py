"""The `migrate` job: memories move between plaintext, activations and RAM as they are used.

One run, in this order, each step its own short transaction (a search never waits long, and a
`kill -9` anywhere leaves a state the next run continues from):

1. demote: an activation nobody used for the cube's `demote_after_days` (since its last use,
   its creation, or its last demotion, whichever is latest) goes down one step per run:
   re-quantized from its stored cache 16 -> 8 -> 4 -> 2 bits (KIVI, `kv_runtime.compress`),
   the blob replaced atomically (`kv_runtime.store`) and the row's bits and bytes updated;
   a 2-bit one is dropped (the notes it was built from remain the source of truth). Before a
   step the cost model (`costs.CostModel`, CacheGen's test) is asked whether the cache is
   still worth keeping as KV: one whose load costs more than prefilling its text again is
   dropped instead of re-quantized. Chat prefixes (saved by the chat routes, losslessly, and
   replaced at every save) are left alone.
2. promote: a session whose notes were recalled at least the cube's `hot_recalls` times in
   all (the `recalls` column the usage flush writes), counting only notes recalled within the
   last `demote_after_days` (a session nobody recalls any more is not promoted again after its
   activation was demoted and dropped), gets an activation, built in the background at
   `promote_bits`: episodic (EpiCache) when its context is longer than
   `promote_episodic_tokens`, else plain. It is listed with the cube's activations (its
   source names the session and `"promoted_by": "migrate"`) for generate to continue from. A
   session that has a current activation (building or ready, built after its latest note
   changed) is skipped, so a rerun promotes nothing twice.
3. unload: loaded and dequantized caches in RAM unused for `unload_idle_s` are dropped from
   memory (their files stay; the next request loads them again).

Crash safety: a re-quantized blob is written before the row is updated; a kill in between
leaves a row whose bits differ from its manifest's, which the next run reconciles from the
manifest (the files are the truth for what is stored). A promotion's build that a kill cuts is
failed at restart (`ActivationService.start`) and promoted again by the next run.

A generation that reads an activation's manifest just before a demotion replaces its blob
finds the old blob gone; it reads the files once more before it calls them corrupt
(`generations.Generations._load`).

The result lists, item by item (bounded), what moved and why.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, update

import kv_runtime
from kv_runtime import CompressedKV, Runtime
from kv_runtime.compress import compress as quantize
from memcube.errors import DomainError, TooManyRequests
from memos.db.engine import Database
from memos.db.models import Activation, Memory
from memos.db.types import utcnow
from memos.services.activations import ActivationService, ActivationSource
from memos.services.activations.episodes import EpisodicSettings
from memos.services.blobs import BlobUnavailable
from memos.services.lifecycle.costs import CostModel, Verdict
from memos.services.lifecycle.policy import PolicyService
from memos.settings import LifecycleConfig, LifecyclePolicy

LISTED = 100  # items named one by one in a run's result; the rest are counted
STEPS = {16: 8, 8: 4, 4: 2}  # bits -> the next step down; 2 bits: dropped next
PROMOTED_BY = "migrate"

# The seam for per-note KV chunks (issue 12): called with (cube id, ids of hot notes that
# belong to no session), returns one result item per note it promoted (the daemon passes
# `ActivationService.promote_note_chunks`; without one such notes are only counted).
PromoteNotes = Callable[[str, Sequence[str]], list[dict[str, Any]]]


@dataclass
class MigrateReport:
    moved: list[dict[str, Any]] = field(default_factory=list)  # the first LISTED
    counts: dict[str, int] = field(default_factory=dict)  # action -> items
    bytes_before: int = 0  # activations in scope, on disk, before the run
    bytes_after: int = 0
    unloaded_bytes: int = 0  # RAM given back
    hot_notes_without_session: int = 0  # for per-note chunks (see `PromoteNotes`)
    costs: dict[str, float | None] = field(default_factory=dict)  # the rates decided with
    took_ms: float = 0.0

    def add(self, action: str, **item: Any) -> None:
        self.counts[action] = self.counts.get(action, 0) + 1
        if len(self.moved) < LISTED:
            self.moved.append({"action": action, **item})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Stored:
    """An activation row as demotion sees it."""

    id: str
    cube_id: str
    bits: int
    bytes: int
    tokens: int
    idle_since: datetime
    episodic: bool


class Migrator:
    def __init__(
        self,
        db: Database,
        policies: PolicyService,
        activations: ActivationService,
        config: LifecycleConfig,
        costs: CostModel | None = None,
        pause: Callable[[], float] = lambda: 0.0,
        promote_notes: PromoteNotes | None = None,
    ) -> None:
        self.db = db
        self.policies = policies
        self.activations = activations
        self.config = config
        self.costs = costs or CostModel(self._prefill_rate)
        self.pause = pause  # before each transaction: step aside while searches run
        self.promote_notes = promote_notes
        self.totals: Counter[str] = Counter()  # since start, for /metrics

    def _prefill_rate(self) -> float | None:
        """Seconds per prefill token, as the runtime measures it (None before it loads)."""
        holder = self.activations.runtime
        if not holder.loaded:
            return None
        rate = holder.get().throughput.seconds(1000, 0) / 1000
        return rate or None

    def run(self, cube_id: str | None = None, now: datetime | None = None) -> MigrateReport:
        """One run over every cube (or one cube: then RAM is left alone)."""
        started = time.perf_counter()
        now = now or utcnow()
        report = MigrateReport()
        policies = self.policies.in_force()
        if cube_id is not None:
            policies = {cube_id: policies[cube_id]} if cube_id in policies else {}
        stored = self._stored(list(policies))
        report.bytes_before = sum(a.bytes for a in stored)
        for activation in stored:
            self._demote(activation, policies[activation.cube_id], now, report)
        left = self.config.promote_max_per_run
        for cid, cube_policy in policies.items():
            left -= self._promote(cid, cube_policy, now, left, report)
        if cube_id is None:
            self._unload(report)
        report.bytes_after = sum(a.bytes for a in self._stored(list(policies)))
        report.costs = self.costs.rates()
        report.took_ms = round((time.perf_counter() - started) * 1000, 3)
        self.totals.update(report.counts)
        return report

    # -- demotion ---------------------------------------------------------------------------

    def _stored(self, cube_ids: list[str]) -> list[Stored]:
        """Ready activations of these cubes, chat prefixes aside."""
        with self.db.read() as s:
            rows = s.execute(
                select(
                    Activation.id, Activation.cube_id, Activation.bits, Activation.bytes,
                    Activation.tokens, Activation.created_at, Activation.last_used_at,
                    Activation.source, Activation.compression,
                )
                .where(Activation.state == "ready", Activation.cube_id.in_(cube_ids))
                .order_by(Activation.created_at, Activation.id)
            ).all()  # fmt: skip
        stored = []
        for aid, cid, bits, size, tokens, created, used, source, compression in rows:
            if "chat_id" in (source or {}):
                continue
            compression = compression or {}
            steps = compression.get("demoted") or []
            moments = [used or created] + [datetime.fromisoformat(s["at"]) for s in steps]
            idle_since = max(moments)
            episodic = "episodic" in compression
            stored.append(Stored(aid, cid, int(bits), int(size), int(tokens), idle_since, episodic))
        return stored

    def _demote(
        self, activation: Stored, cube_policy: LifecyclePolicy, now: datetime,
        report: MigrateReport,
    ) -> None:  # fmt: skip
        idle = now - activation.idle_since
        if idle < timedelta(days=cube_policy.demote_after_days):
            return
        self.pause()
        item = {"activation_id": activation.id, "cube_id": activation.cube_id}
        try:
            runtime = self.activations.runtime.get()
        except DomainError as exc:  # the runtime is disabled or cannot load: nothing to read
            report.add("skipped", **item, why=f"not demoted: {exc.message}")
            return
        catalogue = self.activations.catalogue
        try:  # fetched from the shared tier when another daemon built it
            path = catalogue.fetch(activation.cube_id, activation.id)
        except BlobUnavailable as exc:
            report.add("skipped", **item, why=f"not demoted: {exc.message}")
            return
        except kv_runtime.ActivationCorrupt as exc:  # generate marks it corrupt on its next use
            report.add("skipped", **item, why=f"its files cannot be read: {exc}")
            return
        cold = f"unused for {idle.total_seconds() / 86400:.1f} days (demote_after_days=" \
            f"{cube_policy.demote_after_days:g})"  # fmt: skip
        try:
            started = time.perf_counter()
            caches, manifest = _open(runtime, path, activation.episodic)
            full = [runtime.decompress(c) for c in caches]
            self.costs.observe_load(manifest.bytes, time.perf_counter() - started)
        except (kv_runtime.ActivationCorrupt, kv_runtime.ActivationMismatch) as exc:
            report.add("skipped", **item, why=f"its files cannot be read: {exc}")
            return  # generate marks it corrupt on its next use; evict drops corrupt ones first
        stored_bits = manifest.compression.bits
        if stored_bits != activation.bits or manifest.bytes != activation.bytes:
            # A kill after the blob was replaced and before the row was: the files are the truth
            # (and the step they hold is recorded, so the next one waits its turn).
            stepped = stored_bits != activation.bits
            if self._set_row(activation, stored_bits, manifest, now, activation.bits, stepped):
                report.add(
                    "reconciled", **item, bits=stored_bits, bytes=manifest.bytes,
                    why=f"the row said {activation.bits} bits, {activation.bytes} bytes; "
                    "its files hold this (a run was cut after writing them)",
                )  # fmt: skip
            return
        verdict = self.costs.verdict(manifest.bytes, activation.tokens)
        costs = verdict.as_dict()
        if not verdict.keep or activation.bits not in STEPS:
            why = f"{cold}; " + (verdict.why if not verdict.keep else "at 2 bits, the last step")
            if self.activations.discard(activation.cube_id, activation.id):
                report.add("dropped", **item, bits=activation.bits, bytes=activation.bytes,
                           why=why, **costs)  # fmt: skip
            return
        to_bits = STEPS[activation.bits]
        settings = manifest.compression.model_copy(update={"bits": to_bits})
        requantized = [quantize(kv, settings) for kv in full]  # nothing evicted again
        written = _save(runtime, path, requantized, manifest)
        catalogue.blobs.publish(activation.cube_id, activation.id)  # the fleet's copy too
        if not self._set_row(activation, to_bits, written, now, activation.bits, record=True):
            if not self.activations.catalogue.exists(activation.id):  # deleted meanwhile
                self.activations.catalogue.remove_files(activation.cube_id, activation.id)
            report.add("skipped", **item, why="changed or deleted while it was re-quantized")
            return
        self.activations.loaded.pop((activation.cube_id, activation.id))
        self.activations.dequantized.pop((activation.cube_id, activation.id))
        report.add(
            "demoted", **item, from_bits=activation.bits, to_bits=to_bits,
            bytes_before=activation.bytes, bytes_after=written.bytes,
            why=f"{cold}; {verdict.why}", **costs,
        )  # fmt: skip

    def _set_row(
        self, activation: Stored, bits: int, manifest: kv_runtime.ActivationManifest,
        now: datetime, expected_bits: int, record: bool,
    ) -> bool:  # fmt: skip
        """Bits and bytes of a ready row whose bits are still `expected_bits`; with `record`
        the step is added to its compression's `demoted` list (when it happened)."""
        with self.db.write() as s:
            row = s.get(Activation, activation.id)
            if row is None or row.state != "ready" or row.bits != expected_bits:
                return False
            compression = {**(row.compression or {}), "bits": bits}
            if record:
                step = {"from": expected_bits, "to": bits, "at": now.isoformat()}
                compression["demoted"] = [*compression.get("demoted", []), step]
            episodic = compression.get("episodic")
            if episodic is not None and manifest.episodes is not None:
                sizes = {e.index: e.kv_bytes for e in manifest.episodes}
                built = [{**e, "bytes": sizes.get(e["index"], e["bytes"])}
                         for e in episodic.get("built", [])]  # fmt: skip
                compression["episodic"] = {**episodic, "built": built}
            s.execute(
                update(Activation)
                .where(Activation.id == activation.id, Activation.bits == expected_bits)
                .values(bits=bits, bytes=manifest.bytes, compression=compression)
            )
        return True

    # -- promotion --------------------------------------------------------------------------

    def _promote(
        self, cube_id: str, cube_policy: LifecyclePolicy, now: datetime, left: int,
        report: MigrateReport,
    ) -> int:  # fmt: skip
        """Hot sessions of one cube get an activation; how many builds were queued."""
        hot = cube_policy.hot_recalls
        recent = now - timedelta(days=cube_policy.demote_after_days)
        live = (Memory.cube_id == cube_id, Memory.deleted_at.is_(None))
        # Recalls of the notes recalled lately; the session changed when any live note did.
        recalls = func.sum(case((Memory.last_recalled_at >= recent, Memory.recalls), else_=0))
        with self.db.read() as s:
            sessions = s.execute(
                select(Memory.session_id, recalls, func.max(Memory.updated_at))
                .where(*live, Memory.session_id.is_not(None))
                .group_by(Memory.session_id)
                .having(recalls >= hot)
                .order_by(recalls.desc(), Memory.session_id)
            ).all()
            loose = list(
                s.scalars(
                    select(Memory.id)
                    .where(
                        *live,
                        Memory.session_id.is_(None),
                        Memory.recalls >= hot,
                        Memory.last_recalled_at >= recent,
                    )
                    .order_by(Memory.recalls.desc(), Memory.seq)
                    .limit(LISTED)
                )
            )
            built = s.execute(
                select(
                    Activation.id, Activation.source, Activation.state, Activation.created_at
                ).where(Activation.cube_id == cube_id)
            ).all()
        self._hot_notes(cube_id, loose, report)
        done = 0
        for session_id, count, changed in sessions:
            item = {"cube_id": cube_id, "session_id": session_id, "recalls": int(count)}
            current = _current(built, session_id, changed)
            if current is not None:
                continue  # nothing to do: not listed (a rerun's result stays quiet)
            if done >= left:
                report.add("deferred", **item, why="promote_max_per_run reached this run")
                continue
            verdict = self._promotion_verdict()
            if not verdict.keep:
                report.add("skipped", **item, why=f"not promoted: {verdict.why}")
                continue
            self.pause()
            try:
                view = self.activations.build_for_system(
                    cube_id,
                    ActivationSource(session_id=session_id),
                    self.config.promote_bits,
                    EpisodicSettings(
                        self.config.promote_episodes, self.config.promote_episode_budget_tokens
                    ),
                    self.config.promote_episodic_tokens,
                    {"promoted_by": PROMOTED_BY, "recalls": int(count)},
                )
            except TooManyRequests as exc:  # the build queue is full: the next run tries again
                report.add("deferred", **item, why=f"not promoted yet: {exc.message}")
                continue
            except DomainError as exc:
                report.add("skipped", **item, why=f"not promoted: {exc.message}")
                continue
            done += 1
            kind = "episodic" if view.episodes is not None else "plain"
            report.add(
                "promoted", **item, activation_id=view.id, tokens=view.tokens, kind=kind,
                bits=view.bits,
                why=f"its notes were recalled {int(count)} times (hot_recalls={hot}; those "
                f"recalled in the last {cube_policy.demote_after_days:g} days); "
                f"{view.tokens} tokens: {kind}",
            )  # fmt: skip
        return done

    def _promotion_verdict(self) -> Verdict:
        """Whether a cache at `promote_bits` would load faster than its text prefills, per
        token (both sides scale with the context's length)."""
        runtime = self.activations.runtime
        if not runtime.loaded:
            return self.costs.verdict(0, 0)  # no evidence yet: promote
        fp = runtime.get().fingerprint
        per_token = 2 * fp.layers * fp.kv_heads * fp.head_dim * self.config.promote_bits // 8
        return self.costs.verdict(per_token * 1000, 1000)  # 1000 tokens' worth, stored

    def _hot_notes(self, cube_id: str, note_ids: list[str], report: MigrateReport) -> None:
        """Hot notes outside any session: each gets its KV chunk (issue 12) through
        `promote_notes` (the daemon wires `ActivationService.promote_note_chunks`)."""
        if not note_ids:
            return
        report.hot_notes_without_session += len(note_ids)
        if self.promote_notes is None:
            return
        for item in self.promote_notes(cube_id, note_ids):
            report.add("promoted_note", cube_id=cube_id, **item)

    # -- RAM --------------------------------------------------------------------------------

    def unload_idle(self) -> MigrateReport:
        """Only the RAM step: this daemon's caches idle for `unload_idle_s` dropped (the
        `unload_idle` job, which every daemon of a fleet runs; `run` does it on the leader)."""
        started = time.perf_counter()
        report = MigrateReport()
        self._unload(report)
        report.took_ms = round((time.perf_counter() - started) * 1000, 3)
        self.totals.update(report.counts)
        return report

    def _unload(self, report: MigrateReport) -> None:
        idle = self.config.unload_idle_s
        if not idle:
            return
        why = f"unused in RAM for {idle:g} s (lifecycle.unload_idle_s); its files stay"
        for tier, cache in (("loaded", self.activations.loaded),
                            ("dequantized", self.activations.dequantized)):  # fmt: skip
            for (cube_id, key), size in cache.unload_idle(idle):
                report.unloaded_bytes += size
                report.add("unloaded", cube_id=cube_id, activation_id=key, tier=tier,
                           bytes=size, why=why)  # fmt: skip


def _current(built: Sequence[Any], session_id: str | None, changed: datetime) -> str | None:
    """The id of an activation of exactly this session, building or ready, built after its
    notes last changed; None when there is none."""
    for activation_id, source, state, created_at in built:
        source = source or {}
        if source.get("session_id") != session_id or "chat_id" in source:
            continue
        if state in ("building", "ready") and created_at >= changed:
            return str(activation_id)
    return None


def _open(
    runtime: Runtime, path: Any, episodic: bool
) -> tuple[tuple[CompressedKV, ...], kv_runtime.ActivationManifest]:
    if episodic:
        return kv_runtime.open_episodes(path, runtime.fingerprint)
    compressed, manifest = runtime.open_activation(path)
    return (compressed,), manifest


def _save(
    runtime: Runtime, path: Any, caches: list[CompressedKV],
    manifest: kv_runtime.ActivationManifest,
) -> kv_runtime.ActivationManifest:  # fmt: skip
    """Replace the blob atomically: the new one is written, then the manifest naming it."""
    if manifest.episodes is None:
        return runtime.save_activation(path, caches[0], manifest.messages)
    metas = [e.meta for e in manifest.episodes]
    return kv_runtime.save_episodes(
        path, caches, metas, runtime.fingerprint, manifest.messages, manifest.token_ids
    )
