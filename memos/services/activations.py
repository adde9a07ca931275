"""Activation memory: KV caches of the local model, built from a cube's text, stored, reused.

An activation is built from text, from memories (rendered in the given order with their
timestamps) or from a session (its memories in order). Its context is prefilled once,
compressed (`kv_runtime.CompressionConfig`) and stored on disk (`kv_runtime.store`: safetensors
+ a JSON manifest, written atomically); the `activations` row is its catalogue entry. Small
builds finish inside the request; larger ones (`inline_max_tokens`) return at once in state
"building" and a builder thread fills in `progress` until "ready" or "failed". A build that a
restart interrupted is marked "failed" at start.

`generate` continues an activation's context with a prompt: the stored cache is loaded (kept in
a small in-memory cache of loaded activations), verified against the running model, copied for
the request and extended, so the context is never prefilled again.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

import kv_runtime
from kv_runtime import CompressedKV, CompressionConfig
from memcube.errors import Conflict, InvalidArgument, NotFound, TooLarge
from memos.db.engine import Database
from memos.db.models import Activation, Memory
from memos.db.types import utcnow
from memos.services.cubes import CubeService
from memos.services.ids import new_id
from memos.services.runtime import RuntimeHolder
from memos.services.views import ActivationView, GenerationView, Principal, Role
from memos.settings import ActivationsConfig

log = logging.getLogger("memos.activations")


@dataclass(frozen=True)
class ActivationSource:
    """Exactly one of the three is set (the API checks it)."""

    text: str | None = None
    memory_ids: tuple[str, ...] | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class GenerationStream:
    """Text pieces as they are decoded; `finish()` gives the totals once they are consumed."""

    pieces: Iterator[str]
    finish: Callable[[], GenerationView]

    def collect(self) -> GenerationView:
        """Decode to the end without looking at the pieces; the totals."""
        for _ in self.pieces:
            pass
        return self.finish()


def compression_for(bits: int, budget_tokens: int | None) -> CompressionConfig:
    """The request's compression block as runtime settings. The eviction windows shrink for
    budgets smaller than their defaults (4 sinks + a 32-token window are always kept)."""
    if budget_tokens is None:
        return CompressionConfig(bits=bits)
    defaults = CompressionConfig()
    window = min(defaults.window_tokens, max(1, budget_tokens // 2))
    sinks = min(defaults.sink_tokens, budget_tokens // 4)
    return CompressionConfig(
        bits=bits,
        budget_tokens=budget_tokens,
        window_tokens=window,
        sink_tokens=sinks,
    )


def render_memories(rows: list[Memory]) -> str:
    """One line per memory: `[2023-05-08 13:56] Caroline: content`."""
    lines = []
    for row in rows:
        who = f"{row.speaker}: " if row.speaker else ""
        lines.append(f"[{row.timestamp:%Y-%m-%d %H:%M}] {who}{row.content}")
    return "\n".join(lines)


def _view(row: Activation) -> ActivationView:
    return ActivationView(
        id=row.id,
        cube_id=row.cube_id,
        model=row.model,
        tokens=row.tokens,
        kept_tokens=row.kept_tokens,
        bits=row.bits,
        bytes=row.bytes,
        state=row.state,
        progress=row.progress,
        error=row.error,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
    )


class ActivationService:
    def __init__(
        self,
        db: Database,
        cubes: CubeService,
        runtime: RuntimeHolder,
        directory: Path,
        config: ActivationsConfig,
    ) -> None:
        self.db = db
        self.cubes = cubes
        self.runtime = runtime
        self.directory = directory
        self.config = config
        self._loaded: OrderedDict[str, CompressedKV] = OrderedDict()
        self._loaded_lock = threading.Lock()
        self._builds = threading.Semaphore(1)  # one background build at a time

    def recover(self) -> int:
        """At start: builds that a restart interrupted are failed (their text is not kept)."""
        with self.db.write() as s:
            result = s.execute(
                update(Activation)
                .where(Activation.state == "building")
                .values(state="failed", error="interrupted by a restart; build it again")
            )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # -- build ------------------------------------------------------------------------------

    def create(
        self,
        principal: Principal,
        cube_id: str,
        source: ActivationSource,
        bits: int,
        budget_tokens: int | None,
    ) -> ActivationView:
        self.cubes.require(principal, cube_id, Role.WRITER)
        settings = compression_for(bits, budget_tokens)
        text, described = self._render(cube_id, source)
        runtime = self.runtime.get()
        # The context is stored as the system turn of the model's chat template, so a question
        # can follow it as a user turn (`generate`).
        token_ids = runtime.tokenize(
            runtime.render_chat([{"role": "system", "content": text}], add_generation_prompt=False)
        )
        if not token_ids:
            raise InvalidArgument("the activation's text has no tokens")
        limit = runtime.info.max_positions
        if len(token_ids) >= limit:
            raise TooLarge(f"the context is {len(token_ids)} tokens; the model takes < {limit}")
        row = Activation(
            id=new_id("act"),
            cube_id=cube_id,
            model=runtime.fingerprint.model,
            source=described,
            compression=settings.model_dump(),
            tokens=len(token_ids),
            bits=bits,
            state="building",
            progress=0.0,
            created_at=utcnow(),
        )
        with self.db.write() as s:
            s.add(row)
        if len(token_ids) <= self.config.inline_max_tokens:
            self._build(cube_id, row.id, token_ids, settings)
        else:
            thread = threading.Thread(
                target=self._build_in_background,
                args=(cube_id, row.id, token_ids, settings),
                name=f"memos-activation-{row.id}",
                daemon=True,
            )
            thread.start()
        return self._get_view(cube_id, row.id)

    def _render(self, cube_id: str, source: ActivationSource) -> tuple[str, dict[str, Any]]:
        if source.text is not None:
            size = len(source.text.encode("utf-8"))
            if size > self.config.max_text_bytes:
                raise TooLarge(f"text is {size} bytes; at most {self.config.max_text_bytes}")
            if not source.text.strip():
                raise InvalidArgument("text is empty")
            return source.text, {"text_chars": len(source.text)}
        live = (Memory.cube_id == cube_id, Memory.deleted_at.is_(None))
        with self.db.read() as s:
            if source.memory_ids is not None:
                ids = list(source.memory_ids)
                if not ids:
                    raise InvalidArgument("memory_ids is empty")
                found = {
                    row.id: row
                    for row in s.scalars(select(Memory).where(*live, Memory.id.in_(ids)))
                }
                missing = [i for i in ids if i not in found]
                if missing:
                    raise NotFound(f"memory {missing[0]!r} not found", code="memory_not_found")
                return render_memories([found[i] for i in ids]), {"memory_ids": ids}
            rows = list(
                s.scalars(
                    select(Memory)
                    .where(*live, Memory.session_id == source.session_id)
                    .order_by(Memory.seq)
                )
            )
        if not rows:
            raise NotFound(
                f"session {source.session_id!r} has no memories in this cube",
                code="session_not_found",
            )
        return render_memories(rows), {"session_id": source.session_id}

    def _build_in_background(
        self, cube_id: str, activation_id: str, token_ids: list[int], settings: CompressionConfig
    ) -> None:
        with self._builds:
            try:
                self._build(cube_id, activation_id, token_ids, settings)
            except Exception:  # already recorded on the row by `_build`
                log.exception("activation build failed", extra={"fields": {"id": activation_id}})

    def _build(
        self, cube_id: str, activation_id: str, token_ids: list[int], settings: CompressionConfig
    ) -> None:
        runtime = self.runtime.get()
        last_report = [0.0]

        def on_progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last_report[0] >= 0.5:  # at most two progress writes a second
                last_report[0] = now
                # 1.0 only once stored: compression and the write come after the prefill.
                self._set(activation_id, progress=min(round(done / total, 4), 0.99))

        try:
            kv = runtime.prefill(token_ids, on_progress=on_progress)
            compressed = runtime.compress(kv, settings)
            manifest = runtime.save_activation(self._path(cube_id, activation_id), compressed)
        except Exception as exc:
            self._set(activation_id, state="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        self._set(
            activation_id,
            state="ready",
            progress=1.0,
            kept_tokens=manifest.kept_tokens,
            bytes=manifest.bytes,
        )

    def _set(self, activation_id: str, **values: Any) -> None:
        with self.db.write() as s:
            s.execute(update(Activation).where(Activation.id == activation_id).values(**values))

    # -- catalogue --------------------------------------------------------------------------

    def _row(self, s: Any, cube_id: str, activation_id: str) -> Activation:
        row = s.get(Activation, activation_id)
        if row is None or row.cube_id != cube_id:
            raise NotFound(f"activation {activation_id!r} not found", code="activation_not_found")
        return row

    def _get_view(self, cube_id: str, activation_id: str) -> ActivationView:
        with self.db.read() as s:
            return _view(self._row(s, cube_id, activation_id))

    def get(self, principal: Principal, cube_id: str, activation_id: str) -> ActivationView:
        self.cubes.require(principal, cube_id, Role.READER)
        return self._get_view(cube_id, activation_id)

    def list_activations(self, principal: Principal, cube_id: str) -> list[ActivationView]:
        self.cubes.require(principal, cube_id, Role.READER)
        with self.db.read() as s:
            rows = s.scalars(
                select(Activation)
                .where(Activation.cube_id == cube_id)
                .order_by(Activation.created_at, Activation.id)
            )
            return [_view(row) for row in rows]

    def delete(self, principal: Principal, cube_id: str, activation_id: str) -> None:
        self.cubes.require(principal, cube_id, Role.WRITER)
        with self.db.write() as s:
            self._row(s, cube_id, activation_id)
            s.execute(delete(Activation).where(Activation.id == activation_id))
        self._forget(cube_id, activation_id)

    def drop_cube(self, cube_id: str) -> None:
        """After a cube is deleted (its rows cascade): remove its activations' files."""
        with self._loaded_lock:
            self._loaded.clear()
        shutil.rmtree(self.directory / cube_id, ignore_errors=True)

    def _path(self, cube_id: str, activation_id: str) -> Path:
        return self.directory / cube_id / activation_id

    def _forget(self, cube_id: str, activation_id: str) -> None:
        with self._loaded_lock:
            self._loaded.pop(activation_id, None)
        kv_runtime.delete_activation(self._path(cube_id, activation_id))

    # -- reuse ------------------------------------------------------------------------------

    def _load(self, row: Activation) -> CompressedKV:
        with self._loaded_lock:
            cached = self._loaded.get(row.id)
            if cached is not None:
                self._loaded.move_to_end(row.id)
                return cached
        runtime = self.runtime.get()
        try:
            compressed = runtime.load_activation(self._path(row.cube_id, row.id))
        except kv_runtime.ActivationMismatch as exc:
            raise Conflict(exc.message, code="activation_mismatch") from exc
        except kv_runtime.ActivationCorrupt as exc:
            self._set(row.id, state="corrupt", error=exc.message)
            raise Conflict(exc.message, code="activation_corrupt") from exc
        if self.config.loaded_cache:
            with self._loaded_lock:
                self._loaded[row.id] = compressed
                while len(self._loaded) > self.config.loaded_cache:
                    self._loaded.popitem(last=False)
        return compressed

    def generate(
        self,
        principal: Principal,
        cube_id: str,
        prompt: str,
        activation_id: str | None,
        max_tokens: int,
    ) -> GenerationView:
        """`stream`, decoded to the end."""
        return self.stream(principal, cube_id, prompt, activation_id, max_tokens).collect()

    def stream(
        self,
        principal: Principal,
        cube_id: str,
        prompt: str,
        activation_id: str | None,
        max_tokens: int,
    ) -> GenerationStream:
        """Check the request, load the activation and start decoding: every refusal is raised
        here, before the first piece of text; iterate `pieces`, then call `finish()`."""
        started = time.perf_counter()
        self.cubes.require(principal, cube_id, Role.READER)
        if not prompt.strip():
            raise InvalidArgument("prompt is empty")
        if not 1 <= max_tokens <= self.config.max_generate_tokens:
            raise InvalidArgument(
                f"max_tokens is {max_tokens}; it must be between 1 and "
                f"{self.config.max_generate_tokens}"
            )
        compressed, reused = None, 0
        if activation_id is not None:
            with self.db.read() as s:
                row = self._row(s, cube_id, activation_id)
            if row.state != "ready":
                raise Conflict(
                    f"activation {activation_id!r} is {row.state}, not ready",
                    code="activation_not_ready",
                )
            compressed = self._load(row)
            reused = row.kept_tokens  # cache entries reused; evicted ones are skipped too
        runtime = self.runtime.get()
        question = [{"role": "user", "content": prompt}]
        if compressed is None:
            turn = runtime.render_chat(question)
        else:  # the user turn as it follows a system turn, which the activation holds
            system = [{"role": "system", "content": "-"}]
            head = runtime.render_chat(system, add_generation_prompt=False)
            full = runtime.render_chat(system + question)
            assert full.startswith(head), "the chat template renders turns as a prefix"
            turn = full[len(head) :]
        loaded_ms = (time.perf_counter() - started) * 1000
        try:
            generation = runtime.generate(turn, kv=compressed, max_tokens=max_tokens)
        except kv_runtime.InvalidArgument as exc:
            raise InvalidArgument(exc.message) from exc

        def finish() -> GenerationView:
            result = generation.result
            assert result is not None, "finish() after the pieces are consumed"
            if activation_id is not None:
                self._set(activation_id, last_used_at=utcnow())
            return GenerationView(
                text=result.text,
                ttft_ms=round(loaded_ms + result.ttft_ms, 3),
                prompt_tokens=result.prompt_tokens,
                reused_tokens=reused,
                activation_id=activation_id,
                finish_reason=result.finish_reason,
            )

        return GenerationStream(pieces=generation, finish=finish)
