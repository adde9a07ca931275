"""The tokenizer seam: encoding, decoding and the chat template, safe to share between threads.

Fast (Rust) tokenizers raise "Already borrowed" when one instance is used from several threads
at once, so every call goes through a lock; they take microseconds next to a forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

from kv_runtime.errors import InvalidArgument


class TextCodec:
    """Wraps a transformers tokenizer."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self._lock = threading.Lock()

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added."""
        with self._lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`, special tokens left out unless `skip_special_tokens` is False."""
        with self._lock:
            return str(
                self.tokenizer.decode(
                    list(token_ids),
                    skip_special_tokens=skip_special_tokens,
                    clean_up_tokenization_spaces=False,
                )
            )

    @cached_property
    def boundary_tokens(self) -> tuple[frozenset[str], frozenset[str]]:
        """(added tokens text may be split before, added tokens it may be split after).

        Added tokens are cut out of the text before the tokenizer's model runs, so the text on
        either side of one is tokenized on its own: splitting there changes no token. One with
        `lstrip` (`rstrip`) swallows the whitespace before (after) it, so it is no clean
        boundary on that side.
        """
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        before = {t.content for t in added.values() if not getattr(t, "lstrip", False)}
        after = {t.content for t in added.values() if not getattr(t, "rstrip", False)}
        return frozenset(before), frozenset(after)

    def render_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The chat template applied to `messages` ({"role", "content"} each), as text."""
        if self.chat_template is None:
            raise InvalidArgument("this model's tokenizer has no chat template")
        for i, message in enumerate(messages):
            if not isinstance(message.get("role"), str) or not isinstance(
                message.get("content"), str
            ):
                raise InvalidArgument(f"messages[{i}] needs string 'role' and 'content'")
        with self._lock:
            return str(
                self.tokenizer.apply_chat_template(
                    [dict(m) for m in messages],
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                )
            )
