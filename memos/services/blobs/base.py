"""The blob store's seams: what an activation's files are, and how a shared tier is reached.

An activation is a handful of files (`kv_runtime.store`: `manifest.json` and one
`kv-<blake2b>.safetensors`), written and read by the runtime in a local directory. A
`SharedTier` keeps a copy of each activation's files where every daemon of a fleet can reach
them (Redis); a daemon that lacks an activation's files fetches them into its own directory
before loading. Each file travels with its sha256, checked on every fetch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from memcube.errors import Unavailable

Health = Literal["ok", "down", "off"]


@dataclass(frozen=True)
class BlobKey:
    cube_id: str
    activation_id: str


class BlobUnavailable(Unavailable):
    """An activation's files cannot be reached from this daemon now (not on its disk, and the
    shared tier is down or lacks them). Not corruption: nothing is marked; retry later."""

    code = "activation_unavailable"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SharedTier(Protocol):
    """Where every daemon of a fleet finds an activation's files. Each call either answers
    or raises `TierDown` within the tier's timeout."""

    def put(self, key: BlobKey, files: Mapping[str, bytes]) -> None:
        """Replace the activation's files (all or nothing), each with its sha256."""

    def get(self, key: BlobKey) -> dict[str, tuple[bytes, str]] | None:
        """file name -> (bytes, sha256 stored with them); None when it has none."""

    def version(self, key: BlobKey) -> str | None:
        """The sha256 of the activation's manifest there; None when it has none."""

    def has(self, keys: list[BlobKey]) -> list[bool]: ...

    def delete(self, key: BlobKey) -> None: ...

    def delete_cube(self, cube_id: str) -> None: ...

    def ping(self) -> None: ...


class TierDown(Exception):
    """The shared tier did not answer (refused, timed out, or within its back-off)."""
