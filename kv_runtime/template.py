"""A conversation's new turns as the tokens that follow its history, exactly as the chat template
renders the whole conversation.

A KV cache holds the tokens of a conversation so far (an activation holds one system turn; a chat
session holds every turn). Continuing it needs the tokens the template gives the new turns *in
that conversation*: `render_delta(history, delta)` returns the ids `d` such that

    tokens(render(history, add_generation_prompt=False)) + d == tokens(render(history + delta))

No stand-in turn is rendered: the template sees the real history, so templates whose rendering
of a turn depends on what came before (a default system prompt when there is none, turn
numbering, a different first-turn format) are rendered as they would render the whole chat.

Exactness in token space: the delta's text is what follows the history's text in the whole
rendering (the template must render the history as a prefix; refused otherwise). When the cut
falls next to an added token (`<|im_start|>` in ChatML templates), the two sides tokenize
independently (added tokens are split out before the tokenizer's model runs), so only the
delta's text is tokenized. Elsewhere the whole conversation is tokenized and its first
tokens must be the history's, which is checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kv_runtime.errors import InvalidArgument
from kv_runtime.text import TextCodec

Message = Mapping[str, str]  # {"role": ..., "content": ...}
_PROBE = "\x00memosd-probe\x00"


class ChatTemplate:
    """The model's chat template, rendered to token ids."""

    def __init__(self, codec: TextCodec) -> None:
        self._codec = codec

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the whole conversation."""
        return self._codec.encode(self._codec.render_chat(messages, add_generation_prompt))

    def render_delta(
        self,
        history: Sequence[Message],
        delta: Sequence[Message],
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of `delta` as they follow `history` (rendered without a generation prompt)
        in `history + delta`; see the module docstring for why this is exact."""
        if not history:
            return self.render(delta, add_generation_prompt)
        codec = self._codec
        head = codec.render_chat(history, add_generation_prompt=False)
        whole = codec.render_chat([*history, *delta], add_generation_prompt)
        if not whole.startswith(head):
            raise InvalidArgument(
                "the chat template does not render the history as a prefix of the whole "
                "conversation; its cache cannot be continued"
            )
        tail = whole[len(head) :]
        before, after = codec.boundary_tokens
        if any(tail.startswith(t) for t in before) or any(head.endswith(t) for t in after):
            return codec.encode(tail)
        head_ids, whole_ids = codec.encode(head), codec.encode(whole)
        if whole_ids[: len(head_ids)] != head_ids:
            raise InvalidArgument(
                "the history's tokens change when the conversation grows (the template's cut "
                "falls inside a token); its cache cannot be continued"
            )
        return whole_ids[len(head_ids) :]

    def recover_turn(self, token_ids: Sequence[int], role: str) -> list[dict[str, str]] | None:
        """The one-turn history [{role, content}] whose rendering is `token_ids`, or None.

        For caches stored before their messages were recorded: the content is read back from
        the decoded tokens between the template's framing of a `role` turn, and kept only when
        rendering it again gives exactly `token_ids`.
        """
        codec = self._codec
        text = codec.decode(token_ids, skip_special_tokens=False)
        probe = codec.render_chat([{"role": role, "content": _PROBE}], add_generation_prompt=False)
        if probe.count(_PROBE) != 1:
            return None
        prefix, suffix = probe.split(_PROBE)
        if not (text.startswith(prefix) and text.endswith(suffix)):
            return None
        if len(text) < len(prefix) + len(suffix):
            return None
        history = [{"role": role, "content": text[len(prefix) : len(text) - len(suffix)]}]
        return history if self.render(history, False) == list(token_ids) else None
