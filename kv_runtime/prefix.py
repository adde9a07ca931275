"""`PrefixCache`: one conversation's KV cache, grown in place by its owner turn after turn.

A chat's history is a stable prefix of every prompt it sends: system prompt, then the turns so
far. The cache of that prefix stays loaded, and each turn only prefills what is new:

    prefix = PrefixCache(runner, chunk_tokens=256, max_positions=8192)
    reused = prefix.sync(history_ids)        # keep the longest common prefix, prefill the rest
    answer = runtime.generate(turn_ids, prefix=prefix).collect()  # runs on the prefix's cache,
                                             # which is cropped back to the history afterwards
    prefix.extend(turn_and_answer_ids)       # the history now holds the finished turn

Ownership: one owner at a time (the chat's turn lock) calls `sync`, `extend`, `crop` or runs a
generation on the prefix; nothing here locks. Every change is out of place: transformers'
`DynamicLayer` appends by concatenation and crops by slicing, so tensors a reader took with
`snapshot()` (to save the prefix, or to continue it in another request) never change under it.

A base: a chat whose old turns live in an episodic activation starts its prefix from one
episode's bounded cache (`base=`, evicted or re-positioned: `kv_runtime.episodic`). The base is
frozen: `token_ids`, `sync` and `crop` speak of the tokens after it, which sit at positions
`base_length`.. (the base's next position); a sync never crops into it. Which base a prefix
stands on is the caller's business (a chat keys it by episode).

Exactness: extending a cache by chunks gives the keys and values a full prefill of the same
tokens gives (the same positions, the same causal attention), so a turn answered on a reused
prefix sees what a full prefill of the whole prompt would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kv_runtime.cache import KVCache
from kv_runtime.errors import InvalidArgument
from kv_runtime.forward import ModelRunner

# A cropped cache keeps the storage of what was cut until the next append copies it; past this
# ratio of storage to live bytes it is copied at once, so a cancelled turn leaves no slack.
_SLACK = 1.5


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """The keys and values of `token_ids` (positions 0..length-1), never evicted."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        chunk_tokens: int,
        max_positions: int,
        kv: KVCache | None = None,
        base: KVCache | None = None,
    ) -> None:
        """`kv`: a captured or loaded cache to start from (unevicted); its tokens are the
        prefix's own. `base`: a frozen cache under the prefix (evicted allowed); its tokens are
        not the prefix's. Their tensors are shared, not copied, and never written to."""
        if kv is not None and kv.positions is not None:
            raise InvalidArgument("a prefix cache cannot start from an evicted cache")
        if kv is not None and base is not None:
            raise InvalidArgument("a prefix cache starts from a kv or stands on a base, not both")
        self._runner = runner
        self._chunk, self._max_positions = chunk_tokens, max_positions
        self._cache = DynamicCache()
        self._ids: list[int] = []
        self._has_base = base is not None  # not the base itself: its tensors are not pinned
        # Per layer: a base evicted under per-layer budgets keeps different counts per layer.
        self._base_entries = list(base.layer_kept) if base is not None else None
        self._base_length = base.length if base is not None else 0
        start = kv if kv is not None else base
        if start is not None:
            start = start.to(runner.device)
            for key, value in zip(start.keys, start.values, strict=True):
                layer = DynamicLayer()
                layer.lazy_initialization(key, value)
                layer.keys, layer.values = key, value  # shared: appends go out of place
                self._cache.layers.append(layer)
        if kv is not None:
            self._ids = list(kv.token_ids)

    # -- state ------------------------------------------------------------------------------

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The prefix's own tokens (after the base, if any)."""
        return tuple(self._ids)

    @property
    def base_length(self) -> int:
        """Positions the base takes (0 without one): where the prefix's own tokens start."""
        return self._base_length

    @property
    def base_entries(self) -> int:
        """Cache entries of the base (its kept tokens, its widest layer's; 0 without one)."""
        return max(self._base_entries) if self._base_entries is not None else 0

    @property
    def has_base(self) -> bool:
        return self._has_base

    @property
    def length(self) -> int:
        """The next token's position: the base's positions, then the tokens held."""
        return self._base_length + len(self._ids)

    def nbytes(self) -> int:
        """Bytes of the storage the cache's tensors keep alive (slack after a crop included)."""
        seen: set[int] = set()
        total = 0
        for tensor in self._tensors():
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def snapshot(self) -> KVCache | None:
        """The cache as it is now, as a read-only `KVCache` sharing its tensors (None when
        empty, and for a prefix on a base: the base is stored elsewhere, and the tokens after
        it are bounded by the chat's window, cheap to prefill again). Later changes to the
        prefix never show in it."""
        if not self._ids or self._has_base:
            return None
        pairs = [(layer.keys, layer.values) for layer in self._layers()]
        return KVCache(
            keys=tuple(k for k, _ in pairs if k is not None),
            values=tuple(v for _, v in pairs if v is not None),
            token_ids=tuple(self._ids),
        )

    # -- changes (owner only) ---------------------------------------------------------------

    def sync(self, token_ids: Sequence[int], cancel: Callable[[], bool] | None = None) -> int:
        """Make the cache hold exactly `token_ids`: keep the longest prefix it shares with
        them, prefill the rest (both after the base). Returns how many tokens were kept (not
        prefilled; the base's entries not counted)."""
        keep = common_prefix(self._ids, token_ids)
        if keep < len(self._ids):
            self.crop(keep)
        if keep < len(token_ids):
            self.extend(token_ids[keep:], cancel)
        return keep

    def extend(
        self, token_ids: Sequence[int], cancel: Callable[[], bool] | None = None
    ) -> torch.Tensor | None:
        """Prefill `token_ids` after what the cache holds, in chunks; the last token's logits
        (None when `token_ids` is empty). `cancel` is checked before each chunk (raising
        `Cancelled`): the chunks already run stay, so the cache is always a valid prefix."""
        end = self.length + len(token_ids)
        if end > self._max_positions:
            raise InvalidArgument(
                f"a prefix of {end} tokens exceeds the model's {self._max_positions} positions"
            )
        logits: torch.Tensor | None = None
        for start in range(0, len(token_ids), self._chunk):
            piece = [int(t) for t in token_ids[start : start + self._chunk]]
            try:
                logits = self._runner.forward(piece, self._cache, self.length, cancel=cancel)
            except BaseException:
                self._truncate(len(self._ids))  # a forward that failed mid-way: undo its layers
                raise
            self._ids.extend(piece)
        return logits

    def crop(self, length: int) -> None:
        """Keep the first `length` of the prefix's own tokens (the base always stays)."""
        assert 0 <= length <= len(self._ids), f"length {length} outside 0..{len(self._ids)}"
        del self._ids[length:]
        self._truncate(length)

    def lease(self) -> tuple[DynamicCache, int]:
        """(the live transformers cache, its length) for a generation run on top of it by the
        owner, who crops it back to that length when the generation ends."""
        return self._cache, self.length

    def restore(self, length: int) -> None:
        """After a generation ran on `lease()`: drop what it appended (its prompt and answer)."""
        assert length == self.length, "restore() takes the length lease() gave"
        self._truncate(len(self._ids))

    def _truncate(self, own: int) -> None:
        """Every layer cut to the base's entries and `own` more (layers may differ after a
        failure)."""
        if self._base_entries is None and own == 0:
            self._cache = DynamicCache()
            return
        for index, layer in enumerate(self._layers()):
            length = own + (self._base_entries[index] if self._base_entries is not None else 0)
            if layer.keys is not None and layer.values is not None:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
        self._compact()

    def _layers(self) -> list[DynamicLayer]:
        layers = list(self._cache.layers)
        assert all(isinstance(layer, DynamicLayer) for layer in layers), "full attention only"
        return cast(list[DynamicLayer], layers)

    def _tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for layer in self._layers():
            if layer.keys is not None and layer.values is not None and layer.keys.numel():
                out.extend((layer.keys, layer.values))
        return out

    def _compact(self) -> None:
        live = sum(t.numel() * t.element_size() for t in self._tensors())
        if live and self.nbytes() > _SLACK * live:
            for layer in self._layers():
                if layer.keys is not None and layer.values is not None:
                    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
