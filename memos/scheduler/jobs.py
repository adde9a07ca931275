"""The jobs memosd runs: each a name, an interval and one call into the system service.

In a fleet (several daemons on one database) the scheduler's leader runs each job's ticks,
except for the `local` ones, about what each daemon holds in memory, which every daemon runs.
Jobs act as the daemon itself (memos/services/system.py), never as a user; the runner records
each run's result, the report the service returned, as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from memos.scheduler.runner import JobSpec
from memos.services.system import SystemService
from memos.settings import SchedulerConfig


def index_maintenance(system: SystemService) -> dict[str, Any]:
    """Indexes verified and healed, then activation files without rows removed and rows
    without files failed."""
    return {**asdict(system.maintain_indexes()), "activations": system.sweep_activations()}


def enrichment_retry(system: SystemService) -> dict[str, Any]:
    report = system.retry_enrichment()
    if report is None:
        return {"skipped": "enrichment is disabled (enrichment.enabled=false)"}
    return asdict(report)


def usage_flush(system: SystemService) -> dict[str, Any]:
    return asdict(system.flush_usage())


def evict(system: SystemService) -> dict[str, Any]:
    return system.evict().as_dict()


def fuse(system: SystemService) -> dict[str, Any]:
    return system.fuse().as_dict()


def migrate(system: SystemService) -> dict[str, Any]:
    return system.migrate().as_dict()


def unload_idle(system: SystemService) -> dict[str, Any]:
    report = system.unload_idle()
    return {"counts": report.counts, "unloaded_bytes": report.unloaded_bytes,
            "moved": report.moved, "took_ms": report.took_ms}  # fmt: skip


def job_specs(system: SystemService, config: SchedulerConfig) -> list[JobSpec]:
    """Every job, on its interval or on the crontab `config.cron` gives it."""
    specs = _specs(system, config)
    unknown = sorted(set(config.cron) - {spec.name for spec in specs})
    if unknown:
        raise ValueError(
            f"scheduler.cron names no such job: {unknown}; jobs: {sorted(s.name for s in specs)}"
        )
    return [replace(spec, cron=config.cron.get(spec.name)) for spec in specs]


def _specs(system: SystemService, config: SchedulerConfig) -> list[JobSpec]:
    return [
        JobSpec(
            name="index_maintenance",
            description="verify each cube's vector index against the database; "
            "replay, rebuild and save what drifted; sweep activation files without rows and "
            "fail rows without files",
            interval_s=config.index_maintenance_interval_s,
            run=lambda: index_maintenance(system),
            local=True,  # the indexes this daemon loaded, the activation files on its disk
        ),
        JobSpec(
            name="chat_prefix_save",
            description="save to disk the KV prefixes of chats idle for chats.save_idle_s "
            "that changed since they were last saved, so a restart does not prefill them again",
            interval_s=config.chat_prefix_save_interval_s,
            run=system.save_chat_prefixes,
            local=True,  # the chats this daemon holds
        ),
        JobSpec(
            name="enrichment_retry",
            description="enrich again the notes whose enrichment failed, once their backoff "
            "is over; park them as failed after the last attempt",
            interval_s=config.enrichment_retry_interval_s,
            run=lambda: enrichment_retry(system),
        ),
        JobSpec(
            name="usage_flush",
            description="write the recall counts of notes and the load counts of activations "
            "gathered in memory since the last flush (searches never write)",
            interval_s=config.usage_flush_interval_s,
            run=lambda: usage_flush(system),
            local=True,  # the counts this daemon gathered
        ),
        JobSpec(
            name="unload_idle",
            description="drop the loaded and dequantized activation caches unused in this "
            "daemon's RAM for lifecycle.unload_idle_s (their files stay)",
            interval_s=config.unload_idle_interval_s,
            run=lambda: unload_idle(system),
            local=True,  # the caches this daemon holds (migrate unloads only the leader's)
        ),
        JobSpec(
            name="evict",
            description="soft-delete notes past their cube's memory_ttl_days; erase for good "
            "notes deleted longer ago than deleted_retention_days; sweep activation files "
            "without rows; keep each cube's activations within activation_bytes_max and all "
            "within lifecycle.activation_disk_bytes, by the eviction policy",
            interval_s=config.evict_interval_s,
            run=lambda: evict(system),
            run_cube=lambda cube_id: system.evict(cube_id).as_dict(),
        ),
        JobSpec(
            name="fuse",
            description="merge near-duplicate notes (duplicate links; same speaker above the "
            "fuse threshold) into their earliest note, in cubes whose policy enables fuse",
            interval_s=config.fuse_interval_s,
            run=lambda: fuse(system),
            run_cube=lambda cube_id: system.fuse(cube_id).as_dict(),
        ),
        JobSpec(
            name="migrate",
            description="demote activations unused for demote_after_days one step (16 -> 8 "
            "-> 4 -> 2 bits, then drop; dropped at once when loading them costs more than "
            "prefilling their text again); promote sessions recalled hot_recalls times to an "
            "activation (episodic when long), built in the background; unload caches idle in "
            "RAM for lifecycle.unload_idle_s",
            interval_s=config.migrate_interval_s,
            run=lambda: migrate(system),
            run_cube=lambda cube_id: system.migrate(cube_id).as_dict(),
        ),
    ]
