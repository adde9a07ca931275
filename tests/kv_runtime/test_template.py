"""A conversation's new turns as tokens: exactly what rendering the whole conversation gives."""

from __future__ import annotations

import copy

import pytest

from kv_runtime import ChatTemplate, InvalidArgument, Runtime
from kv_runtime.text import TextCodec
from tests.kv_runtime.conftest import CONTEXT

SYSTEM = {"role": "system", "content": CONTEXT}
ASK = {"role": "user", "content": "Who will bring the telescope?"}
REPLY = {"role": "assistant", "content": "Caroline will bring her old telescope."}
FOLLOW = {"role": "user", "content": "And when do they meet again? 🌙 Schöne Grüße"}

CONVERSATIONS = {
    "a question after a system turn (an activation)": ([SYSTEM], [ASK], True),
    "the next turn of a chat": ([SYSTEM, ASK, REPLY], [FOLLOW], True),
    "a reply appended, no generation prompt": ([SYSTEM, ASK], [REPLY], False),
    # No system turn: the template inserts its default one before the first turn only.
    "a chat that began without a system turn": ([ASK], [REPLY, FOLLOW], True),
    "several turns at once": ([SYSTEM], [ASK, REPLY, FOLLOW], True),
}


def _codec(runtime: Runtime) -> TextCodec:
    return runtime._codec  # the runtime's own tokenizer and template


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_history_tokens_plus_delta_tokens_are_the_whole_conversations(
    runtime: Runtime, name: str
) -> None:
    history, delta, prompt = CONVERSATIONS[name]
    template = runtime.template
    head = template.render(history, add_generation_prompt=False)
    whole = template.render([*history, *delta], add_generation_prompt=prompt)
    assert head + template.render_delta(history, delta, prompt) == whole
    # The same through the general path, which tokenizes the whole conversation.
    general = copy.copy(_codec(runtime))
    general.__dict__["boundary_tokens"] = (frozenset(), frozenset())
    assert head + ChatTemplate(general).render_delta(history, delta, prompt) == whole


def test_the_question_after_an_activation_is_no_longer_rendered_after_a_stand_in_turn(
    runtime: Runtime,
) -> None:
    template = runtime.template
    delta = template.render_delta([SYSTEM], [ASK])
    assert runtime.detokenize(delta) == "user\nWho will bring the telescope?\nassistant\n"
    assert template.render_delta([], [ASK]) == template.render([ASK])  # no history: all of it


def test_a_template_that_rewrites_the_history_is_refused(runtime: Runtime) -> None:
    tokenizer = copy.copy(_codec(runtime).tokenizer)
    # Numbers each turn from the end, so the history renders differently once the chat grows.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ loop.revindex }}:{{ m['content'] }}\n{% endfor %}"
    )
    template = ChatTemplate(TextCodec(tokenizer, []))
    with pytest.raises(InvalidArgument, match="does not render the history as a prefix"):
        template.render_delta([SYSTEM], [ASK])


def test_a_one_turn_history_is_recovered_from_its_tokens(runtime: Runtime) -> None:
    template = runtime.template
    ids = template.render([SYSTEM], add_generation_prompt=False)
    assert template.recover_turn(ids, "system") == [SYSTEM]
    assert template.recover_turn(ids, "user") is None  # another framing
    assert template.recover_turn(ids[:-3], "system") is None  # not a whole turn
