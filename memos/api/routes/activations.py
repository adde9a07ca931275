"""Activation memory routes: build, list, get and delete KV caches; generate with one."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from memos.api.deps import DaemonDep, PrincipalDep
from memos.api.generation import GenerationRun
from memos.api.openapi import READ_ONLY, errors, event_stream
from memos.api.schemas import (
    ActivationCreate,
    ActivationList,
    ActivationOut,
    GenerateRequest,
    GenerateResponse,
)
from memos.services.activations import ActivationSource
from memos.services.activations.episodes import EpisodicSettings

router = APIRouter(prefix="/v1/cubes/{cube_id}", tags=["activations"])

UNAVAILABLE = "`unavailable` (activations are off) or `model_unavailable` (it cannot load)"
GENERATED = {
    "description": "the answer; with `stream: true`, server-sent events instead: one `piece` "
    "event per piece of decoded text, then one `done` event with the same body (or one `error` "
    "event with the error body if decoding fails after the stream began)",
    "content": {
        "text/event-stream": event_stream(
            {
                "piece": {"type": "object", "properties": {"text": {"type": "string"}}},
                "done": {"$ref": "#/components/schemas/GenerateResponse"},
                "error": {"$ref": "#/components/schemas/ErrorBody"},
            },
            example='event: piece\ndata: {"text": "Hi"}\n\nevent: done\ndata: {"text": "Hi", ...}',
        )
    },
}


@router.post(
    "/activations",
    status_code=201,
    response_model=ActivationOut | ActivationList,
    responses=errors(
        {
            413: "`payload_too_large`: the body, the text or the rendered context (in tokens) "
            "is over its limit",
            503: UNAVAILABLE,
        }
    ),
)
def create_activation(
    cube_id: str, body: ActivationCreate, daemon: DaemonDep, principal: PrincipalDep
) -> ActivationOut | ActivationList:
    """Prefill the context once and store its (compressed) KV cache. A context longer than
    `activations.inline_max_tokens` is built in the background: the answer then has
    `state: "building"` and `progress`; poll GET until `"ready"`. Builds are bounded per cube
    owner and daemon-wide (429 `too_many_builds` beyond); deleting the activation cancels its
    build.

    Extension: with `episodic` (and a `session_id`, `session_ids` or `memory_ids` source) the
    conversation is clustered into episodes and each gets its own cache of at most
    `budget_tokens` tokens, built in the background; `generate` then continues from the episode
    nearest the prompt and names it (`episode`).

    Extension: with `"per_memory": true` (and `memory_ids`) each note gets its own KV chunk
    (`kind: "note"`), computed alone, built now; the answer lists one activation per note (a
    note that already has a current chunk keeps it). Chat turns and `generate` with
    `memory_ids` blend these chunks (CacheBlend) instead of prefilling the notes; editing or
    deleting a note drops its chunk."""
    source = ActivationSource(
        text=body.text,
        memory_ids=tuple(body.memory_ids) if body.memory_ids is not None else None,
        session_id=body.session_id,
        session_ids=tuple(body.session_ids) if body.session_ids is not None else None,
    )
    episodic = None
    if body.per_memory:
        bits = body.compression.bits if "bits" in body.compression.model_fields_set else None
        views = daemon.activations.create_note_chunks(
            principal, cube_id, source, bits, body.compression.budget_tokens,
            episodic=body.episodic is not None,
        )  # fmt: skip
        return ActivationList(items=[ActivationOut.model_validate(v) for v in views])
    if body.episodic is not None:
        e = body.episodic
        episodic = EpisodicSettings(e.episodes, e.budget_tokens, e.block_tokens)
    view = daemon.activations.create(
        principal, cube_id, source, body.compression.bits, body.compression.budget_tokens,
        episodic, scorer=body.compression.scorer,
    )  # fmt: skip
    return ActivationOut.model_validate(view)


@router.get("/activations", response_model=ActivationList)
def list_activations(cube_id: str, daemon: DaemonDep, principal: PrincipalDep) -> ActivationList:
    views = daemon.activations.list_activations(principal, cube_id)
    return ActivationList(items=[ActivationOut.model_validate(v) for v in views])


@router.get("/activations/{activation_id}", response_model=ActivationOut)
def get_activation(
    cube_id: str, activation_id: str, daemon: DaemonDep, principal: PrincipalDep
) -> ActivationOut:
    return ActivationOut.model_validate(daemon.activations.get(principal, cube_id, activation_id))


@router.delete("/activations/{activation_id}", status_code=204)
def delete_activation(
    cube_id: str, activation_id: str, daemon: DaemonDep, principal: PrincipalDep
) -> Response:
    daemon.activations.delete(principal, cube_id, activation_id)
    return Response(status_code=204)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    openapi_extra=READ_ONLY,
    responses={
        200: GENERATED,
        **errors(
            {
                409: "`activation_not_ready`, `activation_mismatch` (built by another model, "
                "tokenizer, chat template or dtype) or `activation_corrupt`",
                503: f"{UNAVAILABLE}, or `activation_unavailable` (its files are on another "
                "daemon of the fleet and cannot be reached now; retry after `Retry-After`)",
            }
        ),
    },
)
async def generate(
    cube_id: str,
    body: GenerateRequest,
    request: Request,
    daemon: DaemonDep,
    principal: PrincipalDep,
) -> GenerateResponse | StreamingResponse:
    """Answer `prompt` with the local model, continuing the activation's context when given
    (its KV cache is reused: `reused_tokens` were not prefilled again).

    With `"stream": true` the answer is `text/event-stream`: one `piece` event per piece of text
    (`{"text": ...}`) as it is decoded, then one `done` event with the response body (or one
    `error` event with the error body if decoding fails). Refusals (404, 409, 413, 422, 429,
    ...) still come as ordinary error responses, before any event. A generation is refused at
    once (429 `too_many_generations`, `Retry-After`) when the model work ahead of it is
    estimated beyond `activations.generation_wait_s`; otherwise up to
    `activations.max_generations` run at once, with a short wait queue (429 beyond); one whose
    client disconnects stops at its next token.

    Extension: with `memory_ids` the prompt carries those notes (as a chat turn's notes block);
    notes with a KV chunk (`per_memory` activations) are blended in (CacheBlend: re-rotated,
    `activations.blend_recompute_ratio` of their tokens recomputed), the rest prefilled;
    `reused_tokens` / `recomputed_tokens` say how many chunk tokens were kept / recomputed."""
    max_tokens = body.max_tokens
    if "max_tokens" not in body.model_fields_set:  # the default, within this daemon's limit
        max_tokens = min(max_tokens, daemon.settings.activations.max_generate_tokens)
    run = GenerationRun(
        lambda cancel: daemon.activations.stream(
            principal,
            cube_id,
            body.prompt,
            body.activation_id,
            max_tokens,
            cancel,
            memory_ids=body.memory_ids,
        )  # fmt: skip
    )
    await run.started(request)
    if not body.stream:
        return await run.collect(request)
    return run.stream_response(request)
