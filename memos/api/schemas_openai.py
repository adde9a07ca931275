"""Bodies of the OpenAI-compatible routes, in OpenAI's own shapes (plus the `memos` extension).

Requests refuse unknown fields like every other route, so a typo never silently does nothing;
the OpenAI fields this daemon does not implement are accepted only at their neutral value
(`frequency_penalty: 0`, `n: 1`, ...), anything else is a 422 that names the field. Sampling
defaults are OpenAI's: temperature 1, top_p 1; `max_tokens` left out means as many as the
daemon's limit and the model's positions allow.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictStr,
    model_serializer,
    model_validator,
)

from memos.api.fields import Ids, JsonInt, Text
from memos.api.schemas import RecalledOut, Strict


def _json_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON number")
    return float(value)


JsonNumber = Annotated[float, BeforeValidator(_json_number)]
TokenId = Annotated[JsonInt, Field(ge=0, le=2**31 - 1)]
MAX_TOKENS = Field(None, ge=1, le=65_536, description="at most `activations.max_generate_tokens`")


class _Unsupported(Strict):
    """OpenAI fields accepted only at the value that changes nothing here."""

    frequency_penalty: JsonNumber | None = Field(None, ge=0, le=0, description="only 0")
    presence_penalty: JsonNumber | None = Field(None, ge=0, le=0, description="only 0")
    logit_bias: dict[str, JsonNumber] | None = Field(None, max_length=0, description="only empty")
    user: Text | None = Field(None, max_length=256, description="accepted and ignored")
    n: JsonInt | None = Field(None, ge=1, le=1, description="only 1: one choice per prompt")


class StreamOptions(Strict):
    include_usage: StrictBool = Field(
        False, description="one more chunk before `[DONE]`: no choices, the usage"
    )


class _Sampling(_Unsupported):
    temperature: JsonNumber | None = Field(None, ge=0, le=2, description="default 1; 0 is greedy")
    top_p: JsonNumber | None = Field(None, gt=0, le=1, description="default 1")
    seed: JsonInt | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="the same seed samples the same text"
    )
    stop: Text | list[Text] | None = Field(
        None, description="up to 16 non-empty strings; the text ends before the first one"
    )
    stream: StrictBool = Field(False, description="server-sent events, OpenAI's chunks")
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _stops(self) -> _Sampling:
        stops = self.stops
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop: give at most 16 non-empty strings")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# -- chat --------------------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class OpenAIChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] = Field(description="a string, or text parts")
    name: Text | None = Field(None, max_length=256, description="accepted and ignored")
    type: Literal["text"] | None = Field(None, description="ignored (lm-evaluation-harness)")

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class MemosChatExtension(Strict):
    """memosd's extension: recall from a cube, optionally as a stored chat session."""

    cube_id: StrictStr = Field(max_length=200)
    chat_id: StrictStr | None = Field(
        None, max_length=200, description="a stored chat session of the cube (writer+)"
    )
    recall: StrictBool = Field(True, description="recall the cube's notes into the prompt")


class ChatCompletionRequest(_Sampling):
    model: StrictStr = Field(max_length=500, description="the served model's id (GET /v1/models)")
    messages: list[OpenAIChatMessage] = Field(min_length=1, max_length=10_000)
    max_tokens: JsonInt | None = MAX_TOKENS
    max_completion_tokens: JsonInt | None = MAX_TOKENS
    logprobs: StrictBool | None = Field(None, description="each generated token's logprob")
    top_logprobs: JsonInt | None = Field(None, ge=0, le=20, description="alternatives a token")
    memos: MemosChatExtension | None = None


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="tokens of an activation's cache, not prefilled")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobsOut(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


FinishReason = Literal["stop", "length"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobsOut | None = None


class MemosChatOut(BaseModel):
    recalled: list[RecalledOut] = Field(description="notes recalled into the prompt, best first")
    chat_id: str | None = Field(None, description="with `memos.chat_id`: the stored chat")
    user_memory_id: str | None = Field(
        None, description="with `memos.chat_id`: the stored user turn (null: not stored)"
    )
    assistant_memory_id: str | None = Field(None, description="the stored reply")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    memos: MemosChatOut | None = Field(None, description="with the `memos` extension")


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobsOut | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    memos: MemosChatOut | None = None


# -- legacy completions ------------------------------------------------------------------


class MemosCompletionExtension(Strict):
    cube_id: StrictStr = Field(
        max_length=200, description="the cube of `activation_id`, or of `memory_ids`"
    )
    memory_ids: Ids | None = Field(
        None, min_length=1, max_length=10_000, description="notes of the cube put before "
        "each prompt (a chat turn's notes block: header and lines, in this order); those with "
        "a KV chunk are blended in (CacheBlend), the rest prefilled. Not with "
        "`activation_id` or a scored prompt (`echo` with `logprobs`, `max_tokens: 0`)"
    )  # fmt: skip


class CompletionRequest(_Sampling):
    model: StrictStr = Field(max_length=500, description="the served model's id (GET /v1/models)")
    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]] = Field(
        description="text or token ids, or a list of either (one choice each, at most "
        "`openai.max_prompts`)"
    )
    max_tokens: JsonInt = Field(
        16, ge=0, le=65_536, description="0 only with `echo` (score the prompt)"
    )
    echo: StrictBool = Field(False, description="the prompt back before the completion")
    logprobs: JsonInt | None = Field(
        None, ge=0, le=5, description="token logprobs with this many alternatives"
    )
    best_of: JsonInt | None = Field(None, ge=1, le=1, description="only 1")
    suffix: None = Field(None, description="not supported")
    activation_id: StrictStr | None = Field(
        None,
        max_length=200,
        description="memosd extension: the prompt continues this activation's context "
        "(its cube from `memos.cube_id`, else found from the id)",
    )
    memos: MemosCompletionExtension | None = None

    @model_validator(mode="after")
    def _extension(self) -> CompletionRequest:
        memos = self.memos
        if memos is not None and self.activation_id is None and memos.memory_ids is None:
            raise ValueError("memos.cube_id names the cube of activation_id; give both")
        if memos is not None and self.activation_id is not None and memos.memory_ids:
            raise ValueError("memos.memory_ids and activation_id conflict; give one of them")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)  # type: ignore[arg-type]


class CompletionLogprobsOut(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobsOut | None = None


class MemosCompletionOut(BaseModel):
    episodes: list[int] = Field(
        default_factory=list,
        description="per choice, the episode of the episodic activation it continued",
    )
    reused_tokens: list[int] | None = Field(
        None, description="with `memos.memory_ids`, per choice: the notes' KV-chunk tokens "
        "blended in and kept"
    )  # fmt: skip
    recomputed_tokens: list[int] | None = Field(
        None, description="with `memos.memory_ids`, per choice: those the blend recomputed"
    )  # fmt: skip

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Only what applies: the blend's counts appear with `memory_ids` only."""
        return {k: v for k, v in handler(self).items() if v is not None}


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    memos: MemosCompletionOut | None = Field(
        None, description="memosd extension, with an episodic `activation_id` (not streamed)"
    )
