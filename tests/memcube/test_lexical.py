from __future__ import annotations

import math

import numpy as np

from memcube.lexical import BM25Index, tokenize

DOCS = [
    "Caroline went to the LGBTQ support group yesterday",
    "Melanie painted a sunrise over the lake",
    "The support group meets every Friday",
    "Melanie's kids love painting and pottery",
    "Caroline is researching adoption agencies",
]


def test_tokenize_lowercases_drops_stopwords_and_plurals():
    assert tokenize("The Kids LOVE painting, and Pottery!") == [
        "kid",
        "love",
        "painting",
        "pottery",
    ]
    assert tokenize("agencies glasses glass bus analysis") == [
        "agency",
        "glass",
        "glass",
        "bus",
        "analysis",
    ]
    assert tokenize("Melanie's") == ["melanie"]  # the possessive 's is a stopword token


def test_scores_match_the_bm25_formula():
    index = BM25Index(k1=1.2, b=0.75)
    for row, text in enumerate(DOCS):
        index.add(row, text)
    scores = index.scores("support group", 5, np.ones(5, dtype=bool))
    lengths = [len(tokenize(d)) for d in DOCS]
    avgdl = sum(lengths) / 5
    idf = math.log(1 + (5 - 2 + 0.5) / (2 + 0.5))  # both terms appear in 2 of 5 docs
    expected = [
        2 * idf * 2.2 / (1 + 1.2 * (0.25 + 0.75 * lengths[r] / avgdl)) if r in (0, 2) else 0.0
        for r in range(5)
    ]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_removal_gives_exactly_the_scores_of_an_index_without_the_doc():
    removed = BM25Index()
    for row, text in enumerate(DOCS):
        removed.add(row, text)
    removed.remove(2)
    fresh = BM25Index()
    for row, text in enumerate(DOCS):
        if row != 2:
            fresh.add(row, text)
    mask = np.array([True, True, False, True, True])
    for query in ("support group", "Melanie painting", "Caroline"):
        np.testing.assert_allclose(removed.scores(query, 5, mask), fresh.scores(query, 5, mask))
    assert removed.doc_count == 4


def test_mask_zeroes_rows_and_unknown_terms_score_nothing():
    index = BM25Index()
    for row, text in enumerate(DOCS):
        index.add(row, text)
    mask = np.array([False, True, True, True, True])
    scores = index.scores("Caroline support", 5, mask)
    assert scores[0] == 0 and scores[2] > 0 and scores[4] > 0
    assert not index.scores("zeppelin", 5, np.ones(5, dtype=bool)).any()


def test_compaction_equals_a_fresh_index_of_the_live_rows():
    churned = BM25Index()
    for row, text in enumerate(DOCS):
        churned.add(row, text)
    for row in (1, 3):
        churned.remove(row)
    churned.add(5, "A brand new note about pottery glaze")  # a term only a new row has
    remap = np.array([0, -1, 1, -1, 2, 3])
    churned.compact(remap)
    fresh = BM25Index()
    for row, text in enumerate([DOCS[0], DOCS[2], DOCS[4], "A brand new note about pottery glaze"]):
        fresh.add(row, text)
    mask = np.ones(4, dtype=bool)
    for query in ("support group", "Melanie painting", "pottery", "Caroline glaze"):
        np.testing.assert_array_equal(churned.scores(query, 4, mask), fresh.scores(query, 4, mask))
    # Every count and byte equals the fresh index's: "sunrise", "kid" and the rest are gone.
    assert (churned.term_count, churned.postings_count, churned.nbytes) == (
        fresh.term_count,
        fresh.postings_count,
        fresh.nbytes,
    )
    assert churned.doc_count == 4


def test_coverage_is_the_idf_weighted_share_of_query_terms_present():
    index = BM25Index()
    for row, text in enumerate(DOCS):
        index.add(row, text)
    assert index.coverage("support group", 0) == 1.0
    assert index.coverage("support group", 1) == 0.0
    idf = {t: math.log(1 + (5 - df + 0.5) / (df + 0.5)) for t, df in (("caroline", 2), ("lake", 1))}
    assert index.coverage("Caroline by the lake", 1) == idf["lake"] / sum(idf.values())
    assert index.coverage("the and of", 0) == 0.0  # stopwords only
