"""Incremental detokenization: the text of a growing answer, one token at a time, in O(1) a step.

Decoding the whole answer after every token costs O(n) a step, O(n^2) an answer. Here only the
tokens since the last complete character are decoded, together with the tokens of the previous
emission as context (the usual prefix/read-offset scheme of TGI and vLLM): `decode(context +
new)` minus `decode(context)` is the new text. It is handed out only once it does not end in
U+FFFD: a character split over several byte tokens decodes to U+FFFD until its last byte
arrives. The context always starts at a character boundary, so for byte-level BPE tokenizers
the pieces plus `flush()` are exactly `decode(all tokens)`; tokenizers that decode a token
differently at the start of a sequence (SentencePiece's leading space) get it right from the
context.
"""

from __future__ import annotations

from kv_runtime.text import TextCodec


class IncrementalDecoder:
    """Feed tokens with `push`; each returns the text they completed ('' while waiting)."""

    def __init__(self, codec: TextCodec) -> None:
        self._codec = codec
        self._ids: list[int] = []
        self._prefix = 0  # start of the context tokens (a character boundary)
        self._read = 0  # tokens before this are handed out as text

    def push(self, token: int) -> str:
        self._ids.append(token)
        context = self._codec.decode(self._ids[self._prefix : self._read])
        text = self._codec.decode(self._ids[self._prefix :])
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(context) :]

    def flush(self) -> str:
        """The text of the tokens still held back (incomplete characters decode to U+FFFD)."""
        context = self._codec.decode(self._ids[self._prefix : self._read])
        text = self._codec.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(context) :]
