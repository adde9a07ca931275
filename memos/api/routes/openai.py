"""OpenAI-compatible routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.

The official `openai` client (and tools built on it, such as lm-evaluation-harness) talks to
memosd with `base_url="http://127.0.0.1:8765/v1"` and a memosd API key. Generations run the
local model through the same checks, admission and disconnect cancellation as `generate`
(`memos.api.generation`); streams are OpenAI's server-sent events (`openai_stream`).
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from memcube.errors import InvalidArgument
from memos.api.deps import DaemonDep, PrincipalDep
from memos.api.generation import GenerationRun
from memos.api.openai_stream import (
    Finished,
    Reply,
    chat_chunks,
    chat_completion,
    chat_logprobs,
    completion_choice,
    completion_chunks,
    finish_reason,
    memos_out,
    usage,
)
from memos.api.openapi import errors, event_stream
from memos.api.schemas_openai import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    MemosCompletionOut,
    ModelList,
    ModelOut,
    PromptTokensDetails,
    TextCompletion,
    Usage,
)
from memos.daemon import Daemon
from memos.services.activations import GenerationStream
from memos.services.activations.generations import Sampling
from memos.services.completions import (
    ChatMessage,
    ChatOpened,
    CompletionPrompt,
    CompletionService,
    MemoryScope,
)
from memos.services.runtime import ModelCard
from memos.services.views import ChatReplyView, GenerationView

router = APIRouter(prefix="/v1", tags=["openai"])

UNAVAILABLE = "`unavailable` (the runtime is off) or `model_unavailable` (it cannot load)"
NO_MODEL = "`model_not_found`: `model` is not the served model"
REFUSED = {
    404: f"{NO_MODEL}; or `cube_not_found` / `activation_not_found`",
    409: "`activation_not_ready`, `activation_mismatch` or `activation_corrupt`",
    503: UNAVAILABLE,
}


def _card_out(card: ModelCard) -> ModelOut:
    return ModelOut(id=card.id, created=card.created, owned_by="memosd")


@router.get("/models", response_model=ModelList)
def list_models(daemon: DaemonDep, principal: PrincipalDep) -> ModelList:
    """The served model (the local runtime), in OpenAI's list shape; loading it is not needed."""
    return ModelList(data=[_card_out(card) for card in daemon.completions.models()])


@router.get(
    "/models/{model:path}",
    response_model=ModelOut,
    responses=errors({404: NO_MODEL, 503: UNAVAILABLE}),
)
def get_model(model: str, daemon: DaemonDep, principal: PrincipalDep) -> ModelOut:
    return _card_out(daemon.completions.model(model))


def _sampling(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, **more: int | None
) -> Sampling:
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stops,
        **more,
    )


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {
            "description": "the reply; with `stream: true`, OpenAI's server-sent events: "
            "`data: {chat.completion.chunk}` lines (the role, then content deltas, then the "
            "finish reason; a usage chunk with `stream_options.include_usage`), then "
            "`data: [DONE]`",
            "content": {
                "text/event-stream": event_stream(
                    {"data": {"$ref": "#/components/schemas/ChatCompletionChunk"}},
                    example='data: {"object": "chat.completion.chunk", ...}\n\ndata: [DONE]',
                )
            },
        },
        **errors(
            {
                **REFUSED,
                403: "`forbidden`: `memos.chat_id` needs a writer of the cube",
            }
        ),
    },
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, daemon: DaemonDep, principal: PrincipalDep
) -> ChatCompletion | StreamingResponse:
    """A chat reply from the local model (the messages rendered with its chat template).

    memosd's extension `memos: {"cube_id", "chat_id"?, "recall"?}` (the official client sends
    it through `extra_body`): without `chat_id`, the cube's notes most relevant to the last
    user message are recalled into it (stateless; `recall: false` skips it); with `chat_id`,
    the last message is the next turn of that stored chat (`POST .../chats`): recalled,
    answered on the chat's KV prefix and stored with its reply, the request's other messages
    unread. The response's `memos` lists the recalled notes (and the stored turn's memory
    ids). Refusals (404, 409 `chat_busy`, 413, 422, 429, ...) come as error responses before
    any event; a generation whose client leaves stops at its next token (a chat turn is then
    not stored)."""
    card = daemon.completions.model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs: true")
    wanted = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    messages = [ChatMessage(m.role, m.text) for m in body.messages]
    memory = None
    if body.memos is not None:
        memory = MemoryScope(body.memos.cube_id, body.memos.chat_id, body.memos.recall)
    service = daemon.completions
    if memory is not None and memory.chat_id is not None:
        if body.stops or wanted is not None:
            raise InvalidArgument(
                "stop and logprobs are not available on a stored chat (memos.chat_id)"
            )
        overrides = {
            name: value
            for name, value in (("temperature", body.temperature), ("top_p", body.top_p),
                                ("seed", body.seed))
            if value is not None
        }  # fmt: skip
        run = GenerationRun(
            lambda cancel: service.chat_turn(
                principal, memory, messages, max_tokens, overrides, cancel
            ),
            body=_same,
        )
        summarize = partial(_turn_finished, memory.chat_id)
    else:
        sampling = _sampling(body, max_tokens, logprobs=wanted)
        opened: list[ChatOpened] = []

        def open_stream(cancel: threading.Event) -> GenerationStream:
            chat = service.chat(principal, messages, sampling, memory, cancel)
            opened.append(chat)
            return chat.stream

        run = GenerationRun(open_stream, body=_same)
        summarize = partial(_chat_finished, service, opened, memory is not None, wanted)
    await run.started(request)
    reply = Reply.start(daemon, card, "chatcmpl")
    if not body.stream:
        done = await run.collect(request)
        return chat_completion(reply, await run_in_threadpool(summarize, done))
    return run.stream_response(
        request, chat_chunks(run, request, reply, summarize, _include_usage(body))
    )


def _same(value: Any) -> Any:
    return value


def _chat_finished(
    service: CompletionService,
    opened: list[ChatOpened],
    with_memory: bool,
    logprobs: int | None,
    view: GenerationView,
) -> Finished:
    rows = service.chat_logprobs(view) if logprobs is not None else None
    recalled = [(r.memory_id, r.score) for r in opened[0].recalled]
    return Finished(
        text=view.text,
        finish_reason=finish_reason(view.finish_reason),
        usage=usage([view]),
        logprobs=chat_logprobs(rows),
        memos=memos_out(recalled) if with_memory else None,
    )


def _turn_finished(chat_id: str, view: ChatReplyView) -> Finished:
    completion = view.completion_tokens
    return Finished(
        text=view.reply,
        finish_reason=finish_reason(view.finish_reason),
        usage=Usage(
            prompt_tokens=view.prompt_tokens,
            completion_tokens=completion,
            total_tokens=view.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=view.reused_tokens),
        ),
        memos=memos_out(
            [(r.memory_id, r.score) for r in view.recalled],
            chat_id,
            view.user_memory_id,
            view.assistant_memory_id,
        ),
    )


@router.post(
    "/completions",
    response_model=TextCompletion,
    responses={
        200: {
            "description": "the completions, one choice per prompt; with `stream: true`, "
            "`data: {text_completion}` chunks (text pieces, then each choice's finish "
            "reason and logprobs; a usage chunk with `stream_options.include_usage`), then "
            "`data: [DONE]`",
            "content": {
                "text/event-stream": event_stream(
                    {"data": {"$ref": "#/components/schemas/TextCompletion"}},
                    example='data: {"object": "text_completion", ...}\n\ndata: [DONE]',
                )
            },
        },
        **errors(REFUSED),
    },
)
async def completions(
    body: CompletionRequest, request: Request, daemon: DaemonDep, principal: PrincipalDep
) -> TextCompletion | StreamingResponse:
    """Continue each prompt (text or token ids) as it is, with no chat template.

    `echo` returns the prompt before the completion; `logprobs: k` gives every token's
    log-probability with the k most likely alternatives, the prompt's too with `echo` (the
    first prompt token has none, unless an activation precedes it); `max_tokens: 0` with
    `echo` scores the prompt only (how evaluation tools compute loglikelihoods). The
    `activation_id` extension continues a stored activation's context: the prompt is scored
    and continued after its tokens, reusing its KV cache."""
    card = daemon.completions.model(body.model)
    max_tokens = body.max_tokens
    if "max_tokens" not in body.model_fields_set:  # the default, within this daemon's limit
        max_tokens = min(max_tokens, daemon.settings.activations.max_generate_tokens)
    if max_tokens == 0 and not body.echo:
        raise InvalidArgument("max_tokens is 0; that is only for echo: true (scoring the prompt)")
    scored = body.logprobs if body.logprobs is not None else 0
    sampling = _sampling(
        body,
        max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=scored
        if body.echo and (body.logprobs is not None or not max_tokens)
        else None,
    )
    prompts, cube_id = await run_in_threadpool(_prepare, daemon, principal, body)
    cancel = threading.Event()  # one switch for every prompt of the response
    memory_ids = body.memos.memory_ids if body.memos is not None else None

    def run_for(prompt: CompletionPrompt) -> GenerationRun:
        return GenerationRun(
            lambda c: daemon.completions.complete(
                prompt,
                sampling,
                c,
                cube_id=cube_id,
                activation_id=body.activation_id,
                memory_ids=memory_ids,
            ),  # fmt: skip
            body=_same,
            cancel=cancel,
        )

    first = run_for(prompts[0])
    await first.started(request)
    reply = Reply.start(daemon, card, "cmpl")
    if body.stream:
        chunks = completion_chunks(
            first, run_for, request, reply, prompts, body, daemon.completions, _include_usage(body)
        )
        return first.stream_response(request, chunks)
    choices, views = [], []
    for index, prompt in enumerate(prompts):
        run = first if index == 0 else run_for(prompt)
        if index:
            await run.started(request)
        view = await run.collect(request)
        views.append(view)
        choices.append(
            await run_in_threadpool(
                completion_choice, daemon.completions, index, prompt, view, body
            )
        )
    episodes = [view.episode for view in views if view.episode is not None]
    memos = MemosCompletionOut(episodes=episodes) if episodes else None
    if memory_ids is not None:
        memos = MemosCompletionOut(
            episodes=episodes,
            reused_tokens=[view.reused_tokens for view in views],
            recomputed_tokens=[view.recomputed_tokens for view in views],
        )
    return TextCompletion(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=choices,
        usage=usage(views),
        system_fingerprint=reply.fingerprint,
        memos=memos,
    )


def _prepare(
    daemon: Daemon, principal: PrincipalDep, body: CompletionRequest
) -> tuple[list[CompletionPrompt], str | None]:
    """The prompts tokenized and checked, and the activation's cube, which the caller may
    read (off the event loop: tokenizing a long prompt takes a while)."""
    cube_id = None
    if body.activation_id is not None:
        given = body.memos.cube_id if body.memos is not None else None
        cube_id = daemon.completions.activation_cube(principal, body.activation_id, given)
    elif body.memos is not None:  # its memory_ids: notes of a cube the caller may read
        cube_id = daemon.completions.notes_cube(principal, body.memos.cube_id)
    return daemon.completions.prepare(body.prompts), cube_id
