"""Prometheus families of the activation service, read from its counters at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from memos.services.activations import ActivationStats


class ActivationCollector(Collector):
    def __init__(self, stats: Callable[[], ActivationStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        gen, builds = stats.generations, stats.builds
        yield GaugeMetricFamily(
            "memos_generations_active", "generations decoding now", value=gen.active
        )
        yield GaugeMetricFamily(
            "memos_generations_waiting", "generations waiting for a slot", value=gen.waiting
        )
        yield GaugeMetricFamily(
            "memos_generations_cancelling",
            "generations whose client left, stopping at their next token",
            value=stats.generations_cancelling,
        )
        yield GaugeMetricFamily(
            "memos_generation_cache_bytes",
            "full-precision cache bytes reserved by running generations",
            value=gen.kv_bytes,
        )
        finished = CounterMetricFamily(
            "memos_generations", "generations ended, by finish reason", labels=["finish_reason"]
        )
        for reason, count in sorted(stats.generations_finished.items()):
            finished.add_metric([reason], count)
        yield finished
        refused = CounterMetricFamily(
            "memos_generations_refused", "generations refused admission (429)", labels=["reason"]
        )
        for reason, count in sorted(gen.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily(
            "memos_activation_builds_queued", "activation builds waiting", value=builds.queued
        )
        yield GaugeMetricFamily(
            "memos_activation_builds_running", "activation builds running", value=builds.running
        )
        ended = CounterMetricFamily(
            "memos_activation_builds", "activation builds ended, by outcome", labels=["outcome"]
        )
        for outcome, count in sorted(builds.finished.items()):
            ended.add_metric([outcome], count)
        yield ended
        yield CounterMetricFamily(
            "memos_activation_builds_deferred",
            "short builds run in the background because the model was busy",
            value=stats.builds_deferred,
        )
        if stats.backlog_s is not None:
            yield GaugeMetricFamily(
                "memos_model_backlog_seconds",
                "estimated model time ahead of a new generation (the admission estimate)",
                value=stats.backlog_s,
            )
        if stats.speed is not None:
            speed = GaugeMetricFamily(
                "memos_model_tokens_per_second",
                "the model's measured speed (moving average), by kind of pass",
                labels=["kind"],
            )
            speed.add_metric(["prefill"], stats.speed.prefill_tokens_per_s)
            speed.add_metric(["decode"], stats.speed.decode_tokens_per_s)
            yield speed
        yield GaugeMetricFamily(
            "memos_loaded_activations_bytes",
            "bytes of the activations kept loaded in memory",
            value=stats.loaded_bytes,
        )
        yield GaugeMetricFamily(
            "memos_dequantized_activations_bytes",
            "bytes of the activations kept dequantized, ready for the model",
            value=stats.dequantized_bytes,
        )
