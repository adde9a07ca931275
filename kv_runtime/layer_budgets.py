"""Per-layer KV budgets: layers whose keys change most under block-wise prefill get more entries.

EpiCache (Kim et al. 2025, https://arxiv.org/abs/2509.17396, "sensitivity-aware budget
allocation") profiles a model once: per layer, the mean cosine similarity `s_l` between the keys
computed with the full causal mask and with a block mask, on one long text. A layer whose keys
barely move when the context is cut to a block (s_l near 1) loses little when its cache is cut
too; one whose keys move (low s_l) gets more. Scores normalised to [0, 1], weights
w_l = (1 - s_l) ** alpha (alpha 1.1), budget_l = w_l * M * L / sum(w), floored at M / 4.

Here the floor is applied by water-filling, so the layer budgets still add up to exactly M * L:
a per-layer cache holds the same number of entries in all as a uniform one of budget M.

The block mask: blocks of `block_tokens` with 50% overlap and `sink_tokens` sinks, so a token of
half-block c sees the sinks, half-block c - 1 and half-block c before it. It is computed half a
block at a time by an ordinary prefill of [sinks | half-block c - 1 | half-block c] at the true
positions, keeping half-block c's keys; those keys are then compared with the full prefill's.
(In the earlier half-block the tokens see only the sinks and each other: the profile measures how
much a layer's keys depend on context beyond one block, which is what a budgeted prefill cuts.)

The profile is a property of the model: `load_or_profile` computes it once and keeps it as JSON
beside the converted model (keyed by the model's fingerprint), with the text's token count and
the block it used.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kv_runtime.block_scorers import cache_layers
from kv_runtime.cache import KVCache
from kv_runtime.errors import InvalidArgument
from kv_runtime.forward import ModelRunner
from memcube.atomic import write_atomic

ALPHA = 1.1
FLOOR_SHARE = 0.25  # a layer keeps at least budget / 4
PROFILE_BLOCK_TOKENS = 1024  # the daemon's build block
PROFILE_SINK_TOKENS = 128
PROFILE_MAX_TOKENS = 4096

# The profile text: prose and examples every Python install carries (the standard library's
# module documentation), so profiling needs no download and gives the same text on every machine
# of one Python version. EpiCache profiles on one long text as well.
PROFILE_MODULES = (
    "pdb", "configparser", "re", "statistics", "argparse", "json", "ssl", "csv", "socket",
    "timeit", "unittest", "copy", "heapq", "inspect", "itertools", "doctest", "os", "typing",
)  # fmt: skip


@dataclass(frozen=True)
class LayerSensitivity:
    """The profile of one model: per layer, how similar block-prefilled keys are to full ones.

    similarity: per layer, mean cosine similarity over tokens and KV heads, in [-1, 1].
    """

    similarity: tuple[float, ...]
    model: str
    profile_tokens: int
    block_tokens: int
    sink_tokens: int

    def budgets(self, budget_tokens: int, *, minimum: int = 1) -> tuple[int, ...]:
        """Per-layer budgets adding up to budget_tokens * layers (see `allocate`). minimum: the
        least any layer may keep; a budgeted prefill needs sink_tokens + recent_tokens + 1."""
        return allocate(self.similarity, budget_tokens, minimum=minimum)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LayerSensitivity:
        raw = json.loads(text)
        return cls(
            similarity=tuple(float(s) for s in raw["similarity"]),
            model=str(raw["model"]),
            profile_tokens=int(raw["profile_tokens"]),
            block_tokens=int(raw["block_tokens"]),
            sink_tokens=int(raw["sink_tokens"]),
        )


def allocate(
    similarity: Sequence[float],
    budget_tokens: int,
    *,
    alpha: float = ALPHA,
    floor_share: float = FLOOR_SHARE,
    minimum: int = 1,
) -> tuple[int, ...]:
    """EpiCache's allocation: weights (1 - s_norm) ** alpha, each layer at least
    max(budget * floor_share, minimum), the total exactly budget_tokens * layers.

    similarity: per layer (any range; normalised to [0, 1] here). Equal similarities (or one
    layer) give the uniform budget.
    """
    layers = len(similarity)
    if layers == 0:
        raise InvalidArgument("no layers to allocate a budget over")
    floor = max(math.ceil(budget_tokens * floor_share), minimum)
    if floor > budget_tokens:
        raise InvalidArgument(
            f"budget_tokens={budget_tokens} is below the per-layer minimum of {floor}"
        )
    s = torch.tensor([float(x) for x in similarity], dtype=torch.float64)
    span = float(s.max() - s.min())
    if span <= 0:
        return (budget_tokens,) * layers
    weights = (1.0 - (s - s.min()) / span).clamp(min=0.0) ** alpha
    total = budget_tokens * layers
    # Water-filling: layers whose share falls below the floor get the floor, the rest share
    # what is left in proportion to their weights, until no share is below the floor.
    floored = torch.zeros(layers, dtype=torch.bool)
    while True:
        free = total - floor * int(floored.sum())
        active = weights.masked_fill(floored, 0.0)
        share = active / float(active.sum()) * free if float(active.sum()) > 0 else active
        below = (~floored) & (share < floor)
        if not bool(below.any()):
            break
        floored |= below
    exact = torch.where(floored, torch.full_like(share, float(floor)), share)
    budgets = exact.floor().long()
    remainder = total - int(budgets.sum())  # hand the rounding left-overs out, largest first
    order = (exact - budgets.double()).argsort(descending=True)
    budgets[order[:remainder]] += 1
    assert int(budgets.sum()) == total and int(budgets.min()) >= floor, "allocation broke"
    return tuple(int(b) for b in budgets)


def profile_text() -> str:
    """The default profiling text (see `PROFILE_MODULES`)."""
    parts = []
    for name in PROFILE_MODULES:
        doc = importlib.import_module(name).__doc__
        if doc:
            parts.append(doc.strip())
    return "\n\n".join(parts)


def key_similarity(
    runner: ModelRunner,
    token_ids: Sequence[int],
    *,
    block_tokens: int = PROFILE_BLOCK_TOKENS,
    sink_tokens: int = PROFILE_SINK_TOKENS,
) -> tuple[float, ...]:
    """Per layer: mean cosine similarity between each token's keys under the full causal mask
    and under the block mask (module docstring), over the tokens after the first block and the
    KV heads. token_ids: the profiling text, longer than sinks + one block."""
    ids = [int(t) for t in token_ids]
    half = block_tokens // 2
    first = sink_tokens + 2 * half  # tokens before this see everything anyway: not compared
    if half < 1 or len(ids) <= first:
        raise InvalidArgument(
            f"a profile needs more than sink_tokens + block_tokens = {first} tokens, got {len(ids)}"
        )
    full_cache = DynamicCache()
    for offset in range(0, len(ids), block_tokens):  # in blocks: no text-square attention
        runner.forward(ids[offset : offset + block_tokens], full_cache, offset)
    full = KVCache.from_transformers(full_cache, ids)
    # The sinks see only each other, under either mask: the full prefill's first entries.
    sinks = full.head(sink_tokens)
    totals = [0.0] * full.layers
    count = 0
    for start in range(first, len(ids), half):
        end = min(start + half, len(ids))
        block = sinks.to_transformers()  # shared, appended to out of place
        runner.forward(ids[start - half : end], block, start - half)
        for index, layer in enumerate(cache_layers(block)):
            assert layer.keys is not None
            mine = layer.keys[:, :, sink_tokens + half :].float()
            theirs = full.keys[index][:, :, start:end].float()
            totals[index] += float(F.cosine_similarity(mine, theirs, dim=-1).sum(dim=-1).mean())
        count += end - start
    return tuple(t / count for t in totals)


def load_or_profile(
    runner: ModelRunner,
    path: Path,
    model: str,
    token_ids: Sequence[int],
    *,
    block_tokens: int = PROFILE_BLOCK_TOKENS,
    sink_tokens: int = PROFILE_SINK_TOKENS,
) -> LayerSensitivity:
    """The profile kept at `path` if it is this model's, else a new one (written there).

    model: the model's fingerprint as a string; a profile of another model is recomputed.
    token_ids: the profiling text (cut to `PROFILE_MAX_TOKENS`).
    """
    if path.exists():
        try:
            kept = LayerSensitivity.from_json(path.read_text())
        except (ValueError, KeyError, TypeError):
            kept = None  # unreadable: profile again
        if kept is not None and (kept.model, kept.block_tokens, kept.sink_tokens) == (
            model,
            block_tokens,
            sink_tokens,
        ):
            return kept
    ids = list(token_ids)[:PROFILE_MAX_TOKENS]
    similarity = key_similarity(runner, ids, block_tokens=block_tokens, sink_tokens=sink_tokens)
    profile = LayerSensitivity(
        similarity=similarity,
        model=model,
        profile_tokens=len(ids),
        block_tokens=block_tokens,
        sink_tokens=sink_tokens,
    )
    write_atomic(path, profile.to_json().encode())  # a private temp name: profilers never clash
    return profile
