"""The OpenAI-compatible routes, with the official `openai` package as the client, against a
real daemon (real HTTP, the real local model)."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import openai
import pytest
import torch

from tests.memos.api.conftest import metric, model_held, wait_until

# The routes do not depend on the database backend: one daemon (SQLite) is enough.
pytestmark = pytest.mark.parametrize("server", ["sqlite"], indirect=True)

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]
CONTEXT = (
    "Caroline is a school counselor who volunteers at the LGBTQ support group every Tuesday. "
    "Melanie paints sunrises over the lake and has two kids who love pottery."
)


@pytest.fixture
def api(server, tenant):
    """(openai client as the tenant, the tenant's httpx client, cube id, served model id)."""
    http, cube_id = tenant
    key = http.headers["Authorization"].removeprefix("Bearer ")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    yield client, http, cube_id, model
    client.close()


def rendered(server, messages) -> list[int]:
    return server.daemon.runtime.get().template.render(messages, add_generation_prompt=True)


def test_models_lists_the_served_model_and_refuses_others(server, api):
    client, _, _, model = api
    (card,) = client.models.list().data
    assert (card.object, card.owned_by) == ("model", "memosd") and card.created > 0
    assert card.id == model == server.daemon.runtime.card().id
    assert client.models.retrieve(model).id == model  # an id with a slash in it
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    body = caught.value.body
    assert body["code"] == "model_not_found" and body["type"] == "invalid_request_error"
    assert "param" in body and "gpt-4o" in body["message"]


def test_a_chat_reply_is_the_runtime_greedy_answer_with_exact_usage(server, api):
    client, _, _, model = api
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0
    )
    runtime = server.daemon.runtime.get()
    prompt = rendered(server, MESSAGES)
    expected = runtime.generate(prompt, max_tokens=12).collect()
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == model and reply.system_fingerprint.startswith("fp_")
    (choice,) = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    usage = reply.usage
    assert usage.prompt_tokens == len(prompt)
    assert usage.completion_tokens == len(expected.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Text parts and `max_completion_tokens` are read the same way.
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    again = client.chat.completions.create(
        model=model, messages=parts, max_completion_tokens=12, temperature=0
    )
    assert again.choices[0].message.content == expected.text


def test_a_streamed_chat_reply_is_openai_chunks_then_usage_then_done(server, api):
    client, http, _, model = api
    body = {"model": model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    whole = client.chat.completions.create(**body)
    chunks = list(
        client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([piece for piece in content if piece]) >= 2
    assert "".join(content) == whole.choices[0].message.content
    *_, last, tail = chunks
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert tail.choices == [] and tail.usage == whole.usage
    # On the wire: `data:` lines, ending with [DONE].
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert "usage" not in json.loads(lines[-2][6:])  # only with include_usage


def test_stop_strings_cut_the_reply_where_the_first_one_starts(api):
    client, _, _, model = api
    create = client.chat.completions.create
    free = create(model=model, messages=MESSAGES, max_tokens=24, temperature=0)
    text = free.choices[0].message.content
    assert len(text) > 12, text
    stop = text[6:9]
    cut = create(model=model, messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop, "@@"])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    single = create(model=model, messages=MESSAGES, max_tokens=24, temperature=0, stop=stop)
    assert single.choices[0].message.content == cut.choices[0].message.content


def test_a_seed_makes_sampling_reproducible(api):
    client, _, _, model = api

    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=16, temperature=1.5, seed=seed
        )
        return reply.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))  # not greedy in disguise


def test_chat_logprobs_are_those_of_the_reply_tokens(server, api):
    client, _, _, model = api
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    runtime = server.daemon.runtime.get()
    ids = runtime.generate(rendered(server, MESSAGES), max_tokens=6).collect().token_ids
    assert [c.token for c in content] == runtime.token_texts(ids)
    for item in content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].token == item.token  # greedy
        assert item.top_logprobs[0].logprob == item.logprob <= 0
        assert bytes(item.bytes).decode() == item.token


# -- legacy completions --------------------------------------------------------------------


def test_echo_with_max_tokens_zero_scores_the_prompt_as_log_softmax_of_the_logits(server, api):
    client, _, _, model = api
    prompt = "The quick brown fox jumps over the lazy dog."
    done = client.completions.create(
        model=model, prompt=prompt, echo=True, max_tokens=0, logprobs=2
    )
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    (choice,) = done.choices
    assert choice.text == prompt and choice.finish_reason == "length"
    runtime = server.daemon.runtime.get()
    ids = runtime.tokenize(prompt)
    expected = torch.log_softmax(runtime.logits(ids), dim=-1)
    lp = choice.logprobs
    assert lp.tokens == runtime.token_texts(ids) and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
        top = lp.top_logprobs[i]
        assert lp.tokens[i] in top and 2 <= len(top) <= 3  # the 2 best and the token itself
        assert max(top.values()) == pytest.approx(float(expected[i - 1].max()), abs=1e-4)
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    assert lp.text_offset == offsets
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == 0


def test_the_loglikelihood_request_of_lm_evaluation_harness(server, api):
    """What lm-eval's `local-completions` sends for a loglikelihood (token ids, a batch of
    one, echo, one token, logprobs 1) and how it reads the answer."""
    client, _, _, model = api
    runtime = server.daemon.runtime.get()
    context = runtime.tokenize("Question: What colour is the sky? Answer:")
    continuation = runtime.tokenize(" blue")
    tokens = [*context, *continuation]
    out = client.completions.create(
        model=model, prompt=[tokens], temperature=0, max_tokens=1, logprobs=1, seed=1234,
        echo=True,
    ).model_dump()  # fmt: skip
    (choice,) = out["choices"]
    assert len(choice["logprobs"]["token_logprobs"]) == len(tokens) + 1  # + the generated one
    ctxlen = len(context)
    scores = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    expected = torch.log_softmax(runtime.logits(tokens), dim=-1)
    want = sum(float(expected[i - 1, tokens[i]]) for i in range(ctxlen, len(tokens)))
    assert sum(scores) == pytest.approx(want, abs=1e-3)
    greedy = all(s == max(t.values()) for s, t in zip(scores, tops, strict=True))
    argmax = all(int(expected[i - 1].argmax()) == tokens[i] for i in range(ctxlen, len(tokens)))
    assert greedy == argmax


def test_several_prompts_give_one_choice_each_and_echo_the_prompt(server, api):
    client, _, _, model = api
    prompts = ["Once upon a time", "The capital of France is"]
    out = client.completions.create(
        model=model, prompt=prompts, max_tokens=5, temperature=0, echo=True
    )
    runtime = server.daemon.runtime.get()
    assert [c.index for c in out.choices] == [0, 1]
    for choice, prompt in zip(out.choices, prompts, strict=True):
        alone = runtime.generate(runtime.tokenize(prompt), max_tokens=5).collect()
        assert choice.text == prompt + alone.text
    streamed = list(
        client.completions.create(
            model=model, prompt=prompts, max_tokens=5, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    for index, choice in enumerate(out.choices):
        text = "".join(
            c.choices[0].text for c in streamed if c.choices and c.choices[0].index == index
        )
        assert text == choice.text.removeprefix(prompts[index])
    assert streamed[-1].usage == out.usage


def test_a_completion_continues_a_stored_activation_found_by_its_id(server, api):
    client, http, cube_id, model = api
    act = http.post(f"/v1/cubes/{cube_id}/activations", json={"text": CONTEXT}).json()
    assert act["state"] == "ready" and act["bits"] == 16
    prompt = " Melanie paints"
    runtime = server.daemon.runtime.get()
    head = runtime.template.render([{"role": "system", "content": CONTEXT}], False)
    ids = runtime.tokenize(prompt)
    whole = [*head, *ids]
    expected = torch.log_softmax(runtime.logits(whole), dim=-1)
    for extra in (
        {"activation_id": act["id"]},
        {"activation_id": act["id"], "memos": {"cube_id": cube_id}},
    ):
        out = client.completions.create(
            model=model, prompt=prompt, echo=True, max_tokens=0, logprobs=0, extra_body=extra
        )
        scores = out.choices[0].logprobs.token_logprobs
        assert len(scores) == len(ids) and scores[0] is not None  # the context precedes it
        for i, score in enumerate(scores):
            want = float(expected[len(head) + i - 1, ids[i]])
            assert score == pytest.approx(want, abs=5e-3)  # float16 storage
        assert out.usage.prompt_tokens_details.cached_tokens == act["kept_tokens"]
        assert out.usage.prompt_tokens == len(ids) + act["kept_tokens"]
    # Continuing it generates what a full prefill would.
    cont = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0,
        extra_body={"activation_id": act["id"]},
    )  # fmt: skip
    assert cont.choices[0].text == runtime.generate(whole, max_tokens=8).collect().text
    # A stranger learns nothing, however the cube is named.
    _, stranger_key = server.new_user()
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key=stranger_key, max_retries=0)
    for extra, code in (
        ({"activation_id": act["id"]}, "activation_not_found"),
        ({"activation_id": act["id"], "memos": {"cube_id": cube_id}}, "cube_not_found"),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            stranger.completions.create(model=model, prompt=prompt, max_tokens=1, extra_body=extra)
        assert caught.value.body["code"] == code


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "error", "code", "param"),
    [
        ({"model": "gpt-4o"}, openai.NotFoundError, "model_not_found", None),
        ({"n": 2}, openai.UnprocessableEntityError, "validation_error", "n"),
        ({"max_tokens": 5000}, openai.UnprocessableEntityError, "invalid_argument", None),
        ({"presence_penalty": 1}, openai.UnprocessableEntityError, "validation_error",
         "presence_penalty"),
        ({"top_logprobs": 2}, openai.UnprocessableEntityError, "invalid_argument", None),
        ({"messages": [{"role": "tool", "content": "x"}]}, openai.UnprocessableEntityError,
         "validation_error", "messages[0].role"),
        ({"memos": {"cube_id": "cube_nope"}}, openai.NotFoundError, "cube_not_found", None),
    ],
)  # fmt: skip
def test_bad_chat_requests_raise_the_openai_error_of_their_status(api, body, error, code, param):
    client, _, _, model = api
    request = {"model": model, "messages": MESSAGES, "max_tokens": 2, **body}
    extra = {"memos": request.pop("memos")} if "memos" in request else None
    with pytest.raises(error) as caught:
        client.chat.completions.create(**request, extra_body=extra)
    detail = caught.value.body
    assert detail["code"] == code, detail
    assert detail["param"] == param and detail["type"] == "invalid_request_error"
    assert detail["message"]


def test_too_many_tokens_and_bad_completion_prompts_are_refused_before_any_work(server, api):
    client, _, _, model = api
    positions = server.daemon.runtime.get().info.max_positions
    cases = [
        ({"prompt": [1] * positions, "max_tokens": 1}, "invalid_argument", "exceeds the model"),
        ({"prompt": "hi", "max_tokens": 0}, "invalid_argument", "max_tokens is 0"),
        ({"prompt": [10**9], "max_tokens": 1}, "invalid_argument", "not in the model's vocab"),
        (
            {"prompt": "hi", "best_of": 3},
            "validation_error",
            "best_of: Input should be less than or equal to 1",
        ),
    ]
    for body, code, message in cases:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            client.completions.create(model=model, **body)
        assert caught.value.body["code"] == code and message in caught.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert caught.value.body["type"] == "authentication_error"


# -- the memos extension ---------------------------------------------------------------------


def test_memos_recalls_the_cube_notes_into_the_prompt_as_a_chat_turn_does(server, api):
    client, http, cube_id, model = api
    notes = [
        {"content": "Melanie's daughter is called Ava and she loves pottery.", "speaker": "Mel"},
        {"content": "The support group meets every Tuesday evening.", "speaker": "Caroline"},
    ]
    added = http.post(f"/v1/cubes/{cube_id}/memories", json={"items": notes}).json()["items"]
    question = "What is the name of Melanie's daughter?"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=4, temperature=0,
        extra_body={"memos": {"cube_id": cube_id}},
    )  # fmt: skip
    recalled = reply.model_extra["memos"]["recalled"]
    assert recalled[0]["memory_id"] == added[0]["id"]
    assert {r["memory_id"] for r in recalled} == {m["id"] for m in added}
    # The notes go into the last user message, after the history, as a chat session puts them.
    by_id = {m["id"]: m for m in added}
    lines = [
        f"- [{by_id[r['memory_id']]['timestamp'][:10]}] {by_id[r['memory_id']]['speaker']}: "
        f"{by_id[r['memory_id']]['content']}"
        for r in recalled
    ]
    asked = f"Notes recalled from memory (they may help):\n{chr(10).join(lines)}\n\nMessage:\n"
    expected = [messages[0], {"role": "user", "content": asked + question}]
    assert reply.usage.prompt_tokens == len(rendered(server, expected))
    plain = client.chat.completions.create(
        model=model, messages=messages, max_tokens=4, temperature=0,
        extra_body={"memos": {"cube_id": cube_id, "recall": False}},
    )  # fmt: skip
    assert plain.usage.prompt_tokens == len(rendered(server, messages))
    assert plain.model_extra["memos"]["recalled"] == []
    # The request stored nothing.
    assert len(http.get(f"/v1/cubes/{cube_id}/memories").json()["items"]) == 2


def test_memos_chat_id_sends_a_turn_of_the_stored_chat(server, api):
    client, http, cube_id, model = api
    system = "You answer in one short sentence."
    chat = http.post(f"/v1/cubes/{cube_id}/chats", json={"system": system}).json()
    memos = {"memos": {"cube_id": cube_id, "chat_id": chat["id"]}}
    first = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is a lake?"}], max_tokens=8,
        temperature=0, extra_body=memos,
    )  # fmt: skip
    stored = first.model_extra["memos"]
    assert stored["chat_id"] == chat["id"] and stored["user_memory_id"]
    text = first.choices[0].message.content
    # The client may send the whole conversation: only its last message is the new turn.
    second = list(
        client.chat.completions.create(
            model=model, temperature=0, max_tokens=8, extra_body=memos, stream=True,
            stream_options={"include_usage": True},
            messages=[
                {"role": "user", "content": "What is a lake?"},
                {"role": "assistant", "content": text},
                {"role": "user", "content": "And a river?"},
            ],
        )
    )  # fmt: skip
    last = next(c for c in second if c.choices and c.choices[0].finish_reason)
    assert last.model_extra["memos"]["assistant_memory_id"]
    reply = "".join(c.choices[0].delta.content or "" for c in second if c.choices)
    history = [
        {"role": "system", "content": system},
        {"role": "user", "content": "What is a lake?"},
        {"role": "assistant", "content": text},
    ]
    runtime = server.daemon.runtime.get()
    usage = second[-1].usage
    # The chat's prefix was reused: only the new turn was prefilled.
    assert usage.prompt_tokens_details.cached_tokens == len(runtime.template.render(history, False))
    assert usage.prompt_tokens > usage.prompt_tokens_details.cached_tokens
    messages = http.get(f"/v1/cubes/{cube_id}/chats/{chat['id']}/messages").json()["items"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "What is a lake?"), ("assistant", text),
        ("user", "And a river?"), ("assistant", reply),
    ]  # fmt: skip
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], stop=["."],
            extra_body=memos,
        )  # fmt: skip
    assert "stored chat" in caught.value.body["message"]


def test_memos_access_follows_the_cube_roles(server, api):
    client, http, cube_id, model = api
    chat = http.post(f"/v1/cubes/{cube_id}/chats", json={}).json()
    reader_id, reader_key = server.new_user()
    grant = {"user_id": reader_id, "role": "reader"}
    assert http.post(f"/v1/cubes/{cube_id}/grants", json=grant).status_code in (200, 201)
    reader = openai.OpenAI(base_url=f"{server.url}/v1", api_key=reader_key, max_retries=0)
    request = {"model": model, "messages": MESSAGES, "max_tokens": 2}
    ok = reader.chat.completions.create(**request, extra_body={"memos": {"cube_id": cube_id}})
    assert ok.choices[0].message.content is not None
    with pytest.raises(openai.PermissionDeniedError):
        reader.chat.completions.create(
            **request, extra_body={"memos": {"cube_id": cube_id, "chat_id": chat["id"]}}
        )
    _, stranger_key = server.new_user()
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key=stranger_key, max_retries=0)
    for memos in ({"cube_id": cube_id}, {"cube_id": cube_id, "chat_id": chat["id"]}):
        with pytest.raises(openai.NotFoundError) as caught:
            stranger.chat.completions.create(**request, extra_body={"memos": memos})
        assert caught.value.body["code"] == "cube_not_found"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            **request, extra_body={"memos": {"cube_id": cube_id, "chat_id": "chat_nope"}}
        )
    assert caught.value.body["code"] == "chat_not_found"


# -- cancellation ----------------------------------------------------------------------------

COUNTING = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]


def _cancelled_after(server, before: float) -> None:
    wait_until(lambda: metric(server, "memos_generations_active") == 0, "the generation ended")
    assert metric(server, "memos_generations_total", finish_reason="cancelled") == before + 1


def test_a_chat_whose_client_left_stops_at_its_next_token(server, api):
    _, http, _, model = api
    key = http.headers["Authorization"].removeprefix("Bearer ")
    body = json.dumps({"model": model, "messages": COUNTING, "max_tokens": 200}).encode()
    before = metric(server, "memos_generations_total", finish_reason="cancelled")
    host, port = server.url.removeprefix("http://").split(":")
    with model_held(server):  # it cannot decode a token before the client has gone
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: metric(server, "memos_generations_active") == 1, "it was admitted")
        sock.close()
        wait_until(
            lambda: (
                metric(server, "memos_generations_cancelling") == 1
                or metric(server, "memos_generations_active") == 0
            ),
            "the server noticed",
        )
    _cancelled_after(server, before)


def test_a_chat_stream_whose_client_left_stops_at_its_next_token(server, api):
    client, _, _, model = api
    before = metric(server, "memos_generations_total", finish_reason="cancelled")
    stream = client.chat.completions.create(
        model=model, messages=COUNTING, max_tokens=200, temperature=0, stream=True
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    with model_held(server):
        stream.close()  # the client goes mid-stream
        wait_until(
            lambda: (
                metric(server, "memos_generations_cancelling") == 1
                or metric(server, "memos_generations_active") == 0
            ),
            "the server noticed",
        )
    _cancelled_after(server, before)


def test_concurrent_requests_share_the_admission_of_generate(server, api):
    """A chat holds one of `max_generations` slots like a generate does (the gate's stats)."""
    client, _, _, model = api
    gate = server.daemon.activations.gate
    seen: list[int] = []
    with model_held(server):
        thread = threading.Thread(
            target=lambda: client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=2
            ),
            daemon=True,
        )
        thread.start()
        wait_until(lambda: gate.stats().active == 1, "the chat was admitted")
        seen.append(gate.stats().active)
    thread.join(300)
    assert seen == [1] and gate.stats().active == 0
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_the_openapi_document_declares_the_openai_routes(server, api):
    _, _, _, model = api
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"get"} == set(spec["paths"]["/v1/models"]) == set(spec["paths"]["/v1/models/{model}"])
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "text/event-stream" in responses["200"]["content"]
        assert {"400", "401", "404", "409", "413", "422", "429", "500", "503"} <= set(responses)
    schemas = spec["components"]["schemas"]
    limit = server.daemon.settings.activations.max_generate_tokens
    for name, prop in (
        ("ChatCompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_completion_tokens"),
        ("CompletionRequest", "max_tokens"),
    ):
        assert schemas[name]["properties"][prop]["maximum"] == limit
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        assert schemas[name]["properties"]["model"]["examples"] == [model]
