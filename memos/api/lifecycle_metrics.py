"""Prometheus families of the lifecycle: bytes held, evictions, expiries, purges, fusions,
migrations (promotions, demotions, drops, unloads) and job durations, read from the services'
counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from memos.scheduler.runner import JobRunner
from memos.services.lifecycle import Evictor, Fuser, Migrator


class LifecycleCollector(Collector):
    def __init__(
        self, evictor: Evictor, fuser: Fuser, jobs: JobRunner, migrator: Migrator | None = None
    ) -> None:
        self.evictor, self.fuser, self.jobs = evictor, fuser, jobs
        self.migrator = migrator

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        evicted, fused = self.evictor.totals, self.fuser.totals
        yield GaugeMetricFamily(
            "memos_activation_disk_bytes",
            "bytes of stored activations on disk (ready or corrupt)",
            value=self.evictor.held_bytes(),
        )
        for name, help_text, value in [
            ("memos_lifecycle_evictions", "activations evicted by a budget", evicted["evicted"]),
            ("memos_lifecycle_evicted_bytes", "bytes of evicted activations",
             evicted["evicted_bytes"]),
            ("memos_lifecycle_expired_notes", "notes soft-deleted past their TTL",
             evicted["expired"]),
            ("memos_lifecycle_purged_notes", "deleted notes erased past retention",
             evicted["purged"]),
            ("memos_lifecycle_fusions", "groups of near-duplicate notes fused", fused["groups"]),
            ("memos_lifecycle_fused_notes", "notes fused into a survivor", fused["notes"]),
        ]:  # fmt: skip
            yield CounterMetricFamily(name, help_text, value=value)
        if self.migrator is not None:
            moved = CounterMetricFamily(
                "memos_lifecycle_migrations",
                "items the migrate job moved, by action (promoted, demoted, dropped, ...)",
                labels=["action"],
            )
            for action, count in sorted(self.migrator.totals.items()):
                moved.add_metric([action], count)
            yield moved
        runs = CounterMetricFamily("memos_job_runs", "job runs since start", labels=["job"])
        seconds = CounterMetricFamily(
            "memos_job_duration_seconds", "seconds job runs took in all", labels=["job"]
        )
        for name, (count, total) in sorted(self.jobs.durations().items()):
            runs.add_metric([name], count)
            seconds.add_metric([name], total)
        yield runs
        yield seconds
