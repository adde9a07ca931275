from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np
import pytest

from memcube.retrieval import CubeIndex, RetrievalConfig
from memcube.temporal import TimeQuery, parse_time_query
from memcube.types import IndexedDoc
from memcube.vector_index import HnswConfig


@pytest.mark.parametrize(
    ("query", "spans", "months"),
    [
        ("What did Gina find on 1 February, 2023?", [(date(2023, 2, 1), date(2023, 2, 2))], []),
        ("What happened on May 23rd, 2023?", [(date(2023, 5, 23), date(2023, 5, 24))], []),
        ("What setback came in October 2023?", [(date(2023, 10, 1), date(2023, 11, 1))], []),
        ("Trips in Feb 2024", [(date(2024, 2, 1), date(2024, 3, 1))], []),
        ("How often at the beach in 2023?", [(date(2023, 1, 1), date(2024, 1, 1))], []),
        ("When did Melanie go camping in June?", [], [6]),
        ("What did they do in late July and in 2022?", [(date(2022, 1, 1), date(2023, 1, 1))], [7]),
        ("What did she do last year?", [], []),  # relative: no anchor in a query
        ("I may go", [], []),  # "may" the verb
        # not a day, but the month it names still counts
        ("Plans for 31 February 2023", [(date(2023, 2, 1), date(2023, 3, 1))], []),
    ],
)
def test_parse_time_query(query, spans, months):
    parsed = parse_time_query(query)
    assert list(parsed.spans) == spans
    assert sorted(parsed.months) == months


def test_time_query_matches_any_date_of_a_note():
    when = TimeQuery(spans=((date(2023, 10, 1), date(2023, 11, 1)),), months=frozenset({6}))
    assert when.matches([date(2023, 9, 30), date(2023, 10, 31)])
    assert not when.matches([date(2023, 9, 30), date(2023, 11, 1)])
    assert when.matches([date(2021, 6, 15)])
    assert not TimeQuery().matches([date(2023, 10, 5)])


def test_a_note_in_the_named_time_gains_the_temporal_weight():
    vector = np.zeros(4, dtype=np.float32)
    vector[0] = 1
    said = [datetime(2023, 9, 3, tzinfo=UTC), datetime(2023, 10, 3, tzinfo=UTC)]
    docs = [
        IndexedDoc(0, "we went hiking", vector, "s1", said[0]),  # said in September
        IndexedDoc(1, "we went hiking", vector, "s2", said[1]),  # said in October
        # said in September about a day in October ("in two weeks", resolved by enrichment)
        IndexedDoc(2, "we went hiking", vector, "s1", said[0], dates=(date(2023, 10, 20),)),
    ]
    config = RetrievalConfig(temporal_weight=0.75)
    index = CubeIndex(4, "test:1", HnswConfig(), config)
    index.load_rows(docs, generation=1)
    hits = index.search(vector, "hiking in October 2023", top_k=3)
    assert [h.seq for h in hits] == [1, 2, 0]
    assert hits[0].score - hits[2].score == pytest.approx(0.75)
    assert hits[0].signals["temporal"] == 0.75 and "temporal" not in hits[2].signals
    # Without a time in the query, the three tie and rank by seq.
    assert [h.seq for h in index.search(vector, "hiking", top_k=3)] == [0, 1, 2]
