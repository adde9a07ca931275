"""The temporal signal of a search: the times a query names, and which notes fall in them.

"What did Maria donate in December 2023?" names a month; notes said in December 2023, or whose
content resolves to a date in it ("last week", said on 3 January 2024, is not; "yesterday",
said on 1 December, is), gain a fixed bonus in the fused ranking
(`RetrievalConfig.temporal_weight`). Measured on LoCoMo (docs/benchmarks.md), where one question
in eight names a time: recall@10 0.750 -> 0.761.

Only absolute expressions count: a day ("May 23, 2023", "1 February, 2023"), a month with its
year ("October 2023"), a year after a preposition ("in 2023"), or a bare month after one ("in
June": that month of any year). A relative one ("last year") has no anchor in a query.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from memcube.enrichment.dates import DAY_RE, MONTH_RE, MONTHS, YEAR_RE


@dataclass(frozen=True)
class TimeQuery:
    """What a query names: absolute day ranges [start, end) and months of any year (1-12)."""

    spans: tuple[tuple[date, date], ...] = ()
    months: frozenset[int] = frozenset()

    @property
    def empty(self) -> bool:
        return not self.spans and not self.months

    def matches(self, days: Iterable[date]) -> bool:
        """Whether any of a note's dates falls in what the query names."""
        for day in days:
            if day.month in self.months:
                return True
            if any(start <= day < end for start, end in self.spans):
                return True
        return False


def _day(year: str, month: str, day: str) -> tuple[date, date]:
    start = date(int(year), MONTHS[month.lower().rstrip(".")], int(day))
    return start, start + timedelta(days=1)


def _month(year: str, month: str) -> tuple[date, date]:
    y, m = int(year), MONTHS[month.lower().rstrip(".")]
    return date(y, m, 1), date(y, m, calendar.monthrange(y, m)[1]) + timedelta(days=1)


def _year(year: str) -> tuple[date, date]:
    return date(int(year), 1, 1), date(int(year) + 1, 1, 1)


# Earlier rules win where matches overlap ("May 23, 2023" is a day, not the month of May 2023).
_SPAN_RULES = [
    (rf"\b{DAY_RE} (?:of )?{MONTH_RE},? {YEAR_RE}\b", lambda m: _day(m[3], m[2], m[1])),
    (rf"\b{MONTH_RE} {DAY_RE},? {YEAR_RE}\b", lambda m: _day(m[3], m[1], m[2])),
    (rf"\b{MONTH_RE},? {YEAR_RE}\b", lambda m: _month(m[2], m[1])),
    (rf"\b(?:in|during|of|since|before|after|throughout) {YEAR_RE}\b", lambda m: _year(m[1])),
]
_SPANS = [(re.compile(p.replace(" ", r"\s+"), re.IGNORECASE), f) for p, f in _SPAN_RULES]
_BARE_MONTH = re.compile(rf"\b(?:in|during|of|early|mid|late)\s+{MONTH_RE}\b", re.IGNORECASE)


def parse_time_query(text: str) -> TimeQuery:
    spans: list[tuple[date, date]] = []
    covered: list[tuple[int, int]] = []
    for pattern, to_span in _SPANS:
        for match in pattern.finditer(text):
            if any(start <= match.start() < end for start, end in covered):
                continue
            try:
                spans.append(to_span(match))
            except ValueError:  # "31 February 2023"
                continue
            covered.append((match.start(), match.end()))
    months = {
        MONTHS[match[1].lower().rstrip(".")]
        for match in _BARE_MONTH.finditer(text)
        if not any(start <= match.start(1) < end for start, end in covered)
    }
    return TimeQuery(spans=tuple(spans), months=frozenset(months))
