"""The local directory: `<root>/<cube_id>/<activation_id>/`, the files the runtime reads.

`root` is `<data_dir>/activations` by default (embedded, one daemon), or any directory every
daemon of a fleet mounts (`MEMOS_BLOBS__DIRECTORY`): then the local store *is* the shared one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import kv_runtime
from kv_runtime.store import MANIFEST
from memcube.atomic import write_atomic
from memos.services.blobs.base import BlobKey


class LocalDirectory:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: BlobKey) -> Path:
        return self.root / key.cube_id / key.activation_id

    def has(self, key: BlobKey) -> bool:
        return (self.path(key) / MANIFEST).is_file()

    def read(self, key: BlobKey) -> dict[str, bytes] | None:
        """The manifest and the blob it names, as they are now; None when either is missing
        (never saved, removed, or replaced between the two reads twice over)."""
        folder = self.path(key)
        for _ in range(2):  # a re-save between the manifest and its blob: read again once
            try:
                manifest = (folder / MANIFEST).read_bytes()
                blob = str(json.loads(manifest)["blob"])
                return {MANIFEST: manifest, blob: (folder / blob).read_bytes()}
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    def manifest(self, key: BlobKey) -> bytes | None:
        try:
            return (self.path(key) / MANIFEST).read_bytes()
        except OSError:
            return None

    def write(self, key: BlobKey, files: dict[str, bytes]) -> None:
        """Write fetched files the way `kv_runtime.store` does: the blob first, the manifest
        naming it last, each atomically; blobs the manifest no longer names are removed."""
        folder = self.path(key)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if name != MANIFEST:
                write_atomic(folder / name, data)
        write_atomic(folder / MANIFEST, files[MANIFEST])
        for stale in folder.glob("kv-*.safetensors"):
            if stale.name not in files:
                stale.unlink(missing_ok=True)

    def remove(self, key: BlobKey, prune_cube: bool = False) -> None:
        path = self.path(key)
        try:
            kv_runtime.delete_activation(path)
        except OSError:  # half removed by someone else, or a write still landing: all of it
            shutil.rmtree(path, ignore_errors=True)
        if prune_cube:  # fails when gone already, or another build's files are still there
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    def remove_cube(self, cube_id: str) -> None:
        shutil.rmtree(self.root / cube_id, ignore_errors=True)
