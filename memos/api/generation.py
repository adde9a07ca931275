"""Generation over HTTP: decoded on a thread of its own, stopped when its client goes.

A generation runs for seconds to minutes. Its work (admission wait, loading, decoding) happens on
a dedicated thread, so no event-loop or thread-pool worker waits on the model and `/healthz`,
`/metrics` and searches keep answering. The thread hands events to the route through an
asyncio queue: "started" (every refusal comes before it, as an ordinary error response),
"piece", then "done" or "error". While the route waits for the next event it asks the server
every `POLL_S` whether the client is still there; once it is not, the run's cancel switch is
set, and the runtime stops before its next token (or the admission wait gives up), streaming or
not. For streams Starlette also notices the disconnect itself and cancels the response, which
sets the same switch when it ends (not left to the event generator's `finally`: a generator
cancelled while the response was sending is only closed whenever it is garbage-collected).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from memcube.errors import DomainError
from memos.api.schemas import GenerateResponse

log = logging.getLogger("memos.api")
POLL_S = 0.25  # how often a waiting route checks that its client is still connected


class Stream(Protocol):
    """What a run drives: a generation (`GenerationStream`) or a chat turn (`ChatTurn`)."""

    def __iter__(self) -> Iterator[str]: ...
    def finish(self) -> Any: ...
    def close(self) -> None: ...


class GenerationRun:
    """One generation on its own thread. Create it inside the route (it needs the loop).
    `body` makes the response body of what the stream's `finish()` returns (the identity
    for a route that shapes it itself). Runs that make up one response (a completion's
    prompts) may share one `cancel` switch."""

    def __init__(
        self,
        open_stream: Callable[[threading.Event], Stream],
        body: Callable[[Any], Any] = GenerateResponse.model_validate,
        cancel: threading.Event | None = None,
    ) -> None:
        self._body = body
        self.cancel = cancel or threading.Event()
        self._loop = asyncio.get_running_loop()
        self._next_look = self._loop.time() + POLL_S  # when to look for the client again
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._thread = threading.Thread(
            target=self._work, args=(open_stream,), name="memos-generate", daemon=True
        )
        self._thread.start()

    def _post(self, kind: str, payload: Any = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop has closed (server shutting down): nobody listens
            self.cancel.set()

    def _work(self, open_stream: Callable[[threading.Event], Stream]) -> None:
        try:
            stream = open_stream(self.cancel)
        except BaseException as exc:  # a refusal: the route raises it as an error response
            self._post("error", exc)
            return
        try:
            self._post("started")
            for piece in stream:
                self._post("piece", piece)
            self._post("done", self._body(stream.finish()))
        except BaseException as exc:
            if not isinstance(exc, DomainError):
                log.exception("generation failed")
            self._post("error", exc)
        finally:
            stream.close()

    async def next(self, request: Request) -> tuple[str, Any]:
        """The next event, cancelling the run if the client leaves meanwhile (or the route is
        cancelled itself, as on shutdown). The client is looked for every `POLL_S` whether
        events flow or not: pieces decoded faster than that must not hide its leaving."""
        try:
            while True:
                now = self._loop.time()
                if now >= self._next_look and not self.cancel.is_set():
                    self._next_look = now + POLL_S
                    if await request.is_disconnected():
                        self.cancel.set()  # the thread ends within a token, posts its last event
                try:
                    return await asyncio.wait_for(self._events.get(), POLL_S)
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            self.cancel.set()
            raise

    async def started(self, request: Request) -> None:
        """Wait until decoding starts; raise the refusal if there is one."""
        kind, payload = await self.next(request)
        if kind == "error":
            raise payload
        assert kind == "started", kind

    async def collect(self, request: Request) -> Any:
        """Every piece, then the totals."""
        while True:
            kind, payload = await self.next(request)
            if kind == "done":
                return payload
            if kind == "error":
                raise payload

    def stream_response(
        self, request: Request, content: AsyncIterator[str] | None = None
    ) -> StreamingResponse:
        """`content` (by default `events`) as `text/event-stream`; the run is cancelled when
        the response ends."""
        return _CancellingResponse(content or self.events(request), self.cancel)

    async def events(self, request: Request) -> AsyncIterator[str]:
        """Server-sent events: `piece` per piece, then `done`, or `error` if it fails."""
        try:
            while True:
                kind, payload = await self.next(request)
                if kind == "piece":
                    yield f"event: piece\ndata: {json.dumps({'text': payload})}\n\n"
                elif kind == "done":
                    yield f"event: done\ndata: {payload.model_dump_json()}\n\n"
                    return
                else:
                    yield f"event: error\ndata: {json.dumps(error_body(payload))}\n\n"
                    return
        finally:
            self.cancel.set()  # no-op once done; stops decoding when the client went


class _CancellingResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[str], cancel: threading.Event) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._cancel = cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cancel.set()  # finished: a no-op; the client went: decoding stops


def error_body(exc: BaseException) -> dict[str, Any]:
    """The error body of a failure after a stream began (its status line is long sent)."""
    if isinstance(exc, DomainError):
        return {"error": {"code": exc.code, "message": exc.message}}
    return {"error": {"code": "internal_error", "message": "the server failed; see its log"}}
