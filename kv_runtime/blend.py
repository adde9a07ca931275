"""Blending: a prompt's KV cache assembled from chunks computed on their own (CacheBlend).

A note recalled in a chat turn lands at a new position, after different notes, each time; prefix
caching cannot reuse it. CacheBlend (Yao et al., https://arxiv.org/abs/2405.16444) reuses each
chunk's own cache anyway and repairs what is missing, the chunk's attention to what now precedes it:

1. Each chunk is prefilled alone (`build_chunk`), optionally after a fixed preamble (below), and
   its keys are kept with the position they were rotated for (`ChunkKV.start`).
2. In a prompt [prefix | chunk, chunk, text, ... ], each chunk's keys are re-rotated to their new
   positions (`kv_runtime.rope`) and the caches are concatenated.
3. Layers 0..check_layer are recomputed for every chunk token (layer 0 needs no context to be
   exact; its output is what the check layer's fresh values are computed from). At the check
   layer each chunk token's deviation, the sum over heads and channels of
   (V_fresh - V_cached)^2, ranks it; the top `recompute_ratio` share is carried on and recomputed
   in every later layer, attending to the whole blended cache; their keys and values overwrite
   the cached ones. The other chunk tokens keep their cached keys and values above the check layer.
4. New text (the question, notes without a chunk) is computed in every layer, in the same pass,
   like CacheBlend's suffix. The prefix (a cache computed in context, e.g. the system text and
   the chat so far) is exact and never recomputed.

With recompute_ratio = 1 every token is recomputed in every layer: the result is a full prefill's
(the tests check the logits). recompute_ratio = 0 is the "no recompute" baseline: chunks are only
re-rotated, nothing of theirs is computed; `rerotate_keys=False` is the naive baseline, the bare
concatenation MemOS does (its issue #2315): every chunk keeps the positions it was computed at.

Deviations from the reference code, and why: the check layer's fresh keys and values are kept for
every chunk token, not only the selected ones (they are computed anyway, and they are exact);
deviation uses values, as the paper's vLLM code does (LMCache's uses keys).

Preamble: a chunk prefilled from position 0 makes its first token an attention sink (the first
token of a sequence collects much of the attention mass); `build_chunk(preamble=...)` can instead
prefill the chunk after a fixed preamble (e.g. the chat's system turn) and keep only the chunk's
entries. Measured on SmolLM2-135M with LoCoMo notes (benchmarks/blend.py), the preamble made
things worse, not better (next-token KL against a full prefill 0.45 vs 0.16 at r = 0.15, 0.64 vs
0.48 at r = 0): every note then reads as the first after the header, while the per-chunk sinks
are exactly the tokens the check layer picks for recompute. So chunks start at position 0 by
default; the option stays, to be measured again on other models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from kv_runtime.cache import KVCache
from kv_runtime.errors import InvalidArgument
from kv_runtime.forward import ModelRunner
from kv_runtime.rope import Rotary


@dataclass(frozen=True, eq=False)
class ChunkKV:
    """A chunk's cache computed without the prompt's context.

    kv: the chunk's tokens only, unevicted; keys rotated for positions start..start+length-1.
    start: where the chunk sat when it was computed (the preamble's length, 0 without one).
    """

    kv: KVCache
    start: int = 0

    def __post_init__(self) -> None:
        assert self.kv.positions is None, "a chunk is never evicted"
        assert self.start >= 0, f"start={self.start} is negative"

    @property
    def length(self) -> int:
        return self.kv.length

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.kv.token_ids


Segment = ChunkKV | Sequence[int]
"""A piece of a blended prompt: a cached chunk, or new text (token ids) computed in full."""


@dataclass(frozen=True, eq=False)
class BlendResult:
    """The blended cache and what it cost.

    kv: [prefix | segments...] at positions 0..length-1, like a prefill of the same tokens.
    logits: (vocab,) float32 for the last token when it was computed in every layer (new text
        last, or a chunk token that was recomputed); None otherwise.
    reused_tokens: prefix tokens plus chunk tokens whose cached entries were kept above the
        check layer. recomputed_tokens: chunk tokens recomputed in every layer.
    new_tokens: tokens of new text (computed in full, not counted in the other two).
    recomputed: the positions of the recomputed chunk tokens, ascending.
    """

    kv: KVCache
    logits: torch.Tensor | None
    reused_tokens: int
    recomputed_tokens: int
    new_tokens: int
    recomputed: tuple[int, ...]


def build_chunk(
    runner: ModelRunner,
    token_ids: Sequence[int],
    *,
    preamble: Sequence[int] = (),
) -> ChunkKV:
    """Prefill `token_ids` after `preamble` (not kept) and return the chunk's own entries.

    returns: ChunkKV whose kv holds (1, kv_heads, len(token_ids), head_dim) per layer, rotated for
    positions len(preamble).. . One forward pass: chunks are notes, short by construction.
    """
    if not token_ids:
        raise InvalidArgument("cannot build a chunk of no tokens: token_ids is empty")
    ids = [*preamble, *token_ids]
    cache = DynamicCache()
    runner.forward(ids, cache, 0)
    whole = KVCache.from_transformers(cache, ids)
    cut = len(preamble)
    kv = KVCache(
        keys=tuple(k[:, :, cut:].contiguous() for k in whole.keys),
        values=tuple(v[:, :, cut:].contiguous() for v in whole.values),
        token_ids=tuple(int(t) for t in token_ids),
    )
    return ChunkKV(kv=kv, start=cut)


def rerotate(chunk: ChunkKV, new_start: int, rotary: Rotary) -> ChunkKV:
    """The chunk with its keys moved to positions new_start..new_start+length-1 (values shared).

    Exact to float32 rounding: equals the keys of a prefill of the chunk's tokens (after the
    same preamble) started at that position (see `kv_runtime.rope`).
    """
    if new_start < 0:
        raise InvalidArgument(f"new_start={new_start} must be >= 0")
    if new_start == chunk.start:
        return chunk
    n = chunk.length
    device = chunk.kv.device
    source = torch.arange(chunk.start, chunk.start + n, device=device)
    target = torch.arange(new_start, new_start + n, device=device)
    keys = rotary.move(chunk.kv.keys, source, target)
    kv = KVCache(keys=keys, values=chunk.kv.values, token_ids=chunk.kv.token_ids)
    return ChunkKV(kv=kv, start=new_start)


class _Scatter:
    """Stands in for a transformers cache during one layer of a blend.

    The attention hands it the fresh keys and values of the tokens being computed
    (`rows`, global positions); they are written into the layer's blended tensors, which the
    attention then reads whole. At the check layer the values they replace are kept first.
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, check: bool
    ) -> None:
        self.keys, self.values, self.rows, self.check = keys, values, rows, check
        self.replaced: torch.Tensor | None = None

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.check:
            self.replaced = self.values[:, :, self.rows].float()
        self.keys[:, :, self.rows] = key.to(self.keys.dtype)
        self.values[:, :, self.rows] = value.to(self.values.dtype)
        return self.keys, self.values


def _selection_size(ratio: float, chunk_tokens: int) -> int:
    return min(chunk_tokens, math.floor(ratio * chunk_tokens + 1e-9))


def blend(
    runner: ModelRunner,
    prefix: KVCache | None,
    segments: Sequence[Segment],
    *,
    recompute_ratio: float,
    check_layer: int = 1,
    rerotate_keys: bool = True,
) -> BlendResult:
    """Build the cache of [prefix | segments...] the CacheBlend way (see the module docstring).

    prefix: an unevicted cache computed in context (positions 0..), or None.
    segments: chunks (any start) and new text, in prompt order; none empty.
    recompute_ratio: share of chunk tokens recomputed above the check layer, in [0, 1]; 0 computes
        nothing of the chunks (the baseline), 1 everything (a full prefill).
    check_layer: the layer whose value deviation picks the tokens; 0..layers-1.
    rerotate_keys: False for the naive baseline (chunk keys keep their computed positions).
    Holds the model lock for the whole pass (one layer at a time, all tokens of the prompt).
    """
    model = runner.model
    decoder = model.model
    layers = decoder.layers
    if not 0.0 <= recompute_ratio <= 1.0:
        raise InvalidArgument(f"recompute_ratio={recompute_ratio} must be in [0, 1]")
    if not 0 <= check_layer < len(layers):
        raise InvalidArgument(f"check_layer={check_layer} must be in 0..{len(layers) - 1}")
    if not segments:
        raise InvalidArgument("nothing to blend: segments is empty")
    if prefix is not None and prefix.positions is not None:
        raise InvalidArgument("the prefix cache was evicted; blending needs every prefix entry")
    rotary = Rotary(model)
    device = runner.device
    for i, part in enumerate([prefix, *segments]):
        kv = part.kv if isinstance(part, ChunkKV) else part
        if isinstance(kv, KVCache) and kv.layers != len(layers):
            where = "prefix" if i == 0 else f"segments[{i - 1}]"
            raise InvalidArgument(f"{where} has {kv.layers} layers; the model has {len(layers)}")
    start = prefix.length if prefix is not None else 0

    # Lay the segments out: every chunk re-rotated to where it now sits, new text as ids.
    ids: list[int] = list(prefix.token_ids) if prefix is not None else []
    placed: list[ChunkKV | int] = []  # per segment: the chunk at its new place, or text's length
    chunk_rows: list[torch.Tensor] = []
    new_rows: list[torch.Tensor] = []
    for i, segment in enumerate(segments):
        here = len(ids)
        if isinstance(segment, ChunkKV):
            if segment.length == 0:
                raise InvalidArgument(f"segments[{i}] is an empty chunk")
            chunk = ChunkKV(segment.kv.to(device), segment.start)
            placed.append(rerotate(chunk, here, rotary) if rerotate_keys else chunk)
            ids += chunk.token_ids
            chunk_rows.append(torch.arange(here, len(ids), device=device))
        else:
            if len(segment) == 0:
                raise InvalidArgument(f"segments[{i}] is empty text")
            placed.append(len(segment))
            ids += [int(t) for t in segment]
            new_rows.append(torch.arange(here, len(ids), device=device))
    total = len(ids)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    chunk_at = torch.cat(chunk_rows) if chunk_rows else empty
    new_at = torch.cat(new_rows) if new_rows else empty
    chunk_tokens = int(chunk_at.numel())
    selected_count = _selection_size(recompute_ratio, chunk_tokens)
    recompute = recompute_ratio > 0 and chunk_tokens > 0

    config = model.config.get_text_config(decoder=True)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", heads))

    def layer_cache(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, kv_heads, total, head_dim) keys, values of one layer before it is computed:
        prefix and chunks as cached, zeros where new text goes (always overwritten)."""
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        if prefix is not None:
            keys.append(prefix.keys[layer].to(device))
            values.append(prefix.values[layer].to(device))
        for chunk in placed:
            if isinstance(chunk, ChunkKV):
                keys.append(chunk.kv.keys[layer])
                values.append(chunk.kv.values[layer])
            else:
                shape = (1, kv_heads, chunk, head_dim)
                keys.append(torch.zeros(shape, dtype=model.dtype, device=device))
                values.append(torch.zeros(shape, dtype=model.dtype, device=device))
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    everything = torch.arange(total, device=device)
    rows = torch.cat([chunk_at, new_at]).sort().values if recompute else new_at
    recomputed = chunk_at if recompute and selected_count == chunk_tokens else empty
    out_keys: list[torch.Tensor] = []
    out_values: list[torch.Tensor] = []
    logits: torch.Tensor | None = None
    token_tensor = torch.tensor(ids, dtype=torch.long, device=device)
    with runner.lock, torch.no_grad():
        hidden = decoder.embed_tokens(token_tensor[rows][None]) if rows.numel() else None
        for index, layer in enumerate(layers):
            keys, values = layer_cache(index)
            if hidden is not None and rows.numel():
                cos, sin = rotary.embeddings(rows, hidden.dtype)
                mask = (everything[None, :] <= rows[:, None])[None, None]  # (1, 1, rows, total)
                checking = recompute and index == check_layer and selected_count < chunk_tokens
                sink = _Scatter(keys, values, rows, checking)
                # Positional: the cache argument is named differently across transformers versions.
                hidden = layer(hidden, mask, rows[None], sink, position_embeddings=(cos, sin))
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
                if checking:
                    assert sink.replaced is not None, "the attention did not update its cache"
                    rows, hidden, recomputed = _select(
                        sink.replaced, values, rows, hidden, chunk_at, selected_count
                    )
            out_keys.append(keys)
            out_values.append(values)
        if hidden is not None and rows.numel() and int(rows[-1]) == total - 1:
            last = decoder.norm(hidden[:, -1:])
            logits = model.lm_head(last)[0, -1].float()
    kv = KVCache(keys=tuple(out_keys), values=tuple(out_values), token_ids=tuple(ids))
    recomputed_count = int(recomputed.numel())
    return BlendResult(
        kv=kv,
        logits=logits,
        reused_tokens=start + chunk_tokens - recomputed_count,
        recomputed_tokens=recomputed_count,
        new_tokens=int(new_at.numel()),
        recomputed=tuple(int(p) for p in recomputed.tolist()),
    )


def _select(
    replaced: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    hidden: torch.Tensor,
    chunk_at: torch.Tensor,
    count: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the `count` chunk tokens whose values moved most at the check layer, and all new text.

    replaced: (1, kv_heads, rows, head_dim) float32 cached values the check layer overwrote;
    values: the layer's tensor after it; rows: (r,) positions computed so far, ascending;
    hidden: (1, r, hidden) their layer outputs; chunk_at: (c,) positions of chunk tokens.
    returns: rows to carry on, their hidden states, the recomputed chunk positions (ascending).
    """
    fresh = values[:, :, rows].float()
    deviation = ((fresh - replaced) ** 2).sum(dim=(0, 1, 3))  # (rows,)
    is_chunk = torch.isin(rows, chunk_at)
    deviation = torch.where(is_chunk, deviation, torch.full_like(deviation, -1.0))
    chosen = torch.topk(deviation, count).indices if count else rows[:0]
    keep = ~is_chunk
    keep[chosen] = True
    kept_rows = rows[keep]
    return kept_rows, hidden[:, keep], kept_rows[torch.isin(kept_rows, chunk_at)]
