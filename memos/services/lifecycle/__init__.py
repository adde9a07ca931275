"""Memory lifecycle: usage signals, per-cube policies, and the jobs that act on them.

usage    recall and load counts, kept in memory and flushed in batches (`usage_flush`)
policy   each cube's policy over the daemon's defaults (`LifecycleConfig`), with history
evict    TTL expiry, retention purge, orphan sweep and activation byte budgets (`evict`)
fuse     near-duplicate notes merged into one canonical note (`fuse`)
migrate  hot sessions promoted to activations, cold activations demoted 16 -> 8 -> 4 -> 2 bits
         then dropped, idle loaded caches unloaded from RAM (`migrate`)
costs    the measured cost model migrate decides with: load a cache, or prefill its text again?

Per-note KV chunks (issue 12) plug into migrate through `PromoteNotes`: the hot notes that
belong to no session are handed to it.
"""

from memos.services.lifecycle.costs import CostModel, Verdict
from memos.services.lifecycle.evict import Evictor, EvictReport
from memos.services.lifecycle.fuse import Fuser, FuseReport
from memos.services.lifecycle.migrate import MigrateReport, Migrator, PromoteNotes
from memos.services.lifecycle.policy import PolicyService, PolicyView
from memos.services.lifecycle.usage import FlushReport, UsageCounter

__all__ = [
    "CostModel",
    "EvictReport",
    "Evictor",
    "FlushReport",
    "FuseReport",
    "Fuser",
    "MigrateReport",
    "Migrator",
    "PolicyService",
    "PolicyView",
    "PromoteNotes",
    "UsageCounter",
    "Verdict",
]
