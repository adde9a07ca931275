"""Block-wise prefill under a KV budget: a context of any length, never more than M + block held.

EpiCache (Kim et al. 2025, https://arxiv.org/abs/2509.17396; reference code apple/ml-epicache)
builds a bounded cache for a conversation far longer than the cache may be: run the context in
blocks; after each block score every cached entry and keep the best `budget_tokens`; continue.
The KV held at any moment is the kept entries, one block and the scoring pass's transient
tokens, whatever the length of the conversation. What decides the result is the scorer, one of
the block scorers of `kv_runtime.block_scorers` (EpiCache's patched `prompt`, `kvzip`,
`prompt+kvzip`, and the one-shot `snapkv`, `recent`, `knorm`).

Selection keeps the first `sink_tokens` and, at the end only, the last `recent_tokens` (a
generation re-feeds the context's last token, and a question reads its immediate context); the
rest of the budget goes to the best scores, chosen per layer and KV head, the same count for
every head of a layer (EpiCache's "uniform" variant; its non-uniform one needs a custom kernel).

Layer budgets. EpiCache gives layers whose keys change most under block-wise prefill more of the
budget (`kv_runtime.layer_budgets`). With `layer_budgets`, layer l keeps its own count; the cache
is then ragged (layers of different lengths, read through `kv_runtime.forward`'s per-layer
masks), and with compacted positions each layer's entries end at the same slot, so the newest
entries of every layer sit right before the next token.

Positions. EpiCache keeps the kept entries at their original RoPE positions and continues the
next block at its true position (`positions="original"`, an ordinary evicted `KVCache`). The
default here re-rotates the kept keys to consecutive positions 0..kept-1 after each selection
(`positions="compacted"`, StreamingLLM, Xiao et al. 2023): keys are cached after RoPE, and
rotating by the difference of two positions moves a key from one to the other exactly. Every
position the model sees then stays below `budget_tokens + block_tokens`, so a conversation
longer than the model's positions (SmolLM2: 8,192) can be built and questioned; and it measured
slightly better even where both are legal. `benchmarks/episodic_positions.py`, LoCoMo, budget
1,024, block 1,024, snapkv, NLL of the next 256 gold tokens (lower is better):

    context   original   compacted
      4,096     2.2381      2.2186
     10,240     2.5481      2.5258   (original: positions up to 10,496, past the model's 8,192)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kv_runtime.block_scorers import BlockScorer, cache_layers, layer_lengths, layerwise_max
from kv_runtime.cache import KVCache
from kv_runtime.errors import Cancelled, InvalidArgument
from kv_runtime.eviction import select
from kv_runtime.forward import ModelRunner, ProgressCallback

PositionMode = Literal["original", "compacted", "auto"]


# -- the build --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetedPrefill:
    """What `prefill_under_budget` built.

    kv: the kept entries. With original positions, an evicted KVCache (its `positions` are the
        original ones, its `length` the context's). With compacted positions the entries sit at
        0..kept-1: `kv.positions` are those slots and `kv.length` is `kept` (a generation
        continues there); its token_ids are layer 0, head 0's kept tokens, a stand-in (which
        tokens each head kept is `original_positions`). Nothing evicted: a plain KVCache.
    peak_kv_bytes: the largest KV held at any time during the build (the scoring pass included).
    prefilled_tokens: context tokens run through the model.
    original_positions: (layers, kv_heads, kept) int64 original position of every kept entry.
    compacted: whether the entries were re-positioned to 0..kept-1.
    """

    kv: KVCache
    peak_kv_bytes: int
    prefilled_tokens: int
    original_positions: torch.Tensor
    compacted: bool = False


def prefill_under_budget(
    runner: ModelRunner,
    token_ids: Sequence[int],
    *,
    budget_tokens: int,
    block_tokens: int = 1024,
    sink_tokens: int = 4,
    recent_tokens: int = 32,
    scorer: BlockScorer,
    layer_budgets: Sequence[int] | None = None,
    positions: PositionMode = "compacted",
    max_positions: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> BudgetedPrefill:
    """Prefill `token_ids` block by block, keeping at most `budget_tokens` entries per layer and
    KV head between blocks (the sinks and, at the end, the last `recent_tokens` count in it).

    layer_budgets: per layer, how many entries it keeps (`kv_runtime.layer_budgets`); None:
        `budget_tokens` in every layer. Each must exceed sink_tokens + recent_tokens.
    positions: "compacted" (default, measured better), "original", or "auto" (compacted only
        when the context does not fit `max_positions`); see the module docstring.
    progress(done_tokens, total_tokens) after every block; raising from it aborts the build.
    cancel() returning True aborts it with `Cancelled` (checked between blocks and while waiting
    for the model).
    """
    n = len(token_ids)
    layer_count = int(runner.model.config.num_hidden_layers)
    _check_arguments(n, budget_tokens, block_tokens, sink_tokens, recent_tokens)
    budgets = _budgets(budget_tokens, layer_budgets, layer_count, sink_tokens + recent_tokens)
    widest = max(budgets)
    if positions == "auto":
        fits = max_positions is None or n <= max_positions
        positions = "original" if fits else "compacted"
    if positions not in ("original", "compacted"):
        raise InvalidArgument(f"positions={positions!r}; valid: 'original', 'compacted', 'auto'")
    if positions == "original" and max_positions is not None and n > max_positions:
        raise InvalidArgument(
            f"context of {n} tokens exceeds the model's {max_positions} positions; "
            "use positions='compacted' (or 'auto')"
        )
    compacted = positions == "compacted"
    if compacted and max_positions is not None and widest + block_tokens > max_positions:
        raise InvalidArgument(
            f"budget_tokens + block_tokens = {widest + block_tokens} exceeds the model's "
            f"{max_positions} positions, which compacted positions must stay below"
        )
    rotary = _Rotary.of(runner) if compacted else None

    cache = DynamicCache()
    kept_at: list[torch.Tensor] | None = None  # per layer (kv_heads, kept) original positions
    at: list[torch.Tensor] | None = None  # per layer current RoPE positions (compacted)
    scores: list[torch.Tensor] | None = None  # running scores of the kept entries (accumulate)
    peak = 0

    def meter(live: DynamicCache) -> None:
        nonlocal peak
        peak = max(peak, _nbytes(live))

    for start in range(0, n, block_tokens):
        if cancel is not None and cancel():
            raise Cancelled("budgeted prefill cancelled")
        block = [int(t) for t in token_ids[start : start + block_tokens]]
        cached = layer_lengths(cache)
        # RoPE position of the block's first token (compacted: every layer's entries end before)
        first = max(cached, default=0) if compacted else start
        window = min(scorer.window_tokens, len(block))
        window_queries = None
        if window:
            if len(block) > window:
                runner.forward(block[:-window], cache, first, cancel=cancel)
            window_queries = runner.capture_queries(
                block[-window:], cache, first + len(block) - window
            )
        else:
            runner.forward(block, cache, first, cancel=cancel)
        meter(cache)
        kv_heads = _kv_heads(cache)
        new = torch.arange(start, start + len(block)).expand(kv_heads, len(block))
        kept_at = _extend(kept_at, new, layer_count)
        if compacted:
            slots = torch.arange(first, first + len(block)).expand(kv_heads, len(block))
            at = _extend(at, slots, layer_count)
        last = start + len(block) >= n
        total = layer_lengths(cache)
        over = any(t > b for t, b in zip(total, budgets, strict=True))
        if over or scorer.accumulate:
            fresh = scorer.score(
                runner,
                cache,
                next_position=first + len(block),
                block_ids=block,
                window_queries=window_queries,
                meter=meter,
            )
            assert layer_lengths(cache) == total, "a scorer changed the cache"
            if scorer.accumulate and scores is not None:
                padded = [
                    torch.cat([s, torch.full_like(f[..., c:], -math.inf)], dim=-1)
                    for s, f, c in zip(scores, fresh, cached, strict=True)
                ]
                fresh = layerwise_max(padded, fresh)
            scores = fresh
        if over:
            assert scores is not None
            recent = recent_tokens if last else 0
            keep = [select(s, b, sink_tokens, recent) for s, b in zip(scores, budgets, strict=True)]
            cache, kept_at, scores, at = _gather(cache, keep, kept_at, scores, at)
            if rotary is not None:
                assert at is not None
                cache, at = rotary.compact(cache, at)
        if progress is not None:
            progress(start + len(block), n)
    assert kept_at is not None
    kv = _result(cache, token_ids, kept_at, at)
    return BudgetedPrefill(
        kv=kv,
        peak_kv_bytes=peak,
        prefilled_tokens=n,
        original_positions=_padded(kept_at),
        compacted=compacted,
    )


def _check_arguments(n: int, budget: int, block: int, sinks: int, recent: int) -> None:
    if n == 0:
        raise InvalidArgument("cannot prefill an empty context: token_ids is empty")
    if block < 1:
        raise InvalidArgument(f"block_tokens={block} must be at least 1")
    if sinks < 0:
        raise InvalidArgument(f"sink_tokens={sinks} must be >= 0")
    if recent < 1:  # a generation with prompt logprobs re-feeds the context's last token
        raise InvalidArgument(f"recent_tokens={recent} must be >= 1: the last token is kept")
    if budget < sinks + recent + 1:
        raise InvalidArgument(
            f"budget_tokens={budget} must exceed sink_tokens + recent_tokens = {sinks + recent}, "
            "which are always kept"
        )


def _budgets(
    budget: int, layer_budgets: Sequence[int] | None, layers: int, protected: int
) -> tuple[int, ...]:
    """Every layer's budget: `layer_budgets` checked, or `budget` everywhere."""
    if layer_budgets is None:
        return (budget,) * layers
    budgets = tuple(int(b) for b in layer_budgets)
    if len(budgets) != layers:
        raise InvalidArgument(f"layer_budgets has {len(budgets)} entries; the model has {layers}")
    if min(budgets) <= protected:
        raise InvalidArgument(
            f"layer_budgets has {min(budgets)}; every layer must keep more than sink_tokens + "
            f"recent_tokens = {protected}, which are always kept"
        )
    return budgets


def _extend(
    per_layer: list[torch.Tensor] | None, new: torch.Tensor, layers: int
) -> list[torch.Tensor]:
    """Every layer's (kv_heads, n) positions with `new` (kv_heads, block) appended."""
    if per_layer is None:
        return [new.clone() for _ in range(layers)]
    return [torch.cat([p, new], dim=-1) for p in per_layer]


def _padded(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """(layers, kv_heads, most kept) int64, -1 past a layer's own entries."""
    width = max(p.shape[-1] for p in per_layer)
    out = torch.full((len(per_layer), per_layer[0].shape[0], width), -1, dtype=torch.int64)
    for index, p in enumerate(per_layer):
        out[index, :, : p.shape[-1]] = p
    return out


def _kv_heads(cache: DynamicCache) -> int:
    keys = cache_layers(cache)[0].keys
    assert keys is not None
    return int(keys.shape[1])


def _nbytes(cache: DynamicCache) -> int:
    total = 0
    for layer in cache_layers(cache):
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def _layer(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def _gather(
    cache: DynamicCache,
    keep: list[torch.Tensor],
    kept_at: list[torch.Tensor],
    scores: list[torch.Tensor],
    at: list[torch.Tensor] | None,
) -> tuple[DynamicCache, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """The cache, positions and scores of the kept entries (keep: per layer (kv_heads, kept))."""
    out = DynamicCache()
    positions, kept_scores, slots = [], [], []
    for index, (layer, chosen) in enumerate(zip(cache_layers(cache), keep, strict=True)):
        assert layer.keys is not None and layer.values is not None
        heads, count, dim = layer.keys.shape[1], chosen.shape[1], layer.keys.shape[3]
        gather = chosen[None, :, :, None].expand(1, heads, count, dim).to(layer.keys.device)
        out.layers.append(_layer(layer.keys.gather(2, gather), layer.values.gather(2, gather)))
        layer.keys = layer.values = None  # free the old entries before the next layer's copy
        positions.append(kept_at[index].gather(1, chosen.cpu()))
        kept_scores.append(scores[index].gather(2, chosen[None].to(scores[index].device)))
        if at is not None:
            slots.append(at[index].gather(1, chosen.cpu()))
    return out, positions, kept_scores, slots if at is not None else None


def _result(
    cache: DynamicCache,
    token_ids: Sequence[int],
    kept_at: list[torch.Tensor],
    at: list[torch.Tensor] | None,
) -> KVCache:
    """kept_at: per layer the entries' original positions; at: their compacted slots, or None
    when they kept their original positions."""
    keys, values = [], []
    for layer in cache_layers(cache):
        assert layer.keys is not None and layer.values is not None
        keys.append(layer.keys)
        values.append(layer.values)
    ids = tuple(int(t) for t in token_ids)
    if all(p.shape[-1] == len(ids) for p in kept_at):  # nothing was evicted: a plain prefill
        return KVCache(keys=tuple(keys), values=tuple(values), token_ids=ids)
    if at is not None:
        # The cache now reads as a context of `kept` tokens at 0..kept-1 (its widest layer), so
        # a generation continues at `kept`. It stays marked as evicted (positions set), so
        # nothing treats it as a prefix of its token ids, which are only a stand-in here.
        widest = max(range(len(kept_at)), key=lambda index: kept_at[index].shape[-1])
        stand_in = tuple(ids[int(p)] for p in kept_at[widest][0])
        return KVCache(
            keys=tuple(keys), values=tuple(values), token_ids=stand_in, positions=_padded(at)
        )
    return KVCache(
        keys=tuple(keys), values=tuple(values), token_ids=ids, positions=_padded(kept_at)
    )


# -- compacted positions ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Rotary:
    """The model's RoPE frequencies, to move cached (post-RoPE) keys to other positions."""

    inv_freq: torch.Tensor  # (head_dim / 2,) float32

    @classmethod
    def of(cls, runner: ModelRunner) -> _Rotary:
        rotary = getattr(getattr(runner.model, "model", None), "rotary_emb", None)
        rope_type = getattr(rotary, "rope_type", None)
        if rotary is None or rope_type != "default":
            raise InvalidArgument(
                f"compacted positions need plain RoPE (rotary_emb with rope_type 'default'), "
                f"this model has {rope_type!r}"
            )
        return cls(inv_freq=rotary.inv_freq.detach().float().cpu())

    def compact(
        self, cache: DynamicCache, at: list[torch.Tensor]
    ) -> tuple[DynamicCache, list[torch.Tensor]]:
        """Re-rotate every layer's keys from positions `at` (per layer (kv_heads, kept_l)) to
        consecutive slots ending at K - 1, K the most any layer keeps: 0..kept-1 when the layers
        are equal (the entries are in position order per head, so slot order is kept)."""
        widest = max(a.shape[-1] for a in at)
        targets = []
        for layer, now in zip(cache_layers(cache), at, strict=True):
            assert layer.keys is not None
            kept = now.shape[-1]
            target = torch.arange(widest - kept, widest).expand_as(now).clone()
            # rotate by the difference: R(target) = R(delta) R(at)
            layer.keys = self.rotate(layer.keys, target - now)
            targets.append(target)
        return cache, targets

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """keys (1, kv_heads, kept, head_dim) rotated by `delta` (kv_heads, kept) positions, in
        transformers' rotate_half layout (frequencies repeated over the two halves)."""
        angles = delta.to(torch.float64)[..., None] * self.inv_freq.to(torch.float64)
        angles = torch.cat([angles, angles], dim=-1).to(keys.device)  # (kv_heads, kept, dim)
        cos, sin = angles.cos().float()[None], angles.sin().float()[None]
        k = keys.float()
        half = k.shape[-1] // 2
        rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
        return (k * cos + rotated * sin).to(keys.dtype)
