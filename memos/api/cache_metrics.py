"""Prometheus gauges of the daemon's other byte-bounded caches: loaded cube indexes and loaded
chat prefixes (the activation caches are in `activation_metrics`). With those, a rise in RSS can
be told apart from caches filling up to their budgets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from memos.daemon import Daemon


class CacheCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[GaugeMetricFamily]:
        daemon = self._daemon
        yield GaugeMetricFamily(
            "memos_indexes_loaded_bytes",
            "footprint of the loaded cube indexes (budget MEMOS_INDEXES__MAX_LOADED_BYTES)",
            value=daemon.indexes.loaded_bytes(),
        )
        yield GaugeMetricFamily(
            "memos_chat_prefixes_bytes",
            "KV of the chat prefixes kept loaded (budget MEMOS_CHATS__PREFIX_CACHE_BYTES)",
            value=daemon.chats.loaded.bytes,
        )
