"""A turn's prompt, in the model's chat template:

    system    the chat's system prompt (none: the template's default, if it has one)
    window    the conversation so far, verbatim: the newest turns that fit max_context_tokens
    user      the recalled notes, then the new message

Recalled notes go after the history, inside the new user turn, so `system + window` is the same
from one turn to the next: a stable prefix whose KV cache is kept and only grows (see
`kv_runtime.prefix`). After the reply the turn is added to that prefix as stored, without its
notes. Notes already in the window are not recalled again.

The window moves forward in large steps: when the turns no longer fit `max_context_tokens`, the
oldest leave until the rest fit half of it. Between moves the prefix only grows; at a move it is
prefilled again once (the older turns stay recallable as notes).

A long chat's old part (`chats.episodes`): the whole prompt may stand on one episode's bounded
cache, `before` (the messages its tokens render) taking `base_length` positions. The window is
then rendered as it follows those messages, and the positions left are fewer by the base's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from kv_runtime import Runtime
from memcube.errors import TooLarge
from memos.services.activations import notes as rendering
from memos.services.activations.notes import note_line
from memos.services.chats.history import USER, Message, Turn

MESSAGE_OVERHEAD = 6  # template tokens around one turn's content (ChatML: 5), a safe estimate


@dataclass(frozen=True)
class Note:
    memory_id: str
    score: float
    speaker: str | None
    timestamp: datetime
    content: str
    version: int = 0
    has_kv: bool = False  # a KV chunk of this version is stored: the turn may blend it

    def line(self) -> str:
        """One line of the notes block; a note's KV chunk holds exactly this line's tokens."""
        return note_line(self.speaker, self.timestamp, self.content)


def with_notes(content: str, notes: Sequence[Note]) -> str:
    """The new message as the model reads it: the notes block first, when there are notes."""
    return rendering.with_notes(content, [note.line() for note in notes])


def window_start(sizes: Sequence[int], budget: int) -> int:
    """Index of the first turn the window keeps, given each turn's size in tokens: all of them
    when they fit `budget`, else the newest that fit half of it."""
    if sum(sizes) <= budget:
        return 0
    total, start = 0, len(sizes)
    while start > 0 and total + sizes[start - 1] <= budget // 2:
        start -= 1
        total += sizes[start]
    return start


@dataclass(frozen=True)
class TurnPrompt:
    history: tuple[Message, ...]  # system + window: the stable prefix
    history_ids: tuple[int, ...]
    turn_ids: tuple[int, ...]  # the new user turn with its notes, and the generation prompt
    user: Message  # the new message as the history will hold it (no notes)
    notes: tuple[Note, ...]
    window: tuple[Turn, ...]
    before: tuple[Message, ...] = ()  # what the base under the prefix renders, if any


def _system(system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}] if system else []


def assemble(
    runtime: Runtime,
    system: str | None,
    window: Sequence[Turn],
    user: Message,
    notes: Sequence[Note],
    *,
    recall_tokens: int,
    max_tokens: int,
    before: Sequence[Message] = (),
    base_length: int = 0,
) -> TurnPrompt:
    """The prompt, within the model's positions: notes are cut to `recall_tokens`, then, if the
    whole still does not fit with `max_tokens` to answer, notes go first, then the oldest
    turns of the window. 413 when the new message alone cannot fit."""
    template = runtime.template
    kept: list[Note] = []
    spent = 0
    for note in notes:
        cost = len(runtime.tokenize(note.line())) + 1
        if spent + cost > recall_tokens:
            break
        kept.append(note)
        spent += cost
    turns = list(window)
    limit = runtime.info.max_positions - base_length
    before = list(before)
    while True:
        history = [*_system(system), *(turn.message() for turn in turns)]
        asked = {"role": USER, "content": with_notes(user["content"], kept)}
        if history:
            history_ids = template.render_delta(before, history, add_generation_prompt=False)
        else:
            history_ids = []
        turn_ids = template.render_delta([*before, *history], [asked])
        if len(history_ids) + len(turn_ids) + max_tokens <= limit:
            return TurnPrompt(
                tuple(history), tuple(history_ids), tuple(turn_ids), user, tuple(kept),
                tuple(turns), tuple(before),
            )  # fmt: skip
        if kept:
            kept.pop()
        elif turns:
            turns.pop(0)
        else:
            raise TooLarge(
                f"this message ({len(turn_ids)} tokens with the system prompt) and max_tokens "
                f"{max_tokens} do not fit the model's {limit} positions",
                code="message_too_large",
            )
