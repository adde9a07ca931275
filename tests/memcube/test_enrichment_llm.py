"""The `llm` enricher over real HTTP: valid answers are used, anything else falls back."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from memcube.enrichment import (
    LlmEnricher,
    LlmEnricherConfig,
    NoteInput,
    OpenAICompatible,
    make_enricher,
)
from memcube.enrichment.llm import parse_reply
from memcube.enrichment.taxonomy import LABELS
from memcube.errors import InvalidArgument, Unavailable

SAID = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
NOTE = NoteInput("I went to a pottery class yesterday with my kids.", "Melanie", "s1", SAID)
GOOD = {"keywords": ["Pottery class", "kids"], "tags": ["hobbies", "family"],
        "context": "Melanie tells Caroline about a pottery class with her kids."}  # fmt: skip


class ScriptedEndpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that answers from a script, in order."""

    script: list[tuple[int, object]] = []
    requests: list[dict] = []
    # A "hold" reply answers only once the test is over: a client timeout always fires first,
    # however slow or fast the machine.
    released = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                    "body": body})  # fmt: skip
        status, reply = type(self).script.pop(0)
        if reply == "hold":
            type(self).released.wait(timeout=120)
            reply = GOOD
        if isinstance(reply, dict):
            reply = json.dumps(reply)
        payload = (
            {"choices": [{"message": {"role": "assistant", "content": reply}}]}
            if status == 200 and reply != "not a completion"
            else {"error": "boom"}
        )
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    ScriptedEndpoint.script, ScriptedEndpoint.requests = [], []
    ScriptedEndpoint.released = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    ScriptedEndpoint.released.set()
    server.shutdown()


def test_parse_reply_accepts_one_valid_object_and_nothing_else():
    fenced = "Sure! ```json\n" + json.dumps(GOOD) + "\n```"
    assert parse_reply(fenced).tags == ["hobbies", "family"]
    for bad in (
        "I cannot help with that.",
        "{not json}",
        json.dumps({**GOOD, "tags": ["pottery"]}),  # not in the taxonomy
        json.dumps({**GOOD, "keywords": []}),
        json.dumps({**GOOD, "keywords": [f"k{i}" for i in range(9)]}),
        json.dumps({**GOOD, "links": ["mem_1"]}),  # unknown field: never trusted
        json.dumps({**GOOD, "context": "x" * 301}),
    ):
        with pytest.raises(ValueError):
            parse_reply(bad)


def test_valid_answers_are_used_and_every_failure_falls_back_per_note(endpoint, embedder):
    ScriptedEndpoint.script = [
        (200, GOOD),
        (200, "no json here"),
        (200, {**GOOD, "tags": ["astrology"]}),
        (500, GOOD),
        (200, "not a completion"),
    ]
    config = LlmEnricherConfig(backend="openai", url=endpoint, model="tiny", api_key="sk-test")
    enricher = make_enricher("llm", embedder.embed, llm=config)
    assert isinstance(enricher, LlmEnricher)
    notes = [NOTE] + [
        NoteInput(f"Note {i}: we adopted a puppy named Rex.", "Caroline", "s1", SAID)
        for i in range(4)
    ]
    results = enricher.enrich(notes)
    assert len(results) == 5
    first = results[0]
    assert first.keywords == ("pottery class", "kids")
    assert first.tags == ("hobbies", "family")
    assert first.context == GOOD["context"]
    assert first.dates == (date(2023, 5, 7),)  # resolved by rules, not by the model
    assert (first.enricher, first.fallback) == ("llm", None)
    local = make_enricher("local", embedder.embed).enrich(notes[1:])
    labels = ", ".join(repr(label) for label in LABELS[:-1]) + f" or {LABELS[-1]!r}"
    reasons = [
        "ValueError: no JSON object in the reply",
        f"schema: tags.0: Input should be {labels}",
        f"HTTPStatusError: Server error '500 Internal Server Error' for url "
        f"'{endpoint}/chat/completions'",
        "ValueError: not a chat completion: KeyError('choices')",
    ]
    # Each failed note got exactly the local enrichment, and says why.
    assert results[1:] == [replace(e, fallback=r) for e, r in zip(local, reasons, strict=True)]
    assert (enricher.answered, enricher.fell_back) == (1, 4)
    sent = ScriptedEndpoint.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-test"
    assert sent["body"]["model"] == "tiny" and sent["body"]["temperature"] == 0
    assert sent["body"]["messages"][1]["content"] == (
        "Melanie said on 8 May 2023: I went to a pottery class yesterday with my kids."
    )


def test_a_slow_endpoint_times_out_into_the_fallback(endpoint, embedder):
    ScriptedEndpoint.script = [(200, "hold")]
    config = LlmEnricherConfig(backend="openai", url=endpoint, timeout_s=0.2)
    enricher = LlmEnricher(OpenAICompatible(config), make_enricher("local", embedder.embed))
    (result,) = enricher.enrich([NOTE])
    local = make_enricher("local", embedder.embed).enrich([NOTE])[0]
    assert result == replace(local, fallback="ReadTimeout: timed out")
    assert enricher.fell_back == 1


class Flaky:
    """`Complete` over the scripted endpoint, except for notes that name an exception: those
    raise it, as a model path can (out of memory mid-generation, the runtime turned off)."""

    def __init__(self, endpoint: OpenAICompatible) -> None:
        self.endpoint = endpoint
        self.asked: list[str] = []

    def __call__(self, messages: list[dict[str, str]]) -> str:
        said = messages[-1]["content"]
        self.asked.append(said)
        if "OOM" in said:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if "OFF" in said:
            raise Unavailable("the local runtime is disabled (activations.enabled=false)")
        return self.endpoint(messages)


def test_any_exception_of_the_model_path_falls_back_for_that_note_alone(endpoint, embedder):
    """Before, only ValueError and HTTP errors fell back: an out-of-memory or a disabled
    runtime raised out of `enrich` and failed the whole batch."""
    ScriptedEndpoint.script = [(200, GOOD), (200, GOOD)]
    flaky = Flaky(OpenAICompatible(LlmEnricherConfig(backend="openai", url=endpoint)))
    enricher = LlmEnricher(flaky, make_enricher("local", embedder.embed))
    texts = ["We went camping.", "OOM: a long story.", "I adopted a greyhound.", "OFF: hi.",
             "My sister baked bread."]  # fmt: skip
    notes = [NoteInput(text, "Caroline", "s1", SAID) for text in texts]
    results = enricher.enrich(notes)
    assert [(r.enricher, r.fallback) for r in results] == [
        ("llm", None),
        ("local", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        ("llm", None),
        ("local", "Unavailable: the local runtime is disabled (activations.enabled=false)"),
        # The backend said it cannot run: the rest of the batch is not asked again.
        ("local", "Unavailable: the local runtime is disabled (activations.enabled=false)"),
    ]
    assert len(flaky.asked) == 4 and len(ScriptedEndpoint.requests) == 2
    local = make_enricher("local", embedder.embed).enrich([notes[i] for i in (1, 3, 4)])
    assert [replace(results[i], fallback=None) for i in (1, 3, 4)] == local
    assert (enricher.answered, enricher.fell_back) == (2, 3)


def test_keywords_that_are_iso_dates_are_dropped(endpoint, embedder):
    ScriptedEndpoint.script = [(200, {**GOOD, "keywords": ["2023-05-07", "Pottery class"]})]
    config = LlmEnricherConfig(backend="openai", url=endpoint)
    (result,) = make_enricher("llm", embedder.embed, llm=config).enrich([NOTE])
    assert (result.keywords, result.dates) == (("pottery class",), (date(2023, 5, 7),))


def test_misconfigured_llm_enrichers_are_refused(embedder):
    with pytest.raises(InvalidArgument, match="needs the local runtime"):
        make_enricher("llm", embedder.embed)
    with pytest.raises(InvalidArgument, match="url is empty"):
        make_enricher("llm", embedder.embed, llm=LlmEnricherConfig(backend="openai"))
