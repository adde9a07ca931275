"""Chat turns answered by an OpenAI-compatible endpoint instead of the local runtime.

For a model larger than the CPU default: recall, the verbatim window, the notes and storage are
exactly those of a local turn; only the answer comes from `POST {url}/chat/completions` (streamed),
so there is no KV prefix to reuse (`reused_tokens` is 0). Without the endpoint's tokenizer, sizes
are estimated at four characters a token, and the prompt is kept within the configured
`context_tokens` the same way a local prompt is kept within the model's positions.

The stream is opened before the turn is handed back, so an endpoint that refuses or cannot be
reached is an ordinary error (503 `chat_backend_unavailable`) before any text; a client that
leaves closes the upstream connection at the next chunk.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from memcube.errors import TooLarge, Unavailable
from memos.services.activations.admission import Slot
from memos.services.chats.history import USER, Message, Turn
from memos.services.chats.prompt import MESSAGE_OVERHEAD, Note, with_notes
from memos.services.chats.turns import Release, Store, TurnRequest, store_turn
from memos.services.views import ChatReplyView, RecalledView
from memos.settings import ChatEndpointConfig

CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 1


def remote_prompt(
    system: str | None,
    window: Sequence[Turn],
    user: Message,
    notes: Sequence[Note],
    *,
    recall_tokens: int,
    context_tokens: int,
    max_tokens: int,
) -> tuple[list[Message], list[Note]]:
    """(messages, the notes kept): notes cut to `recall_tokens`, then notes and the oldest
    turns give way until the estimate fits `context_tokens` with `max_tokens` to answer."""
    kept: list[Note] = []
    spent = 0
    for note in notes:
        cost = estimate_tokens(note.line())
        if spent + cost > recall_tokens:
            break
        kept.append(note)
        spent += cost
    turns = list(window)
    head = [{"role": "system", "content": system}] if system else []
    while True:
        asked = {"role": USER, "content": with_notes(user["content"], kept)}
        messages = [*head, *(t.message() for t in turns), asked]
        size = sum(estimate_tokens(m["content"]) + MESSAGE_OVERHEAD for m in messages)
        if size + max_tokens <= context_tokens:
            return messages, kept
        if kept:
            kept.pop()
        elif turns:
            turns.pop(0)
        else:
            raise TooLarge(
                f"this message (about {size} tokens with the system prompt) and max_tokens "
                f"{max_tokens} do not fit the endpoint's {context_tokens}-token context",
                code="message_too_large",
            )


class RemoteTurn:
    """A turn answered by the endpoint, driven like `ChatTurn` (iterate, finish, close)."""

    def __init__(
        self,
        client: httpx.Client,
        config: ChatEndpointConfig,
        request: TurnRequest,
        messages: list[Message],
        user: Message,
        notes: Sequence[Note],
        slot: Slot,
        cancel: threading.Event,
        store: Store,
        release: Release,
        started: float,
    ) -> None:
        self.request, self.user, self.notes = request, user, tuple(notes)
        self._slot, self._cancel, self._store, self._release = slot, cancel, store, release
        self._started = started
        self._closed = False
        self.stored: tuple[str, str] | None = None
        self.text = ""
        self.finish_reason: str | None = None
        self.ttft_ms = 0.0
        self.prompt_tokens = self.completion_tokens = 0
        body: dict[str, Any] = {
            "model": config.model,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.seed is not None:
            body["seed"] = request.seed
        try:
            self._response = client.send(
                client.build_request("POST", "/chat/completions", json=body), stream=True
            )
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"the chat endpoint {config.url} cannot be reached: {exc}",
                code="chat_backend_unavailable",
            ) from exc
        if self._response.status_code >= 400:
            detail = self._response.read().decode("utf-8", "replace")[:500]
            self._response.close()
            raise Unavailable(
                f"the chat endpoint answered {self._response.status_code}: {detail}",
                code="chat_backend_unavailable",
            )

    def __iter__(self) -> Iterator[str]:
        for line in self._response.iter_lines():
            if self._cancel.is_set():
                self.finish_reason = "cancelled"
                return
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage")
            if usage:
                self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                self.completion_tokens = int(usage.get("completion_tokens") or 0)
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    if not self.text:
                        self.ttft_ms = (time.perf_counter() - self._started) * 1000
                    self.text += piece
                    yield piece
                if choice.get("finish_reason"):
                    self.finish_reason = str(choice["finish_reason"])
        if self.finish_reason is None:
            self.finish_reason = "cancelled" if self._cancel.is_set() else "stop"

    def finish(self) -> ChatReplyView:
        try:
            reason = self.finish_reason or "stop"
            if reason in {"stop", "length"} and self.text.strip():
                self.stored = store_turn(self._store, self.request, self.text)
            return ChatReplyView(
                reply=self.text,
                user_memory_id=self.stored[0] if self.stored else None,
                assistant_memory_id=self.stored[1] if self.stored else None,
                recalled=[RecalledView(n.memory_id, n.score) for n in self.notes],
                ttft_ms=round(self.ttft_ms, 3),
                prompt_tokens=self.prompt_tokens,
                reused_tokens=0,
                finish_reason=reason,
                completion_tokens=self.completion_tokens,
            )
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._response.close()
        finally:
            self._slot.release()
            outcome = self.finish_reason or "failed"
            self._release(self.request.chat_id, outcome, self.stored is not None, None)
