"""Incremental detokenization: the pieces are exactly the whole decode, characters never split."""

from __future__ import annotations

from kv_runtime import Runtime
from kv_runtime.detokenize import IncrementalDecoder

TEXT = "Café 🌍 naïve — 日本語のテキスト, then ASCII again. 🙂🙂"


def test_pieces_add_up_to_the_whole_decode_and_never_split_a_character(runtime: Runtime) -> None:
    codec = runtime._codec
    ids = runtime.tokenize(TEXT)
    decoder = IncrementalDecoder(codec)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) + decoder.flush() == runtime.detokenize(ids) == TEXT
    assert "" in pieces  # some characters took several byte tokens: nothing until the last
    assert not any("\ufffd" in p for p in pieces)


def test_an_unfinished_character_is_left_to_flush_as_the_whole_decode_has_it(
    runtime: Runtime,
) -> None:
    ids = runtime.tokenize("sun 🌍")
    cut = ids[:-1]  # the globe's last byte token missing
    decoder = IncrementalDecoder(runtime._codec)
    text = "".join(decoder.push(t) for t in cut)
    assert "\ufffd" not in text
    assert text + decoder.flush() == runtime.detokenize(cut)
    assert runtime.detokenize(cut).endswith("\ufffd")
    assert decoder.flush() == ""  # nothing is handed out twice
