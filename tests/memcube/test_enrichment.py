from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np
import pytest
from pydantic import ValidationError

from memcube.enrichment import (
    ENRICHERS,
    Enrichment,
    LocalEnricherConfig,
    NoteInput,
    make_enricher,
)
from memcube.enrichment.dates import human_date, resolve_dates
from memcube.enrichment.local import LocalEnricher, candidates, mmr
from memcube.enrichment.taxonomy import LABELS, TAXONOMY
from memcube.errors import InvalidArgument
from memcube.lexical import normalize_token

MONDAY = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)  # LoCoMo's first session: a Monday


def note(content: str, speaker: str | None = "Caroline", session: str | None = "session_3"):
    return NoteInput(content=content, speaker=speaker, session_id=session, timestamp=MONDAY)


@pytest.fixture(scope="module")
def enricher(embedder) -> LocalEnricher:
    made = make_enricher("local", embedder.embed)
    assert isinstance(made, LocalEnricher)
    return made


def enrich_one(enricher: LocalEnricher, content: str, **kwargs) -> Enrichment:
    (result,) = enricher.enrich([note(content, **kwargs)])
    return result


# -- dates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I saw her yesterday", date(2023, 5, 7)),
        ("Today was long", date(2023, 5, 8)),
        ("we meet tonight", date(2023, 5, 8)),
        ("see you tomorrow", date(2023, 5, 9)),
        ("the day before yesterday", date(2023, 5, 6)),
        ("we went out last night", date(2023, 5, 7)),
        ("last week I ran", date(2023, 5, 1)),
        ("next week I run", date(2023, 5, 15)),
        ("camping last weekend", date(2023, 5, 6)),
        ("this past weekend", date(2023, 5, 6)),
        ("last month", date(2023, 4, 1)),
        ("next month", date(2023, 6, 1)),
        ("last year", date(2022, 1, 1)),
        ("next year", date(2024, 1, 1)),
        ("3 days ago", date(2023, 5, 5)),
        ("three days ago", date(2023, 5, 5)),
        ("a couple of days ago", date(2023, 5, 6)),
        ("Two weeks ago", date(2023, 4, 24)),
        ("2 months ago", date(2023, 3, 8)),
        ("a year ago", date(2022, 5, 8)),
        ("10 years ago", date(2013, 5, 8)),
        ("last Friday", date(2023, 5, 5)),
        ("on Monday", date(2023, 5, 1)),  # strictly before the day it was said
        ("this Wednesday", date(2023, 5, 3)),
        ("this past Sunday", date(2023, 5, 7)),
        ("next Friday", date(2023, 5, 12)),
        ("next Monday", date(2023, 5, 15)),
        ("on 8 May 2023", date(2023, 5, 8)),
        ("the 8th of May, 2023", date(2023, 5, 8)),
        ("May 8, 2023", date(2023, 5, 8)),
        ("Sept 3rd 2022", date(2022, 9, 3)),
        ("in May 2023", date(2023, 5, 1)),
        ("2023-05-01", date(2023, 5, 1)),
        ("in 2022", date(2022, 1, 1)),
        ("since 2019", date(2019, 1, 1)),
        ("back in early 2020", date(2020, 1, 1)),
    ],
)
def test_time_expression_resolves_against_the_timestamp(text, expected):
    assert resolve_dates(text, MONDAY) == (expected,)


@pytest.mark.parametrize(
    "text",
    [
        "I have 2022 stamps",  # a bare number is not a year
        "I go there on Mondays",  # habitual, not a date
        "a few weeks ago",  # vague
        "recently",
        "31 February",
    ],
)
def test_text_without_a_resolvable_date_gives_none(text):
    assert resolve_dates(text, MONDAY) == ()


def test_dates_come_in_order_of_appearance_deduplicated():
    text = "Last Friday, not 8 May 2023 or yesterday, and again last Friday; since 2019 too."
    assert resolve_dates(text, MONDAY) == (
        date(2023, 5, 5),
        date(2023, 5, 8),
        date(2023, 5, 7),
        date(2019, 1, 1),
    )


def test_longest_match_wins_over_the_expression_inside_it():
    assert resolve_dates("the day before yesterday", MONDAY) == (date(2023, 5, 6),)
    assert resolve_dates("8 May 2023", MONDAY) == (date(2023, 5, 8),)


def test_weekend_said_on_a_weekend_is_the_one_before():
    sunday = datetime(2023, 5, 14, 9, 0, tzinfo=UTC)
    assert resolve_dates("last weekend", sunday) == (date(2023, 5, 6),)
    assert resolve_dates("this past weekend", sunday) == (date(2023, 5, 13),)


def test_month_arithmetic_clamps_to_the_month_end():
    march_31 = datetime(2023, 3, 31, tzinfo=UTC)
    assert resolve_dates("a month ago", march_31) == (date(2023, 2, 28),)


def test_reference_date_is_the_utc_date():
    late_evening_new_york = datetime.fromisoformat("2023-05-07T22:30:00-04:00")  # 02:30 UTC
    assert resolve_dates("yesterday", late_evening_new_york) == (date(2023, 5, 7),)


def test_human_date():
    assert human_date(date(2023, 5, 7)) == "7 May 2023"


# -- keyphrase candidates and MMR ------------------------------------------------------------


def test_candidates_have_no_stop_word_at_either_end_and_keep_entities():
    found = candidates("I went to the LGBTQ support group yesterday and it was so powerful.", 3, 30)
    assert list(found) == [
        "lgbtq",  # entities first
        "lgbtq support",
        "lgbtq support group",
        "support",
        "support group",
        "group",
        "powerful",
    ]
    assert found["lgbtq"].entity


def test_a_name_only_addressed_is_not_an_entity():
    found = candidates("Thanks, Mel! We are moving to Sweden.", 3, 30)
    assert found["sweden"].entity
    assert not found["mel"].entity and found["mel"].addressed == 1


def test_candidates_are_capped():
    text = " ".join(f"topic{i} thing{i} item{i}." for i in range(500))
    assert len(candidates(text, 3, 30)) == 30


def test_mmr_trades_relevance_for_diversity():
    relevance = np.array([0.9, 0.85, 0.5], np.float32)
    similarity = np.array([[1.0, 0.95, 0.1], [0.95, 1.0, 0.1], [0.1, 0.1, 1.0]], np.float32)
    assert mmr(relevance, similarity, 3, diversity=0.0) == [0, 1, 2]
    assert mmr(relevance, similarity, 3, diversity=0.5) == [0, 2, 1]


# -- the local enricher with the real embedder -----------------------------------------------


def test_support_group_note(enricher):
    result = enrich_one(
        enricher, "I went to the LGBTQ support group yesterday and it was so powerful."
    )
    assert result.keywords == ("lgbtq support group", "powerful")
    assert result.dates == (date(2023, 5, 7),)
    assert result.tags == ("identity",)
    assert result.context == (
        "Caroline, in session_3 on 8 May 2023, talks about LGBTQ support group and powerful "
        "(mentions 7 May 2023)."
    )


@pytest.mark.parametrize(
    "content, keyword, tag",
    [
        ("My dog Max loves chasing squirrels at the park.", "chasing squirrels", "pets"),
        ("We are moving to Sweden next month, I'm so excited!", "sweden", "plans"),
        ("I started training for the Boston Marathon last week.", "boston marathon", "fitness"),
        ("Caroline is researching adoption agencies to build a family.", "adoption", "family"),
        ("I paid off my student loans and my credit card debt.", "student loans", "finance"),
        ("I've been learning to play the violin in a small band.", "violin", "music"),
    ],
)
def test_obvious_keyword_and_tag(enricher, content, keyword, tag):
    result = enrich_one(enricher, content)
    assert any(keyword in k for k in result.keywords), result.keywords
    assert result.tags[0] == tag


def test_keywords_are_lowercase_bounded_and_not_near_duplicates(enricher):
    text = (
        "Thanks, Melanie! I painted a sunrise over the lake with my kids last summer, then we "
        "went camping in the mountains, roasted marshmallows and watched the Perseid meteor "
        "shower. My daughter wants to study astronomy at the University of Oslo."
    )
    result = enrich_one(enricher, text)
    assert 3 <= len(result.keywords) <= 8
    assert all(k == k.lower() for k in result.keywords)
    stems = [frozenset(normalize_token(w) for w in k.split()) for k in result.keywords]
    for i, a in enumerate(stems):
        for b in stems[i + 1 :]:
            assert not (a <= b or b <= a), result.keywords


def test_tags_come_from_the_taxonomy_only(enricher):
    contents = [
        "Hey Mel! Good to see you!",
        "My cat knocked over the plant again.",
        "I got promoted to team lead at work and my boss threw a party.",
        "We flew to Tokyo for vacation and ate the best ramen.",
    ]
    results = enricher.enrich([note(c) for c in contents])
    assert [r.tags[0] for r in results] == ["smalltalk", "pets", "work", "travel"]
    for result in results:
        assert 1 <= len(result.tags) <= 3
        assert set(result.tags) <= set(LABELS)
        assert len(set(result.tags)) == len(result.tags)
    assert len(TAXONOMY) == len(LABELS) == 25


def test_context_without_speaker_or_session(enricher):
    result = enrich_one(enricher, "We adopted a puppy on Monday.", speaker=None, session=None)
    assert result.context.startswith("Someone, on 8 May 2023, talks about ")
    assert result.context.endswith(" (mentions 1 May 2023).")
    assert result.dates == (date(2023, 5, 1),)


def test_empty_and_whitespace_content(enricher):
    results = enricher.enrich([note(""), note("   \n\t "), note("Hi!")])
    empty = Enrichment(
        keywords=(),
        tags=("smalltalk",),
        context="Caroline, in session_3 on 8 May 2023, makes a brief remark.",
        dates=(),
    )
    assert results[0] == empty
    assert results[1] == empty
    assert results[2].keywords == ()
    assert results[2].tags[0] == "smalltalk"


def test_very_long_content(enricher):
    filler = "We talked about gardening, tomatoes and the weather in the greenhouse. " * 3000
    assert len(filler) > 200_000
    result = enrich_one(enricher, filler + "My sister visits on 3 June 2023.")
    assert result.keywords == ("gardening", "greenhouse", "weather")
    assert result.dates == (date(2023, 6, 3),)  # dates are read from the whole content


def test_batch_keeps_input_order_and_embeds_twice(embedder):
    calls: list[int] = []

    def counting_embed(texts):
        calls.append(len(texts))
        return embedder.embed(texts)

    enricher = make_enricher("local", counting_embed)
    calls.clear()  # the taxonomy descriptions are embedded once, at construction
    cities = ["Sweden", "Tokyo", "Nairobi", "Lisbon", "Toronto"]
    expressions = ["yesterday", "last week", "2 days ago", "next Friday", "in 2019"]
    expected = [
        date(2023, 5, 7),
        date(2023, 5, 1),
        date(2023, 5, 6),
        date(2023, 5, 12),
        date(2019, 1, 1),
    ]
    notes = [
        note(f"I flew to {c} {e} for a work trip.")
        for c, e in zip(cities, expressions, strict=True)
    ]
    notes.insert(2, note(""))
    results = enricher.enrich(notes)
    assert len(calls) == 2  # all candidates of the batch in one call, the notes in another
    assert calls[1] == 5
    assert results[2].keywords == ()
    del results[2]
    assert [r.dates for r in results] == [(d,) for d in expected]
    for city, result in zip(cities, results, strict=True):
        assert city.lower() in result.keywords, result.keywords
    assert enricher.enrich([]) == []


# -- registry and config ---------------------------------------------------------------------


def test_unknown_enricher_is_rejected_with_the_valid_names(embedder):
    with pytest.raises(InvalidArgument) as raised:
        make_enricher("gpt-4", embedder.embed)
    assert raised.value.message == "unknown enricher 'gpt-4'; valid: ['llm', 'local']"
    assert sorted(ENRICHERS) == ["llm", "local"]


@pytest.mark.parametrize(
    "bad",
    [
        {"max_keywords": 0},
        {"max_keywords": 21},
        {"diversity": 1.5},
        {"diversity": -0.1},
        {"min_keywords": 5, "max_keywords": 4},
        {"max_candidates": 0},
        {"no_such_option": 1},
    ],
)
def test_config_ranges_are_checked(bad):
    with pytest.raises(ValidationError):
        LocalEnricherConfig(**bad)


def test_config_changes_the_outcome(embedder):
    config = LocalEnricherConfig(min_keywords=1, max_keywords=1, max_tags=1)
    result = make_enricher("local", embedder.embed, config).enrich(
        [note("I went to the LGBTQ support group yesterday and it was so powerful.")]
    )[0]
    assert result.keywords == ("lgbtq support group",)
    assert result.tags == ("identity",)
