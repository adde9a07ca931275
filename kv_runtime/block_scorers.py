"""Block scorers: how a budgeted prefill (`kv_runtime.episodic`) rates the cached entries after
each block. Each is a small frozen dataclass overriding one `score` method, registered by name in
`BLOCK_SCORERS` and built by `make_block_scorer`:

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
- `prompt+kvzip`: both, an entry scoring the more of the two, as a running max over the blocks
  like KVzip's (the most attention an episode's prompt paid it after any block, or the most it
  received while its block was repeated). An episode's cache then keeps what the
  reconstruction needs plus what the episode points at.
- `snapkv`, `recent`, `knorm`: the one-shot scorers of `kv_runtime.eviction`, applied after each
  block (SnapKV's observation window is the block's last `window_tokens`, as EpiCache's
  baseline does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kv_runtime.errors import InvalidArgument
from kv_runtime.eviction import Scorer, SnapKVScorer, make_scorer, window_attention
from kv_runtime.forward import ModelRunner

Meter = Callable[[DynamicCache], None]

# The scoring pass runs its prompt in pieces of at most this many tokens: the attention matrix
# it materialises per layer is (heads, piece, cached) floats.
SCORING_PIECE_TOKENS = 256

KVZIP_PROMPT = "\n\nRepeat the previous context exactly:\n"
KVZIP_CONTINUE_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


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
                scores = layerwise_max(best, scores)
            best = scores
        assert best is not None, "empty block"
        return best


@dataclass(frozen=True, kw_only=True)
class PromptKVzipScorer(BlockScorer):
    """The larger of the prompt's attention and KVzip's reconstruction score, both kept as a
    running max over the blocks (`accumulate`)."""

    name: ClassVar[str] = "prompt+kvzip"
    accumulate: ClassVar[bool] = True
    prompt: PromptScorer
    kvzip: KVzipScorer

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
        both = [
            scorer.score(
                runner,
                cache,
                next_position=next_position,
                block_ids=block_ids,
                window_queries=window_queries,
                meter=meter,
            )
            for scorer in (self.prompt, self.kvzip)
        ]
        return layerwise_max(*both)


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
        for index, layer in enumerate(cache_layers(cache)):
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
    cached = layer_lengths(cache)
    best: list[torch.Tensor] | None = None
    try:
        for offset in range(0, len(prompt_ids), SCORING_PIECE_TOKENS):
            piece = prompt_ids[offset : offset + SCORING_PIECE_TOKENS]
            queries = runner.capture_queries(piece, cache, start + offset)
            meter(cache)
            scores = []
            for layer, q, c in zip(cache_layers(cache), queries, cached, strict=True):
                assert layer.keys is not None
                kv_heads = layer.keys.shape[1]
                weights = window_attention(layer.keys, q)[..., :c]  # (1, heads, piece, cached)
                weights = weights.amax(dim=2).view(1, kv_heads, -1, c).amax(dim=2)
                scores.append(weights)
            if best is not None:
                scores = layerwise_max(best, scores)
            best = scores
    finally:
        for layer, c in zip(cache_layers(cache), cached, strict=True):  # scoring entries not kept
            assert layer.keys is not None and layer.values is not None
            layer.keys, layer.values = layer.keys[:, :, :c], layer.values[:, :, :c]
    assert best is not None, "empty scoring prompt"
    return best


BLOCK_SCORERS: tuple[str, ...] = ("prompt", "kvzip", "prompt+kvzip", "snapkv", "recent", "knorm")


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
    if name in ("kvzip", "prompt+kvzip"):
        kvzip = KVzipScorer(
            repeat_ids=tuple(int(t) for t in repeat_ids),
            continue_ids=tuple(int(t) for t in continue_ids),
            chunk_tokens=chunk_tokens,
        )
        if name == "kvzip":
            return kvzip
        return PromptKVzipScorer(
            prompt=PromptScorer(prompt_ids=tuple(int(t) for t in prompt_ids)), kvzip=kvzip
        )
    if name == "snapkv":
        return KeyScorer(window_tokens=window_tokens, scorer=SnapKVScorer())
    if name in ("recent", "knorm"):
        return KeyScorer(scorer=make_scorer(name))
    raise InvalidArgument(f"scorer={name!r} is unknown; valid block scorers: {list(BLOCK_SCORERS)}")


def layerwise_max(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the elementwise larger of two scores of the same entries."""
    return [torch.maximum(x, y) for x, y in zip(a, b, strict=True)]


# -- cache helpers ---------------------------------------------------------------------------


def cache_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, which are all `DynamicLayer`s (full attention: `Runtime.load` checks)."""
    layers = list(cache.layers)
    assert all(isinstance(layer, DynamicLayer) for layer in layers), "unsupported cache layers"
    return layers  # type: ignore[return-value]


def layer_lengths(cache: DynamicCache) -> list[int]:
    """Entries per layer ([] before the first forward)."""
    return [0 if layer.keys is None else int(layer.keys.shape[2]) for layer in cache_layers(cache)]
