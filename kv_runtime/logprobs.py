"""Log-probabilities of tokens under the model: the chosen token's and the most likely ones.

Evaluation tools score a text by the log-probability the model gives each of its tokens given
everything before it (teacher forcing), and clients ask for the alternatives a sampled token
had. Both come from the same rows of logits: row i is the model's distribution for the token
after position i, turned into log-probabilities with a float32 `log_softmax` over the whole
vocabulary (the raw model distribution: temperature and top-p only change how a token is
drawn, not what is reported, as in OpenAI's API).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_TOP = 20  # alternatives per token: OpenAI's own ceiling for chat `top_logprobs`


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, targets: Sequence[int], top: int) -> list[TokenLogprob]:
    """logits: (n, vocab) any float dtype, row i the distribution of `targets[i]` (n of them);
    top: how many alternatives to list (0..MAX_TOP). One `TokenLogprob` per target."""
    assert logits.dim() == 2 and logits.shape[0] == len(targets), (logits.shape, len(targets))
    assert 0 <= top <= MAX_TOP, top
    if not targets:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(targets), dtype=torch.long, device=logp.device)[:, None]
    chosen = logp.gather(1, index)[:, 0].cpu().tolist()
    tops: list[tuple[tuple[int, float], ...]] = [() for _ in targets]
    if top:
        values, ids = logp.topk(top, dim=-1)
        pairs = zip(ids.tolist(), values.tolist(), strict=True)
        tops = [tuple(zip(i, v, strict=True)) for i, v in pairs]
    return [
        TokenLogprob(int(t), float(lp), alternatives)
        for t, lp, alternatives in zip(targets, chosen, tops, strict=True)
    ]
