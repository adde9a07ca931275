"""Memory lifecycle: usage signals, per-cube policies, and the jobs that act on them.

usage    recall and load counts, kept in memory and flushed in batches (`usage_flush`)
policy   each cube's policy over the daemon's defaults (`LifecycleConfig`), with history
evict    TTL expiry, retention purge, orphan sweep and activation byte budgets (`evict`)
fuse     near-duplicate notes merged into one canonical note (`fuse`)

The `migrate` job (promote hot notes to activations, demote cold ones step by step) belongs
here too; it needs episodic activations and is not written yet. Its inputs are ready: recall
counts (`memories.recalls`, `last_recalled_at`), activation uses and loads, and the policy's
`hot_recalls` and `demote_after_days`.
"""

from memos.services.lifecycle.evict import Evictor, EvictReport
from memos.services.lifecycle.fuse import Fuser, FuseReport
from memos.services.lifecycle.policy import PolicyService, PolicyView
from memos.services.lifecycle.usage import FlushReport, UsageCounter

__all__ = [
    "EvictReport",
    "Evictor",
    "FlushReport",
    "FuseReport",
    "Fuser",
    "PolicyService",
    "PolicyView",
    "UsageCounter",
]
