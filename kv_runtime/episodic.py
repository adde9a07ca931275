"""Block-wise prefill under a KV budget: a context of any length, never more than M + block held.

EpiCache (Kim et al. 2025, https://arxiv.org/abs/2509.17396; reference code apple/ml-epicache)
builds a bounded cache for a conversation far longer than the cache may be: run the context in
blocks; after each block score every cached entry and keep the best `budget_tokens`; continue.
The KV held at any moment is the kept entries, one block and the scoring pass's transient
tokens, whatever the length of the conversation. What decides the result is the scorer:

- `prompt` (EpiCache): the attention an arbitrary prompt pays to each cached entry, the prompt run
  after the block and then cut off. EpiCache's prompt is an episode's "patched prompt" (its medoid
  windows behind an instruction). Per KV head: softmax(QK^T / sqrt(d)) of the prompt's queries
  over the cache, max over the prompt's positions and over the query heads of the group, as
  ml-epicache (and the KVzip code it adapts) does.
- `kvzip` (Kim et al. 2025, https://arxiv.org/abs/2505.23416): query-agnostic. After each block
  the model is asked to repeat that block ("Repeat the previous context exactly:" + the block's
  tokens, teacher-forced, in chunks as KVzip repeats a long context), and an entry's score is
  the most attention it received during any reconstruction so far (a running max: each entry is
  scored when its own block is repeated, as KVzip scores a context chunk by chunk). Each chunk's
  pass is cut off before the next, so the transient KV is one chunk.
- `snapkv`, `recent`, `knorm`: the one-shot scorers of `kv_runtime.eviction`, applied after each
  block (SnapKV's observation window is the block's last `window_tokens`, as EpiCache's
  baseline does).

Selection keeps the first `sink_tokens` and, at the end only, the last `recent_tokens` (a
generation re-feeds the context's last token, and a question reads its immediate context); the
rest of the budget goes to the best scores, chosen per layer and KV head so the cache stays
rectangular (EpiCache's "uniform" variant; its non-uniform one needs a custom attention kernel).

Layer budgets. EpiCache gives layers whose keys change most under block-wise prefill more of the
budget. That needs layers of different lengths, and a `KVCache` (with the KIVI assembly, the
store and transformers' causal mask behind it) keeps the same number of entries in every layer,
so every layer gets `budget_tokens` here and `layer_budgets` only accepts that.

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
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kv_runtime.cache import KVCache
from kv_runtime.errors import Cancelled, InvalidArgument
from kv_runtime.eviction import Scorer, SnapKVScorer, make_scorer, select, window_attention
from kv_runtime.forward import ModelRunner, ProgressCallback

PositionMode = Literal["original", "compacted", "auto"]
Meter = Callable[[DynamicCache], None]

# The scoring pass runs its prompt in pieces of at most this many tokens: the attention matrix
# it materialises per layer is (heads, piece, cached) floats.
SCORING_PIECE_TOKENS = 256

KVZIP_PROMPT = "\n\nRepeat the previous context exactly:\n"
KVZIP_CONTINUE_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


# -- scorers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockScorer:
    """Rates every cached entry after a block; higher is more worth keeping.

    `window_tokens`: how many of the block's last tokens' queries `score` needs (0: none).
    `accumulate`: the score of an entry is the max of what it scored after every block so far
    (KVzip's running max), instead of only its latest score.
    """

    name: ClassVar[str] = ""
    accumulate: ClassVar[bool] = False
    window_tokens: int = 0

    def score(
        self,
        runner: ModelRunner,
        cache: DynamicCache,
        *,
        next_position: int,
        block_ids: Sequence[int],
        window_queries: tuple[torch.Tensor, ...] | None,
        meter: Meter,
    ) -> list[torch.Tensor]:
        """cache: the kept entries plus the block (it must come back holding exactly those);
        next_position: the position id after the block; window_queries: per layer
        (1, heads, window_tokens, head_dim) of the block's last tokens, when asked for;
        meter(cache): call after anything that grows the cache (peak accounting).
        returns: per layer (1, kv_heads, cached) float32 scores."""
        raise NotImplementedError


@dataclass(frozen=True)
class PromptScorer(BlockScorer):
    """Attention received from an arbitrary prompt (EpiCache's patched prompt)."""

    name: ClassVar[str] = "prompt"
    prompt_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidArgument("the prompt scorer needs a non-empty scoring prompt (query_ids)")

    def score(
        self,
        runner: ModelRunner,
        cache: DynamicCache,
        *,
        next_position: int,
        block_ids: Sequence[int],
        window_queries: tuple[torch.Tensor, ...] | None,
        meter: Meter,
    ) -> list[torch.Tensor]:
        return attention_received(runner, cache, self.prompt_ids, next_position, meter)


@dataclass(frozen=True)
class KVzipScorer(BlockScorer):
    """Attention received while the model repeats the block (query-agnostic).

    The block is repeated in chunks of `chunk_tokens`, as KVzip repeats a long context: the
    first after `repeat_ids` ("Repeat the previous context exactly:"), each later one after
    `continue_ids` ("Repeat the part of the previous context exactly, starting with") and the
    previous chunk's last `overlap_tokens`. Each chunk's pass is cut off before the next, so the
    transient KV is one chunk. The default repeats a default block in one pass: 256-token
    chunks lowered the memory peak by a quarter but cost answer likelihood on LoCoMo (conv-26
    answer NLL 4.624 vs 4.440, conv-30 2.968 vs 2.976; benchmarks/episodic_scorers.py).
    """

    name: ClassVar[str] = "kvzip"
    accumulate: ClassVar[bool] = True
    repeat_ids: tuple[int, ...] = ()
    continue_ids: tuple[int, ...] = ()
    chunk_tokens: int = 1024
    overlap_tokens: int = 8

    def __post_init__(self) -> None:
        if not self.repeat_ids or not self.continue_ids:
            raise InvalidArgument("the kvzip scorer needs the token ids of its repeat prompts")

    def score(
        self,
        runner: ModelRunner,
        cache: DynamicCache,
        *,
        next_position: int,
        block_ids: Sequence[int],
        window_queries: tuple[torch.Tensor, ...] | None,
        meter: Meter,
    ) -> list[torch.Tensor]:
        best: list[torch.Tensor] | None = None
        for offset in range(0, len(block_ids), self.chunk_tokens):
            chunk = block_ids[offset : offset + self.chunk_tokens]
            if offset == 0:
                ids = (*self.repeat_ids, *chunk)
            else:
                tail = block_ids[max(0, offset - self.overlap_tokens) : offset]
                ids = (*self.continue_ids, *tail, *chunk)
            scores = attention_received(runner, cache, ids, next_position, meter)
            if best is not None:
                scores = [torch.maximum(a, b) for a, b in zip(best, scores, strict=True)]
            best = scores
        assert best is not None, "empty block"
        return best


@dataclass(frozen=True)
class KeyScorer(BlockScorer):
    """A one-shot scorer of `kv_runtime.eviction` run on each layer's keys after the block."""

    name: ClassVar[str] = "keys"
    scorer: Scorer = field(default_factory=SnapKVScorer)

    def score(
        self,
        runner: ModelRunner,
        cache: DynamicCache,
        *,
        next_position: int,
        block_ids: Sequence[int],
        window_queries: tuple[torch.Tensor, ...] | None,
        meter: Meter,
    ) -> list[torch.Tensor]:
        out = []
        for index, layer in enumerate(_layers(cache)):
            assert layer.keys is not None and layer.values is not None
            queries = window_queries[index] if window_queries is not None else None
            out.append(self.scorer.score(layer.keys, layer.values, queries).float())
        return out


def attention_received(
    runner: ModelRunner,
    cache: DynamicCache,
    prompt_ids: Sequence[int],
    start: int,
    meter: Meter,
) -> list[torch.Tensor]:
    """Per layer (1, kv_heads, cached): the most attention any of `prompt_ids` (run at positions
    start.. after the cache) pays to each cached entry, max over the prompt's positions and over
    the query heads sharing the KV head. The cache is cropped back to its entries afterwards.

    The prompt runs in pieces of `SCORING_PIECE_TOKENS`; a piece attends to the cache, the
    earlier pieces and itself (causal), exactly as one pass would.
    """
    cached = _entries(cache)
    best: list[torch.Tensor] | None = None
    try:
        for offset in range(0, len(prompt_ids), SCORING_PIECE_TOKENS):
            piece = prompt_ids[offset : offset + SCORING_PIECE_TOKENS]
            queries = runner.capture_queries(piece, cache, start + offset)
            meter(cache)
            scores = []
            for layer, q in zip(_layers(cache), queries, strict=True):
                assert layer.keys is not None
                kv_heads = layer.keys.shape[1]
                weights = window_attention(layer.keys, q)[..., :cached]  # (1, heads, piece, cached)
                weights = weights.amax(dim=2).view(1, kv_heads, -1, cached).amax(dim=2)
                scores.append(weights)
            if best is not None:
                scores = [torch.maximum(a, b) for a, b in zip(best, scores, strict=True)]
            best = scores
    finally:
        for layer in _layers(cache):  # the scoring tokens' entries are not kept
            assert layer.keys is not None and layer.values is not None
            layer.keys, layer.values = layer.keys[:, :, :cached], layer.values[:, :, :cached]
    assert best is not None, "empty scoring prompt"
    return best


BLOCK_SCORERS: tuple[str, ...] = ("prompt", "kvzip", "snapkv", "recent", "knorm")


def make_block_scorer(
    name: str,
    *,
    prompt_ids: Sequence[int] = (),
    repeat_ids: Sequence[int] = (),
    continue_ids: Sequence[int] = (),
    window_tokens: int = 64,
    chunk_tokens: int = 1024,
) -> BlockScorer:
    """The block scorer called `name` (one of `BLOCK_SCORERS`); InvalidArgument otherwise.

    prompt_ids: the scoring prompt of `prompt`; repeat_ids, continue_ids: KVzip's instructions
    (`KVZIP_PROMPT`, `KVZIP_CONTINUE_PROMPT` tokenized);
    window_tokens: SnapKV's observation window (EpiCache's baseline uses the block's last 64);
    chunk_tokens: how much of a block KVzip repeats in one pass.
    """
    if name == "prompt":
        return PromptScorer(prompt_ids=tuple(int(t) for t in prompt_ids))
    if name == "kvzip":
        return KVzipScorer(
            repeat_ids=tuple(int(t) for t in repeat_ids),
            continue_ids=tuple(int(t) for t in continue_ids),
            chunk_tokens=chunk_tokens,
        )
    if name == "snapkv":
        return KeyScorer(window_tokens=window_tokens, scorer=SnapKVScorer())
    if name in ("recent", "knorm"):
        return KeyScorer(scorer=make_scorer(name))
    raise InvalidArgument(f"scorer={name!r} is unknown; valid block scorers: {list(BLOCK_SCORERS)}")


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

    layer_budgets: per-layer budgets are not supported: a `KVCache` (and the KIVI and store paths
        behind it) is rectangular, every layer holds the same number of entries. Pass None, or a
        sequence whose entries all equal `budget_tokens`.
    positions: "compacted" (default, measured better), "original", or "auto" (compacted only
        when the context does not fit `max_positions`); see the module docstring.
    progress(done_tokens, total_tokens) after every block; raising from it aborts the build.
    cancel() returning True aborts it with `Cancelled` (checked between blocks and while waiting
    for the model).
    """
    n = len(token_ids)
    _check_arguments(n, budget_tokens, block_tokens, sink_tokens, recent_tokens, layer_budgets)
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
    if compacted and max_positions is not None and budget_tokens + block_tokens > max_positions:
        raise InvalidArgument(
            f"budget_tokens + block_tokens = {budget_tokens + block_tokens} exceeds the model's "
            f"{max_positions} positions, which compacted positions must stay below"
        )
    rotary = _Rotary.of(runner) if compacted else None

    cache = DynamicCache()
    kept_at: torch.Tensor | None = None  # (layers, kv_heads, kept) original positions
    at: torch.Tensor | None = None  # current RoPE positions of the kept entries (compacted)
    scores: list[torch.Tensor] | None = None  # running scores of the kept entries (accumulate)
    peak = 0

    def meter(live: DynamicCache) -> None:
        nonlocal peak
        peak = max(peak, _nbytes(live))

    for start in range(0, n, block_tokens):
        if cancel is not None and cancel():
            raise Cancelled("budgeted prefill cancelled")
        block = [int(t) for t in token_ids[start : start + block_tokens]]
        cached = _entries(cache)
        first = cached if compacted else start  # RoPE position of the block's first token
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
        block_positions = torch.arange(start, start + len(block))
        layers, kv_heads = len(cache.layers), _kv_heads(cache)
        new = block_positions.expand(layers, kv_heads, len(block))
        kept_at = new.clone() if kept_at is None else torch.cat([kept_at, new], dim=-1)
        if compacted:
            slots = torch.arange(first, first + len(block)).expand(layers, kv_heads, len(block))
            at = slots.clone() if at is None else torch.cat([at, slots], dim=-1)
        last = start + len(block) >= n
        total = _entries(cache)
        if total > budget_tokens or scorer.accumulate:
            fresh = scorer.score(
                runner,
                cache,
                next_position=first + len(block),
                block_ids=block,
                window_queries=window_queries,
                meter=meter,
            )
            assert _entries(cache) == total, "a scorer changed the cache"
            if scorer.accumulate and scores is not None:
                padded = [
                    torch.cat([s, torch.full_like(f[..., cached:], -math.inf)], dim=-1)
                    for s, f in zip(scores, fresh, strict=True)
                ]
                fresh = [torch.maximum(p, f) for p, f in zip(padded, fresh, strict=True)]
            scores = fresh
        if total > budget_tokens:
            assert scores is not None
            keep = [
                select(s, budget_tokens, sink_tokens, recent_tokens if last else 0) for s in scores
            ]
            cache, kept_at, scores, at = _gather(cache, keep, kept_at, scores, at)
            if rotary is not None:
                assert at is not None
                cache, at = rotary.compact(cache, at)
        if progress is not None:
            progress(start + len(block), n)
    assert kept_at is not None
    kv = _result(cache, token_ids, kept_at, compacted)
    return BudgetedPrefill(
        kv=kv,
        peak_kv_bytes=peak,
        prefilled_tokens=n,
        original_positions=kept_at,
        compacted=compacted,
    )


def _check_arguments(
    n: int,
    budget: int,
    block: int,
    sinks: int,
    recent: int,
    layer_budgets: Sequence[int] | None,
) -> None:
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
    if layer_budgets is not None and any(int(b) != budget for b in layer_budgets):
        raise InvalidArgument(
            "per-layer budgets are not supported: a KVCache keeps the same number of entries in "
            f"every layer; pass layer_budgets=None or all equal to budget_tokens={budget}"
        )


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, which are all `DynamicLayer`s (full attention: `Runtime.load` checks)."""
    layers = list(cache.layers)
    assert all(isinstance(layer, DynamicLayer) for layer in layers), "unsupported cache layers"
    return layers  # type: ignore[return-value]


def _entries(cache: DynamicCache) -> int:
    if not _layers(cache):
        return 0
    keys = _layers(cache)[0].keys
    return 0 if keys is None else int(keys.shape[2])


def _kv_heads(cache: DynamicCache) -> int:
    keys = _layers(cache)[0].keys
    assert keys is not None
    return int(keys.shape[1])


def _nbytes(cache: DynamicCache) -> int:
    total = 0
    for layer in _layers(cache):
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
    kept_at: torch.Tensor,
    scores: list[torch.Tensor],
    at: torch.Tensor | None,
) -> tuple[DynamicCache, torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """The cache, positions and scores of the kept entries (keep: per layer (kv_heads, kept))."""
    out = DynamicCache()
    positions, kept_scores, slots = [], [], []
    for index, (layer, chosen) in enumerate(zip(_layers(cache), keep, strict=True)):
        assert layer.keys is not None and layer.values is not None
        heads, count, dim = layer.keys.shape[1], chosen.shape[1], layer.keys.shape[3]
        gather = chosen[None, :, :, None].expand(1, heads, count, dim).to(layer.keys.device)
        out.layers.append(_layer(layer.keys.gather(2, gather), layer.values.gather(2, gather)))
        layer.keys = layer.values = None  # free the old entries before the next layer's copy
        positions.append(kept_at[index].gather(1, chosen.cpu()))
        kept_scores.append(scores[index].gather(2, chosen[None].to(scores[index].device)))
        if at is not None:
            slots.append(at[index].gather(1, chosen.cpu()))
    return out, torch.stack(positions), kept_scores, torch.stack(slots) if at is not None else None


def _result(
    cache: DynamicCache, token_ids: Sequence[int], kept_at: torch.Tensor, compacted: bool
) -> KVCache:
    keys, values = [], []
    for layer in _layers(cache):
        assert layer.keys is not None and layer.values is not None
        keys.append(layer.keys)
        values.append(layer.values)
    ids = tuple(int(t) for t in token_ids)
    if kept_at.shape[-1] == len(ids):  # nothing was evicted: a plain prefill
        return KVCache(keys=tuple(keys), values=tuple(values), token_ids=ids)
    if compacted:
        # The cache now reads as a context of `kept` tokens at 0..kept-1, so a generation
        # continues at `kept`. It stays marked as evicted (positions set), so nothing treats
        # it as a prefix of its token ids, which are only a stand-in here.
        stand_in = tuple(ids[int(p)] for p in kept_at[0, 0])
        slots = torch.arange(len(stand_in)).expand_as(kept_at).clone()
        return KVCache(keys=tuple(keys), values=tuple(values), token_ids=stand_in, positions=slots)
    return KVCache(keys=tuple(keys), values=tuple(values), token_ids=ids, positions=kept_at.clone())


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

    def compact(self, cache: DynamicCache, at: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
        """Re-rotate every layer's keys from positions `at` (layers, kv_heads, kept) to
        0..kept-1 (the entries are in position order per head, so slot order is kept)."""
        kept = at.shape[-1]
        target = torch.arange(kept).expand_as(at)
        delta = target - at  # rotate by the difference: R(target) = R(delta) R(at)
        for index, layer in enumerate(_layers(cache)):
            assert layer.keys is not None
            layer.keys = self.rotate(layer.keys, delta[index])
        return cache, target.clone()

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
