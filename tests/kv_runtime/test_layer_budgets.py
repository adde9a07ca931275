"""Per-layer budgets: EpiCache's allocation, the key profile, ragged caches and their attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kv_runtime import CompressionConfig, InvalidArgument, KVCache, Runtime
from kv_runtime.block_scorers import make_block_scorer
from kv_runtime.layer_budgets import allocate, key_similarity, load_or_profile

LAYERS = 30


def test_allocation_follows_the_weights_floors_and_keeps_the_total() -> None:
    # s normalised to [1, 0.5, 0], weights (1 - s) ** 1.1 = [0, 0.4665, 1]; 300 entries in all.
    # Layer 0's share (0) is under the floor 25, so it gets 25 and the other two share 275 in
    # proportion: 87.48 and 187.52, rounded to 87 and 188.
    assert allocate([1.0, 0.5, 0.0], 100) == (25, 87, 188)
    # Only the order of the similarities matters after normalisation, not their scale.
    assert allocate([0.9999, 0.99985, 0.9998], 100) == (25, 87, 188)
    assert allocate([0.7] * 4, 64) == (64, 64, 64, 64)
    budgets = allocate([1.0, 0.99, 0.9, 0.5, 0.1, 0.0], 1024, minimum=37)
    assert sum(budgets) == 6 * 1024 and min(budgets) == 256
    assert list(budgets) == sorted(budgets)  # less similar keys, more entries
    # A minimum above a quarter of the budget is the floor.
    assert min(allocate([1.0, 0.0, 0.0, 0.0], 100, minimum=40)) == 40
    with pytest.raises(InvalidArgument, match="below the per-layer minimum of 37"):
        allocate([1.0, 0.0], 36, minimum=37)
    with pytest.raises(InvalidArgument, match="no layers"):
        allocate([], 100)


def test_the_first_layer_keys_do_not_depend_on_context(runtime: Runtime) -> None:
    """Layer 0's keys are a function of the token and its position only, so cutting the context
    to a block leaves them unchanged (similarity 1); deeper layers read the context."""
    ids = runtime.tokenize(
        " ".join(f"item {i} is the {i % 7}th colour of the set." for i in range(40))
    )
    similarity = key_similarity(runtime.runner, ids[:200], block_tokens=64, sink_tokens=8)
    assert len(similarity) == LAYERS
    assert similarity[0] == pytest.approx(1.0, abs=1e-5)
    assert all(s < 1.0 - 1e-5 for s in similarity[1:])
    with pytest.raises(InvalidArgument, match="more than sink_tokens \\+ block_tokens = 72"):
        key_similarity(runtime.runner, ids[:72], block_tokens=64, sink_tokens=8)


def test_the_profile_is_kept_per_model_and_redone_for_another(
    runtime: Runtime, tmp_path: Path
) -> None:
    ids = runtime.tokenize(" ".join(f"note {i}: the lamp in room {i} is on." for i in range(30)))
    path = tmp_path / "profile.json"
    first = load_or_profile(runtime.runner, path, "model-a", ids, block_tokens=64, sink_tokens=8)
    kept = json.loads(path.read_text())
    assert kept["model"] == "model-a" and kept["profile_tokens"] == len(ids)
    assert tuple(kept["similarity"]) == first.similarity
    # Read back, not recomputed: a doctored profile comes back as written.
    kept["similarity"] = [0.5] * LAYERS
    path.write_text(json.dumps(kept))
    again = load_or_profile(runtime.runner, path, "model-a", ids, block_tokens=64, sink_tokens=8)
    assert again.similarity == (0.5,) * LAYERS and again.budgets(100) == (100,) * LAYERS
    # Another model (or another block) is profiled again and replaces the file.
    other = load_or_profile(runtime.runner, path, "model-b", ids, block_tokens=64, sink_tokens=8)
    assert other.similarity == first.similarity and other.model == "model-b"
    path.write_text("not json")
    assert load_or_profile(runtime.runner, path, "model-b", ids, block_tokens=64, sink_tokens=8)


def _budgets() -> list[int]:
    return [40 + (layer * 7) % 25 for layer in range(LAYERS)]  # 40..64, all different layers


def test_layer_budgets_build_a_ragged_cache(runtime: Runtime, context_ids: list[int]) -> None:
    budgets = _budgets()
    ids = context_ids * 2
    built = runtime.prefill_budgeted(
        ids, budget_tokens=48, block_tokens=32, scorer="snapkv", layer_budgets=budgets,
        recent_tokens=8,
    )  # fmt: skip
    kv = built.kv
    assert kv.ragged and list(kv.layer_kept) == budgets and kv.kept == max(budgets)
    # Compacted: every layer's entries end at the same slot, the widest layer's start at 0.
    assert kv.length == max(budgets) and kv.positions is not None
    for layer, count in enumerate(budgets):
        assert (
            kv.positions[layer, :, :count].tolist()
            == [list(range(max(budgets) - count, max(budgets)))] * kv.kv_heads
        )
        assert (kv.positions[layer, :, count:] == -1).all()
        assert (built.original_positions[layer, :, count:] == -1).all()
        kept = built.original_positions[layer, :, :count]
        assert (kept[:, -8:] == torch.arange(len(ids) - 8, len(ids))).all()  # the recent tokens
    # Equal per-layer budgets are exactly the uniform build.
    uniform = runtime.prefill_budgeted(
        ids, budget_tokens=48, block_tokens=32, scorer="snapkv", recent_tokens=8
    )
    same = runtime.prefill_budgeted(
        ids, budget_tokens=48, block_tokens=32, scorer="snapkv", recent_tokens=8,
        layer_budgets=[48] * LAYERS,
    )  # fmt: skip
    assert not same.kv.ragged
    assert all(torch.equal(a, b) for a, b in zip(uniform.kv.keys, same.kv.keys, strict=True))
    assert torch.equal(uniform.original_positions, same.original_positions)
    # The KIVI layout is rectangular: a ragged cache is refused, not mangled.
    with pytest.raises(InvalidArgument, match="per-layer budgets"):
        runtime.compress(kv, CompressionConfig(bits=4))


def _reference_logits(runtime: Runtime, kv: KVCache, ids: list[int]) -> torch.Tensor:
    """The model's layers run one by one, each with its own explicit causal mask over its own
    cached entries: an independent oracle for the per-layer masks of a ragged cache."""
    model = runtime.runner.model
    inner = model.model
    cache = kv.to_transformers()
    positions = torch.arange(kv.length, kv.length + len(ids))[None]
    with torch.no_grad():
        hidden = inner.embed_tokens(torch.tensor([ids]))
        embeddings = inner.rotary_emb(hidden, positions)
        for index, layer in enumerate(inner.layers):
            total = kv.layer_kept[index] + len(ids)
            mask = torch.ones(len(ids), total, dtype=torch.bool).tril(total - len(ids))
            hidden = layer(
                hidden,
                attention_mask=mask[None, None],
                position_ids=positions,
                past_key_values=cache,
                position_embeddings=embeddings,
            )
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return model.lm_head(inner.norm(hidden))[0].float()


def test_a_ragged_cache_is_read_with_each_layers_own_mask(
    runtime: Runtime, context_ids: list[int]
) -> None:
    built = runtime.prefill_budgeted(
        context_ids * 2, budget_tokens=48, block_tokens=32, scorer="snapkv",
        layer_budgets=_budgets(), recent_tokens=8,
    )  # fmt: skip
    prompt = runtime.tokenize(" On the camping trip, Caroline will bring")
    got = runtime.logits(prompt, built.kv)
    want = _reference_logits(runtime, built.kv, prompt)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The oracle is sharp: reading every layer with layer 0's mask (what transformers would
    # build from the first layer) gives other logits.
    narrowest = min(built.kv.layer_kept)
    assert built.kv.positions is not None
    wrong = KVCache(
        keys=tuple(k[:, :, -narrowest:] for k in built.kv.keys),
        values=tuple(v[:, :, -narrowest:] for v in built.kv.values),
        token_ids=built.kv.token_ids,
        positions=built.kv.positions[:, :, :narrowest],
    )
    assert not torch.allclose(runtime.logits(prompt, wrong), want, atol=1e-2)
    # Generation continues from it; its first token is the oracle's choice.
    result = runtime.generate(prompt, built.kv, max_tokens=4).collect()
    assert len(result.token_ids) == 4 and result.token_ids[0] == int(want[-1].argmax())


def test_the_combined_scorer_keeps_the_larger_of_both_scores(
    runtime: Runtime, context_ids: list[int]
) -> None:
    query = runtime.tokenize(" Caroline's telescope")
    repeat = runtime.tokenize("\n\nRepeat the previous context exactly:\n")
    cont = runtime.tokenize("\n\nRepeat the part of the previous context exactly, starting with")
    cache = DynamicCache()
    runtime.runner.forward(context_ids, cache, 0)
    noop = lambda live: None  # noqa: E731
    scores = {}
    for name in ("prompt", "kvzip", "prompt+kvzip"):
        scorer = make_block_scorer(name, prompt_ids=query, repeat_ids=repeat, continue_ids=cont)
        scores[name] = scorer.score(
            runtime.runner, cache, next_position=len(context_ids), block_ids=context_ids,
            window_queries=None, meter=noop,
        )  # fmt: skip
    for both, one, two in zip(
        scores["prompt+kvzip"], scores["prompt"], scores["kvzip"], strict=True
    ):
        assert torch.equal(both, torch.maximum(one, two))
        assert not torch.equal(both, one) and not torch.equal(both, two)
    # Scoring left the cache as it was.
    assert [layer.keys.shape[2] for layer in cache.layers] == [len(context_ids)] * LAYERS  # type: ignore[union-attr]


def test_a_prefix_on_a_ragged_base_crops_each_layer_to_its_own_base(
    runtime: Runtime, context_ids: list[int]
) -> None:
    budgets = _budgets()
    base = runtime.prefill_budgeted(
        context_ids * 2, budget_tokens=48, block_tokens=32, scorer="snapkv",
        layer_budgets=budgets, recent_tokens=8,
    )  # fmt: skip
    prefix = runtime.prefix_cache(base=base.kv)
    assert prefix.base_entries == max(budgets) and prefix.length == base.kv.length
    ask = runtime.tokenize(" Caroline will bring")
    on_prefix = prefix.extend(ask)
    assert on_prefix is not None
    torch.testing.assert_close(on_prefix, runtime.logits(ask, base.kv)[-1], atol=1e-4, rtol=1e-4)
    cache, length = prefix.lease()
    runtime.runner.forward(runtime.tokenize(" her old telescope"), cache, length)
    prefix.restore(length)
    prefix.crop(2)
    held = [layer.keys.shape[2] for layer in cache.layers]  # type: ignore[union-attr]
    assert held == [b + 2 for b in budgets]  # each layer: its own base, then 2 own tokens
