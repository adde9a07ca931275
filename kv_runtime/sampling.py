"""Choosing the next token: greedy, or temperature + nucleus (top-p) sampling with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kv_runtime.errors import InvalidArgument
from kv_runtime.logprobs import MAX_TOP


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. temperature 0 is greedy (argmax); `seed` makes sampling reproducible."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()  # besides the model's end-of-sequence tokens
    # Recorded when set: each generated token's logprob with this many alternatives, and the
    # same for every prompt token (scoring a text; `max_tokens` may then be 0).
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        least = 0 if self.prompt_logprobs is not None else 1
        if not least <= self.max_tokens <= 1_000_000:
            raise InvalidArgument(
                f"max_tokens={self.max_tokens} must be in {least}..1000000"
                + ("" if least == 0 else " (0 only when scoring the prompt)")
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP:
                raise InvalidArgument(f"{name}={value} must be in 0..{MAX_TOP}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidArgument(f"temperature={self.temperature} must be in 0..100")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p={self.top_p} must be in (0, 1]")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop strings must not be empty")

    def generator(self) -> torch.Generator:
        """A CPU generator: seeded when `seed` is set, from OS entropy otherwise."""
        gen = torch.Generator(device="cpu")
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: (vocab,) float32 on any device -> the chosen token id."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the strictly better tokens
        sorted_probs[before >= params.top_p] = 0.0  # keeps the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
