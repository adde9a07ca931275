"""The daemon acting on its own behalf: the work scheduler jobs do, with no user behind it.

Routes act for a caller: a `Principal`, checked against the cube's owner and grants. The
daemon's own work (verifying indexes, retrying failed enrichments, later lifecycle jobs) spans
every cube and answers to no user, so it goes through this service, whose methods take no
principal at all. A job never builds a fake principal to pass a user's access check; a new job
adds a method here over the same services and row helpers the routes use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from memcube.errors import NotFound
from memos.db.engine import Database
from memos.db.models import Cube
from memos.services.cubes import cube_not_found
from memos.services.enrichment import EnrichmentService, RetryReport
from memos.services.indexes import IndexRegistry
from memos.services.lifecycle import (
    Evictor,
    EvictReport,
    FlushReport,
    Fuser,
    FuseReport,
    MigrateReport,
    Migrator,
    UsageCounter,
)


@dataclass(frozen=True)
class MaintenanceReport:
    cubes: int  # cubes in the database
    actions: dict[str, int] = field(default_factory=dict)  # e.g. {"clean": 3, "healed": 1}


class SystemService:
    def __init__(
        self,
        db: Database,
        indexes: IndexRegistry,
        enrichment: EnrichmentService,
        enrichment_enabled: bool,
        sweep_activations: Callable[[], Any],
        save_chat_prefixes: Callable[[], dict[str, int]] = dict,
        usage: UsageCounter | None = None,
        evictor: Evictor | None = None,
        fuser: Fuser | None = None,
        migrator: Migrator | None = None,
    ) -> None:
        self.db = db
        self.indexes = indexes
        self.enrichment = enrichment
        self.enrichment_enabled = enrichment_enabled
        self.sweep_activations = sweep_activations  # files without rows, rows without files
        self.save_chat_prefixes = save_chat_prefixes  # idle, changed chat prefixes to disk
        self.usage = usage
        self.evictor = evictor
        self.fuser = fuser
        self.migrator = migrator

    def maintain_indexes(self) -> MaintenanceReport:
        """Verify every cube's ANN index against the database; replay, rebuild and save what
        drifted. Loaded cubes are checked in memory (ids, a sample of vectors, generation);
        cubes not loaded are healed if their saved index lags the database."""
        with self.db.read() as s:
            cube_ids = list(s.scalars(select(Cube.id)))
        actions: Counter[str] = Counter()
        loaded = set(self.indexes.loaded())
        for cube_id in cube_ids:
            if cube_id in loaded:
                try:
                    actions[self.indexes.maintain(cube_id).action] += 1
                except NotFound:
                    actions["deleted"] += 1  # deleted while the job ran
        for report in self.indexes.heal_all():
            actions[report.action] += 1
        return MaintenanceReport(cubes=len(cube_ids), actions=dict(actions))

    def retry_enrichment(self, now: datetime | None = None) -> RetryReport | None:
        """Enrich again the notes whose retry is due; None when enrichment is disabled (notes
        then wait, as pending ones do, for a daemon that enriches)."""
        if not self.enrichment_enabled:
            return None
        return self.enrichment.retry_due(now)

    # -- lifecycle (memos/services/lifecycle/) ----------------------------------------------

    def require_cube(self, cube_id: str) -> None:
        """404 `cube_not_found` unless the cube exists (a job asked to run on one cube)."""
        with self.db.read() as s:
            if s.get(Cube, cube_id) is None:
                raise cube_not_found(cube_id)

    def flush_usage(self) -> FlushReport:
        """Write the recall and load counts gathered since the last flush."""
        assert self.usage is not None, "the daemon wires the usage counter"
        return self.usage.flush()

    def evict(self, cube_id: str | None = None) -> EvictReport:
        """TTL expiry, retention purge, orphan sweep, activation byte budgets."""
        assert self.evictor is not None, "the daemon wires the evictor"
        return self.evictor.run(cube_id)

    def fuse(self, cube_id: str | None = None) -> FuseReport:
        """Near-duplicate notes merged, in cubes whose policy enables it."""
        assert self.fuser is not None, "the daemon wires the fuser"
        return self.fuser.run(cube_id)

    def migrate(self, cube_id: str | None = None) -> MigrateReport:
        """Cold activations demoted a step (or dropped), hot sessions promoted, idle caches
        unloaded from RAM."""
        assert self.migrator is not None, "the daemon wires the migrator"
        return self.migrator.run(cube_id)

    def unload_idle(self) -> MigrateReport:
        """This daemon's loaded and dequantized caches idle in RAM dropped."""
        assert self.migrator is not None, "the daemon wires the migrator"
        return self.migrator.unload_idle()
