"""The daemon: builds every subsystem from `Settings`, starts and stops them in order."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memcube.atomic import tree_bytes
from memcube.embedder import Embedder
from memcube.enrichment import make_enricher
from memos.db.engine import Database
from memos.db.migrate import upgrade
from memos.scheduler import jobs
from memos.scheduler.runner import JobRunner
from memos.services.activations import ActivationService
from memos.services.auth import AuthService
from memos.services.blobs import make_blob_store
from memos.services.chats import ChatService
from memos.services.chats.turnlock import TurnLocks
from memos.services.completions import CompletionLimits, CompletionService
from memos.services.cubes import CubeService
from memos.services.enrichment import EnrichmentService, EnrichmentWorker
from memos.services.enrichment_claims import Claims
from memos.services.erasure import ErasureService
from memos.services.fleet import Instance, Leases
from memos.services.fleet.changes import ChangeFeed
from memos.services.fleet.instance import load_instance_id
from memos.services.foreground import Foreground
from memos.services.indexes import IndexRegistry, vector_space
from memos.services.keys import KeyService
from memos.services.lifecycle import Evictor, Fuser, Migrator, PolicyService, UsageCounter
from memos.services.memories import MemoryService
from memos.services.quotas import QuotaService
from memos.services.ratelimit import RateLimiter
from memos.services.runtime import RuntimeHolder
from memos.services.search import SearchService
from memos.services.system import SystemService
from memos.settings import Settings

log = logging.getLogger("memos.daemon")


class Daemon:
    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.resolved_database_url)
        self.schema_revision = upgrade(self.db)
        fleet = settings.fleet
        self.instance = Instance(
            self.db,
            load_instance_id(fleet.instance_id, settings.data_dir),
            fleet.lease_s,
            fleet.heartbeat_s,
            url=fleet.url,
        )
        self.leases = Leases(self.db, self.instance.id)
        self._owns_embedder = embedder is None  # a shared one (tests) outlives this daemon
        self.embedder = embedder or Embedder(settings.embedder)
        # Searches in flight; enrichment waits for a gap between them before each step.
        self.foreground = Foreground(settings.enrichment.yield_ms / 1000)
        self.indexes = IndexRegistry(
            self.db,
            settings.index_dir,
            self.embedder.dim,
            vector_space(self.embedder.fingerprint),
            settings.hnsw,
            settings.retrieval,
            self.embedder.embed_background,
            settings.indexes.max_loaded_bytes,
        )
        # Other daemons' writes on this database, caught up into the loaded indexes.
        self.changes = ChangeFeed(
            self.indexes,
            settings.resolved_database_url,
            self.instance.id,
            fleet.changes_poll_s,
            fleet.changes_reconnect_max_s,
            listen=fleet.changes_listen,
        )
        self.auth = AuthService(self.db)
        self.quotas = QuotaService(self.db, settings.quotas)
        self.keys = KeyService(self.db, self.quotas)
        self.rate_limiter = RateLimiter(settings.rate_limit)
        self.runtime = RuntimeHolder(settings.runtime, enabled=settings.activations.enabled)
        self.cubes = CubeService(self.db, self._drop_cube, self._cube_bytes, self.quotas)
        # Activation files: on this disk, written through to Redis when MEMOS_REDIS_URL is set.
        self.blobs = make_blob_store(
            settings.activation_dir, settings.redis_url, settings.blobs, self._alone
        )
        self.activations = ActivationService(
            self.db,
            self.cubes,
            self.runtime,
            settings.activation_dir,
            settings.activations,
            check_quota=self.quotas.check_activation_bytes,
            embedder=self.embedder,
            blobs=self.blobs,
            instance_id=self.instance.id,
        )
        self.enrichment = EnrichmentService(
            self.db,
            self.indexes,
            make_enricher(
                settings.enrichment.enricher,
                self._embed_background,
                settings.enrichment.local,
                settings.enrichment.llm,
                self.runtime.complete,
            ),
            settings.enrichment,
            embed=self._embed_background,
            pause=self.foreground.pause,
            claims=Claims(self.db, self.instance.id, fleet.lease_s),
        )
        self.enrichment_worker = EnrichmentWorker(self.enrichment, settings.enrichment.idle_poll_s)
        self.memories = MemoryService(
            self.db,
            self.cubes,
            self.indexes,
            self.embedder,
            settings.limits,
            on_write=self.enrichment_worker.wake,
            quotas=self.quotas,
            on_changed=self.activations.drop_note_chunks,  # an edited note's chunk goes
        )
        # Recall and load counts, written in batches by the `usage_flush` job and at stop.
        self.usage = UsageCounter(self.db)
        self.activations.catalogue.on_load = self.usage.loaded
        self.search = SearchService(
            self.db,
            self.cubes,
            self.indexes,
            self.embedder,
            settings.limits.max_top_k,
            self.foreground,
            usage=self.usage,
        )
        self.chats = ChatService(
            self.db,
            self.cubes,
            self.memories,
            self.search,
            self.activations,
            settings.chats,
            TurnLocks(self.db, self.instance.id, fleet.lease_s, fleet.heartbeat_s),
            check_quota=self.quotas.check_activation_bytes,
        )
        self.erasure = ErasureService(
            self.db,
            self.cubes,
            self.indexes,
            settings.activation_dir,
            on_erased=self._erased,
            remove_activation=self.blobs.remove,
        )
        self.completions = CompletionService(
            self.cubes,
            self.activations,
            self.runtime,
            self.search,
            self.chats,
            CompletionLimits(
                max_prompt_bytes=settings.activations.max_prompt_bytes,
                max_prompts=settings.openai.max_prompts,
                recall_top_k=settings.chats.default_recall_top_k,
                recall_tokens=settings.chats.recall_tokens,
            ),
        )
        self.policies = PolicyService(self.db, self.cubes, settings.lifecycle)
        self.evictor = Evictor(
            self.db, self.policies, self.memories, self.erasure, self.activations,
            settings.lifecycle, pause=self.foreground.pause,
        )  # fmt: skip
        self.fuser = Fuser(
            self.db, self.policies, self.indexes, self._embed_background, settings.lifecycle,
            enrichment_enabled=settings.enrichment.enabled, pause=self.foreground.pause,
        )  # fmt: skip
        self.migrator = Migrator(
            self.db, self.policies, self.activations, settings.lifecycle,
            pause=self.foreground.pause, promote_notes=self.activations.promote_note_chunks,
        )  # fmt: skip
        # What the daemon does on its own behalf; the scheduler's jobs go through it.
        self.system = SystemService(
            self.db,
            self.indexes,
            self.enrichment,
            settings.enrichment.enabled,
            sweep_activations=lambda: self.activations.sweep().as_dict(),
            save_chat_prefixes=self.chats.save_idle,
            usage=self.usage,
            evictor=self.evictor,
            fuser=self.fuser,
            migrator=self.migrator,
        )
        self.jobs = JobRunner(
            self.db,
            jobs.job_specs(self.system, settings.scheduler),
            enabled=settings.scheduler.enabled,
            leases=self.leases,
            lease_s=fleet.lease_s,
            on_lead=self.activations.fail_orphans,  # builds of daemons gone, failed
        )
        self.healing = False
        self._heal_thread: threading.Thread | None = None

    def _embed_background(self, texts: Sequence[str]) -> np.ndarray:
        """Enrichment's embeddings: on the background lane, pausing before each chunk while
        searches are in flight. (Re-embedding a cube at load does not pause: a search may be
        waiting for that load.)"""
        return self.embedder.embed_background(texts, pause=self.foreground.pause)

    def _drop_cube(self, cube_id: str) -> None:
        self.indexes.drop(cube_id)
        self.activations.drop_cube(cube_id)
        self.chats.drop_cube(cube_id)

    def _alone(self) -> bool:
        """No other daemon of the fleet is alive (their disks may hold what this one lacks)."""
        return all(member["self"] for member in self.instance.members())

    def _erased(self, cube_id: str, session_id: str | None) -> None:
        self.activations.loaded.drop_cube(cube_id)  # the erased memory's activations went
        self.activations.dequantized.drop_cube(cube_id)
        if session_id is not None:
            self.chats.drop_session(cube_id, session_id)

    def _cube_bytes(self, cube_id: str) -> int:
        """On-disk bytes of a cube's index files and activation blobs."""
        stored = tree_bytes(self.settings.activation_dir / cube_id)
        return self.indexes.disk_bytes(cube_id) + stored

    @property
    def admin_key_file(self) -> Path:
        return self.settings.data_dir / "admin.key"

    def start(self) -> None:
        self.instance.start()  # first: recovery below tells this daemon's work from others'
        admin_key = self.settings.admin_key.get_secret_value() if self.settings.admin_key else None
        written = self.auth.ensure_admin(admin_key, self.admin_key_file)
        if written:
            log.warning("generated an admin API key", extra={"fields": {"admin_key_file": written}})
            print(f"memosd: admin API key written to {written}", flush=True)
        interrupted, swept = self.activations.start()
        if interrupted:
            log.warning("activation builds interrupted", extra={"fields": {"count": interrupted}})
        if swept.removed or swept.failed or swept.cubes:
            log.warning("activation files swept", extra={"fields": swept.as_dict()})
        self.jobs.start()
        self.changes.start()
        if self.settings.enrichment.enabled:
            self.enrichment.claims.release_all()  # of this daemon's earlier self
            self.enrichment_worker.start()
        # Heal indexes a crash left behind, without holding up the first requests.
        self.healing = True
        self._heal_thread = threading.Thread(target=self._heal, name="memos-heal", daemon=True)
        self._heal_thread.start()

    def _heal(self) -> None:
        try:
            reports = self.indexes.heal_all()
            if reports:
                log.info("indexes healed", extra={"fields": {"cubes": len(reports)}})
        except Exception:
            log.exception("index heal at start failed")
        finally:
            self.healing = False

    def stop(self) -> None:
        self.enrichment_worker.stop()
        self.jobs.stop()
        self.changes.stop()
        try:
            self.usage.flush()  # counts since the last flush; lost only on a kill
        except Exception:
            log.exception("usage flush at stop failed")
        if self.runtime.loaded:
            self.chats.save_all()  # the next start loads them instead of prefilling again
        self.chats.close()
        self.activations.stop()
        if self._heal_thread is not None:
            self._heal_thread.join(timeout=60)
        self.indexes.save_all()
        self.instance.stop()  # last: the fleet may take over what is left
        self.db.dispose()
        if self._owns_embedder:
            self.embedder.close()


def serve(settings: Settings) -> None:
    """Run the daemon in the foreground until interrupted."""
    import uvicorn

    from memos import heap, logs
    from memos.api.app import create_app

    logs.configure(settings.log_level)
    heap.limit_arenas(settings.heap.arena_max)  # before the daemon's threads start
    daemon = Daemon(settings)
    app = create_app(daemon)
    log.info(
        "memosd starting",
        extra={
            "fields": {"host": settings.host, "port": settings.port, **settings.public_summary()}
        },
    )
    trimmer = heap.Trimmer(settings.heap.trim_interval_s) if settings.heap.trim_interval_s else None
    if trimmer is not None:
        trimmer.start()
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    finally:
        if trimmer is not None:
            trimmer.stop()
