"""Redis as the fleet's shared hot tier for activation blobs (as LMCache uses Redis).

One hash per activation, `<prefix><cube_id>:<activation_id>`:

    file:<name>    the file's bytes (`manifest.json`, `kv-<blake2b>.safetensors`)
    sha256:<name>  its sha256, checked by every daemon that fetches it

written whole in one MULTI (the old hash is replaced, never merged), with a TTL refreshed on
every fetch: an activation nobody loads for `ttl_s` leaves Redis (the daemons that hold it on
disk still serve it). Redis's own `maxmemory` / eviction policy bounds the total; see
README.md "Fleet: the shared activation tier".

Redis down never stalls a request: connect and socket timeouts are `timeout_s`, redis-py's
retries are off, and after a failure the tier answers `TierDown` at once for `retry_s` before
it tries the server again (so a Redis that comes back is used again without a restart).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from memos.services.blobs.base import BlobKey, TierDown, sha256

FILE, SHA = b"file:", b"sha256:"
_MANIFEST = "manifest.json"


class RedisTier:
    def __init__(
        self,
        url: str,
        timeout_s: float,
        retry_s: float,
        ttl_s: int,
        prefix: str = "memos:act:",
    ) -> None:
        self.prefix, self.ttl_s, self.retry_s = prefix, ttl_s, retry_s
        self.client = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._down_until = 0.0
        self._lock = threading.Lock()

    def key(self, key: BlobKey) -> str:
        return f"{self.prefix}{key.cube_id}:{key.activation_id}"

    # -- the breaker ------------------------------------------------------------------------

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def _check(self) -> None:
        if self.down:
            raise TierDown("redis did not answer lately; not asked again yet")

    def _failed(self, exc: redis.RedisError) -> TierDown:
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            with self._lock:
                self._down_until = time.monotonic() + self.retry_s
        return TierDown(f"redis: {type(exc).__name__}: {exc}")

    # -- the protocol -----------------------------------------------------------------------

    def put(self, key: BlobKey, files: Mapping[str, bytes]) -> None:
        self._check()
        mapping: dict[bytes, bytes] = {}
        for name, data in files.items():
            mapping[FILE + name.encode()] = data
            mapping[SHA + name.encode()] = sha256(data).encode()
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.key(key))
            pipe.hset(self.key(key), mapping=mapping)  # type: ignore[arg-type]
            pipe.expire(self.key(key), self.ttl_s)
            pipe.execute()
        except redis.RedisError as exc:
            raise self._failed(exc) from exc

    def get(self, key: BlobKey) -> dict[str, tuple[bytes, str]] | None:
        self._check()
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self.key(key))
            pipe.expire(self.key(key), self.ttl_s)
            raw, _ = pipe.execute()
        except redis.RedisError as exc:
            raise self._failed(exc) from exc
        if not raw:
            return None
        files: dict[str, tuple[bytes, str]] = {}
        for field, value in raw.items():
            if field.startswith(FILE):
                name = field[len(FILE) :].decode()
                files[name] = (value, raw.get(SHA + field[len(FILE) :], b"").decode())
        return files

    def version(self, key: BlobKey) -> str | None:
        self._check()
        try:
            found = self.client.hget(self.key(key), SHA + _MANIFEST.encode())
        except redis.RedisError as exc:
            raise self._failed(exc) from exc
        return None if found is None else bytes(found).decode()  # type: ignore[arg-type]

    def has(self, keys: list[BlobKey]) -> list[bool]:
        self._check()
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.key(key))
            return [bool(n) for n in pipe.execute()]
        except redis.RedisError as exc:
            raise self._failed(exc) from exc

    def delete(self, key: BlobKey) -> None:
        self._check()
        try:
            self.client.delete(self.key(key))
        except redis.RedisError as exc:
            raise self._failed(exc) from exc

    def delete_cube(self, cube_id: str) -> None:
        self._check()
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", f"{self.prefix}{cube_id}:") + "*"
        try:
            batch: list[bytes] = []
            for found in self.client.scan_iter(match=pattern, count=500):
                batch.append(found)
                if len(batch) >= 500:
                    self.client.delete(*batch)
                    batch.clear()
            if batch:
                self.client.delete(*batch)
        except redis.RedisError as exc:
            raise self._failed(exc) from exc

    def ping(self) -> None:
        """Asks the server even within the back-off (the health check's probe)."""
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise self._failed(exc) from exc
        with self._lock:
            self._down_until = 0.0
