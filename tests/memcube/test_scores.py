from __future__ import annotations

from memcube.scores import relevance, shown


def test_relevance_is_the_better_of_cosine_and_coverage_in_0_1():
    assert relevance(0.42, 0.0) == 0.42
    assert relevance(0.2, 0.75) == 0.75
    assert relevance(-0.3, 0.0) == 0.0  # a negative cosine is no relevance, not less than none
    assert relevance(1.0000001, 1.0) == 1.0


def test_shown_scores_are_the_running_minimum_down_the_ranking():
    assert shown([0.9, 0.95, 0.4, 0.6, 0.1]) == [0.9, 0.9, 0.4, 0.4, 0.1]
    assert shown([]) == []
