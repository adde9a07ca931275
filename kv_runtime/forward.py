"""`ModelRunner`: every forward pass of the shared model goes through here, under one lock.

Why a lock: on CPU one forward already uses every core, so running two at once only slows both;
on CUDA a single stream serialises them anyway. Requests therefore interleave step by step
(a decode step is a few milliseconds to a few hundred), each with its own transformers cache, and
nothing a forward touches is shared between requests except the (read-only) weights. The lock
(`kv_runtime.turns.ModelLock`) is handed over in turn, interactive work before background work,
so no request starves; every pass's running time feeds `throughput`, the model's measured speed.

Query capture for SnapKV: the attention queries of an observation window are read where the model
itself hands them to its attention function, through a capturing implementation registered in
transformers' `AttentionInterface`. The queries are therefore exactly the model's, after any
q-norm and RoPE, for every architecture that dispatches attention through that interface.

Ragged caches (per-layer budgets, `kv_runtime.layer_budgets`): transformers builds one causal
mask for all layers, sized by layer 0's cache, which is wrong for a layer holding more or fewer
entries. A forward over a ragged cache therefore runs through `_RAGGED`, an implementation with
no mask function registered (transformers then passes no mask) whose attention builds each
layer's own: every cached entry precedes the new tokens, so new token i sees the layer's cached
entries and new tokens 0..i (batch 1, no padding, as everywhere in this runtime).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import Cache

from kv_runtime.errors import Cancelled
from kv_runtime.throughput import Throughput
from kv_runtime.turns import ModelLock

_CAPTURE = "memosd_capture_queries"
_RAGGED = "memosd_ragged"  # the same attention without a mask function: per-layer causal masks
_captured = threading.local()  # the dict the capturing attention writes into, per thread


def _attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """SDPA, recording `query` (batch, heads, q_len, head_dim) by layer when a capture is on,
    and with this layer's own causal mask when transformers passed none for a multi-token pass.

    The query is recorded rescaled so that q.k / sqrt(head_dim) is the model's attention logit
    whatever scaling the model uses (a no-op for the usual head_dim ** -0.5).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sink = getattr(_captured, "queries", None)
    if sink is not None:
        head_dim = query.shape[-1]
        scaling = kwargs.get("scaling") or head_dim**-0.5
        sink[int(module.layer_idx)] = (
            query.detach() * (scaling * math.sqrt(head_dim))
        ).contiguous()
    new, total = query.shape[2], key.shape[2]
    if attention_mask is None and 1 < new < total:
        # SDPA's is_causal aligns the triangle top-left; the new tokens come after the cache.
        attention_mask = torch.ones(new, total, dtype=torch.bool, device=query.device)
        attention_mask = attention_mask.tril(total - new)[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_CAPTURE, _attention)
    AttentionMaskInterface.register(_CAPTURE, sdpa_mask)
    AttentionInterface.register(_RAGGED, _attention)


def is_ragged(cache: Cache) -> bool:
    """Whether the cache's layers hold different numbers of entries."""
    lengths = {
        int(layer.keys.shape[2])
        for layer in getattr(cache, "layers", ())
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4
    }
    return len(lengths) > 1


class ModelRunner:
    """A causal LM in eval mode on one device, with the lock its forward passes share and the
    moving averages of their speed."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.lock = ModelLock()
        self.throughput = Throughput()
        _register_attention()

    def forward(
        self,
        token_ids: Sequence[int],
        cache: Cache,
        start: int,
        *,
        all_logits: bool = False,
        cancel: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Run `token_ids` at positions start.. on top of `cache` (which grows by them).

        returns: (vocab,) float32 logits of the last token, or (tokens, vocab) for every token
        when `all_logits`. The positions are RoPE positions; the cache may hold fewer entries
        than `start` (evicted tokens), the causal mask only depends on how many it holds.
        `cancel`: checked while waiting for the model (another request's prefill chunk may hold
        it for a while); once it returns True, `Cancelled` is raised and nothing runs.
        """
        if not self.lock.acquire(cancel):
            raise Cancelled("cancelled while waiting for the model")
        try:
            with self._attention_for(cache, capture=False):
                logits = self._run(token_ids, cache, start, all_logits)
        finally:
            self.lock.release()
        return logits if all_logits else logits[-1]

    def capture_queries(
        self, token_ids: Sequence[int], cache: Cache, start: int
    ) -> tuple[torch.Tensor, ...]:
        """Like `forward`, but return each layer's attention queries for these tokens.

        returns: per layer (1, attention_heads, len(token_ids), head_dim), model dtype.
        """
        config = self.model.config
        queries: dict[int, torch.Tensor] = {}
        with self.lock, self._attention_for(cache, capture=True):
            _captured.queries = queries
            try:
                self._run(token_ids, cache, start)
            finally:
                _captured.queries = None
        layers = int(config.num_hidden_layers)
        assert sorted(queries) == list(range(layers)), (
            f"captured queries for layers {sorted(queries)}; the model did not dispatch "
            "attention through transformers' AttentionInterface"
        )
        return tuple(queries[i] for i in range(layers))

    @contextmanager
    def _attention_for(self, cache: Cache, *, capture: bool) -> Iterator[None]:
        """Run the model's attention through ours for a capture or a ragged cache (the caller
        holds the lock, so no other pass sees the switched implementation)."""
        config = self.model.config
        previous = config._attn_implementation
        wanted = _RAGGED if is_ragged(cache) else _CAPTURE if capture else previous
        config._attn_implementation = wanted
        try:
            yield
        finally:
            config._attn_implementation = previous

    def _run(
        self, token_ids: Sequence[int], cache: Cache, start: int, all_logits: bool = False
    ) -> torch.Tensor:
        """(tokens or 1, vocab) float32 logits; the caller holds the lock."""
        assert len(token_ids) > 0, "nothing to run"
        started = time.perf_counter()
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(token_ids), device=self.device)[None]
        with torch.no_grad():
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
            )
            logits = out.logits[0].float()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the pass's real time, for `throughput`
        self.throughput.observe(len(token_ids), time.perf_counter() - started)
        return logits


ProgressCallback = Callable[[int, int], None]
