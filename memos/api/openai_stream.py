"""OpenAI's response bodies and server-sent event chunks, made from finished generations.

A chat stream is `data: {chat.completion.chunk}` lines: the first delta carries the role, the
next ones the text as it is decoded, the last one the finish reason (and the logprobs, when
asked for, all at once); with `stream_options.include_usage` one more chunk with no choices
carries the usage; then `data: [DONE]`. A completion stream is the same with
`text_completion` chunks, prompt after prompt (each choice its `index`). A failure after the
stream began is one `data: {"error": {...}}` line (the official client raises it), then
`[DONE]`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from memos.api.generation import GenerationRun, error_body
from memos.api.schemas import RecalledOut
from memos.api.schemas_openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobsOut,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionLogprobsOut,
    CompletionRequest,
    FinishReason,
    MemosChatOut,
    PromptTokensDetails,
    TextCompletion,
    TokenLogprobOut,
    TopLogprobOut,
    Usage,
)
from memos.daemon import Daemon
from memos.services.completions import ChatTokenLogprob, CompletionPrompt, CompletionService
from memos.services.runtime import ModelCard
from memos.services.views import GenerationView

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Reply:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str
    fingerprint: str

    @classmethod
    def start(cls, daemon: Daemon, card: ModelCard, prefix: str) -> Reply:
        """Once the runtime is loaded (the generation has started)."""
        fingerprint = json.dumps(daemon.runtime.get().fingerprint.to_dict(), sort_keys=True)
        digest = hashlib.blake2b(fingerprint.encode(), digest_size=6).hexdigest()
        return cls(f"{prefix}-{secrets.token_hex(12)}", int(time.time()), card.id, f"fp_{digest}")


@dataclass(frozen=True)
class Finished:
    """A chat reply as OpenAI's bodies need it, whatever produced it (a generation, a turn of
    a stored chat)."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: ChatLogprobsOut | None = None
    memos: MemosChatOut | None = None


def memos_out(
    recalled: Sequence[tuple[str, float]],
    chat_id: str | None = None,
    user_memory_id: str | None = None,
    assistant_memory_id: str | None = None,
) -> MemosChatOut:
    return MemosChatOut(
        recalled=[RecalledOut(memory_id=m, score=score) for m, score in recalled],
        chat_id=chat_id,
        user_memory_id=user_memory_id,
        assistant_memory_id=assistant_memory_id,
    )


def _event(body: ChatCompletionChunk | TextCompletion) -> str:
    return f"data: {body.model_dump_json(exclude_none=True)}\n\n"


def _error(exc: BaseException) -> str:
    return f"data: {json.dumps(error_body(exc))}\n\n"


def finish_reason(reason: str) -> FinishReason:
    # "cancelled" is only ever seen by a client that has gone.
    return "length" if reason == "length" else "stop"


def usage(views: Sequence[GenerationView]) -> Usage:
    """Prompt tokens count an activation's tokens too (`cached_tokens`: not prefilled)."""
    cached = sum(v.reused_tokens for v in views)
    prompt = sum(v.prompt_tokens for v in views) + cached
    completion = sum(len(v.token_ids) for v in views)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


# -- chat ------------------------------------------------------------------------------------


def chat_logprobs(rows: list[ChatTokenLogprob] | None) -> ChatLogprobsOut | None:
    if rows is None:
        return None
    return ChatLogprobsOut(
        content=[
            TokenLogprobOut(
                token=row.token,
                logprob=row.logprob,
                bytes=list(row.token.encode("utf-8")),
                top_logprobs=[
                    TopLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
                    for t in row.top_logprobs
                ],
            )
            for row in rows
        ]
    )


def chat_completion(reply: Reply, done: Finished) -> ChatCompletion:
    return ChatCompletion(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(content=done.text),
                finish_reason=done.finish_reason,
                logprobs=done.logprobs,
            )
        ],
        usage=done.usage,
        system_fingerprint=reply.fingerprint,
        memos=done.memos,
    )


async def chat_chunks(
    run: GenerationRun,
    request: Request,
    reply: Reply,
    summarize: Callable[[Any], Finished],
    include_usage: bool,
) -> AsyncIterator[str]:
    """`summarize` turns the run's result into the last chunk's contents (off the loop)."""

    def chunk(choices: list[ChunkChoice], **more: Any) -> str:
        body = ChatCompletionChunk(
            id=reply.id,
            created=reply.created,
            model=reply.model,
            choices=choices,
            system_fingerprint=reply.fingerprint,
            **more,
        )
        return _event(body)

    try:
        yield chunk([ChunkChoice(index=0, delta=ChunkDelta(role="assistant", content=""))])
        while True:
            kind, payload = await run.next(request)
            if kind == "piece":
                yield chunk([ChunkChoice(index=0, delta=ChunkDelta(content=payload))])
            elif kind == "done":
                done = await run_in_threadpool(summarize, payload)
                last = ChunkChoice(
                    index=0,
                    delta=ChunkDelta(),
                    finish_reason=done.finish_reason,
                    logprobs=done.logprobs,
                )
                yield chunk([last], memos=done.memos)
                if include_usage:
                    yield chunk([], usage=done.usage)
                yield DONE
                return
            else:
                yield _error(payload)
                yield DONE
                return
    finally:
        run.cancel.set()


# -- completions -------------------------------------------------------------------------------


def completion_choice(
    service: CompletionService,
    index: int,
    prompt: CompletionPrompt,
    view: GenerationView,
    body: CompletionRequest,
) -> CompletionChoice:
    logprobs = None
    if body.logprobs is not None:
        legacy = service.legacy_logprobs(prompt, view, body.echo)
        logprobs = CompletionLogprobsOut(**vars(legacy))
    return CompletionChoice(
        index=index,
        text=(prompt.text if body.echo else "") + view.text,
        finish_reason=finish_reason(view.finish_reason),
        logprobs=logprobs,
    )


async def completion_chunks(
    first: GenerationRun,
    run_for: Callable[[CompletionPrompt], GenerationRun],
    request: Request,
    reply: Reply,
    prompts: Sequence[CompletionPrompt],
    body: CompletionRequest,
    service: CompletionService,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choices: list[CompletionChoice], **more: object) -> str:
        return _event(
            TextCompletion(
                id=reply.id,
                created=reply.created,
                model=reply.model,
                choices=choices,
                system_fingerprint=reply.fingerprint,
                **more,
            )
        )

    views: list[GenerationView] = []
    try:
        for index, prompt in enumerate(prompts):
            run = first if index == 0 else run_for(prompt)
            if body.echo:
                yield chunk([CompletionChoice(index=index, text=prompt.text, finish_reason=None)])
            while True:
                kind, payload = await run.next(request)
                if kind == "started":
                    continue
                if kind == "piece":
                    yield chunk([CompletionChoice(index=index, text=payload, finish_reason=None)])
                    continue
                if kind == "error":
                    yield _error(payload)
                    yield DONE
                    return
                views.append(payload)
                whole = await run_in_threadpool(
                    completion_choice, service, index, prompt, payload, body
                )
                yield chunk([whole.model_copy(update={"text": ""})])
                break
        if include_usage:
            yield chunk([], usage=usage(views))
        yield DONE
    finally:
        first.cancel.set()
