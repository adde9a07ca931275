"""The `llm` enricher: a language model writes each note's keywords, tags and context as JSON.

The model is reached through one callable, `Complete` (chat messages -> reply text), so the
same enricher runs on the daemon's local runtime (kv_runtime) or on any OpenAI-compatible
endpoint (`OpenAICompatible`). Its reply must be one JSON object that passes `LlmNote`
(keywords, tags from the fixed taxonomy, a one-sentence context); anything else sends that
note to the `local` enricher instead: no JSON, a wrong field, an unknown tag, a timeout, an
HTTP error, and any exception of the model path (a runtime error, out of memory, the local
runtime disabled or unable to load). The result says why (`Enrichment.fallback`). A bad answer
never loses or blocks a write, nor fails the other notes of its batch. When the backend says it
cannot run at all (`Unavailable`), the rest of the batch goes straight to the fallback.
Dates are always resolved by rules (`dates.resolve_dates`), never taken from the model, and
keywords that are ISO dates are dropped (dates have a field of their own).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Annotated, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, ValidationError

from memcube.enrichment import Enricher, Enrichment, NoteInput
from memcube.enrichment.dates import human_date, reference_date, resolve_dates
from memcube.enrichment.taxonomy import LABELS
from memcube.errors import InvalidArgument, Unavailable, describe

log = logging.getLogger("memcube.enrichment.llm")

# Chat messages ([{"role": "system" | "user", "content": str}]) -> the model's reply.
Complete = Callable[[list[dict[str, str]]], str]

Keyword = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=60)]
Tag = Literal[LABELS]  # type: ignore[valid-type]


class LlmNote(BaseModel):
    """The schema a model's reply must pass, field by field."""

    model_config = ConfigDict(extra="forbid")

    keywords: list[Keyword] = Field(min_length=1, max_length=8)
    tags: list[Tag] = Field(min_length=1, max_length=3)
    context: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]


class LlmEnricherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["runtime", "openai"] = Field(
        "runtime", description="the daemon's local model, or an OpenAI-compatible endpoint"
    )
    url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://host/v1")
    model: str = Field("default", description="model name sent to the endpoint")
    api_key: SecretStr | None = None
    timeout_s: float = Field(30.0, gt=0, le=600)
    max_tokens: int = Field(200, ge=16, le=4096)


SYSTEM_PROMPT = (
    "You annotate one message from a conversation for a memory system. Reply with one JSON "
    'object and nothing else: {"keywords": [1-8 short keyphrases from the message, most '
    'salient first], "tags": [1-3 labels from this list: ' + ", ".join(LABELS) + "], "
    '"context": "one sentence: who said it, when, and what it is about"}.'
)

_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def messages_for(note: NoteInput) -> list[dict[str, str]]:
    when = human_date(reference_date(note.timestamp))
    who = note.speaker or "someone"
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{who} said on {when}: {note.content}"},
    ]


def parse_reply(reply: str) -> LlmNote:
    """The reply's JSON object, validated. Raises ValueError (or ValidationError) if unusable."""
    found = _OBJECT.search(reply)  # models like to wrap JSON in prose or code fences
    if found is None:
        raise ValueError("no JSON object in the reply")
    return LlmNote.model_validate(json.loads(found.group(0)))


def fallback_reason(exc: Exception) -> str:
    """Why a note left the model path, in one line: "schema: tags.0: Input should be ..." for
    a reply that failed `LlmNote`, "<ExceptionType>: <first line of its message>" otherwise."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "reply"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"schema: {where}: {first['msg']}{more}"
    return describe(exc)


class LlmEnricher:
    name = "llm"

    def __init__(self, complete: Complete, fallback: Enricher) -> None:
        self._complete = complete
        self._fallback = fallback
        self.answered = 0  # notes enriched by the model
        self.fell_back = 0  # notes the fallback enricher took

    def enrich(self, notes: Sequence[NoteInput]) -> list[Enrichment]:
        out: list[Enrichment | None] = []
        reasons: dict[int, str] = {}  # note index -> why it goes to the fallback
        down: str | None = None  # the backend cannot run: the rest of the batch skips it
        for i, note in enumerate(notes):
            if down is not None:
                reasons[i] = down
                out.append(None)
                continue
            try:
                parsed = parse_reply(self._complete(messages_for(note)))
            except Exception as exc:  # any failure of the model path: this note only
                reasons[i] = fallback_reason(exc)
                if isinstance(exc, Unavailable):
                    down = reasons[i]
                log.info("llm enrichment fell back to %s: %s", self._fallback.name, reasons[i])
                out.append(None)
                continue
            keywords = dict.fromkeys(k.lower() for k in parsed.keywords)
            out.append(
                Enrichment(
                    keywords=tuple(k for k in keywords if not _ISO_DATE.fullmatch(k)),
                    tags=tuple(dict.fromkeys(parsed.tags)),
                    context=parsed.context,
                    dates=resolve_dates(note.content, note.timestamp),
                    enricher=self.name,
                )
            )
        if reasons:
            fallback = self._fallback.enrich([notes[i] for i in reasons])
            for (i, reason), enrichment in zip(reasons.items(), fallback, strict=True):
                out[i] = replace(enrichment, fallback=reason)
        self.answered += len(notes) - len(reasons)
        self.fell_back += len(reasons)
        return [e for e in out if e is not None]


class OpenAICompatible:
    """`Complete` over HTTP: POST {url}/chat/completions, temperature 0, JSON reply asked."""

    def __init__(self, config: LlmEnricherConfig) -> None:
        if not config.url:
            raise InvalidArgument("enrichment.llm.url is empty; the openai backend needs one")
        headers = {}
        if config.api_key is not None:
            headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self._config = config
        self._client = httpx.Client(
            base_url=config.url.rstrip("/"), headers=headers, timeout=config.timeout_s
        )

    def __call__(self, messages: list[dict[str, str]]) -> str:
        response = self._client.post(
            "/chat/completions",
            json={
                "model": self._config.model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": self._config.max_tokens,
                "response_format": {"type": "json_object"},
            },
        )
        response.raise_for_status()
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a chat completion: {exc!r}") from exc
        if not isinstance(content, str):
            raise ValueError("the completion has no text content")
        return content
