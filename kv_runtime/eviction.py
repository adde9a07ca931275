"""Token eviction under a budget, with the scorer as a plug-in.

Each scorer is a small dataclass overriding one `score` method (the NVIDIA kvpress pattern): it
rates every cached entry of one layer, per KV head, and the selection keeps the best ones. The
selection is the same for every scorer: the first `sink_tokens` (attention sinks, Xiao et al.
2023, https://arxiv.org/abs/2309.17453) and the last `window_tokens` are always kept, the rest of
the budget goes to the highest scores, chosen per layer and per KV head as kvpress does. Kept
entries stay in position order and remember their original positions.

Scorers, registered by name in `SCORERS`:
- `snapkv` (Li et al. 2024, https://arxiv.org/abs/2404.14469): the attention the observation
  window (the last `window_tokens` queries) pays to each earlier token, averaged over the window
  and over the query heads sharing a KV head, smoothed by average pooling.
- `recent`: newer is better (with the sinks this is StreamingLLM's policy).
- `knorm`: a smaller key norm is better (Devoto et al. 2024, https://arxiv.org/abs/2406.11430).

`PREFILL_SCORERS` are scorers that need the model, so they score while the context is prefilled
(`Runtime.prefill_budgeted`, kv_runtime.episodic) rather than on a finished cache: `kvzip`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kv_runtime.cache import KVCache
from kv_runtime.errors import InvalidArgument


@dataclass(frozen=True)
class Scorer:
    """Rates cached entries of one layer; higher is more worth keeping."""

    name: ClassVar[str] = ""
    needs_queries: ClassVar[bool] = False

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None
    ) -> torch.Tensor:
        """keys, values: (1, kv_heads, tokens, head_dim); queries: (1, heads, window, head_dim)
        post-RoPE queries of the last `window` tokens, or None when `needs_queries` is False.
        returns: (1, kv_heads, tokens) float32 scores."""
        raise NotImplementedError


@dataclass(frozen=True)
class SnapKVScorer(Scorer):
    name: ClassVar[str] = "snapkv"
    needs_queries: ClassVar[bool] = True
    kernel_size: int = 5

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None
    ) -> torch.Tensor:
        assert queries is not None, "snapkv scores need the observation window's queries"
        kv_heads, tokens = keys.shape[1], keys.shape[2]
        weights = window_attention(keys, queries)  # (1, heads, window, tokens)
        weights = weights.view(1, kv_heads, -1, tokens).mean(dim=2)  # over window and group
        return F.avg_pool1d(
            weights, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1
        )


def window_attention(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last `window` tokens' queries over all keys, causal in the window.

    keys: (1, kv_heads, tokens, head_dim) post-RoPE; queries: (1, heads, window, head_dim)
    post-RoPE, heads a multiple of kv_heads (grouped-query attention: query head h reads KV head
    h // (heads // kv_heads), as transformers' `repeat_kv` lays them out).
    returns: (1, heads, window, tokens) float32 attention weights; rows sum to 1.
    """
    _, kv_heads, tokens, head_dim = keys.shape
    heads, window = queries.shape[1], queries.shape[2]
    groups = heads // kv_heads
    q = queries.float().reshape(1, kv_heads, groups * window, head_dim)
    logits = q @ keys.float().transpose(-1, -2) / math.sqrt(head_dim)
    logits = logits.view(1, kv_heads, groups, window, tokens)
    # The window's own keys: query i of the window sees window keys 0..i only.
    future = torch.ones(window, window, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., tokens - window :].masked_fill_(future, float("-inf"))
    return logits.softmax(dim=-1).view(1, heads, window, tokens)


@dataclass(frozen=True)
class RecentScorer(Scorer):
    name: ClassVar[str] = "recent"

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None
    ) -> torch.Tensor:
        _, kv_heads, tokens, _ = keys.shape
        order = torch.arange(tokens, dtype=torch.float32, device=keys.device)
        return order.expand(1, kv_heads, tokens).clone()


@dataclass(frozen=True)
class KnormScorer(Scorer):
    name: ClassVar[str] = "knorm"

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None
    ) -> torch.Tensor:
        return -keys.float().norm(dim=-1)


SCORERS: dict[str, type[Scorer]] = {s.name: s for s in (SnapKVScorer, RecentScorer, KnormScorer)}
# Scored during a block-wise prefill with the model (kv_runtime.episodic), not here.
PREFILL_SCORERS: tuple[str, ...] = ("kvzip",)


def make_scorer(name: str) -> Scorer:
    """The registered scorer called `name`; InvalidArgument listing the valid names otherwise."""
    if name in PREFILL_SCORERS:
        raise InvalidArgument(
            f"scorer={name!r} scores while the context is prefilled (Runtime.prefill_budgeted), "
            "not a finished cache"
        )
    if name not in SCORERS:
        raise InvalidArgument(f"scorer={name!r} is unknown; valid scorers: {sorted(SCORERS)}")
    return SCORERS[name]()


def select(scores: torch.Tensor, budget: int, sink_tokens: int, window_tokens: int) -> torch.Tensor:
    """Indices to keep per head: sinks, the recent window, then the best-scored, ascending.

    scores: (1, kv_heads, tokens) float; returns (kv_heads, min(budget, tokens)) int64.
    """
    _, kv_heads, tokens = scores.shape
    if tokens <= budget:
        return torch.arange(tokens, device=scores.device).expand(kv_heads, tokens).clone()
    assert budget >= sink_tokens + window_tokens, "budget below the protected tokens"
    ranked = scores[0].float().clone()
    ranked[:, : min(sink_tokens, tokens)] = float("inf")
    ranked[:, tokens - window_tokens :] = float("inf")
    keep = ranked.topk(budget, dim=-1, sorted=False).indices
    return keep.sort(dim=-1).values


def evict(
    kv: KVCache,
    scorer: Scorer,
    *,
    budget: int,
    sink_tokens: int,
    window_tokens: int,
    queries: tuple[torch.Tensor, ...] | None,
) -> KVCache:
    """Keep at most `budget` entries per layer and KV head of an unevicted cache.

    queries: per layer (1, heads, window_tokens, head_dim), required when `scorer.needs_queries`.
    returns: a new KVCache of (1, kv_heads, budget, head_dim) tensors and their positions.
    """
    if kv.positions is not None:
        raise InvalidArgument("this cache was already evicted; compress the original prefill")
    if kv.length <= budget:
        return kv
    assert queries is not None or not scorer.needs_queries, f"{scorer.name} needs queries"
    keys, values, positions = [], [], []
    for layer in range(kv.layers):
        k, v = kv.keys[layer], kv.values[layer]
        scores = scorer.score(k, v, queries[layer] if queries is not None else None)
        assert tuple(scores.shape) == (1, kv.kv_heads, kv.length), f"bad scores {scores.shape}"
        keep = select(scores, budget, sink_tokens, window_tokens)  # (kv_heads, budget)
        index = keep[None, :, :, None].expand(1, kv.kv_heads, budget, kv.head_dim)
        keys.append(k.gather(2, index.to(k.device)))
        values.append(v.gather(2, index.to(v.device)))
        positions.append(keep.cpu())
    return KVCache(
        keys=tuple(keys),
        values=tuple(values),
        token_ids=kv.token_ids,
        positions=torch.stack(positions),
    )
