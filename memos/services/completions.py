"""OpenAI-compatible generation: chat messages and completion prompts run by the local model.

What existing apps and evaluation tools speak. A chat is rendered with the model's chat
template; a completion prompt (text or token ids) is run as it is, after an activation's
tokens when one is named, so a tool can score text against a stored context. Both go through
`Generations.open_tokens`: the same size checks, admission and cancellation as `generate`.

The `memos` extension of a chat names a cube. Without a `chat_id` the request is stateless: the
cube's notes most relevant to the last user message are recalled into that message, rendered as
a chat session renders them (`chats.prompt.with_notes`), after the history. With a `chat_id` the
last message is a turn of that stored chat session (`ChatService.send`): recalled, answered on
the chat's loaded KV prefix, stored with its reply; the request's other messages are not read
(the chat holds its own history). A stranger to the cube gets 404, as everywhere; a `chat_id`
needs a writer.

Logprobs come back in OpenAI's two shapes: the legacy completion one (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`, where the first prompt token has none unless
an activation precedes it) and the chat one (per token its text, bytes and alternatives).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kv_runtime import Runtime, TokenLogprob
from memcube.errors import InvalidArgument, NotFound, TooLarge
from memcube.types import SearchFilters
from memos.services.activations import ActivationService, GenerationStream
from memos.services.activations.catalogue import activation_not_found
from memos.services.activations.generations import Sampling
from memos.services.chats import ChatService
from memos.services.chats.prompt import Note, with_notes
from memos.services.chats.remote import RemoteTurn
from memos.services.chats.turns import ChatTurn
from memos.services.cubes import CubeService
from memos.services.runtime import ModelCard, RuntimeHolder
from memos.services.search import SearchService
from memos.services.views import GenerationView, Principal, Role

ROLES = frozenset({"system", "developer", "user", "assistant"})


@dataclass(frozen=True)
class CompletionLimits:
    max_prompt_bytes: int  # a prompt's text, or a chat's messages together
    max_prompts: int  # prompts in one completion request
    recall_top_k: int  # notes a stateless chat with `memos.recall` recalls
    recall_tokens: int  # at most this many tokens of them


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, developer (a system turn), user or assistant
    content: str


@dataclass(frozen=True)
class MemoryScope:
    """The `memos` extension: the cube whose notes a chat recalls, and its stored chat."""

    cube_id: str
    chat_id: str | None = None
    recall: bool = True


@dataclass(frozen=True)
class Recalled:
    memory_id: str
    score: float


@dataclass(frozen=True)
class ChatOpened:
    """A stateless chat's generation and the notes recalled into its prompt."""

    stream: GenerationStream
    recalled: tuple[Recalled, ...]


@dataclass(frozen=True)
class CompletionPrompt:
    """A completion prompt, tokenized and checked: its ids and its text (echoed back)."""

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class LegacyLogprobs:
    """OpenAI's completion `logprobs`; `text_offset` indexes the choice's text (with `echo`)
    or the prompt followed by it (without)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


@dataclass(frozen=True)
class TopToken:
    token: str
    logprob: float


@dataclass(frozen=True)
class ChatTokenLogprob:
    """OpenAI's chat `logprobs.content` item (`bytes` are those of `token`'s UTF-8 text)."""

    token: str
    logprob: float
    top_logprobs: list[TopToken]


class CompletionService:
    def __init__(
        self,
        cubes: CubeService,
        activations: ActivationService,
        runtime: RuntimeHolder,
        search: SearchService,
        chats: ChatService,
        limits: CompletionLimits,
    ) -> None:
        self.cubes, self.activations, self.runtime = cubes, activations, runtime
        self.search, self.chats, self.limits = search, chats, limits

    # -- models -----------------------------------------------------------------------------

    def models(self) -> list[ModelCard]:
        """The models served: the local one (none while the runtime is disabled)."""
        return [self.runtime.card()] if self.runtime.enabled else []

    def model(self, name: str) -> ModelCard:
        """The model a request names, if it is the one served (by its id or configured name)."""
        card = self.runtime.card()
        if name != card.id and name not in card.aliases:
            raise NotFound(
                f"model {name!r} is not served here; this daemon serves {card.id!r}",
                code="model_not_found",
            )
        return card

    # -- chat -------------------------------------------------------------------------------

    def chat(
        self,
        principal: Principal,
        messages: Sequence[ChatMessage],
        sampling: Sampling,
        memory: MemoryScope | None = None,
        cancel: threading.Event | None = None,
    ) -> ChatOpened:
        """A stateless chat: recall (with `memory`), render, check, admit, start decoding."""
        assert memory is None or memory.chat_id is None, "a stored chat goes through chat_turn"
        self._check_messages(messages)
        turns = [{"role": _template_role(m.role), "content": m.content} for m in messages]
        recalled: tuple[Recalled, ...] = ()
        if memory is not None:
            self.cubes.require(principal, memory.cube_id, Role.READER)
            if memory.recall:
                turns, recalled = self._recall(principal, memory.cube_id, turns)
        runtime = self.runtime.get()
        token_ids = runtime.template.render(turns, add_generation_prompt=True)
        stream = self.activations.generations.open_tokens(token_ids, sampling, cancel)
        return ChatOpened(stream, recalled)

    def chat_turn(
        self,
        principal: Principal,
        memory: MemoryScope,
        messages: Sequence[ChatMessage],
        max_tokens: int | None,
        overrides: dict[str, float | int],
        cancel: threading.Event | None = None,
    ) -> ChatTurn | RemoteTurn:
        """The last message as a turn of the stored chat `memory.chat_id` (writer+)."""
        assert memory.chat_id is not None
        self._check_messages(messages)
        last = messages[-1]
        if last.role != "user":
            raise InvalidArgument(
                f"with memos.chat_id the last message is the new turn and must be the user's "
                f"(it is {last.role!r}); the chat keeps its own history"
            )
        if not memory.recall:
            raise InvalidArgument(
                "memos.recall: a stored chat recalls as it was created (its recall.top_k); "
                "leave recall out with a chat_id"
            )
        return self.chats.send(
            principal, memory.cube_id, memory.chat_id, last.content,
            max_tokens=max_tokens, cancel=cancel, sampling=overrides,
        )  # fmt: skip

    def _check_messages(self, messages: Sequence[ChatMessage]) -> None:
        if not messages:
            raise InvalidArgument("messages is empty")
        for i, message in enumerate(messages):
            if message.role not in ROLES:
                raise InvalidArgument(
                    f"messages[{i}].role is {message.role!r}; this model takes "
                    f"{', '.join(sorted(ROLES))}"
                )
        size = sum(len(m.content.encode("utf-8")) for m in messages)
        if size > self.limits.max_prompt_bytes:
            raise TooLarge(
                f"the messages' contents are {size} bytes together; at most "
                f"{self.limits.max_prompt_bytes}"
            )

    def _recall(
        self, principal: Principal, cube_id: str, turns: list[dict[str, str]]
    ) -> tuple[list[dict[str, str]], tuple[Recalled, ...]]:
        """Notes relevant to the last user message, inside it (as a chat session puts them:
        after the history), at most `recall_tokens` of them."""
        last = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
        if last is None or not turns[last]["content"].strip():
            return turns, ()
        top_k = min(self.limits.recall_top_k, self.search.max_top_k)
        if top_k <= 0:
            return turns, ()
        query = turns[last]["content"]
        hits = self.search.search(principal, cube_id, query, top_k, SearchFilters()).hits
        runtime = self.runtime.get()
        notes: list[Note] = []
        spent = 0
        for hit in hits:
            m = hit.memory
            note = Note(m.id, hit.score, m.speaker, m.timestamp, m.content)
            spent += len(runtime.tokenize(note.line())) + 1
            if spent > self.limits.recall_tokens:
                break
            notes.append(note)
        if not notes:
            return turns, ()
        asked = {"role": "user", "content": with_notes(query, notes)}
        recalled = tuple(Recalled(n.memory_id, n.score) for n in notes)
        return [*turns[:last], asked, *turns[last + 1 :]], recalled

    # -- completions ------------------------------------------------------------------------

    def prepare(self, prompts: Sequence[str | Sequence[int]]) -> list[CompletionPrompt]:
        """Each prompt tokenized (text) or checked (token ids), with its text."""
        if not 1 <= len(prompts) <= self.limits.max_prompts:
            raise InvalidArgument(
                f"prompt holds {len(prompts)} prompts; give 1 to {self.limits.max_prompts}"
            )
        runtime = self.runtime.get()
        return [self._prepare(runtime, i, p) for i, p in enumerate(prompts)]

    def _prepare(
        self, runtime: Runtime, index: int, prompt: str | Sequence[int]
    ) -> CompletionPrompt:
        where = f"prompt[{index}]"
        if isinstance(prompt, str):
            size = len(prompt.encode("utf-8"))
            if size > self.limits.max_prompt_bytes:
                raise TooLarge(f"{where} is {size} bytes; at most {self.limits.max_prompt_bytes}")
            return CompletionPrompt(tuple(runtime.tokenize(prompt)), prompt)
        limit = runtime.info.max_positions
        if len(prompt) > limit:
            raise InvalidArgument(f"{where} has {len(prompt)} tokens; the model takes {limit}")
        vocab = runtime.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument(
                f"{where}: token id {bad} is not in the model's vocabulary (0..{vocab - 1})"
            )
        ids = tuple(int(t) for t in prompt)
        return CompletionPrompt(ids, runtime.detokenize(ids, skip_special_tokens=False))

    def activation_cube(self, principal: Principal, activation_id: str, cube_id: str | None) -> str:
        """The cube of the activation a completion continues, which the caller may read;
        found from the activation when not given (a stranger learns nothing: 404)."""
        if cube_id is not None:
            self.cubes.require(principal, cube_id, Role.READER)
            return cube_id
        found = self.activations.catalogue.cube_of(activation_id)
        try:
            self.cubes.require(principal, found, Role.READER)
        except NotFound as exc:
            raise activation_not_found(activation_id) from exc
        return found

    def notes_cube(self, principal: Principal, cube_id: str) -> str:
        """The cube whose notes (`memos.memory_ids`) the completion's prompts carry."""
        self.cubes.require(principal, cube_id, Role.READER)
        return cube_id

    def complete(
        self,
        prompt: CompletionPrompt,
        sampling: Sampling,
        cancel: threading.Event | None = None,
        *,
        cube_id: str | None = None,
        activation_id: str | None = None,
        memory_ids: Sequence[str] | None = None,
    ) -> GenerationStream:
        """Check, admit and start one prompt (access to the activation's or the notes' cube
        is checked by `activation_cube` / `notes_cube` first). An episodic activation
        continues from the episode nearest the prompt's text; `memory_ids` go before the
        prompt, blended from their KV chunks where they have one."""
        return self.activations.generations.open_tokens(
            prompt.token_ids, sampling, cancel, cube_id=cube_id, activation_id=activation_id,
            route_text=prompt.text, memory_ids=memory_ids,
        )  # fmt: skip

    # -- logprobs ---------------------------------------------------------------------------

    def legacy_logprobs(
        self, prompt: CompletionPrompt, view: GenerationView, echo: bool
    ) -> LegacyLogprobs:
        runtime = self.runtime.get()
        rows: list[TokenLogprob | None] = []
        ids: list[int] = []
        if echo:
            assert view.prompt_logprobs is not None, "an echo with logprobs scores the prompt"
            rows += view.prompt_logprobs
            ids += prompt.token_ids
        rows += view.logprobs or ()
        ids += view.token_ids[: len(view.logprobs or ())]
        tokens = runtime.token_texts(ids)
        offsets, at = [], 0 if echo else len(prompt.text)
        for token in tokens:
            offsets.append(at)
            at += len(token)
        tops: list[dict[str, float] | None] = []
        for row in rows:
            if row is None:
                tops.append(None)
                continue
            top: dict[str, float] = {}
            pairs = [*row.top, (row.token_id, row.logprob)]  # the chosen one, always
            texts = runtime.token_texts([t for t, _ in pairs])
            for text, (_, logprob) in zip(texts, pairs, strict=True):
                top.setdefault(text, logprob)
            tops.append(top)
        return LegacyLogprobs(
            tokens=tokens,
            token_logprobs=[row.logprob if row is not None else None for row in rows],
            top_logprobs=tops,
            text_offset=offsets,
        )

    def chat_logprobs(self, view: GenerationView) -> list[ChatTokenLogprob]:
        runtime = self.runtime.get()
        out = []
        for row in view.logprobs or ():
            token, *alternatives = runtime.token_texts([row.token_id, *(t for t, _ in row.top)])
            top = [
                TopToken(text, logprob)
                for text, (_, logprob) in zip(alternatives, row.top, strict=True)
            ]
            out.append(ChatTokenLogprob(token, row.logprob, top))
        return out


def _template_role(role: str) -> str:
    """OpenAI's `developer` messages are system instructions to this model."""
    return "system" if role == "developer" else role
