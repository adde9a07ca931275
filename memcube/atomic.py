"""Atomic file writes: every file the daemon writes goes through here.

A write goes to a unique temporary sibling, is fsynced, renamed over the target, and the
directory is fsynced, so after a crash (even `kill -9` or a power cut) the target holds either
its old bytes or its new ones, never a mix, and the rename itself is durable.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_path(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (for writers that take a file
    name: hnswlib, safetensors, ONNX export). On a clean exit it is fsynced and renamed over
    `path`; on an exception it is removed and `path` keeps its old content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace `path`'s content with `data` atomically and durably (`mode`: its permissions,
    set before the rename, so the file is never readable with looser ones)."""
    with atomic_path(path, 0o644 if mode is None else mode) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under `root` (0 if it does not exist).

    Atomic writes rename temporary files over their targets and remove them on failure, and a
    deleted activation takes its whole directory; any of that can happen between the listing
    and a file's stat. A file gone by then is skipped (`os.walk` already skips a directory gone
    before it is listed): the total is what was there, file by file, while it was counted.
    """
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            try:
                info = os.stat(os.path.join(directory, name), follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total
