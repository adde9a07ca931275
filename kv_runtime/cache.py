"""`KVCache`: the keys and values a prefill captured, typed, with their original positions.

Keys are stored after RoPE, exactly as the model's attention layers cached them, so a kept entry
carries its original position inside its key; new tokens only need position ids that continue
from the original length (`KVCache.length`), whatever was evicted.

The runtime handles one sequence at a time: batch is always 1.

Sharing without copying: `to_transformers` hands the model a `DynamicCache` whose layers hold
this cache's own tensors. transformers' `DynamicLayer.update` appends with `torch.cat` and
`crop` slices, both out of place: they rebind the layer's tensors and never write into the old
ones, so a request that grows (or crops) its cache leaves the shared tensors bit-identical and
many requests can read one cache at once. The first forward's `torch.cat` is the request's one
private copy, exactly what a plain `DynamicCache` kept in process pays. `Runtime.load` checks
this on the loaded model and transformers version, and the tests assert it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass(frozen=True, eq=False)
class KVCache:
    """Per-layer keys and values of one context.

    keys[l], values[l]: (1, kv_heads, kept_l, head_dim), the model's dtype, one device.
    token_ids:          the whole original context (`length` ids), evicted tokens included.
    positions:          (layers, kv_heads, kept) int64 original position of every kept entry,
                        ascending per head; None when nothing was evicted (0..length-1).

    Every layer keeps the same number of entries, except a cache evicted under per-layer
    budgets (`ragged`, see `kv_runtime.layer_budgets`): layer l keeps `layer_kept[l]` entries,
    `kept` is the most any layer keeps, and `positions` is padded with -1 past each layer's
    entries. The model reads a ragged cache through a mask-free attention
    (`kv_runtime.forward`); the KIVI and store paths take rectangular caches only.

    Treat the tensors as read-only: every request reads them through `to_transformers`.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    token_ids: tuple[int, ...]
    positions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert len(self.keys) == len(self.values) > 0, "one key and one value tensor per layer"
        shape = tuple(self.keys[0].shape)
        assert len(shape) == 4 and shape[0] == 1, f"keys must be (1, heads, tokens, dim): {shape}"
        for k, v in zip(self.keys, self.values, strict=True):
            assert tuple(k.shape) == tuple(v.shape), "keys and values differ in shape"
            layer_shape = (k.shape[0], k.shape[1], k.shape[3])
            assert layer_shape == (1, shape[1], shape[3]), "layers differ in heads or head_dim"
            assert k.dtype == v.dtype == self.keys[0].dtype, "mixed dtypes"
        if self.positions is None:
            assert not self.ragged, "only an evicted cache may keep different counts per layer"
            assert shape[2] == len(self.token_ids), "an unevicted cache has one entry per token"
        else:
            want = (len(self.keys), shape[1], self.kept)
            assert tuple(self.positions.shape) == want, f"positions must be {want}"
            assert self.positions.dtype == torch.int64, "positions are int64"

    # -- shape ------------------------------------------------------------------------------

    @property
    def layers(self) -> int:
        return len(self.keys)

    @property
    def kv_heads(self) -> int:
        return int(self.keys[0].shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.keys[0].shape[3])

    @property
    def kept(self) -> int:
        """Entries per layer and head (== `length` unless tokens were evicted); the most any
        layer keeps when the cache is `ragged`."""
        return max(self.layer_kept)

    @property
    def layer_kept(self) -> tuple[int, ...]:
        """Entries per head of every layer."""
        return tuple(int(k.shape[2]) for k in self.keys)

    @property
    def ragged(self) -> bool:
        """Whether the layers keep different numbers of entries (per-layer budgets)."""
        return len(set(self.layer_kept)) > 1

    @property
    def length(self) -> int:
        """Tokens of the original context; the next token's position id."""
        return len(self.token_ids)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def nbytes(self) -> int:
        """Bytes of the key and value tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # -- conversion -------------------------------------------------------------------------

    def to_transformers(self) -> DynamicCache:
        """A fresh transformers cache over these tensors, without copying them: a request may
        grow or crop it, never this one (see the module docstring for why that holds).

        `DynamicCache(pairs)` would copy every tensor once more (it fills its layers through
        `update`, a `torch.cat` onto an empty tensor), so the layers are built here directly.
        """
        cache = DynamicCache()
        for k, v in zip(self.keys, self.values, strict=True):
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
        return cache

    def to(self, device: torch.device | str) -> KVCache:
        """The same cache on `device` (self when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return KVCache(
            keys=tuple(k.to(device) for k in self.keys),
            values=tuple(v.to(device) for v in self.values),
            token_ids=self.token_ids,
            positions=self.positions,
        )

    @classmethod
    def from_transformers(cls, cache: DynamicCache, token_ids: Sequence[int]) -> KVCache:
        """Capture a transformers cache filled by a prefill of exactly `token_ids`."""
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for layer in cache.layers:
            assert isinstance(layer, DynamicLayer), f"unsupported cache layer {type(layer)}"
            assert layer.keys is not None and layer.values is not None, "empty cache layer"
            keys.append(layer.keys)
            values.append(layer.values)
        ids = tuple(int(t) for t in token_ids)
        return cls(keys=tuple(keys), values=tuple(values), token_ids=ids)

    def head(self, tokens: int) -> KVCache:
        """The first `tokens` entries of an unevicted cache (views, no copy)."""
        assert self.positions is None, "head() needs an unevicted cache"
        assert 0 < tokens <= self.length, f"tokens={tokens} outside 1..{self.length}"
        return KVCache(
            keys=tuple(k[:, :, :tokens] for k in self.keys),
            values=tuple(v[:, :, :tokens] for v in self.values),
            token_ids=self.token_ids[:tokens],
        )
