"""Prometheus metrics of this daemon's share of the fleet's work: notes it enriched, and
whether its scheduler leads (runs the scheduled jobs)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from memos.daemon import Daemon


class FleetCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        daemon = self._daemon
        yield CounterMetricFamily(
            "memos_enrichment_notes",
            "notes this daemon enriched since it started (each note is enriched by one daemon)",
            value=daemon.enrichment.enriched,
        )
        yield GaugeMetricFamily(
            "memos_scheduler_leader",
            "1 while this daemon's scheduler leads the fleet (runs the scheduled jobs), else 0",
            value=1 if daemon.jobs.enabled and daemon.jobs.leading() else 0,
        )
