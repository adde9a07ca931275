"""Note chunks: one note's KV cache, computed alone, stored as an activation, blended later.

A chat recalls a different handful of notes each turn, in new orders at new positions, so
prefix caching cannot reuse them. Each note can instead hold its own KV chunk: the note's line,
rendered exactly as the chat's recalled-notes block renders it (`note_line`), prefilled once
with no preceding context (`Runtime.build_chunk`, keys rotated for positions 0..n-1), then
re-rotated and blended into any prompt that recalls it (`blending`, CacheBlend).

A chunk is an ordinary activation row (so it is listed, counted in the cube's activation
bytes and evicted by the lifecycle budgets like any other), marked by its source:
`{"memory_ids": [id], "note": {"memory_id", "version", "start"}}` (`start`: the position its
keys were rotated for; the erasure of the note drops it through `memory_ids`). Its id is
derived from the note's id and version (`ids.note_chunk_id`): whether a note has a current
chunk is one primary-key lookup, and a chunk of an older version can never be taken for the
current one. Editing or deleting the note drops its chunk (`ActivationService.drop_note_chunks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

import kv_runtime
from kv_runtime import ChunkKV, CompressionConfig, KVCache, Runtime
from memcube.errors import Conflict, TooLarge
from memos.db.models import Activation, Memory
from memos.db.types import utcnow
from memos.services.activations.catalogue import Catalogue
from memos.services.activations.loaded import ByteBoundedLRU
from memos.services.activations.prompts import ActivationSource, Prompts
from memos.services.blobs import BlobUnavailable
from memos.services.ids import note_chunk_id
from memos.services.runtime import RuntimeHolder
from memos.services.views import ActivationView
from memos.settings import ActivationsConfig

# (cube id, an upper bound of the bytes it will store): raises to refuse (the owner's quota).
QuotaCheck = Callable[[str, int], None]


def note_line(speaker: str | None, timestamp: datetime, content: str) -> str:
    """A note as the chat's recalled-notes block shows it, one line: `- [2023-05-08] Ann: ...`.
    The one rendering of a note: a chunk's tokens are this line's, so they match the prompt."""
    who = f"{speaker}: " if speaker else ""
    return f"- [{timestamp.date().isoformat()}] {who}{content}"


NOTES_HEADER = "Notes recalled from memory (they may help):"
NOTES_FOOTER = "Message:"


def with_notes(content: str, lines: Sequence[str]) -> str:
    """A message as the model reads it: the notes block (`note_line`s) first, when there are
    notes. Chat turns and generate with `memory_ids` render notes alike, so chunks fit both."""
    if not lines:
        return content
    block = "\n".join(lines)
    return f"{NOTES_HEADER}\n{block}\n\n{NOTES_FOOTER}\n{content}"


def notes_prefix(lines: Sequence[str]) -> str:
    """The notes block before a completion's prompt (no chat template): header, lines, a
    blank line; the prompt follows as it is."""
    block = "\n".join(lines)
    return f"{NOTES_HEADER}\n{block}\n\n"


def kv_nbytes(kv: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in (*kv.keys, *kv.values))


class NoteChunks:
    """Builds, finds and loads notes' chunks; removal goes through the service's `discard`."""

    def __init__(
        self,
        catalogue: Catalogue,
        runtime: RuntimeHolder,
        prompts: Prompts,
        cache: ByteBoundedLRU[KVCache],
        config: ActivationsConfig,
    ) -> None:
        self.catalogue, self.runtime, self.prompts = catalogue, runtime, prompts
        self.cache, self.config = cache, config

    # -- builds -----------------------------------------------------------------------------

    def notes(self, cube_id: str, memory_ids: Sequence[str]) -> list[Memory]:
        """The live notes named, each once, in order; checked (404, 413) before any work."""
        rows, _ = self.prompts.source_rows(cube_id, ActivationSource(memory_ids=tuple(memory_ids)))
        unique = list({row.id: row for row in rows}.values())
        if len(unique) > self.config.max_note_chunks:
            raise TooLarge(
                f"memory_ids names {len(unique)} notes; one request takes at most "
                f"{self.config.max_note_chunks} (activations.max_note_chunks)"
            )
        return unique

    def build(
        self, cube_id: str, rows: Sequence[Memory], bits: int, check_quota: QuotaCheck | None
    ) -> list[ActivationView]:
        """One chunk per note, in order; a note with a current chunk (ready, or being built
        by another request) keeps it. Inline: notes are short, one forward pass each."""
        runtime = self.runtime.get()
        views = []
        for row in rows:
            activation_id = note_chunk_id(row.id, row.version)
            current = self._current(cube_id, activation_id)
            if current is None:
                # In flight here: the orphan sweep must not fail its row while it is built.
                with self.catalogue.building_inline(activation_id):
                    current = self._build(runtime, cube_id, row, activation_id, bits, check_quota)
            views.append(current)
        return views

    def _current(self, cube_id: str, activation_id: str) -> ActivationView | None:
        """The chunk's view when it is ready or building; a failed or corrupt one is removed
        (built again)."""
        if not self.catalogue.exists(activation_id):
            return None
        view = self.catalogue.view(cube_id, activation_id)
        if view.state in ("ready", "building"):
            return view
        self.catalogue.delete_if_exists(activation_id)
        self.catalogue.remove_files(cube_id, activation_id)
        return None

    def _build(
        self,
        runtime: Runtime,
        cube_id: str,
        row: Memory,
        activation_id: str,
        bits: int,
        check_quota: QuotaCheck | None,
    ) -> ActivationView:
        token_ids = runtime.tokenize(note_line(row.speaker, row.timestamp, row.content))
        if len(token_ids) >= runtime.info.max_positions:
            raise TooLarge(
                f"note {row.id!r} is {len(token_ids)} tokens; the model takes "
                f"< {runtime.info.max_positions}"
            )
        if check_quota is not None:  # at most its tokens in float16
            check_quota(cube_id, len(token_ids) * runtime.kv_bytes_per_token)
        start = 0  # no preamble: measured better (kv_runtime.blend)
        try:
            self.catalogue.insert(self._row(runtime, cube_id, row, activation_id, bits, start,
                                            len(token_ids)))  # fmt: skip
        except IntegrityError:  # another request is building the same chunk
            found = self._current(cube_id, activation_id)
            assert found is not None, "a chunk row vanished as it was inserted"
            return found
        path = self.catalogue.path(cube_id, activation_id)
        try:
            chunk = runtime.build_chunk(token_ids)
            assert chunk.start == start, "a chunk without a preamble starts at 0"
            compressed = runtime.compress(chunk.kv, CompressionConfig(bits=bits))
            manifest = runtime.save_activation(path, compressed)
        except Exception as exc:
            self.catalogue.remove_files(cube_id, activation_id)
            self.catalogue.mark_failed(activation_id, f"{type(exc).__name__}: {exc}")
            raise
        ready = self.catalogue.mark_ready(activation_id, manifest.kept_tokens, manifest.bytes)
        if not ready or not self._still_current(row):  # deleted or edited meanwhile
            self.catalogue.delete_if_exists(activation_id)
            self.catalogue.remove_files(cube_id, activation_id)
            raise Conflict(
                f"note {row.id!r} changed while its chunk was built; build it again",
                code="note_changed",
            )
        return self.catalogue.view(cube_id, activation_id)

    def _still_current(self, row: Memory) -> bool:
        with self.catalogue.db.read() as s:
            version = s.scalar(
                select(Memory.version).where(Memory.id == row.id, Memory.deleted_at.is_(None))
            )
        return version == row.version

    @staticmethod
    def _row(
        runtime: Runtime,
        cube_id: str,
        row: Memory,
        activation_id: str,
        bits: int,
        start: int,
        tokens: int,
    ) -> Activation:
        return Activation(
            id=activation_id,
            cube_id=cube_id,
            model=runtime.fingerprint.model,
            source={
                "memory_ids": [row.id],
                "note": {"memory_id": row.id, "version": row.version, "start": start},
            },
            compression=CompressionConfig(bits=bits).model_dump(),
            tokens=tokens,
            bits=bits,
            state="building",
            progress=0.0,
            created_at=utcnow(),
        )

    # -- use --------------------------------------------------------------------------------

    def load(self, runtime: Runtime, cube_id: str, memory_id: str, version: int) -> ChunkKV | None:
        """The note's current chunk, full precision on the model's device; None when it has
        none (never built, evicted, failed, unreadable: the note is then prefilled)."""
        activation_id = note_chunk_id(memory_id, version)
        with self.catalogue.db.read() as s:
            found = s.execute(
                select(Activation.source).where(
                    Activation.id == activation_id,
                    Activation.cube_id == cube_id,
                    Activation.state == "ready",
                )
            ).first()
        if found is None:
            return None
        start = int(((found[0] or {}).get("note") or {}).get("start", 0))
        key = (cube_id, activation_id)
        kv = self.cache.get(key)
        if kv is None:
            try:
                compressed = runtime.load_activation(self.catalogue.fetch(cube_id, activation_id))
            except kv_runtime.ActivationCorrupt as exc:
                self.catalogue.mark_corrupt(activation_id, exc.message)
                return None
            except (kv_runtime.ActivationMismatch, OSError, BlobUnavailable):
                return None
            self.catalogue.loaded(activation_id)
            kv = runtime.decompress(compressed)
            self.cache.put(key, kv, kv_nbytes(kv))
        self.catalogue.touch(activation_id)
        return ChunkKV(kv, start)
