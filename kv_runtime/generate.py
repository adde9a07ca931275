"""Generation: continue a prompt, optionally on top of a reused KV cache, streaming text pieces.

Copy-on-read: the reused cache is wrapped in a fresh transformers cache for this request only
(`KVCache.to_transformers`: no copy; the first forward's append is the request's private
copy), so a shared cache is never written to and many requests can read one at once. The prompt
after the cached context gets position ids from the context's original length on, whatever was
evicted (as kvpress and EpiCache do), so RoPE sees the same positions as a full prefill would.

Text is decoded incrementally (`kv_runtime.detokenize`) and stop strings are searched only where
the new text could complete one, so a step costs the same at the 1,000th token as at the first.
A `cancel` hook is checked between prefill chunks and before every decoding step, also while
waiting for the model behind other requests: a request whose client has gone ends within one
forward pass, or 50 ms if it is waiting (finish reason "cancelled").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import DynamicCache

from kv_runtime.cache import KVCache
from kv_runtime.detokenize import IncrementalDecoder
from kv_runtime.errors import Cancelled, InvalidArgument
from kv_runtime.forward import ModelRunner
from kv_runtime.logprobs import TokenLogprob, token_logprobs
from kv_runtime.prefix import PrefixCache
from kv_runtime.sampling import SamplingParams, next_token
from kv_runtime.text import TextCodec

FinishReason = Literal["stop", "length", "cancelled"]
CancelHook = Callable[[], bool]  # True once the request should stop


@dataclass(frozen=True)
class GenerationResult:
    """The whole answer and what it cost. ttft_ms runs from the call to the first token."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    reused_tokens: int
    ttft_ms: float
    total_ms: float
    # With `SamplingParams.logprobs`: one per generated token (`token_ids`). With
    # `prompt_logprobs`: one per prompt token, the first None when no cache precedes it.
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


def _stop_hit(text: str, stops: Sequence[str], searched: int) -> int | None:
    """Index of the earliest stop string in `text`, or None, knowing that `text[:searched]`
    held none: a new one must end past `searched`, so it starts at most len(stop) - 1 before."""
    hits = [i for i in (text.find(s, max(0, searched - len(s) + 1)) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


class Generation(Iterator[str]):
    """Iterate for text pieces as they are decoded; `result` is set once it is exhausted."""

    def __init__(
        self,
        runner: ModelRunner,
        codec: TextCodec,
        prompt_ids: Sequence[int],
        kv: KVCache | None,
        params: SamplingParams,
        *,
        chunk_tokens: int,
        max_positions: int,
        started: float | None = None,
        cancel: CancelHook | None = None,
        prefix: PrefixCache | None = None,
    ) -> None:
        """`started`: the time.perf_counter() the request began (TTFT counts from it);
        `cancel`: checked between prefill chunks and before each decoding step; `prefix`
        (instead of `kv`): run on the prefix cache itself, cropped back when the generation
        ends, however it ends (the caller owns the prefix meanwhile)."""
        assert kv is None or prefix is None, "continue a kv or a prefix, not both"
        if prefix is not None and not prompt_ids:
            raise InvalidArgument("a generation on a prefix cache needs a prompt")
        if not prompt_ids and kv is None:
            raise InvalidArgument("nothing to continue: the prompt is empty and no kv was given")
        context = kv.length if kv else prefix.length if prefix else 0
        end = context + len(prompt_ids) + params.max_tokens
        if end > max_positions:
            raise InvalidArgument(
                f"context {context} + prompt {len(prompt_ids)} + max_tokens "
                f"{params.max_tokens} = {end} exceeds the model's {max_positions} positions"
            )
        self._runner, self._codec, self._params = runner, codec, params
        self._prompt_ids, self._kv, self._prefix = list(prompt_ids), kv, prefix
        self._reused = context
        self._chunk = chunk_tokens
        self._cancel = cancel or (lambda: False)
        self._started = time.perf_counter() if started is None else started
        self._logprobs: list[TokenLogprob] = []
        self._scored: tuple[TokenLogprob | None, ...] | None = None
        self._pieces = self._run()
        self.result: GenerationResult | None = None
        # Progress, for estimates of the work left: prompt tokens run, tokens decoded.
        self.prefilled = 0
        self.decoded = 0

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop here (a consumer that leaves early); a prefix it ran on is cropped back."""
        self._pieces.close()

    def collect(self) -> GenerationResult:
        """Drain the stream; return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def _prepare(self) -> tuple[DynamicCache, list[int], int]:
        """(request cache, tokens still to run, position of the first of them)."""
        kv, prompt = self._kv, self._prompt_ids
        if self._prefix is not None:
            cache, length = self._prefix.lease()  # no copy: cropped back in `_run`
            return cache, prompt, length
        if kv is None:
            return DynamicCache(), prompt, 0
        cache = kv.to_transformers()  # shares kv's tensors; appending copies (copy-on-read)
        if prompt and self._params.prompt_logprobs is None:
            return cache, prompt, kv.length
        # No prompt, or the prompt's first token is scored: the last context token is run
        # again to get its logits; it is always kept (recent window, or residual), so drop its
        # entry and re-feed it at its own position.
        cache.crop(-1)
        return cache, [kv.token_ids[-1], *prompt], kv.length - 1

    def _run(self) -> Generator[str, None, None]:
        if self._prefix is None:
            yield from self._decode()
            return
        try:
            yield from self._decode()
        finally:  # also when the consumer stops early (the generator is closed)
            self._prefix.restore(self._reused)

    def _decode(self) -> Iterator[str]:
        params, codec, runner = self._params, self._codec, self._runner
        cache, todo, position = self._prepare()
        generated: list[int] = []
        text, emitted, ttft_ms = "", 0, 0.0
        finish: FinishReason = "length"
        scoring = params.prompt_logprobs is not None
        scored: list[TokenLogprob] = []  # of todo[1:]: every row but the last predicts one
        for start in range(0, len(todo), self._chunk):
            piece = todo[start : start + self._chunk]
            try:
                logits = runner.forward(
                    piece, cache, position, all_logits=scoring, cancel=self._cancel
                )
            except Cancelled:
                self._finish(text, generated, "cancelled", ttft_ms)
                return
            position += len(piece)
            self.prefilled += len(piece)
            if params.prompt_logprobs is not None:
                targets = todo[start + 1 : start + 1 + len(piece)]
                scored += token_logprobs(logits[: len(targets)], targets, params.prompt_logprobs)
                logits = logits[-1]
        if scoring:
            self._scored = tuple(scored) if self._kv is not None else (None, *scored)
        if params.max_tokens == 0:  # scoring only
            self._finish(text, generated, "length", ttft_ms)
            return
        generator = params.generator()
        decoder = IncrementalDecoder(codec)
        cut: int | None = None
        while True:
            token = next_token(logits, params, generator)
            if not generated:
                ttft_ms = (time.perf_counter() - self._started) * 1000
            if token in codec.eos_token_ids or token in params.stop_token_ids:
                finish = "stop"
                break
            generated.append(token)
            if params.logprobs is not None:
                self._logprobs += token_logprobs(logits[None], [token], params.logprobs)
            self.decoded = len(generated)
            new = decoder.push(token)
            if new:
                searched, text = len(text), text + new
                cut = _stop_hit(text, params.stop, searched)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    break
                ready = len(text) - _held_back(text, params.stop)
                if ready > emitted:
                    yield text[emitted:ready]
                    emitted = ready
            if len(generated) >= params.max_tokens:
                break
            try:
                logits = runner.forward([token], cache, position, cancel=self._cancel)
            except Cancelled:
                finish = "cancelled"
                break
            position += 1
        if cut is None:
            # Tokens still held back (a character not complete yet); nothing after a stop
            # string. At the length limit or a cancel an incomplete character is dropped.
            text += decoder.flush()
            if finish != "stop":
                text = text.rstrip("\ufffd")
        if len(text) > emitted:
            yield text[emitted:]
        self._finish(text, generated, finish, ttft_ms)

    def _finish(
        self, text: str, generated: list[int], finish: FinishReason, ttft_ms: float
    ) -> None:
        self.result = GenerationResult(
            text=text,
            token_ids=tuple(generated),
            finish_reason=finish,
            prompt_tokens=len(self._prompt_ids),
            reused_tokens=self._reused,
            ttft_ms=ttft_ms,
            total_ms=(time.perf_counter() - self._started) * 1000,
            logprobs=tuple(self._logprobs) if self._params.logprobs is not None else None,
            prompt_logprobs=self._scored,
        )
