"""`Runtime`: the facade the daemon uses. One loaded model, shared by every request.

    runtime = Runtime.load(RuntimeConfig(cache_dir=data_dir / "models"))
    kv = runtime.prefill(runtime.tokenize(text), on_progress=report)
    compressed = runtime.compress(kv, CompressionConfig(bits=4))
    manifest = save_activation(directory, compressed, runtime.fingerprint)
    ...
    compressed = load_activation(directory, runtime.fingerprint)  # refuses other models
    result = runtime.generate("Question: ...", kv=compressed).collect()

Thread-safety: every method may be called from many threads. Forward passes are serialised by
one lock, handed over in turn (see `kv_runtime.forward` and `kv_runtime.turns`), tokenizer calls
by another; caches are never shared mutably (copy-on-read), so concurrent generations on one
activation are safe. `throughput` is the model's measured speed, for admission estimates.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from kv_runtime import model as loading
from kv_runtime.blend import BlendResult, ChunkKV, Segment, blend, build_chunk
from kv_runtime.block_scorers import KVZIP_CONTINUE_PROMPT, KVZIP_PROMPT, make_block_scorer
from kv_runtime.cache import KVCache
from kv_runtime.compress import CompressedKV, compress, decompress
from kv_runtime.config import CompressionConfig, RuntimeConfig
from kv_runtime.episodic import BudgetedPrefill, PositionMode, prefill_under_budget
from kv_runtime.errors import InvalidArgument, ModelUnavailable
from kv_runtime.eviction import PREFILL_SCORERS, evict, make_scorer
from kv_runtime.forward import ModelRunner, ProgressCallback
from kv_runtime.generate import CancelHook, Generation
from kv_runtime.layer_budgets import LayerSensitivity, load_or_profile, profile_text
from kv_runtime.model import Fingerprint
from kv_runtime.prefill import prefill
from kv_runtime.prefix import PrefixCache
from kv_runtime.sampling import SamplingParams
from kv_runtime.store import (
    ActivationManifest,
    load_activation,
    open_activation,
    save_activation,
)
from kv_runtime.template import ChatTemplate
from kv_runtime.text import TextCodec
from kv_runtime.throughput import Throughput
from kv_runtime.turns import background


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for logs and the API."""

    name: str
    directory: Path
    device: str
    dtype: str
    max_positions: int


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return sorted(ids)


def _tokenizer_hash(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return loading.hash_text(backend.to_str())
    return loading.hash_text(json.dumps(sorted(tokenizer.get_vocab().items())))


def _check_shared_cache(runner: ModelRunner, token: int, name: str) -> None:
    """Continue a captured one-token cache by one token and check that its tensors did not
    change: requests read shared caches without copying them (`KVCache.to_transformers`), which
    holds only while this model and transformers version append out of place."""
    kv = prefill(runner, [token], chunk_tokens=1)
    before = [t.clone() for t in (*kv.keys, *kv.values)]
    runner.forward([token], kv.to_transformers(), 1)
    after = (*kv.keys, *kv.values)
    if not all(torch.equal(a, b) for a, b in zip(after, before, strict=True)):
        raise ModelUnavailable(
            f"model {name!r} wrote into the cache it continued; memosd shares cached keys and "
            "values between requests and needs a cache that appends out of place"
        )


class Runtime:
    """A loaded causal LM with KV capture, compression and reuse. Build with `Runtime.load`."""

    def __init__(
        self,
        config: RuntimeConfig,
        runner: ModelRunner,
        codec: TextCodec,
        fingerprint: Fingerprint,
        info: ModelInfo,
    ) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.info = info
        self._runner = runner
        self._codec = codec
        self.template = ChatTemplate(codec)
        self._vocab_size = int(runner.model.get_input_embeddings().num_embeddings)

    @classmethod
    def load(cls, config: RuntimeConfig) -> Runtime:
        """Load (converting a GGUF model once into `config.cache_dir`) and warm up the model."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from packages or disk
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 2) // 2))
        device = loading.resolve_device(config.device)
        dtype = loading.resolve_dtype(config.dtype, device)
        source, directory, gguf = loading.load_directory(config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
            model: Any = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=gguf, dtype=dtype, attn_implementation="sdpa"
            )
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"cannot load model {source.name!r}: {exc}") from exc
        model = model.to(device).eval()
        text_config = model.config.get_text_config(decoder=True)
        layer_kinds = {type(layer).__name__ for layer in DynamicCache(config=text_config).layers}
        if layer_kinds != {"DynamicLayer"}:
            raise ModelUnavailable(
                f"model {source.name!r} has {sorted(layer_kinds)} cache layers; only "
                "full-attention models (DynamicLayer) are supported"
            )
        heads = int(text_config.num_attention_heads)
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        fingerprint = Fingerprint(
            model=source.name,
            weights_hash=loading.cached_weights_hash(
                directory, loading.weight_files(directory, gguf), config.cache_dir
            ),
            tokenizer_hash=_tokenizer_hash(tokenizer),
            chat_template_hash=loading.hash_text(getattr(tokenizer, "chat_template", None)),
            dtype=str(dtype).removeprefix("torch."),
            layers=int(text_config.num_hidden_layers),
            kv_heads=int(getattr(text_config, "num_key_value_heads", heads)),
            head_dim=int(head_dim),
        )
        info = ModelInfo(
            name=source.name,
            directory=directory,
            device=str(device),
            dtype=fingerprint.dtype,
            max_positions=min(
                config.max_context, int(getattr(text_config, "max_position_embeddings", 1 << 20))
            ),
        )
        runner = ModelRunner(model, device)
        eos = int(tokenizer.eos_token_id or 0)
        _check_shared_cache(runner, eos, source.name)  # warm-up (the first pass is the slowest)
        runner.throughput = Throughput()  # then a first measure of each kind of pass
        measured = DynamicCache()
        runner.forward([eos] * 16, measured, 0)
        runner.forward([eos], measured, 16)
        return cls(
            config, runner, TextCodec(tokenizer, _eos_ids(model, tokenizer)), fingerprint, info
        )

    # -- text -------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self._codec.encode(text)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._codec.decode(token_ids, skip_special_tokens)

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text, special tokens included (a byte of a character split over
        several tokens decodes to U+FFFD on its own)."""
        return [self._codec.decode([t], skip_special_tokens=False) for t in token_ids]

    @property
    def vocab_size(self) -> int:
        """Token ids are 0..vocab_size-1 (the model's embedding rows, added tokens included)."""
        return self._vocab_size

    def render_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The model's chat template applied to [{"role", "content"}, ...]."""
        return self._codec.render_chat(messages, add_generation_prompt)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take in a full-precision cache (all layers)."""
        fp = self.fingerprint
        size = torch.empty((), dtype=loading.resolve_dtype(fp.dtype, torch.device("cpu")))
        return 2 * fp.layers * fp.kv_heads * fp.head_dim * size.element_size()

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._codec.eos_token_ids

    @property
    def throughput(self) -> Throughput:
        """The model's measured speed: `throughput.seconds(prefill, decode)` estimates work."""
        return self._runner.throughput

    @staticmethod
    def background() -> AbstractContextManager[None]:
        """`with runtime.background():` this thread's forward passes (prefill, compression)
        wait as background work: interactive requests go first (see `kv_runtime.turns`)."""
        return background()

    @property
    def runner(self) -> ModelRunner:
        """The model and its lock, for evaluation code that drives transformers caches itself."""
        return self._runner

    # -- KV capture and compression ---------------------------------------------------------

    def prefill(
        self, token_ids: Sequence[int], on_progress: ProgressCallback | None = None
    ) -> KVCache:
        """Run the context and capture its cache: (1, kv_heads, n, head_dim) per layer.

        `on_progress(done_tokens, total_tokens)` is called after each chunk of
        `config.prefill_chunk` tokens; raising from it aborts the prefill.
        """
        if len(token_ids) > self.info.max_positions:
            raise InvalidArgument(
                f"context of {len(token_ids)} tokens exceeds {self.info.max_positions} positions"
            )
        return prefill(
            self._runner, token_ids, chunk_tokens=self.config.prefill_chunk, on_progress=on_progress
        )

    def prefill_budgeted(
        self,
        token_ids: Sequence[int],
        *,
        budget_tokens: int,
        block_tokens: int | None = None,
        query_ids: Sequence[int] | None = None,
        scorer: str = "kvzip",
        sink_tokens: int = 4,
        recent_tokens: int = 32,
        positions: PositionMode = "compacted",
        layer_budgets: Sequence[int] | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelHook | None = None,
    ) -> BudgetedPrefill:
        """Prefill a context of any length block by block, never holding more than
        `budget_tokens` + one block (+ the scoring pass) of KV (see `kv_runtime.episodic`).

        scorer: "prompt" (attention from `query_ids`, e.g. an EpiCache patched prompt), "kvzip"
        (query-agnostic reconstruction), "prompt+kvzip" (the larger of both), "snapkv",
        "recent" or "knorm". block_tokens: default
        1024. positions: "compacted" (kept keys re-rotated to 0..kept-1: any context length,
        and measured better), "original" (EpiCache's), or "auto" (original when it fits).
        Default scorer kvzip: it beat snapkv, recent and even a question-prompted cache on
        LoCoMo gold-answer likelihood (benchmarks/episodic_scorers.py). layer_budgets: per-layer
        counts (e.g. `layer_sensitivity().budgets(M, minimum=sink_tokens + recent_tokens + 1)`),
        giving a ragged cache; None: M in every layer.
        """
        prompted = scorer in ("prompt", "prompt+kvzip")
        if query_ids is not None and not prompted:
            raise InvalidArgument(f"query_ids are only used by scorer='prompt', not {scorer!r}")
        if prompted and not query_ids:
            raise InvalidArgument(f"scorer={scorer!r} needs query_ids (the scoring prompt)")
        if any(not 0 <= int(t) < self._vocab_size for t in (*token_ids, *(query_ids or ()))):
            raise InvalidArgument(f"token ids must lie in 0..{self._vocab_size - 1}")
        block_scorer = make_block_scorer(
            scorer,
            prompt_ids=query_ids or (),
            repeat_ids=self.tokenize(KVZIP_PROMPT),
            continue_ids=self.tokenize(KVZIP_CONTINUE_PROMPT),
        )
        return prefill_under_budget(
            self._runner,
            token_ids,
            budget_tokens=budget_tokens,
            block_tokens=1024 if block_tokens is None else block_tokens,
            sink_tokens=sink_tokens,
            recent_tokens=recent_tokens,
            scorer=block_scorer,
            layer_budgets=layer_budgets,
            positions=positions,
            max_positions=self.info.max_positions,
            progress=progress,
            cancel=cancel,
        )

    def layer_sensitivity(self, path: Path | None = None) -> LayerSensitivity:
        """How much each layer's keys change under block-wise prefill (`kv_runtime.layer_budgets`),
        profiled once per model and kept at `path` (default: `layer_budgets.json` in a folder
        named by the model's fingerprint under `config.cache_dir`, the daemon's data dir)."""
        fingerprint = json.dumps(self.fingerprint.to_dict(), sort_keys=True)
        if path is None:
            if self.config.cache_dir is None:
                raise InvalidArgument("no cache_dir to keep the layer profile in: pass a path")
            digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
            path = self.config.cache_dir / "layer_budgets" / f"{digest}.json"
        return load_or_profile(self._runner, path, fingerprint, self.tokenize(profile_text()))

    def capture(
        self,
        token_ids: Sequence[int],
        settings: CompressionConfig,
        on_progress: ProgressCallback | None = None,
    ) -> CompressedKV:
        """Prefill a context and compress its cache as `settings` say. A scorer that needs the
        model (`kvzip`) scores while prefilling, block by block under the budget
        (`prefill_budgeted`, compacted positions); the others evict the finished prefill."""
        budget = settings.budget_tokens
        if settings.scorer in PREFILL_SCORERS and budget is not None and len(token_ids) > budget:
            block = min(1024, self.info.max_positions - budget)
            budgeted = self.prefill_budgeted(
                token_ids,
                budget_tokens=budget,
                block_tokens=max(1, block),
                scorer=settings.scorer,
                sink_tokens=settings.sink_tokens,
                recent_tokens=settings.window_tokens,
                progress=on_progress,
            )
            return self.compress(budgeted.kv, settings)  # kept <= budget: quantized only
        return self.compress(self.prefill(token_ids, on_progress=on_progress), settings)

    def compress(self, kv: KVCache, settings: CompressionConfig) -> CompressedKV:
        """Evict down to `settings.budget_tokens` (if set), then quantize (if bits < 16)."""
        if settings.budget_tokens is not None and kv.length > settings.budget_tokens:
            scorer = make_scorer(settings.scorer)
            queries = (
                self.window_queries(kv, settings.window_tokens) if scorer.needs_queries else None
            )
            kv = evict(
                kv,
                scorer,
                budget=settings.budget_tokens,
                sink_tokens=settings.sink_tokens,
                window_tokens=settings.window_tokens,
                queries=queries,
            )
        return compress(kv, settings)

    def decompress(self, compressed: CompressedKV) -> KVCache:
        """Fresh full-precision tensors on the runtime's device."""
        return decompress(compressed, self._runner.device)

    def window_queries(self, kv: KVCache, window: int) -> tuple[torch.Tensor, ...]:
        """Per layer (1, heads, window, head_dim): the queries of the last `window` tokens,
        recomputed on a copy of the cache without them (their keys come out identical)."""
        if kv.positions is not None:
            raise InvalidArgument("this cache was already evicted; compress the original prefill")
        cut = kv.length - window
        assert cut > 0, "the window must leave a prefix (budget >= window < length)"
        cache = kv.head(cut).to_transformers()
        return self._runner.capture_queries(kv.token_ids[cut:], cache, cut)

    # -- blending (kv_runtime.blend) --------------------------------------------------------

    def build_chunk(self, token_ids: Sequence[int], preamble: Sequence[int] = ()) -> ChunkKV:
        """A chunk's own cache (a note's rendered text), computed after `preamble` (not kept),
        to be blended into prompts later at any position."""
        if len(preamble) + len(token_ids) > self.info.max_positions:
            raise InvalidArgument(
                f"preamble {len(preamble)} + chunk {len(token_ids)} tokens exceed "
                f"{self.info.max_positions} positions"
            )
        return build_chunk(self._runner, token_ids, preamble=preamble)

    def blend(
        self,
        segments: Sequence[Segment],
        prefix: KVCache | CompressedKV | None = None,
        *,
        recompute_ratio: float = 0.15,
        check_layer: int = 1,
        rerotate: bool = True,
    ) -> BlendResult:
        """The cache of [prefix | segments...]: chunks re-rotated to their new positions, a
        `recompute_ratio` share of their tokens recomputed (CacheBlend), new text computed in
        full. recompute_ratio=1 equals a full prefill; 0 and rerotate=False are baselines.
        Continue it with `generate(prompt, kv=result.kv)`."""
        if isinstance(prefix, CompressedKV):
            prefix = self.decompress(prefix)
        total = (prefix.length if prefix is not None else 0) + sum(
            s.length if isinstance(s, ChunkKV) else len(s) for s in segments
        )
        if total > self.info.max_positions:
            raise InvalidArgument(
                f"blended prompt of {total} tokens exceeds {self.info.max_positions} positions"
            )
        return blend(
            self._runner,
            prefix,
            segments,
            recompute_ratio=recompute_ratio,
            check_layer=check_layer,
            rerotate_keys=rerotate,
        )

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        kv: KVCache | CompressedKV | None = None,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        cancel: CancelHook | None = None,
        prefix: PrefixCache | None = None,
    ) -> Generation:
        """Continue `kv`'s context (if any) with `prompt`; iterate the result for text pieces.

        prompt: text (tokenized without special tokens) or token ids; may be empty with a kv.
        kv: a captured or a loaded/compressed cache; it is copied for this request, never changed.
        Stops at an end-of-sequence token or one of `stop_token_ids` (neither is returned), at
        the first `stop` string (cut from the text) or after `max_tokens`. Sampling with a
        `seed` is reproducible; temperature 0 is greedy. `.collect()` returns the result.
        `cancel()` returning True ends it at the next prefill chunk or token ("cancelled").
        `logprobs` / `prompt_logprobs` (0..20 alternatives): record each generated / prompt
        token's log-probability in the result (`kv_runtime.logprobs`); with `prompt_logprobs`,
        `max_tokens` may be 0 (score the prompt, generate nothing).
        prefix: instead of `kv`, a `PrefixCache` the caller owns: the generation runs on it
        without copying it and crops it back to its length when it ends.
        """
        started = time.perf_counter()  # TTFT includes dequantizing the cache
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop),
            stop_token_ids=frozenset(int(t) for t in stop_token_ids),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        prompt_ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if isinstance(kv, CompressedKV):
            kv = self.decompress(kv)
        elif kv is not None:
            kv = kv.to(self._runner.device)
        return Generation(
            self._runner,
            self._codec,
            prompt_ids,
            kv,
            params,
            chunk_tokens=self.config.prefill_chunk,
            max_positions=self.info.max_positions,
            started=started,
            cancel=cancel,
            prefix=prefix,
        )

    def prefix_cache(
        self, kv: KVCache | CompressedKV | None = None, *, base: KVCache | None = None
    ) -> PrefixCache:
        """A new growing prefix cache, empty or starting from `kv` (a stored chat prefix), or
        standing on a frozen `base` (an episode's bounded cache: `kv_runtime.prefix`)."""
        if isinstance(kv, CompressedKV):
            kv = self.decompress(kv)
        return PrefixCache(
            self._runner,
            chunk_tokens=self.config.prefill_chunk,
            max_positions=self.info.max_positions,
            kv=kv,
            base=base,
        )

    def logits(
        self, token_ids: Sequence[int], kv: KVCache | CompressedKV | None = None
    ) -> torch.Tensor:
        """(len(token_ids), vocab) float32 logits of `token_ids` run after `kv`'s context
        (teacher forcing; for evaluation). The positions continue from `kv.length`."""
        if isinstance(kv, CompressedKV):
            kv = self.decompress(kv)
        cache = kv.to(self._runner.device).to_transformers() if kv is not None else DynamicCache()
        start = kv.length if kv is not None else 0
        return self._runner.forward(token_ids, cache, start, all_logits=True)

    # -- persistence ------------------------------------------------------------------------

    def save_activation(
        self,
        directory: Path,
        compressed: CompressedKV,
        messages: Sequence[Mapping[str, str]] | None = None,
    ) -> ActivationManifest:
        """Store atomically under `directory` (see `kv_runtime.store`); `messages`: the chat
        messages the cache's tokens render (`template.render(messages, False)`)."""
        return save_activation(directory, compressed, self.fingerprint, messages)

    def load_activation(self, directory: Path) -> CompressedKV:
        """Load and verify; ActivationMismatch / ActivationCorrupt when it cannot be used."""
        return load_activation(directory, self.fingerprint)

    def open_activation(self, directory: Path) -> tuple[CompressedKV, ActivationManifest]:
        """`load_activation` with its manifest (the messages its tokens render)."""
        return open_activation(directory, self.fingerprint)
