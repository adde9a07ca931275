"""OpenAI-compatible routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.

The official `openai` client (and tools built on it, such as lm-evaluation-harness) talks to
memosd with `base_url="http://127.0.0.1:8765/v1"` and a memosd API key. Generations run the
local model through the same checks, admission and disconnect cancellation as `generate`
(`memos.api.generation`); streams are OpenAI's server-sent events (`openai_stream`).
"""

from __future__ import annotations

import threading

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from memcube.errors import InvalidArgument
from memos.api.deps import DaemonDep, PrincipalDep
from memos.api.generation import GenerationRun
from memos.api.openai_stream import (
    Reply,
    chat_chunks,
    chat_completion,
    completion_choice,
    completion_chunks,
    usage,
)
from memos.api.openapi import errors, event_stream
from memos.api.schemas_openai import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    ModelOut,
    TextCompletion,
)
from memos.daemon import Daemon
from memos.services.activations import GenerationStream
from memos.services.activations.generations import Sampling
from memos.services.completions import ChatMessage, ChatTurn, CompletionPrompt, MemoryScope
from memos.services.runtime import ModelCard

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

    `memos: {"cube_id", "recall"?}` (memosd's extension; the official client sends it through
    `extra_body`) recalls the cube's notes most relevant to the last user message into the
    prompt; the response's `memos.recalled` lists them. Refusals (404, 413, 422, 429, ...)
    come as error responses before any event; a generation whose client leaves stops at its
    next token."""
    card = daemon.completions.model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs: true")
    wanted = (body.top_logprobs or 0) if body.logprobs else None
    sampling = _sampling(body, body.max_completion_tokens or body.max_tokens, logprobs=wanted)
    messages = [ChatMessage(m.role, m.text) for m in body.messages]
    memory = None
    if body.memos is not None:
        memory = MemoryScope(body.memos.cube_id, body.memos.chat_id, body.memos.recall)
    turns: list[ChatTurn] = []

    def open_stream(cancel: threading.Event) -> GenerationStream:
        turn = daemon.completions.chat(principal, messages, sampling, memory, cancel)
        turns.append(turn)
        return turn.stream

    run = GenerationRun(open_stream)
    await run.started(request)
    reply = Reply.start(daemon, card, "chatcmpl", recalled=turns[0].recalled)
    if not body.stream:
        view = await run.collect(request)
        logprobs = None
        if wanted is not None:
            logprobs = await run_in_threadpool(daemon.completions.chat_logprobs, view)
        return chat_completion(reply, view, logprobs)
    return run.stream_response(
        request,
        chat_chunks(run, request, reply, daemon.completions, wanted, _include_usage(body)),
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
    if body.max_tokens == 0 and not body.echo:
        raise InvalidArgument("max_tokens is 0; that is only for echo: true (scoring the prompt)")
    scored = body.logprobs if body.logprobs is not None else 0
    sampling = _sampling(
        body,
        body.max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=scored
        if body.echo and (body.logprobs is not None or not body.max_tokens)
        else None,
    )
    prompts, cube_id = await run_in_threadpool(_prepare, daemon, principal, body)
    cancel = threading.Event()  # one switch for every prompt of the response

    def run_for(prompt: CompletionPrompt) -> GenerationRun:
        return GenerationRun(
            lambda c: daemon.completions.complete(
                prompt, sampling, c, cube_id=cube_id, activation_id=body.activation_id
            ),
            cancel,
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
    return TextCompletion(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=choices,
        usage=usage(views),
        system_fingerprint=reply.fingerprint,
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
    return daemon.completions.prepare(body.prompts), cube_id
