"""One chat turn: recall, prompt, the prefix brought up to date, generation, both turns stored.

    open   (every refusal here, before any text)
      the chat is taken for this turn (409 chat_busy if another turn runs)
      the verbatim window, the recalled notes, the prompt (`prompt.assemble`)
      an admission slot (the generations' gate: 429 too_many_generations)
      the chat's prefix: loaded, else read from disk, else empty; synced to system + window
      (only what it lacks is prefilled: `reused_tokens` is what it already held)
      recalled notes with KV chunks: the turn's cache is blended on a snapshot of the prefix
      (`activations.blending`; their kept tokens count in `reused_tokens`, the others in
      `recomputed_tokens`), and the reply is decoded on that blended cache, never on the prefix
    pieces as they are decoded, on the prefix itself (cropped back after)
    finish
      finished ("stop" or "length"): the user turn and the reply are stored as two memories of
      the chat's session in one transaction, then the prefix is extended by both (as stored)
      cancelled (client gone) or failed: nothing is stored, the prefix is as before the turn
    close: the slot and the chat are given back, the prefix goes back to the loaded map

A daemon killed mid-turn has stored nothing of that turn: the memories are written only after
the reply is complete, both in one transaction.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime

from kv_runtime import Generation, GenerationResult, Runtime
from memos.db.types import utcnow
from memos.services.activations.admission import Slot
from memos.services.activations.blending import Blended
from memos.services.chats.history import ASSISTANT, USER, Message
from memos.services.chats.prefixes import LoadedPrefix
from memos.services.chats.prompt import TurnPrompt
from memos.services.views import ChatReplyView, NewMemory, RecalledView

Store = Callable[[list[NewMemory]], list[str]]  # both turns, one transaction -> their ids
# When a turn ends: (chat id, outcome: finish reason or "failed", whether it was stored, the
# prefix to keep loaded or None).
Release = Callable[[str, str, bool, LoadedPrefix | None], None]


@dataclass(frozen=True)
class TurnRequest:
    chat_id: str
    cube_id: str
    session_id: str
    content: str
    speaker: str | None
    timestamp: datetime | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


def store_turn(store: Store, request: TurnRequest, reply: str) -> tuple[str, str]:
    """The finished turn as two memories of the chat's session, in one transaction: the
    message (dated as sent, or now) and the reply (never dated before it)."""
    asked_at = request.timestamp or utcnow()
    user = NewMemory(
        content=request.content,
        session_id=request.session_id,
        speaker=request.speaker or USER,
        timestamp=asked_at,
        metadata={"chat_id": request.chat_id},
    )
    answer = NewMemory(
        content=reply,
        session_id=request.session_id,
        speaker=ASSISTANT,
        timestamp=max(asked_at, utcnow()),
        metadata={"chat_id": request.chat_id},
    )
    user_id, assistant_id = store([user, answer])
    return user_id, assistant_id


class ChatTurn:
    """A running turn, in the shape `memos.api.generation.GenerationRun` drives: iterate for
    pieces, then `finish()`; `close()` always (it releases everything, once)."""

    def __init__(
        self,
        runtime: Runtime,
        request: TurnRequest,
        prompt: TurnPrompt,
        entry: LoadedPrefix,
        slot: Slot,
        cancel: threading.Event,
        store: Store,
        release: Release,
        started: float,
        reused_tokens: int,
        blended: Blended | None = None,
        episode: int | None = None,
    ) -> None:
        self.runtime, self.request, self.prompt, self.entry = runtime, request, prompt, entry
        self._slot, self._cancel, self._store, self._release = slot, cancel, store, release
        self._started = started
        self._closed = False
        self.stored: tuple[str, str] | None = None
        # The prefix was synced to `prompt.history_ids` by the caller: it kept `reused_tokens`
        # (with the episode's entries it stands on, if any); a blend kept more (the notes'
        # chunk tokens it did not recompute).
        self.reused_tokens = reused_tokens + (blended.reused_tokens if blended else 0)
        self.recomputed_tokens = blended.recomputed_tokens if blended else 0
        self.episode = episode  # the episode of the chat's old part it stands on, if any
        self.prefilled_ms = (time.perf_counter() - started) * 1000
        # On the prefix itself (cropped back after), or on the blended cache (the prefix is
        # not touched): then only the prompt's last token is left to run.
        self._generation: Generation = runtime.generate(
            list(prompt.turn_ids if blended is None else blended.tail),
            kv=None if blended is None else blended.kv,
            prefix=entry.prefix if blended is None else None,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            cancel=cancel.is_set,
        )

    def __iter__(self) -> Iterator[str]:
        generation, work = self._generation, self._slot.work
        synced = work.prefilled  # the history the prefix was brought up to date with
        for piece in generation:
            work.advance(synced + generation.prefilled, generation.decoded)
            yield piece

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def result(self) -> GenerationResult | None:
        return self._generation.result

    def finish(self) -> ChatReplyView:
        """Store the finished turn (nothing for a cancelled one), extend the prefix and give
        the chat back, so a client may send its next message as soon as it has the reply."""
        try:
            return self._finish()
        finally:
            self.close()

    def _finish(self) -> ChatReplyView:
        result = self._generation.result
        assert result is not None, "finish() after the pieces are consumed"
        recalled = [RecalledView(n.memory_id, n.score) for n in self.prompt.notes]
        view = ChatReplyView(
            reply=result.text,
            user_memory_id=None,
            assistant_memory_id=None,
            recalled=recalled,
            ttft_ms=round(self.prefilled_ms + result.ttft_ms, 3),
            prompt_tokens=self.entry.prefix.base_entries
            + len(self.prompt.history_ids)
            + len(self.prompt.turn_ids),
            reused_tokens=self.reused_tokens,
            finish_reason=result.finish_reason,
            completion_tokens=len(result.token_ids),
            recomputed_tokens=self.recomputed_tokens,
            episode=self.episode,
        )
        if result.finish_reason == "cancelled" or not result.text.strip():
            return view  # nothing to store: the client left, or the model said nothing
        user_id, assistant_id = store_turn(self._store, self.request, result.text)
        self.stored = (user_id, assistant_id)
        self._extend(self.prompt.user, {"role": ASSISTANT, "content": result.text})
        return replace(view, user_memory_id=user_id, assistant_memory_id=assistant_id)

    def _extend(self, user: Message, answer: Message) -> None:
        """The prefix grows by the stored turn, so the next turn prefills only its own."""
        history = [*self.prompt.before, *self.prompt.history]
        template = self.runtime.template
        delta = template.render_delta(history, [user, answer], add_generation_prompt=False)
        self.entry.prefix.extend(delta)  # not cancellable: the turn is stored already
        self.entry.messages = (*self.prompt.history, user, answer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._generation.close()  # crops the prefix back if it stopped early
        finally:
            self._slot.release()
            result = self._generation.result
            outcome = result.finish_reason if result is not None else "failed"
            self._release(self.request.chat_id, outcome, self.stored is not None, self.entry)
