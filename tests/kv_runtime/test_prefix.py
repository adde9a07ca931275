"""A conversation's prefix cache: grown in place, exact, and never changed under a reader."""

from __future__ import annotations

import pytest
import torch

from kv_runtime import InvalidArgument, PrefixCache, Runtime
from kv_runtime.errors import Cancelled
from tests.kv_runtime.conftest import CONTEXT

SYSTEM = {"role": "system", "content": CONTEXT}
TURNS = [
    {"role": "user", "content": "Who will bring the telescope?"},
    {"role": "assistant", "content": "Caroline will bring her old telescope."},
    {"role": "user", "content": "When do they meet again?"},
    {"role": "assistant", "content": "Next week, to plan the route and the food."},
]
ASK = {"role": "user", "content": "What does Melanie teach?"}


def _prefix(runtime: Runtime) -> PrefixCache:
    return runtime.prefix_cache()


def test_a_prefix_grown_turn_by_turn_holds_what_a_full_prefill_holds(runtime: Runtime) -> None:
    template = runtime.template
    prefix = _prefix(runtime)
    history = [SYSTEM]
    prefix.extend(template.render(history, add_generation_prompt=False))
    for i in range(0, len(TURNS), 2):
        pair = TURNS[i : i + 2]
        prefix.extend(template.render_delta(history, pair, add_generation_prompt=False))
        history += pair
    whole = template.render(history, add_generation_prompt=False)
    assert list(prefix.token_ids) == whole
    full = runtime.prefill(whole)
    grown = prefix.snapshot()
    assert grown is not None
    for layer in range(full.layers):
        torch.testing.assert_close(grown.keys[layer], full.keys[layer], atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(grown.values[layer], full.values[layer], atol=2e-4, rtol=1e-3)


def test_a_turn_answered_on_the_prefix_matches_a_full_prefill_of_the_same_prompt(
    runtime: Runtime,
) -> None:
    """The mechanism behind chat turns: logits of the new turn on the reused prefix equal the
    logits of the same tokens at the end of a full prefill."""
    template = runtime.template
    history = [SYSTEM, *TURNS]
    prefix = _prefix(runtime)
    prefix.sync(template.render(history, add_generation_prompt=False))
    delta = template.render_delta(history, [ASK])
    reused = runtime.logits(delta, prefix.snapshot())
    whole = template.render([*history, ASK])
    full = runtime.logits(whole)[-len(delta) :]
    torch.testing.assert_close(reused, full, atol=2e-3, rtol=1e-3)
    assert torch.equal(reused.argmax(-1), full.argmax(-1))


def test_generation_on_a_prefix_leaves_it_as_it_was_and_answers_like_a_full_prompt(
    runtime: Runtime,
) -> None:
    template = runtime.template
    history = [SYSTEM, *TURNS[:2]]
    prefix = _prefix(runtime)
    prefix.sync(template.render(history, add_generation_prompt=False))
    before = prefix.snapshot()
    assert before is not None
    delta = template.render_delta(history, [ASK])
    on_prefix = runtime.generate(delta, prefix=prefix, max_tokens=12).collect()
    assert on_prefix.reused_tokens == before.length
    assert prefix.length == before.length and prefix.token_ids == before.token_ids
    after = prefix.snapshot()
    assert after is not None
    for layer in range(before.layers):  # cropped back to exactly the history
        assert torch.equal(after.keys[layer], before.keys[layer])
    full = runtime.generate(template.render([*history, ASK]), max_tokens=12).collect()
    assert on_prefix.token_ids == full.token_ids
    assert on_prefix.prompt_tokens == len(delta)


def test_a_generation_stopped_early_still_gives_the_prefix_back(runtime: Runtime) -> None:
    template = runtime.template
    prefix = _prefix(runtime)
    prefix.sync(template.render([SYSTEM], add_generation_prompt=False))
    length = prefix.length
    generation = runtime.generate(template.render_delta([SYSTEM], [ASK]), prefix=prefix)
    next(generation)  # the consumer takes one piece and goes away
    generation.close()
    assert prefix.length == length
    cache, held = prefix.lease()
    assert held == length and cache.get_seq_length() == length


def test_a_snapshot_never_changes_when_the_prefix_grows_or_shrinks(runtime: Runtime) -> None:
    template = runtime.template
    prefix = _prefix(runtime)
    prefix.extend(template.render([SYSTEM], add_generation_prompt=False))
    taken = prefix.snapshot()
    assert taken is not None
    copies = [k.clone() for k in taken.keys]
    prefix.extend(template.render_delta([SYSTEM], TURNS[:2], add_generation_prompt=False))
    prefix.crop(10)
    prefix.extend(runtime.tokenize(" something else entirely"))
    assert all(torch.equal(k, c) for k, c in zip(taken.keys, copies, strict=True))


def test_sync_keeps_the_common_prefix_and_prefills_only_the_rest(runtime: Runtime) -> None:
    template = runtime.template
    prefix = _prefix(runtime)
    old = template.render([SYSTEM, *TURNS], add_generation_prompt=False)
    assert prefix.sync(old) == 0
    # The second turn was edited: everything up to the edit is kept.
    edited = [SYSTEM, TURNS[0], TURNS[1], {"role": "user", "content": "Where is the garden?"}]
    new = template.render(edited, add_generation_prompt=False)
    kept = prefix.sync(new)
    shared = template.render([SYSTEM, *TURNS[:2]], add_generation_prompt=False)
    assert len(shared) <= kept < len(new)
    assert list(prefix.token_ids) == new
    reference = runtime.prefill(new)
    snap = prefix.snapshot()
    assert snap is not None
    torch.testing.assert_close(snap.keys[-1], reference.keys[-1], atol=2e-4, rtol=1e-3)


def test_a_cancelled_extend_keeps_a_valid_prefix(runtime: Runtime) -> None:
    prefix = PrefixCache(runtime.runner, chunk_tokens=16, max_positions=runtime.info.max_positions)
    ids = runtime.tokenize(CONTEXT)
    chunks = iter([False, False, True])
    with pytest.raises(Cancelled):
        prefix.extend(ids, cancel=lambda: next(chunks, True))
    assert 0 < prefix.length < len(ids) and prefix.length % 16 == 0
    cache, held = prefix.lease()
    assert cache.get_seq_length() == held == prefix.length
    prefix.extend(ids[prefix.length :])  # continue where it stopped
    assert list(prefix.token_ids) == ids


def test_a_prefix_past_the_models_positions_is_refused(runtime: Runtime) -> None:
    prefix = PrefixCache(runtime.runner, chunk_tokens=64, max_positions=40)
    with pytest.raises(InvalidArgument, match="positions"):
        prefix.extend(runtime.tokenize(CONTEXT))
    assert prefix.length == 0


def test_a_prefix_can_start_from_a_stored_cache_without_copying_it(runtime: Runtime) -> None:
    template = runtime.template
    ids = template.render([SYSTEM], add_generation_prompt=False)
    kv = runtime.prefill(ids)
    prefix = runtime.prefix_cache(kv)
    assert prefix.token_ids == kv.token_ids
    snap = prefix.snapshot()
    assert snap is not None and snap.keys[0].data_ptr() == kv.keys[0].data_ptr()
    prefix.extend(template.render_delta([SYSTEM], TURNS[:2], add_generation_prompt=False))
    assert kv.keys[0].shape[2] == len(ids)  # the stored cache did not grow
    assert prefix.nbytes() > kv.nbytes()


def test_a_prefix_on_an_episode_base_continues_it_exactly_and_never_crops_it(
    runtime: Runtime,
) -> None:
    """A long chat stands its window on an episode's bounded cache: the window's tokens after
    that base are what a generation continuing the base would see, and a sync that changes the
    window (a new episode's window, or one that moved) drops only tokens after the base."""
    template = runtime.template
    context = template.render([SYSTEM], add_generation_prompt=False)
    base = runtime.prefill_budgeted(context, budget_tokens=64, block_tokens=64, scorer="recent").kv
    assert base.positions is not None and base.kept == 64  # an evicted, re-positioned cache
    prefix = runtime.prefix_cache(base=base)
    assert prefix.has_base and prefix.length == prefix.base_length == base.length
    window = template.render_delta([SYSTEM], TURNS, add_generation_prompt=False)
    assert prefix.sync(window) == 0
    ask = template.render_delta([SYSTEM, *TURNS], [ASK])
    on_prefix = prefix.extend(ask)
    direct = runtime.logits([*window, *ask], base)[-1]
    assert on_prefix is not None
    torch.testing.assert_close(on_prefix, direct, atol=2e-3, rtol=1e-3)
    assert prefix.sync(window[:10]) == 10  # crops its own tokens only
    assert prefix.length == base.length + 10
    assert prefix.snapshot() is None  # the base is stored elsewhere: never saved as a prefix
    assert base.keys[0].shape[2] == 64  # the base did not change
