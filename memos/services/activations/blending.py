"""A prompt's recalled notes assembled from their KV chunks (CacheBlend) instead of prefilled.

The prompt's tokens are rendered as usual (the chat template, the notes block and all), so the
blended prompt is token for token the prompt a plain prefill would read. Each note's chunk is
then looked for in those tokens, in order: where its tokens occur as they are, that span is
taken from the chunk (re-rotated to where it sits, `kv_runtime.blend`); everything else, notes
without a chunk and notes whose tokens merge with their neighbours' included, is new text,
computed in full in the same pass. With recompute_ratio = 1 the result is a full prefill's.

Continuing: the blend stops one token short of the prompt, and the generation runs that last
token itself. It is always new text in a chat turn (the template's assistant opening), so
nothing is computed twice and the first reply token comes from a fully computed position.
(`generate([], kv=...)` would work too: it drops the cached last entry and runs it again.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kv_runtime import ChunkKV, KVCache, Runtime
from kv_runtime.blend import Segment


@dataclass(frozen=True)
class Blended:
    """The prompt's cache but its last token, which the generation runs (`tail`)."""

    kv: KVCache  # [prefix | prompt[:-1]]
    tail: tuple[int, ...]  # the prompt's last token
    chunks: int  # chunks blended in
    chunk_tokens: int
    reused_tokens: int  # chunk tokens whose cached keys and values were kept (prefix not counted)
    recomputed_tokens: int  # chunk tokens recomputed in every layer


def find(haystack: Sequence[int], needle: Sequence[int], start: int) -> int:
    """Index of the first occurrence of `needle` in `haystack` at or after `start`, or -1."""
    n = len(needle)
    first = needle[0]
    for i in range(start, len(haystack) - n + 1):
        if haystack[i] == first and tuple(haystack[i : i + n]) == tuple(needle):
            return i
    return -1


def segments(token_ids: Sequence[int], chunks: Sequence[ChunkKV]) -> list[Segment]:
    """`token_ids` as text and chunk segments: each chunk, in order, where its tokens next
    occur; the rest as text. A chunk not found (its tokens merged with a neighbour's) is
    left out: its note is computed as text."""
    out: list[Segment] = []
    done = 0
    for chunk in chunks:
        at = find(token_ids, chunk.token_ids, done) if chunk.length else -1
        if at < 0:
            continue
        if at > done:
            out.append(list(token_ids[done:at]))
        out.append(chunk)
        done = at + chunk.length
    if done < len(token_ids):
        out.append(list(token_ids[done:]))
    return out


def blend_prompt(
    runtime: Runtime,
    prefix: KVCache | None,
    token_ids: Sequence[int],
    chunks: Sequence[ChunkKV],
    recompute_ratio: float,
) -> Blended | None:
    """Blend `chunks` into the prompt `token_ids` after `prefix` (exact, never recomputed);
    None when no chunk occurs in it (the caller prefills as usual)."""
    if len(token_ids) < 2:
        return None
    body, tail = list(token_ids[:-1]), (int(token_ids[-1]),)
    parts = segments(body, chunks)
    used = [p for p in parts if isinstance(p, ChunkKV)]
    if not used:
        return None
    result = runtime.blend(parts, prefix, recompute_ratio=recompute_ratio)
    chunk_tokens = sum(c.length for c in used)
    return Blended(
        kv=result.kv,
        tail=tail,
        chunks=len(used),
        chunk_tokens=chunk_tokens,
        reused_tokens=chunk_tokens - result.recomputed_tokens,
        recomputed_tokens=result.recomputed_tokens,
    )
