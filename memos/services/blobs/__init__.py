"""The blob store of activation files: a local directory (default; or a directory every daemon
mounts), written through to a shared tier (Redis, when `MEMOS_REDIS_URL` is set).

base        the seams: `BlobKey`, `SharedTier`, `BlobUnavailable`
local       the local directory the runtime reads
redis_tier  Redis: one hash per activation, sha256 per file, TTL, short timeouts, back-off
store       `BlobStore`: publish, fetch (checked), remove, gone, health
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from memos.services.blobs.base import BlobKey, BlobUnavailable, Health, SharedTier, TierDown
from memos.services.blobs.local import LocalDirectory
from memos.services.blobs.redis_tier import RedisTier
from memos.services.blobs.store import BlobStore
from memos.settings import BlobsConfig


def make_blob_store(
    root: Path,
    redis_url: str | None,
    config: BlobsConfig,
    alone: Callable[[], bool] = lambda: True,
) -> BlobStore:
    """The daemon's store: `root` on disk, Redis written through when `redis_url` is set."""
    shared = None
    if redis_url:
        shared = RedisTier(
            redis_url, config.redis_timeout_s, config.redis_retry_s, config.redis_ttl_s
        )
    return BlobStore(
        LocalDirectory(root), shared, alone, config.redis_max_bytes, config.retry_after_s
    )


__all__ = [
    "BlobKey",
    "BlobStore",
    "BlobUnavailable",
    "Health",
    "LocalDirectory",
    "RedisTier",
    "SharedTier",
    "TierDown",
    "make_blob_store",
]
