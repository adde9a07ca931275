"""`ActivationService`: the one object routes and the daemon use; each job is a module beside it.

catalogue    rows, states, listing, deletion, file locations
prompts      text / memories / sessions -> a context's tokens; a question after a history
builds       bounded build queue, progress, cancellation
episodes     episodic activations (EpiCache): one budgeted cache per episode, routing
sweep        files without rows removed, rows without files failed
loaded       loaded activations in memory, bounded by bytes
backlog      the model work admitted and not done, and its estimate in seconds
admission    generations: refused when the work ahead is too long, bounded by number and bytes
generations  checked up front, admitted, cancellable generation
notes        one KV chunk per note, for blending (CacheBlend)
blending     a prompt's notes assembled from their chunks
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kv_runtime import CompressionConfig, KVCache, Runtime, Speed
from memcube.embedder import Embedder
from memcube.errors import InvalidArgument, NotFound, TooManyRequests, Unavailable
from memos.db.engine import Database
from memos.db.models import Activation, Cube
from memos.db.types import utcnow
from memos.services.activations.admission import AdmissionLimits, AdmissionStats, GenerationGate
from memos.services.activations.backlog import Backlog
from memos.services.activations.builds import Builder, BuildJob, BuildQueue, BuildStats
from memos.services.activations.catalogue import CUBE_DELETED, DELETED, Catalogue
from memos.services.activations.episodes import (
    EPISODE_SCORER,
    MIN_BUDGET_TOKENS,
    EpisodicPlan,
    EpisodicSettings,
    plan,
)
from memos.services.activations.generations import Generations, GenerationStream
from memos.services.activations.loaded import ByteBoundedLRU, LoadedActivation
from memos.services.activations.notes import NoteChunks
from memos.services.activations.prompts import (
    ActivationSource,
    Context,
    PromptLimits,
    Prompts,
    render_memories,
)
from memos.services.activations.sweep import ActivationSweep, SweepReport
from memos.services.blobs import BlobStore
from memos.services.cubes import CubeService
from memos.services.ids import new_id, note_chunk_id
from memos.services.runtime import RuntimeHolder
from memos.services.views import ActivationView, GenerationView, Principal, Role
from memos.settings import ActivationsConfig

log = logging.getLogger("memos.activations")

# The seam for per-user quotas: called with (cube id, an upper bound of the bytes the build's
# tensors will take) before a build is accepted; raise a DomainError to refuse it.
QuotaCheck = Callable[[str, int], None]


# The scorer of budgeted activations unless the request names one. KVzip (query-agnostic: a
# stored cache's questions are unknown) kept the most answer likelihood of every single-cache
# scorer on LoCoMo at M = 1,024: 4.142 nats per token pooled over four conversations against
# SnapKV's 5.049 and full KV's 4.565 (docs/benchmarks.md, benchmarks/episodic.py).
DEFAULT_BUDGET_SCORER = "kvzip"


def compression_for(
    bits: int, budget_tokens: int | None, scorer: str | None = None
) -> CompressionConfig:
    """The request's compression block as runtime settings. The eviction windows shrink for
    budgets smaller than their defaults (4 sinks + a 32-token window are always kept); a
    budget too small for KVzip's block prefill (it must exceed sinks + window) uses SnapKV."""
    if budget_tokens is None:
        return CompressionConfig(bits=bits)
    defaults = CompressionConfig()
    window = min(defaults.window_tokens, max(1, budget_tokens // 2))
    sinks = min(defaults.sink_tokens, budget_tokens // 4)
    if scorer is None:
        scorer = DEFAULT_BUDGET_SCORER if budget_tokens > sinks + window else "snapkv"
    return CompressionConfig(
        bits=bits,
        budget_tokens=budget_tokens,
        window_tokens=window,
        sink_tokens=sinks,
        scorer=scorer,
    )


def stored_bytes_bound(
    runtime: Runtime, tokens: int, settings: CompressionConfig, episodic: EpisodicSettings | None
) -> int:
    """At most the bytes a build's tensors take: its kept tokens in float16 (each episode's)."""
    budget = episodic.budget_tokens if episodic is not None else settings.budget_tokens
    kept = min(tokens, budget or tokens) * (episodic.episodes if episodic is not None else 1)
    fp = runtime.fingerprint
    return 2 * fp.layers * fp.kv_heads * fp.head_dim * kept * 2


@dataclass(frozen=True)
class ActivationStats:
    """For /metrics."""

    builds: BuildStats
    builds_deferred: int  # small enough to build inline, built in the background (busy model)
    generations: AdmissionStats
    generations_finished: dict[str, int]
    generations_cancelling: int
    loaded_bytes: int
    loaded_entries: int
    dequantized_bytes: int
    backlog_s: float | None  # estimated model seconds ahead of a new generation
    speed: Speed | None  # the model's measured speed (None before it is loaded)


class ActivationService:
    def __init__(
        self,
        db: Database,
        cubes: CubeService,
        runtime: RuntimeHolder,
        directory: Path,
        config: ActivationsConfig,
        check_quota: QuotaCheck | None = None,
        embedder: Embedder | None = None,
        blobs: BlobStore | None = None,
        instance_id: str | None = None,
    ) -> None:
        """`instance_id`: this daemon's in a fleet, recorded on the builds it starts."""
        self.cubes, self.runtime, self.config = cubes, runtime, config
        self.check_quota = check_quota
        self.embedder = embedder  # episodic activations cluster and route with it
        self.catalogue = Catalogue(db, directory, blobs, instance_id)
        self.prompts = Prompts(
            db,
            PromptLimits(
                config.max_text_bytes, config.max_source_memories, config.max_prompt_bytes
            ),
        )
        self.backlog = Backlog(runtime.config.prefill_chunk)
        self.builds = BuildQueue(
            Builder(self.catalogue, runtime, self.backlog, embedder),
            workers=config.build_workers,
            max_builds=config.max_queued_builds,
            max_per_user=config.max_queued_builds_per_user,
        )
        self.sweeper = ActivationSweep(db, self.catalogue, self.builds)
        self.loaded: ByteBoundedLRU[LoadedActivation] = ByteBoundedLRU(config.loaded_cache_bytes)
        self.dequantized: ByteBoundedLRU[KVCache] = ByteBoundedLRU(config.dequantized_cache_bytes)
        self.gate = GenerationGate(
            AdmissionLimits(
                max_active=config.max_generations,
                max_waiting=config.max_waiting_generations,
                wait_s=config.generation_wait_s,
                max_kv_bytes=config.generation_kv_bytes,
            ),
            self.backlog,
        )
        self.notes = NoteChunks(self.catalogue, runtime, self.prompts, self.dequantized, config)
        self._deferred = 0
        self._deferred_lock = threading.Lock()
        self.generations = Generations(
            self.catalogue, runtime, self.prompts, self.loaded, self.dequantized, self.gate,
            config.max_generate_tokens, embedder, self.notes,
        )  # fmt: skip

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> tuple[int, SweepReport]:
        """Fail builds a restart interrupted, then sweep; (builds failed, sweep report)."""
        return self._fail_unfinished(), self.sweeper.run()

    def stop(self) -> None:
        """Cancel every build; the rows of those that never ran are failed as interrupted."""
        self.builds.stop()
        self._fail_unfinished()

    def _fail_unfinished(self) -> int:
        return self._remove_partial(self.catalogue.recover())

    def fail_orphans(self) -> int:
        """Fail the builds of other daemons whose lease expired (nobody will finish them);
        run periodically by the scheduler's leader. Returns how many."""
        cut = self.catalogue.fail_orphans()
        if cut:
            log.warning("builds of stopped daemons failed", extra={"fields": {
                "activations": [activation_id for _, activation_id in cut]
            }})  # fmt: skip
        return self._remove_partial(cut)

    def _remove_partial(self, cut: list[tuple[str, str]]) -> int:
        for cube_id, activation_id in cut:
            self.catalogue.remove_files(cube_id, activation_id)
        return len(cut)

    def sweep(self) -> SweepReport:
        report = self.sweeper.run()
        self.catalogue.republish()  # what a Redis restarted empty lost, from this disk
        return report

    # -- builds -----------------------------------------------------------------------------

    def create(
        self,
        principal: Principal,
        cube_id: str,
        source: ActivationSource,
        bits: int,
        budget_tokens: int | None,
        episodic: EpisodicSettings | None = None,
        note: Mapping[str, Any] | None = None,
        scorer: str | None = None,
    ) -> ActivationView:
        """Accept a build: checked, admitted, its row inserted; built inline when small, else
        queued. With `episodic`, one budgeted cache per episode of the source's conversation
        (see `activations.episodes`), always built in the background. `note`: recorded in
        its source beside what it was built from (a chat's old part names its chat). `scorer`:
        how `budget_tokens` chooses the kept tokens (default `DEFAULT_BUDGET_SCORER`)."""
        cube = self.cubes.require(principal, cube_id, Role.WRITER)
        settings = compression_for(bits, budget_tokens, scorer)
        runtime = self.runtime.get()
        episodic_plan = None
        if episodic is not None:
            self._check_episodic(runtime, source, budget_tokens, episodic)
            rows, described = self.prompts.source_rows(cube_id, source)
            text = render_memories(rows)
            self.prompts.check_text(text)
            episodic_plan = plan(rows, episodic)
            described = {**described, "episodic": episodic.as_dict()}
        else:
            text, described = self.prompts.source_text(cube_id, source)
        if note:
            described = {**described, **note}
        # An episodic build takes conversations past the model's positions (kv_runtime.episodic
        # re-positions what it keeps); its bound is on the tokens prefilled, E times over.
        limit = self.config.max_episodic_tokens if episodic is not None else None
        context = self.prompts.context(runtime, text, described, limit)
        return self._submit(
            runtime, cube_id, cube.owner_id, context, settings, bits, episodic, episodic_plan
        )

    def build_for_system(
        self,
        cube_id: str,
        source: ActivationSource,
        bits: int,
        episodic: EpisodicSettings,
        episodic_over_tokens: int,
        described: dict[str, Any],
    ) -> ActivationView:
        """`create` on the system path (no principal: the `migrate` job promoting a hot
        session), always built in the background. A context longer than
        `episodic_over_tokens` (or than the model's positions) becomes an episodic activation
        with `episodic`, a shorter one a plain one. `described` is added to the row's source
        (who asked for it and why). Refused as `create` refuses (DomainError)."""
        with self.catalogue.db.read() as s:
            cube = s.get(Cube, cube_id)
            if cube is None:
                raise NotFound(f"cube {cube_id!r} not found", code="cube_not_found")
            owner_id = cube.owner_id
        runtime = self.runtime.get()
        text, what = self.prompts.source_text(cube_id, source)
        context = self.prompts.context(
            runtime, text, {**what, **described}, self.config.max_episodic_tokens
        )
        tokens = len(context.token_ids)
        if tokens <= episodic_over_tokens and tokens < runtime.info.max_positions:
            return self._submit(
                runtime, cube_id, owner_id, context, compression_for(bits, None), bits,
                background=True,
            )  # fmt: skip
        self._check_episodic(runtime, source, None, episodic)
        rows, _ = self.prompts.source_rows(cube_id, source)
        context = replace(context, described={**context.described, "episodic": episodic.as_dict()})
        return self._submit(
            runtime, cube_id, owner_id, context, compression_for(bits, None), bits, episodic,
            plan(rows, episodic),
        )  # fmt: skip

    def _submit(
        self,
        runtime: Runtime,
        cube_id: str,
        owner_id: str,
        context: Context,
        settings: CompressionConfig,
        bits: int,
        episodic: EpisodicSettings | None = None,
        episodic_plan: EpisodicPlan | None = None,
        background: bool = False,
    ) -> ActivationView:
        """Quota, admission, the row, then the build: inline when small (and not
        `background`), else queued."""
        if self.check_quota is not None:
            bound = stored_bytes_bound(runtime, len(context.token_ids), settings, episodic)
            self.check_quota(cube_id, bound)
        job = BuildJob(
            activation_id=new_id("act"),
            cube_id=cube_id,
            owner_id=owner_id,
            token_ids=context.token_ids,
            messages=context.messages,
            settings=settings,
            episodic=episodic_plan,
        )
        ticket = self.builds.admit(job)
        if ticket is None:
            raise TooManyRequests(
                f"too many activation builds are queued (at most "
                f"{self.config.max_queued_builds_per_user} per user and "
                f"{self.config.max_queued_builds} in all); try again later",
                code="too_many_builds",
                retry_after=self.config.build_retry_after_s,
            )
        try:
            self.catalogue.insert(self._row(runtime, job, context, bits))
        except BaseException:
            self.builds.abandon(ticket)
            raise
        inline = episodic is None and not background
        if inline and self._inline(runtime, len(job.token_ids)):
            self.builds.run_inline(ticket)
        else:
            self.builds.enqueue(ticket)
        return self.catalogue.view(cube_id, job.activation_id)

    def create_note_chunks(
        self,
        principal: Principal,
        cube_id: str,
        source: ActivationSource,
        bits: int | None,
        budget_tokens: int | None,
        episodic: bool = False,
    ) -> list[ActivationView]:
        """`per_memory`: one KV chunk per note of `source.memory_ids` (see `notes`), built
        inline; notes with a current chunk keep theirs. `bits` None: `note_chunk_bits`."""
        self.cubes.require(principal, cube_id, Role.WRITER)
        if source.memory_ids is None:
            raise InvalidArgument(
                "per_memory builds one chunk per note: give memory_ids, not text, session_id "
                "or session_ids"
            )
        if episodic:
            raise InvalidArgument("per_memory and episodic conflict: a note chunk is one cache")
        if budget_tokens is not None:
            raise InvalidArgument(
                "per_memory and compression.budget_tokens conflict: a note chunk keeps every "
                "token (blending re-rotates and recomputes them)"
            )
        rows = self.notes.notes(cube_id, source.memory_ids)
        chosen = self.config.note_chunk_bits if bits is None else bits
        return self.notes.build(cube_id, rows, chosen, self.check_quota)

    def promote_note_chunks(self, cube_id: str, memory_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The `migrate` job's hook for hot notes outside any session (system path): a chunk
        each, at `note_chunk_bits`, at most `max_note_chunks` a call; notes that already have
        a current chunk are left out of the answer."""
        rows = self.notes.notes(cube_id, list(memory_ids)[: self.config.max_note_chunks])
        built = []
        for row in rows:
            before = self.catalogue.exists(note_chunk_id(row.id, row.version))
            bits = self.config.note_chunk_bits
            (view,) = self.notes.build(cube_id, [row], bits, self.check_quota)
            if not before:
                built.append(
                    {"memory_id": row.id, "activation_id": view.id, "bytes": view.bytes,
                     "why": "recalled often outside any session: its KV chunk is blended "
                     "into the turns that recall it"}
                )  # fmt: skip
        return built

    def drop_note_chunks(self, cube_id: str, notes: list[tuple[str, int]]) -> int:
        """After notes were edited or deleted: their chunks (of these (id, version) pairs, the
        versions before the change) go, like any activation; how many there were."""
        return sum(self.discard(cube_id, note_chunk_id(m, v)) for m, v in notes)

    def _inline(self, runtime: Runtime, tokens: int) -> bool:
        """Whether a build of `tokens` runs inside its request: when it is short and the model
        work ahead of it plus its own is estimated within `inline_wait_s`; otherwise it builds
        in the background and the request answers at once ("building")."""
        if tokens > self.config.inline_max_tokens:
            return False
        estimate = runtime.throughput.seconds
        if self.gate.ahead_s(estimate) + estimate(tokens, 0) <= self.config.inline_wait_s:
            return True
        with self._deferred_lock:
            self._deferred += 1
        return False

    def _check_episodic(
        self,
        runtime: Runtime,
        source: ActivationSource,
        budget_tokens: int | None,
        episodic: EpisodicSettings,
    ) -> None:
        """Refuse, before any work, what an episodic build cannot do (422)."""
        if self.embedder is None:
            raise Unavailable("episodic activations need the daemon's embedder")
        if source.text is not None:
            raise InvalidArgument(
                "an episodic activation is built from a conversation: give session_id, "
                "session_ids or memory_ids, not text"
            )
        if budget_tokens is not None:
            raise InvalidArgument(
                "compression.budget_tokens and episodic.budget_tokens conflict: an episodic "
                "activation keeps episodic.budget_tokens tokens per episode"
            )
        most = self.config.max_episodes
        if not 1 <= episodic.episodes <= most:
            raise InvalidArgument(f"episodic.episodes is {episodic.episodes}; 1 to {most}")
        positions = runtime.info.max_positions
        if not MIN_BUDGET_TOKENS <= episodic.budget_tokens < positions:
            raise InvalidArgument(
                f"episodic.budget_tokens is {episodic.budget_tokens}; it must be between "
                f"{MIN_BUDGET_TOKENS} and {positions - 1} (the model's positions)"
            )
        block = episodic.block_tokens
        if block is not None and not 1 <= block <= positions - episodic.budget_tokens:
            raise InvalidArgument(
                f"episodic.block_tokens is {block}; budget_tokens + block_tokens must stay "
                f"within the model's {positions} positions"
            )

    @staticmethod
    def _row(runtime: Runtime, job: BuildJob, context: Context, bits: int) -> Activation:
        compression = job.settings.model_dump()
        if job.episodic is not None:  # its episodes are listed once built
            compression["episodic"] = {
                **job.episodic.settings.as_dict(),
                "scorer": EPISODE_SCORER,
                "built": [],
            }
        return Activation(
            id=job.activation_id,
            cube_id=job.cube_id,
            model=runtime.fingerprint.model,
            source=context.described,
            compression=compression,
            tokens=len(job.token_ids),
            bits=bits,
            state="building",
            progress=0.0,
            created_at=utcnow(),
        )

    # -- catalogue --------------------------------------------------------------------------

    def get(self, principal: Principal, cube_id: str, activation_id: str) -> ActivationView:
        self.cubes.require(principal, cube_id, Role.READER)
        return self.catalogue.view(cube_id, activation_id)

    def list_activations(self, principal: Principal, cube_id: str) -> list[ActivationView]:
        self.cubes.require(principal, cube_id, Role.READER)
        return self.catalogue.views(cube_id)

    def delete(self, principal: Principal, cube_id: str, activation_id: str) -> None:
        """The row, then its build (cancelled), its loaded copy and its files."""
        self.cubes.require(principal, cube_id, Role.WRITER)
        self.catalogue.delete(cube_id, activation_id)
        self._forget(cube_id, activation_id)

    def discard(self, cube_id: str, activation_id: str) -> bool:
        """`delete` on the system path (no principal), for eviction: False when the row was
        gone already. The row goes first, so a kill between the two leaves files without a
        row, which the sweep removes."""
        if not self.catalogue.exists(activation_id):
            return False
        self.catalogue.delete_if_exists(activation_id)
        self._forget(cube_id, activation_id)
        return True

    def _forget(self, cube_id: str, activation_id: str) -> None:
        self.builds.cancel(activation_id, DELETED)
        self.loaded.pop((cube_id, activation_id))
        self.dequantized.pop((cube_id, activation_id))
        self.catalogue.remove_files(cube_id, activation_id)

    def drop_cube(self, cube_id: str) -> None:
        """After a cube is deleted (its rows cascade): cancel its builds, remove its files."""
        self.builds.cancel_cube(cube_id, CUBE_DELETED)
        self.loaded.drop_cube(cube_id)
        self.dequantized.drop_cube(cube_id)
        self.catalogue.remove_cube_files(cube_id)

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        principal: Principal,
        cube_id: str,
        prompt: str,
        activation_id: str | None,
        max_tokens: int,
        memory_ids: Sequence[str] | None = None,
    ) -> GenerationView:
        """`stream`, decoded to the end."""
        return self.stream(
            principal, cube_id, prompt, activation_id, max_tokens, memory_ids=memory_ids
        ).collect()

    def stream(
        self,
        principal: Principal,
        cube_id: str,
        prompt: str,
        activation_id: str | None,
        max_tokens: int,
        cancel: threading.Event | None = None,
        memory_ids: Sequence[str] | None = None,
    ) -> GenerationStream:
        """Check the request, wait for admission, load the activation and start decoding:
        every refusal is raised here, before the first piece of text. Setting `cancel` stops
        it (while waiting too); iterate the stream, then call `finish()`, or `close()` it.
        `memory_ids`: notes the prompt carries, blended from their KV chunks where they have
        one (not with an activation)."""
        self.cubes.require(principal, cube_id, Role.READER)
        return self.generations.open(cube_id, prompt, activation_id, max_tokens, cancel, memory_ids)

    def stats(self) -> ActivationStats:
        runtime = self.runtime.get() if self.runtime.loaded else None
        return ActivationStats(
            builds=self.builds.stats(),
            builds_deferred=self._deferred,
            generations=self.gate.stats(),
            generations_finished=self.generations.finished(),
            generations_cancelling=self.generations.cancelling(),
            loaded_bytes=self.loaded.bytes,
            loaded_entries=len(self.loaded.order()),
            dequantized_bytes=self.dequantized.bytes,
            backlog_s=self.gate.ahead_s(runtime.throughput.seconds) if runtime else None,
            speed=runtime.throughput.speed() if runtime else None,
        )
