"""Episodes of a conversation: windows, seeded clustering, medoids, patched prompts, routing."""

from __future__ import annotations

import numpy as np
import pytest

from memcube.episodes import (
    INSTRUCTION,
    Utterance,
    cluster,
    patched_prompt,
    route,
    segment,
)

HIKING = [
    ("Ana", "We hiked the ridge trail to the summit on Saturday."),
    ("Ben", "Did you see the glacier lake below the pass?"),
    ("Ana", "Yes, and my boots finally held up on the rocky descent."),
    ("Ben", "Next time we should camp at the alpine hut near the trailhead."),
]
BAKING = [
    ("Ana", "I baked sourdough bread with a new rye starter."),
    ("Ben", "How long did the dough proof in the fridge?"),
    ("Ana", "Overnight; the crust came out of the oven dark and crackly."),
    ("Ben", "Share the recipe, I want to bake loaves for the bake sale."),
]


def conversation(*topics: list[tuple[str, str]]) -> list[Utterance]:
    return [Utterance(speaker, text) for topic in topics for speaker, text in topic]


def test_windows_are_consecutive_utterances_written_as_the_reference_writes_them():
    utterances = [*conversation(HIKING, BAKING), Utterance(None, "bye")]
    windows = segment(utterances, 4)
    assert [(w.index, w.first, w.count) for w in windows] == [(0, 0, 4), (1, 4, 4), (2, 8, 1)]
    assert (
        windows[0].text.splitlines()[1]
        == 'Ben said, "Did you see the glacier lake below the pass?"'
    )
    assert windows[2].text == 'Someone said, "bye"\n'
    assert segment([], 4) == []
    with pytest.raises(ValueError):
        segment(utterances, 0)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def two_topics(seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Ten vectors around two directions, interleaved in time: (vectors, topic of each)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, 32))
    topics = [0, 0, 1, 1, 0, 1, 0, 1, 1, 0]
    rows = np.stack([(a, b)[t] + 0.2 * rng.normal(size=32) for t in topics])
    return unit(rows), topics


def test_clusters_follow_the_topics_and_are_seeded():
    vectors, topics = two_topics()
    episodes = cluster(vectors, 2, medoids=3)
    assert [e.index for e in episodes] == [0, 1]
    # Episodes are numbered by their first window; each holds exactly one topic's windows.
    assert episodes[0].windows == tuple(i for i, t in enumerate(topics) if t == 0)
    assert episodes[1].windows == tuple(i for i, t in enumerate(topics) if t == 1)
    for e in episodes:
        assert len(e.medoids) == 3 and set(e.medoids) <= set(e.windows)
        assert list(e.medoids) == sorted(e.medoids)  # time order
        assert abs(float(np.linalg.norm(e.centroid)) - 1) < 1e-5
        # The medoids are the members nearest the centroid.
        sims = {w: float(vectors[w] @ e.centroid) for w in e.windows}
        assert min(sims[w] for w in e.medoids) >= max(
            sims[w] for w in e.windows if w not in e.medoids
        )
    again = cluster(vectors, 2, medoids=3)
    assert [e.windows for e in again] == [e.windows for e in episodes]
    assert all(np.array_equal(x.centroid, y.centroid) for x, y in zip(again, episodes, strict=True))


def test_episodes_are_capped_by_the_windows_and_empty_clusters_dropped():
    vectors, _ = two_topics()
    assert len(cluster(vectors[:3], 8)) <= 3
    one = cluster(vectors[:1], 4)
    assert len(one) == 1 and one[0].windows == (0,) and one[0].medoids == (0,)
    same = np.repeat(vectors[:1], 4, axis=0)
    assert [e.windows for e in cluster(same, 3)] == [(0, 1, 2, 3)]
    with pytest.raises(ValueError):
        cluster(vectors, 0)
    with pytest.raises(ValueError):
        cluster(np.zeros((0, 32), dtype=np.float32), 2)


def test_route_picks_the_nearest_centroid():
    vectors, topics = two_topics()
    episodes = cluster(vectors, 2)
    centroids = np.stack([e.centroid for e in episodes])
    assert [route(v, centroids) for v in vectors] == topics


def test_patched_prompt_is_the_instruction_then_the_medoids_in_time_order():
    windows = segment(conversation(HIKING, BAKING, HIKING), 2)
    vectors, _ = two_topics()
    episode = cluster(vectors[: len(windows)], 1, medoids=2)[0]
    text = patched_prompt(windows, episode)
    assert text.startswith(INSTRUCTION + "\n\n")
    first, second = episode.medoids
    body = windows[first].text.rstrip("\n") + "\n\n" + windows[second].text.rstrip("\n")
    assert text == INSTRUCTION + "\n\n" + body
    short = patched_prompt(windows, episode, max_chars=40)
    assert len(short) <= len(INSTRUCTION) + 2 + 40 + 2


def test_real_embeddings_separate_two_topics_and_route_questions(embedder):
    windows = segment(conversation(HIKING[:2], BAKING[:2], HIKING[2:], BAKING[2:]), 2)
    vectors = embedder.embed([w.text for w in windows])
    episodes = cluster(vectors, 2, medoids=2)
    assert [e.windows for e in episodes] == [(0, 2), (1, 3)]  # hiking, baking
    centroids = np.stack([e.centroid for e in episodes])
    assert route(embedder.embed_query("Which trail did they climb?"), centroids) == 0
    assert route(embedder.embed_query("How was the bread's crust?"), centroids) == 1
