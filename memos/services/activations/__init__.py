"""Activation memory: KV caches of the local model, built from a cube's text, stored, reused.

An activation is built from text, from memories (rendered in the given order with their
timestamps) or from sessions (their memories in order). Its context is prefilled once,
compressed (`kv_runtime.CompressionConfig`) and stored on disk (`kv_runtime.store`); the
`activations` row is its catalogue entry. Small builds finish inside the request; larger ones
(`inline_max_tokens`) return at once in state "building" and a bounded build queue fills in
`progress` until "ready" or "failed". `generate` continues an activation's context with a
prompt, admitted under bounds on concurrent generations and their memory.

An episodic activation (EpiCache, `episodes.py`) holds one bounded cache per episode of a
conversation; `generate` continues from the episode nearest the prompt.

A note can hold its own KV chunk (`notes.py`, kind "note"), blended into any prompt that
carries the note (`blending.py`, CacheBlend): chat turns, `generate` and completions with
`memory_ids`.

`ActivationService` (service.py) is the facade; each job has a module of its own.
"""

from memos.services.activations.generations import GenerationStream
from memos.services.activations.prompts import ActivationSource, render_memories
from memos.services.activations.service import (
    ActivationService,
    ActivationStats,
    QuotaCheck,
    compression_for,
)
from memos.services.activations.sweep import SweepReport

__all__ = [
    "ActivationService",
    "ActivationSource",
    "ActivationStats",
    "GenerationStream",
    "QuotaCheck",
    "SweepReport",
    "compression_for",
    "render_memories",
]
