"""Generation on an activation: checked up front, admitted, cancellable, counted.

A generation is opened from a prompt after an activation's chat history (`open`, the generate
route) or from token ids as they are (`open_tokens`: a rendered chat, a completion prompt,
optionally continuing an activation's tokens); both go through the same checks and admission.
`open` refuses everything it can before any real work: `max_tokens`, the prompt's size, the
activation's state, the context length (activation + question + answer within the model's
positions) and the memory the full-precision cache will take, all from the catalogue row and the
manifest. Only then does it ask for admission (`admission.GenerationGate`: refused at once when
the model's work ahead would make it wait too long, else a bounded wait for a slot), load the
activation (`loaded`: byte-bounded), take its dequantized cache (`loaded` too: kept for the next
request) and start decoding, with a cancel switch the runtime checks
before every token, so a request whose client left ends within one forward pass. As it decodes,
its progress goes to its `Work` in the backlog, so later requests see the work it has left.

With `memory_ids` (and no activation) the prompt carries those notes, rendered as a chat turn's
notes block; notes with a KV chunk are blended in (`blending`) once admitted, the others and
the prompt computed in the same pass.

An episodic activation is continued from one of its episodes' caches: the one whose centroid is
nearest the prompt (`episodes.Router`), chosen once admitted; the answer names it (`episode`).
Its bounds are checked up front with the largest episode (the row's `kept_tokens`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

import kv_runtime
from kv_runtime import ChunkKV, Generation, GenerationResult, KVCache, Runtime
from memcube.embedder import Embedder
from memcube.errors import Conflict, InvalidArgument, TooLarge, Unavailable
from memos.db.models import Memory
from memos.services.activations.admission import GenerationGate, Refusal, Slot, refused
from memos.services.activations.blending import Blended, blend_prompt
from memos.services.activations.catalogue import Catalogue, activation_not_found
from memos.services.activations.episodes import Router, continues_at
from memos.services.activations.loaded import ByteBoundedLRU, LoadedActivation, episode_key
from memos.services.activations.notes import NoteChunks, note_line, notes_prefix, with_notes
from memos.services.activations.prompts import Prompts
from memos.services.runtime import RuntimeHolder
from memos.services.views import ActivationView, GenerationView

History = tuple[Mapping[str, str], ...]


@dataclass(frozen=True)
class Sampling:
    """How a generation decodes and what it records (see `kv_runtime.Runtime.generate`);
    `max_tokens` may be 0 only when the prompt is scored (`prompt_logprobs`); None: as many
    as `max_generate_tokens` and the model's positions allow."""

    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None


class GenerationStream:
    """Text pieces as they are decoded, then `finish()` for the totals.

    It holds an admission slot until its pieces run out, it fails, or `close()` is called
    (whichever comes first; callers that may stop early close it). `cancel()` asks the runtime
    to stop at the next token; the pieces then end with finish reason "cancelled".
    """

    def __init__(
        self,
        generation: Generation,
        slot: Slot,
        cancel: threading.Event,
        on_finish: Callable[[GenerationResult], GenerationView],
        on_close: Callable[[GenerationStream], None],
    ) -> None:
        self._generation, self._slot, self._cancel = generation, slot, cancel
        self._on_finish, self._on_close = on_finish, on_close

    def __iter__(self) -> Iterator[str]:
        generation, work = self._generation, self._slot.work
        try:
            for piece in generation:
                work.advance(generation.prefilled, generation.decoded)
                yield piece
        finally:
            self.close()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def result(self) -> GenerationResult | None:
        """Set once the pieces have run out."""
        return self._generation.result

    def close(self) -> None:
        self._slot.release()
        self._on_close(self)

    def finish(self) -> GenerationView:
        result = self.result
        assert result is not None, "finish() after the pieces are consumed"
        return self._on_finish(result)

    def collect(self) -> GenerationView:
        """Decode to the end without looking at the pieces; the totals."""
        for _ in self:
            pass
        return self.finish()


class Generations:
    def __init__(
        self,
        catalogue: Catalogue,
        runtime: RuntimeHolder,
        prompts: Prompts,
        loaded: ByteBoundedLRU[LoadedActivation],
        dequantized: ByteBoundedLRU[KVCache],
        gate: GenerationGate,
        max_generate_tokens: int,
        embedder: Embedder | None = None,
        notes: NoteChunks | None = None,
    ) -> None:
        self.catalogue, self.runtime, self.prompts = catalogue, runtime, prompts
        self.notes = notes  # generate with memory_ids blends their chunks
        self.embedder = embedder  # routes prompts to an episodic activation's episodes
        self.loaded, self.dequantized, self.gate = loaded, dequantized, gate
        self.max_generate_tokens = max_generate_tokens
        self._finished: Counter[str] = Counter()
        self._open: set[GenerationStream] = set()
        self._lock = threading.Lock()

    def open(
        self,
        cube_id: str,
        prompt: str,
        activation_id: str | None,
        max_tokens: int,
        cancel: threading.Event | None = None,
        memory_ids: Sequence[str] | None = None,
    ) -> GenerationStream:
        """`prompt` as a user turn after the activation's context (its chat history), greedy;
        with `memory_ids`, after those notes (blended from their KV chunks where they have
        one). Check, admit, load and start; every refusal is raised here, before any text."""
        started = time.perf_counter()
        sampling = Sampling(max_tokens=max_tokens)
        self._check_sampling(sampling)
        self.prompts.check_prompt(prompt)
        runtime = self.runtime.get()
        if memory_ids is not None:
            if activation_id is not None:
                raise InvalidArgument(
                    "memory_ids and activation_id conflict: notes are blended into a prompt of "
                    "their own; give one of them"
                )
            return self._open_notes(runtime, cube_id, prompt, memory_ids, sampling, cancel,
                                    started)  # fmt: skip
        row = self._ready(cube_id, activation_id)
        history = self._history(runtime, row) if row is not None else ()
        question = self.prompts.question(runtime, history, prompt)
        return self._start(runtime, row, question, sampling, cancel, started, prompt)

    def _open_notes(
        self,
        runtime: Runtime,
        cube_id: str,
        prompt: str,
        memory_ids: Sequence[str],
        sampling: Sampling,
        cancel: threading.Event | None,
        started: float,
    ) -> GenerationStream:
        """The notes' block, then `prompt`, as one user turn; their chunks blended in."""
        assert self.notes is not None, "the service wires note chunks in"
        rows = self.notes.notes(cube_id, memory_ids)
        lines = [note_line(r.speaker, r.timestamp, r.content) for r in rows]
        question = self.prompts.question(runtime, (), with_notes(prompt, lines))
        chunks = self._chunks(runtime, cube_id, rows)
        return self._start(runtime, None, question, sampling, cancel, started, chunks=chunks)

    def open_tokens(
        self,
        token_ids: Sequence[int],
        sampling: Sampling,
        cancel: threading.Event | None = None,
        *,
        cube_id: str | None = None,
        activation_id: str | None = None,
        route_text: str | None = None,
        memory_ids: Sequence[str] | None = None,
    ) -> GenerationStream:
        """Token ids as given (a rendered chat, a completion prompt), continuing the
        activation's tokens when one is given (`cube_id` is then its cube). The same checks,
        admission and cancellation as `open`. `route_text`: what picks an episodic
        activation's episode (default: the prompt's tokens as text). `memory_ids`: notes of
        `cube_id` put before the tokens as a notes block (`notes_prefix`), their chunks
        blended in; not with an activation or a scored prompt."""
        started = time.perf_counter()
        runtime = self.runtime.get()
        vocab = runtime.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument(
                f"token id {bad} is not in the model's vocabulary (0..{vocab - 1})"
            )
        row = None
        if activation_id is not None:
            assert cube_id is not None, "an activation is looked up in its cube"
            row = self._ready(cube_id, activation_id)
        if not token_ids and row is None:
            raise InvalidArgument("the prompt is empty")
        chunks: list[ChunkKV] = []
        if memory_ids is not None:
            assert cube_id is not None and self.notes is not None, "notes are of a cube"
            if row is not None:
                raise InvalidArgument("memory_ids and activation_id conflict; give one of them")
            if sampling.prompt_logprobs is not None:
                raise InvalidArgument(
                    "memory_ids cannot be used to score a prompt (echo with logprobs, or "
                    "max_tokens 0): the notes' blended tokens have no exact logprobs"
                )
            rows = self.notes.notes(cube_id, memory_ids)
            lines = [note_line(r.speaker, r.timestamp, r.content) for r in rows]
            token_ids = [*runtime.tokenize(notes_prefix(lines)), *token_ids]
            chunks = self._chunks(runtime, cube_id, rows)
        if sampling.max_tokens is None:
            left = runtime.info.max_positions - self._continues_at(runtime, row) - len(token_ids)
            sampling = replace(sampling, max_tokens=max(1, min(self.max_generate_tokens, left)))
        self._check_sampling(sampling)
        if row is not None and row.episodes is not None and route_text is None:
            route_text = runtime.detokenize(token_ids, skip_special_tokens=True)
        return self._start(runtime, row, token_ids, sampling, cancel, started, route_text,
                           chunks=chunks)  # fmt: skip

    def _chunks(self, runtime: Runtime, cube_id: str, rows: Sequence[Memory]) -> list[ChunkKV]:
        """The notes' current KV chunks, those they have (the others are prefilled)."""
        assert self.notes is not None, "the service wires note chunks in"
        notes = self.notes
        return [c for r in rows if (c := notes.load(runtime, cube_id, r.id, r.version)) is not None]

    def _check_sampling(self, sampling: Sampling) -> None:
        least = 0 if sampling.prompt_logprobs is not None else 1
        assert sampling.max_tokens is not None, "resolved by the caller"
        if not least <= sampling.max_tokens <= self.max_generate_tokens:
            raise InvalidArgument(
                f"max_tokens is {sampling.max_tokens}; it must be between {least} and "
                f"{self.max_generate_tokens}"
                + (" (0 only when the prompt is scored)" if least else "")
            )
        if any(not s for s in sampling.stop):
            raise InvalidArgument("stop strings must not be empty")

    def _ready(self, cube_id: str, activation_id: str | None) -> ActivationView | None:
        if activation_id is None:
            return None
        row = self.catalogue.view(cube_id, activation_id)
        if row.state != "ready":
            raise Conflict(
                f"activation {activation_id!r} is {row.state}, not ready",
                code="activation_not_ready",
            )
        return row

    @staticmethod
    def _continues_at(runtime: Runtime, row: ActivationView | None) -> int:
        """Where a generation on `row` continues (at most): after its context, or for an
        episodic activation re-positioned past the model's positions, after its kept tokens."""
        if row is None:
            return 0
        if row.episodes is None:
            return row.tokens
        return continues_at(row.tokens, row.kept_tokens, runtime.info.max_positions)

    def _start(
        self,
        runtime: Runtime,
        row: ActivationView | None,
        token_ids: Sequence[int],
        sampling: Sampling,
        cancel: threading.Event | None,
        started: float,
        route_text: str | None = None,
        chunks: Sequence[ChunkKV] = (),
    ) -> GenerationStream:
        """The checks every generation shares (positions, cache bytes), then admission,
        loading (an episodic activation's episode chosen by `route_text`), blending `chunks`
        (note chunks, into a prompt without an activation) and the first forward pass."""
        cancel = cancel or threading.Event()
        max_tokens = sampling.max_tokens
        assert max_tokens is not None, "resolved by the caller"
        context = self._continues_at(runtime, row)
        end = context + len(token_ids) + max_tokens
        if end > runtime.info.max_positions:
            raise InvalidArgument(
                f"context {context} + prompt {len(token_ids)} + max_tokens {max_tokens} = {end} "
                f"exceeds the model's {runtime.info.max_positions} positions"
            )
        kept = row.kept_tokens if row is not None else 0
        kv_bytes = (kept + len(token_ids) + max_tokens) * runtime.kv_bytes_per_token
        if kv_bytes > self.gate.limits.max_kv_bytes:
            raise TooLarge(
                f"this generation's cache would take {kv_bytes} bytes; generations may take "
                f"{self.gate.limits.max_kv_bytes} (fewer max_tokens or a compressed activation)",
                code="generation_too_large",
            )
        slot = self.gate.acquire(
            kv_bytes,
            cancel.is_set,
            prefill=len(token_ids),
            decode=max_tokens,
            estimate=runtime.throughput.seconds,
        )
        if isinstance(slot, Refusal):
            raise refused(self.gate.limits, slot)
        episode = None
        blended: Blended | None = None
        try:
            kv = None
            prompt = token_ids
            if row is not None:
                kv, episode = self._dequantized(runtime, row, route_text)
                kept = kv.kept
            elif chunks:
                assert self.notes is not None, "chunks come from the note chunks"
                ratio = self.notes.config.blend_recompute_ratio
                blended = blend_prompt(runtime, None, token_ids, chunks, ratio)
                if blended is not None:  # its last token is left for the generation to run
                    kv, prompt, kept = blended.kv, blended.tail, blended.reused_tokens
            loaded_ms = (time.perf_counter() - started) * 1000
            generation = runtime.generate(
                prompt,
                kv=kv,
                max_tokens=max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed,
                stop=sampling.stop,
                logprobs=sampling.logprobs,
                prompt_logprobs=sampling.prompt_logprobs,
                cancel=cancel.is_set,
            )
        except BaseException:
            slot.release()
            raise
        activation_id = row.id if row is not None else None

        def finish(result: GenerationResult) -> GenerationView:
            if activation_id is not None:
                self.catalogue.touch(activation_id)
            return GenerationView(
                text=result.text,
                ttft_ms=round(loaded_ms + result.ttft_ms, 3),
                # Of a blend: the prompt's tokens but the kept chunk tokens (`reused_tokens`),
                # as for an activation, whose tokens are not counted here either.
                prompt_tokens=len(token_ids) - kept if blended else result.prompt_tokens,
                # Cache entries reused (evicted ones are skipped too); of a blend, the chunk
                # tokens kept, and those it recomputed.
                reused_tokens=kept,
                recomputed_tokens=blended.recomputed_tokens if blended is not None else 0,
                activation_id=activation_id,
                finish_reason=result.finish_reason,
                episode=episode,
                token_ids=result.token_ids,
                logprobs=result.logprobs,
                prompt_logprobs=result.prompt_logprobs,
            )

        stream = GenerationStream(generation, slot, cancel, finish, self._closed)
        with self._lock:
            self._open.add(stream)
        return stream

    def _closed(self, stream: GenerationStream) -> None:
        """Count how it ended, once: its finish reason, or "failed" when it never finished."""
        result = stream.result
        with self._lock:
            if stream in self._open:
                self._open.remove(stream)
                self._finished[result.finish_reason if result else "failed"] += 1

    def finished(self) -> dict[str, int]:
        """Generations ended since start, by finish reason ("stop", "length", "cancelled"), or
        "failed" (an error, or closed before decoding)."""
        with self._lock:
            return dict(self._finished)

    def cancelling(self) -> int:
        """Generations asked to stop (their client left) that have not ended yet."""
        with self._lock:
            return sum(1 for stream in self._open if stream.cancelled)

    # -- loading ----------------------------------------------------------------------------

    def _path(self, row: ActivationView) -> Path:
        """Its local folder, fetched from the shared tier first if needed (503 when it
        cannot be reached; `ActivationCorrupt` when the fetched bytes fail their sha256)."""
        return self.catalogue.fetch(row.cube_id, row.id)

    def _history(self, runtime: Runtime, row: ActivationView) -> History:
        """The chat messages the activation's tokens render: from memory, else its manifest."""
        cached = self.loaded.get((row.cube_id, row.id))
        if cached is not None:
            return cached.history
        try:
            manifest = kv_runtime.read_manifest(self._path(row))
        except kv_runtime.ActivationCorrupt as exc:
            self._corrupt(row, exc)
        if manifest.messages is not None:
            return manifest.messages
        # Stored before manifests recorded their messages: read its one system turn back.
        recovered = runtime.template.recover_turn(manifest.token_ids, "system")
        if recovered is None:
            raise Conflict(
                f"activation {row.id!r} was stored without its chat messages by an older "
                "memosd and cannot be read back; build it again",
                code="activation_mismatch",
            )
        return tuple(recovered)

    def _load(self, runtime: Runtime, row: ActivationView) -> LoadedActivation:
        key = (row.cube_id, row.id)
        cached = self.loaded.get(key)
        if cached is not None:
            return cached
        for attempt in (1, 2):
            try:
                path = self._path(row)
                if row.episodes is not None:
                    caches, manifest = kv_runtime.open_episodes(path, runtime.fingerprint)
                    router: Router | None = Router.of(manifest)
                else:
                    compressed, manifest = runtime.open_activation(path)
                    caches, router = (compressed,), None
                break
            except kv_runtime.ActivationMismatch as exc:
                raise Conflict(exc.message, code="activation_mismatch") from exc
            except kv_runtime.ActivationCorrupt as exc:
                # The `migrate` job replaces a demoted activation's files atomically, but a
                # reader between its manifest and its blob sees a blob that is gone: read again
                # once before calling it corrupt.
                if attempt == 2:
                    self._corrupt(row, exc)
        self.catalogue.loaded(row.id)
        history = manifest.messages
        if history is None:  # stored before messages were recorded; `_history` checked it
            history = tuple(runtime.template.recover_turn(manifest.token_ids, "system") or ())
        entry = LoadedActivation(caches, history, router)
        self.loaded.put(key, entry, entry.memory_nbytes())
        return entry

    def episode(
        self, runtime: Runtime, row: ActivationView, route_text: str
    ) -> tuple[KVCache, int, History]:
        """An episodic activation's cache for `route_text` (the nearest episode), that episode
        and the messages its tokens render: what a long chat stands its window on."""
        assert row.episodes is not None, "a plain activation has no episodes"
        kv, episode = self._dequantized(runtime, row, route_text)
        assert episode is not None
        return kv, episode, self._history(runtime, row)

    def _dequantized(
        self, runtime: Runtime, row: ActivationView, route_text: str | None
    ) -> tuple[KVCache, int | None]:
        """The activation's full-precision cache on the model's device (for an episodic one,
        the episode `route_text` is nearest to) and that episode: kept from an earlier
        request, else loaded, dequantized and kept. Requests only read it (see
        `kv_runtime.KVCache.to_transformers`), so one copy serves them all."""
        key, episode = (row.cube_id, row.id), None
        if row.episodes is not None:
            loaded = self._load(runtime, row)
            assert loaded.router is not None, "an episodic row's files hold episodes"
            if self.embedder is None:
                raise Unavailable("episodic activations need the daemon's embedder")
            episode = loaded.router.route(self.embedder, row.id, route_text or "")
            key = episode_key(row.cube_id, row.id, episode)
        kv = self.dequantized.get(key)
        if kv is None:
            loaded = self._load(runtime, row)
            kv = runtime.decompress(loaded.caches[episode or 0])
            self.dequantized.put(key, kv, kv.nbytes())
        return kv, episode

    def _corrupt(self, row: ActivationView, exc: kv_runtime.ActivationCorrupt) -> NoReturn:
        if not self.catalogue.exists(row.id):  # deleted meanwhile: its files went first
            raise activation_not_found(row.id) from exc
        self.catalogue.mark_corrupt(row.id, exc.message)
        raise Conflict(exc.message, code="activation_corrupt") from exc
