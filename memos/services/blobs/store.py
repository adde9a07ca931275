"""`BlobStore`: an activation's files on this daemon's disk, written through to a shared tier.

- `publish` after the runtime saved an activation: its files go to the shared tier (when one
  is configured and they fit `max_bytes`). A publish Redis refused is remembered (at most
  `MAX_PENDING`) and replayed on a thread of its own once Redis answers again.
- `fetch` before the runtime loads one: the local folder when it holds the files (and, with a
  shared tier, the same manifest as there: a re-quantized activation is fetched again), else
  the shared tier's copy, each file checked against its sha256 and written locally the way
  `kv_runtime.store` writes. A checksum that fails raises `ActivationCorrupt` (the caller
  marks the row corrupt); files this daemon cannot reach raise `BlobUnavailable` (503, the
  row untouched).
- `remove` / `remove_cube`: locally and in the shared tier (a delete Redis refused is
  remembered and retried like a publish).
- `gone`: whether the store may say an activation's files are lost for good (the orphan
  sweep fails such rows): only when no other daemon of the fleet is alive (their disks may
  hold it) and the shared tier, if any, answers that it has none.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import kv_runtime
from kv_runtime.store import MANIFEST
from memos.services.blobs.base import BlobKey, BlobUnavailable, Health, SharedTier, TierDown
from memos.services.blobs.base import sha256 as digest
from memos.services.blobs.local import LocalDirectory

log = logging.getLogger("memos.blobs")
MAX_PENDING = 1024  # publishes and deletes waiting for Redis to come back
REPUBLISH_MAX = 256  # activations one sweep writes back to a shared tier that lost them


class BlobStore:
    def __init__(
        self,
        local: LocalDirectory,
        shared: SharedTier | None = None,
        alone: Callable[[], bool] = lambda: True,
        max_bytes: int = 64 << 20,
        retry_after_s: float = 5.0,
    ) -> None:
        self.local, self.shared, self.alone = local, shared, alone
        self.max_bytes, self.retry_after_s = max_bytes, retry_after_s
        # (cube, activation) -> "put" | "delete": what the shared tier missed while down
        self._pending: OrderedDict[BlobKey, str] = OrderedDict()
        self._lock = threading.Lock()
        self._fetching = threading.Lock()  # one fetch writes a folder at a time
        self._flushing = threading.Lock()  # held by the one thread replaying `_pending`
        self.published = self.fetched = self.skipped = 0

    @property
    def root(self) -> Path:
        return self.local.root

    def path(self, cube_id: str, activation_id: str) -> Path:
        return self.local.path(BlobKey(cube_id, activation_id))

    # -- write-through ----------------------------------------------------------------------

    def publish(self, cube_id: str, activation_id: str) -> None:
        """Copy the activation's local files to the shared tier (never raises for the tier)."""
        if self.shared is None:
            return
        key = BlobKey(cube_id, activation_id)
        files = self.local.read(key)
        if files is None:
            return  # removed meanwhile
        size = sum(len(b) for b in files.values())
        if size > self.max_bytes:
            self.skipped += 1
            log.info(
                "activation not written to redis: larger than blobs.redis_max_bytes",
                extra={"fields": {"activation_id": activation_id, "bytes": size}},
            )
            return
        try:
            self.shared.put(key, files)
        except TierDown as exc:
            self._remember(key, "put")
            log.warning("activation not written to redis: %s", exc)
            return
        self.published += 1
        self._forget(key)
        self._flush_soon()

    def fetch(self, cube_id: str, activation_id: str) -> Path:
        """The local folder holding the activation's files, fetched first when needed."""
        key = BlobKey(cube_id, activation_id)
        local = self.local.manifest(key)
        if self.shared is None:
            if local is None:
                raise self._unavailable(activation_id, "its files are not on this daemon's disk")
            return self.local.path(key)
        if local is not None:
            if self._waiting(key):  # this disk is newer than what redis missed of it
                return self.local.path(key)
            try:
                there = self.shared.version(key)
            except TierDown:
                return self.local.path(key)  # Redis down: what this disk holds is served
            if there is None or there == digest(local):
                return self.local.path(key)
        with self._fetching:
            try:
                found = self.shared.get(key)
            except TierDown as exc:
                raise self._unavailable(activation_id, f"redis is down ({exc})") from exc
            if found is None:
                if local is not None:  # dropped from redis meanwhile: the local copy stands
                    return self.local.path(key)
                raise self._unavailable(
                    activation_id, "its files are neither on this daemon's disk nor in redis"
                )
            files = self._checked(activation_id, found)
            self.local.write(key, files)
            self.fetched += 1
        return self.local.path(key)

    @staticmethod
    def _checked(activation_id: str, found: dict[str, tuple[bytes, str]]) -> dict[str, bytes]:
        if MANIFEST not in found:
            raise kv_runtime.ActivationCorrupt(
                f"activation {activation_id!r} in redis has no {MANIFEST}"
            )
        for name, (data, claimed) in found.items():
            if digest(data) != claimed:
                raise kv_runtime.ActivationCorrupt(
                    f"activation {activation_id!r}: {name} in redis does not match its sha256"
                )
        return {name: data for name, (data, _) in found.items()}

    def _unavailable(self, activation_id: str, why: str) -> BlobUnavailable:
        return BlobUnavailable(
            f"activation {activation_id!r} cannot be read from this daemon now: {why}; "
            "try again later",
            retry_after=self.retry_after_s,
        )

    # -- removal ----------------------------------------------------------------------------

    def remove(self, cube_id: str, activation_id: str, prune_cube: bool = False) -> None:
        key = BlobKey(cube_id, activation_id)
        self.local.remove(key, prune_cube)
        if self.shared is not None:
            try:
                self.shared.delete(key)
                self._forget(key)
            except TierDown:
                self._remember(key, "delete")

    def remove_cube(self, cube_id: str) -> None:
        self.local.remove_cube(cube_id)
        if self.shared is not None:
            try:
                self.shared.delete_cube(cube_id)
            except TierDown as exc:  # its rows are gone: the TTL ends what is left
                log.warning("a deleted cube's activations stay in redis until their TTL: %s", exc)

    # -- what the sweep and /healthz ask ----------------------------------------------------

    def gone(self, cube_id: str, activation_id: str) -> bool:
        """The files are lost for good (see the module docstring)."""
        key = BlobKey(cube_id, activation_id)
        if self.local.has(key) or not self.alone():
            return False
        if self.shared is None:
            return True
        try:
            return not self.shared.has([key])[0]
        except TierDown:
            return False

    def republish(self, ready: list[tuple[str, str]], limit: int = REPUBLISH_MAX) -> int:
        """Publish the activations of `ready` (cube id, activation id) this disk holds and the
        shared tier lacks (a Redis restarted empty, an expired TTL), at most `limit`; how many.
        Never raises for the tier."""
        if self.shared is None:
            return 0
        here = [BlobKey(c, a) for c, a in ready if self.local.has(BlobKey(c, a))]
        done = 0
        for start in range(0, len(here), 500):
            batch = here[start : start + 500]
            try:
                present = self.shared.has(batch)
            except TierDown:
                return done
            for key, there in zip(batch, present, strict=True):
                if not there and done < limit:
                    self.publish(key.cube_id, key.activation_id)
                    done += 1
        if done:
            log.info("activations written back to redis", extra={"fields": {"count": done}})
        return done

    def health(self) -> Health:
        if self.shared is None:
            return "off"
        if getattr(self.shared, "down", False):
            return "down"
        try:
            self.shared.ping()
        except TierDown:
            return "down"
        self._flush_soon()
        return "ok"

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _flush_soon(self) -> None:
        """`flush` on a thread of its own (one at a time), so no request waits on it."""
        if not self.pending() or not self._flushing.acquire(blocking=False):
            return

        def run() -> None:
            try:
                self.flush()
            finally:
                self._flushing.release()

        threading.Thread(target=run, name="memos-blobs-flush", daemon=True).start()

    def flush(self) -> None:
        """Retry what the shared tier missed while it was down (oldest first)."""
        if self.shared is None:
            return
        while True:
            with self._lock:
                if not self._pending:
                    return
                key, what = next(iter(self._pending.items()))
            try:
                if what == "delete":
                    self.shared.delete(key)
                else:
                    files = self.local.read(key)
                    if files is not None and sum(map(len, files.values())) <= self.max_bytes:
                        self.shared.put(key, files)
            except TierDown:
                return
            with self._lock:
                if self._pending.get(key) == what:
                    del self._pending[key]

    def _remember(self, key: BlobKey, what: str) -> None:
        with self._lock:
            self._pending.pop(key, None)
            self._pending[key] = what
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)

    def _waiting(self, key: BlobKey) -> bool:
        with self._lock:
            return self._pending.get(key) == "put"

    def _forget(self, key: BlobKey) -> None:
        with self._lock:
            self._pending.pop(key, None)
