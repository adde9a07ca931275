"""The activation catalogue: one `activations` row per stored KV cache, its state and its files.

States: "building" (with `progress` 0..1), "ready", "failed" (with `error`), "corrupt" (its files
failed their checksum). The tensors live under `<directory>/<cube_id>/<activation_id>/`
(`kv_runtime.store`), kept by a `BlobStore` (`memos.services.blobs`): written through to the
fleet's shared tier when a build is marked ready or a chat prefix saved, fetched from it by
`fetch` when this daemon lacks them. A row is inserted before its files are written and
deleted before they are removed, so files without a row are always leftovers (see
`ActivationSweep`).

Each row records the daemon that builds it (`instance_id`). Several daemons on one database
fail a "building" row only once its builder is gone (`memos.services.fleet.owner_gone`): this
daemon's earlier self, or a daemon whose lease expired; never the build of a live daemon.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, delete, select, true, update
from sqlalchemy.orm import Session

from memcube.errors import NotFound
from memos.db.engine import Database
from memos.db.models import Activation
from memos.db.types import utcnow
from memos.services.blobs import BlobStore, LocalDirectory
from memos.services.fleet import other_owner_gone, owner_gone
from memos.services.views import ActivationView, EpisodeView

INTERRUPTED = "interrupted by a restart; build it again"
DELETED = "deleted while it was built"
CUBE_DELETED = "its cube was deleted while it was built"


def interrupted(owner: str | None, me: str | None) -> str:
    """Why a build no daemon will finish was failed: this daemon's restart, or its builder's
    end (another daemon whose lease expired)."""
    if owner is None or owner == me:
        return INTERRUPTED
    return f"interrupted: daemon {owner} stopped; build it again"


def activation_not_found(activation_id: str) -> NotFound:
    return NotFound(f"activation {activation_id!r} not found", code="activation_not_found")


def _episodes(row: Activation) -> tuple[EpisodeView, ...] | None:
    """An episodic activation's episodes (empty while it is built); None for a plain one."""
    episodic = (row.compression or {}).get("episodic")
    if episodic is None:
        return None
    return tuple(
        EpisodeView(e["index"], tuple(e["windows"]), e["kept_tokens"], e["bytes"])
        for e in episodic.get("built", ())
    )


def kind_of(source: dict[str, Any], compression: dict[str, Any]) -> str:
    """What an activation is, from what it was built from (no column of its own)."""
    if "note" in source:
        return "note"
    if "chat_id" in source:
        return "chat_prefix"
    if "episodic" in compression:
        return "episodic"
    return "context"


def _view(row: Activation) -> ActivationView:
    source = row.source or {}
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
        episodes=_episodes(row),
        kind=kind_of(source, row.compression or {}),
        memory_id=(source.get("note") or {}).get("memory_id"),
        scorer=_scorer(row.compression or {}),
    )


def _scorer(compression: dict[str, Any]) -> str | None:
    """The scorer that chose a budgeted activation's kept tokens (an episodic one's: what its
    episodes were built with, `prompt` before that was recorded); None when nothing was
    evicted by design."""
    if "episodic" in compression:
        return str(compression["episodic"].get("scorer", "prompt"))
    if compression.get("budget_tokens") is None:
        return None
    return str(compression.get("scorer", "snapkv"))


class Catalogue:
    """Rows and file locations; every method is one short transaction."""

    def __init__(
        self,
        db: Database,
        directory: Path,
        blobs: BlobStore | None = None,
        instance_id: str | None = None,
    ) -> None:
        """`instance_id`: this daemon's, recorded as the builder of the rows it inserts
        (None: alone on its database, every "building" row at start is its own)."""
        self.db = db
        self.directory = directory
        self.blobs = blobs or BlobStore(LocalDirectory(directory))
        assert self.blobs.root == directory, "the catalogue and its blob store share a root"
        self.instance_id = instance_id
        # Counts loads in memory (memos/services/lifecycle/usage.py); set by the daemon.
        self.on_load: Callable[[str], None] = lambda activation_id: None
        self._inline: dict[str, int] = {}  # see `building_inline`: id -> requests in it
        self._inline_lock = threading.Lock()

    @contextmanager
    def building_inline(self, activation_id: str) -> Iterator[None]:
        """Mark a build that runs in a request's own thread, not in the build queue (a note's
        KV chunk, a chat prefix saved), as in flight while the block runs, so the orphan sweep
        leaves its "building" row and its files alone. Enter it before inserting the row: the
        sweep reads the rows before it takes the in-flight ids."""
        with self._inline_lock:
            self._inline[activation_id] = self._inline.get(activation_id, 0) + 1
        try:
            yield
        finally:
            with self._inline_lock:
                left = self._inline.pop(activation_id) - 1
                if left:
                    self._inline[activation_id] = left

    def building_here(self) -> set[str]:
        """Ids of the inline builds in flight in this process (`building_inline`)."""
        with self._inline_lock:
            return set(self._inline)

    def path(self, cube_id: str, activation_id: str) -> Path:
        """Where this daemon writes the activation's files."""
        return self.directory / cube_id / activation_id

    def fetch(self, cube_id: str, activation_id: str) -> Path:
        """Where this daemon reads them: fetched from the shared tier first when it lacks
        them. Raises `BlobUnavailable` (503) when it cannot reach them, `ActivationCorrupt`
        when the fetched bytes fail their sha256."""
        return self.blobs.fetch(cube_id, activation_id)

    # -- reads ------------------------------------------------------------------------------

    @staticmethod
    def _row(s: Session, cube_id: str, activation_id: str) -> Activation:
        row = s.get(Activation, activation_id)
        if row is None or row.cube_id != cube_id:
            raise activation_not_found(activation_id)
        return row

    def view(self, cube_id: str, activation_id: str) -> ActivationView:
        with self.db.read() as s:
            return _view(self._row(s, cube_id, activation_id))

    def cube_of(self, activation_id: str) -> str:
        """The cube an activation belongs to (the caller checks the caller may see it)."""
        with self.db.read() as s:
            row = s.get(Activation, activation_id)
            if row is None:
                raise activation_not_found(activation_id)
            return str(row.cube_id)

    def exists(self, activation_id: str) -> bool:
        with self.db.read() as s:
            return s.get(Activation, activation_id) is not None

    def views(self, cube_id: str) -> list[ActivationView]:
        with self.db.read() as s:
            rows = s.scalars(
                select(Activation)
                .where(Activation.cube_id == cube_id)
                .order_by(Activation.created_at, Activation.id)
            )
            return [_view(row) for row in rows]

    # -- writes -----------------------------------------------------------------------------

    def insert(self, row: Activation) -> ActivationView:
        if row.instance_id is None:
            row.instance_id = self.instance_id
        with self.db.write() as s:
            s.add(row)
        return _view(row)

    def delete(self, cube_id: str, activation_id: str) -> None:
        """The row only; the caller cancels its build and removes its files afterwards."""
        with self.db.write() as s:
            self._row(s, cube_id, activation_id)
            s.execute(delete(Activation).where(Activation.id == activation_id))

    def delete_if_exists(self, activation_id: str) -> None:
        with self.db.write() as s:
            s.execute(delete(Activation).where(Activation.id == activation_id))

    def _update(self, activation_id: str, *where: Any, **values: Any) -> bool:
        """Set `values` on the row if it exists (and matches `where`); whether it did."""
        with self.db.write() as s:
            result = s.execute(
                update(Activation).where(Activation.id == activation_id, *where).values(**values)
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def set_progress(self, activation_id: str, progress: float) -> None:
        self._update(activation_id, Activation.state == "building", progress=progress)

    def mark_ready(
        self,
        activation_id: str,
        kept_tokens: int,
        size: int,
        compression: dict[str, Any] | None = None,
    ) -> bool:
        """Building -> ready (with `compression`: what the build recorded of how, e.g. its
        episodes). False when the row is gone (deleted while it was built)."""
        building = Activation.state == "building"
        values: dict[str, Any] = {
            "state": "ready", "progress": 1.0, "kept_tokens": kept_tokens, "bytes": size
        }  # fmt: skip
        if compression is not None:
            values["compression"] = compression
        self._publish(activation_id)  # before the row says ready: other daemons may read it
        return self._update(activation_id, building, **values)

    def mark_saved(self, activation_id: str, tokens: int, kept_tokens: int, size: int) -> bool:
        """Its files were (re)written whole (a chat prefix saved again): ready, these sizes."""
        values = {"tokens": tokens, "kept_tokens": kept_tokens, "bytes": size}
        self._publish(activation_id)
        return self._update(activation_id, state="ready", progress=1.0, error=None, **values)

    def _publish(self, activation_id: str) -> None:
        """Write the activation's saved files through to the shared tier (if any)."""
        if self.blobs.shared is None:
            return
        with self.db.read() as s:
            cube_id = s.scalar(select(Activation.cube_id).where(Activation.id == activation_id))
        if cube_id is not None:
            self.blobs.publish(str(cube_id), activation_id)

    def mark_failed(self, activation_id: str, error: str) -> None:
        self._update(activation_id, Activation.state == "building", state="failed", error=error)

    def mark_corrupt(self, activation_id: str, error: str) -> None:
        self._update(activation_id, state="corrupt", error=error)

    def touch(self, activation_id: str) -> None:
        """It served a generation or a chat: one more use, now."""
        self._update(activation_id, last_used_at=utcnow(), uses=Activation.uses + 1)

    def loaded(self, activation_id: str) -> None:
        """Its files were read from disk: counted in memory, written by the usage flush."""
        self.on_load(activation_id)

    def gone(self) -> ColumnElement[bool]:
        """SQL: the row's builder is gone (see `owner_gone`); all are, for a lone daemon."""
        if self.instance_id is None:
            return true()
        return owner_gone(Activation.instance_id, self.instance_id)

    def recover(self) -> list[tuple[str, str]]:
        """Builds no thread will finish (a restart or shutdown cut them, or their daemon is
        gone) are failed; their (cube id, activation id), whose partial files the caller
        removes. The builds of live daemons are left alone."""
        return self._fail_building(self.gone())

    def fail_orphans(self) -> list[tuple[str, str]]:
        """The builds of other daemons whose lease expired, failed (a live daemon's periodic
        take-over; its own builds are in flight)."""
        if self.instance_id is None:
            return []
        return self._fail_building(other_owner_gone(Activation.instance_id, self.instance_id))

    def _fail_building(self, gone: ColumnElement[bool]) -> list[tuple[str, str]]:
        building = Activation.state == "building"
        with self.db.read() as s:  # mostly none: no write transaction then (SQLite: a lock)
            if s.execute(select(Activation.id).where(building, gone).limit(1)).first() is None:
                return []
        with self.db.write() as s:
            cut = s.execute(
                select(Activation.cube_id, Activation.id, Activation.instance_id).where(
                    building, gone
                )
            ).all()
            for _, activation_id, owner in cut:
                s.execute(
                    update(Activation)
                    .where(Activation.id == activation_id, building)
                    .values(state="failed", error=interrupted(owner, self.instance_id))
                )
        return [(cube_id, activation_id) for cube_id, activation_id, _ in cut]

    # -- files ------------------------------------------------------------------------------

    def republish(self) -> int:
        """Ready activations this disk holds and the shared tier lost (a Redis restarted
        empty, an expired TTL) are written back to it; how many."""
        if self.blobs.shared is None:
            return 0
        with self.db.read() as s:
            ready = s.execute(
                select(Activation.cube_id, Activation.id).where(Activation.state == "ready")
            ).all()
        return self.blobs.republish([(str(c), str(a)) for c, a in ready])

    def remove_files(self, cube_id: str, activation_id: str, prune_cube: bool = False) -> None:
        """Remove an activation's files (the manifest first), whatever is left of them, here
        and in the shared tier, and with `prune_cube` (its cube is gone) the cube's folder if
        that leaves it empty."""
        self.blobs.remove(cube_id, activation_id, prune_cube)

    def remove_cube_files(self, cube_id: str) -> None:
        self.blobs.remove_cube(cube_id)
