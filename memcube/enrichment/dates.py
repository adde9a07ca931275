"""Time expressions in a note resolved to absolute dates against the moment it was said.

"I went to the support group yesterday", said on 8 May 2023, is about 7 May 2023; storing that
date lets temporal questions ("when did Caroline go...?") be answered without an LLM. Rules are
plain regular expressions, English only, and deliberately conservative: a bare number is a year
only after a preposition ("in 2022"), a weekday only after "last", "on", "this", "next" or "this
past", and vague spans ("recently", "a few weeks ago") are not resolved.

Resolutions (`ref` is the UTC date of the timestamp):
- yesterday / last night: ref - 1; today, tonight: ref; tomorrow: ref + 1; "the day before
  yesterday" / "the day after tomorrow": ref -/+ 2.
- last / next week: ref -/+ 7 days.
- last weekend: the Saturday of the most recent weekend that is over (said on a Saturday or
  Sunday, the weekend before); "(this) past weekend": the latest Saturday before ref.
- last / next month: the first day of that month; last / next year: 1 January of that year.
- N days / weeks / months / years ago: the same calendar day N units back (day clamped to the
  month's end), N in digits or words ("two", "a", "a couple of").
- last / on / this / this past <weekday>: the most recent such weekday strictly before ref;
  next <weekday>: the first such weekday strictly after ref.
- "8 May 2023", "May 8, 2023", "2023-05-08": that date; "May 2023": its first day; "in 2022",
  "since 2019": 1 January of that year.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

MONTHS = {
    name: number
    for number, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sept", "sep"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ],
        start=1,
    )
    for name in names
}
_WEEKDAYS = {
    name: number
    for number, name in enumerate(
        "monday tuesday wednesday thursday friday saturday sunday".split()
    )
}
_NUMBERS = {
    word: number
    for number, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve".split()
    )
} | {"a": 1, "an": 1, "a couple of": 2, "couple of": 2, "a couple": 2}

MONTH_RE = "(" + "|".join(sorted(MONTHS, key=len, reverse=True)) + r")\.?"
_WEEKDAY = "(" + "|".join(_WEEKDAYS) + ")"
_NUMBER = r"(\d{1,3}|" + "|".join(sorted(_NUMBERS, key=len, reverse=True)) + ")"
DAY_RE = r"(\d{1,2})(?:st|nd|rd|th)?"
YEAR_RE = r"((?:19|20)\d\d)"


def _on(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:  # "31 February 2023"
        return None


def _add_months(day: date, months: int) -> date:
    """`day` moved by whole months, clamped to the month's end (31 March - 1 month: 28 Feb)."""
    year, month0 = divmod(day.year * 12 + day.month - 1 + months, 12)
    return date(year, month0 + 1, min(day.day, calendar.monthrange(year, month0 + 1)[1]))


def _word(text: str) -> str:
    """A matched word or phrase in canonical form: lowercase, single spaces."""
    return " ".join(text.lower().split())


def _count(text: str) -> int:
    return int(text) if text.isdigit() else _NUMBERS[_word(text)]


def _last_weekend(ref: date) -> date:
    back = (ref.weekday() - 5) % 7  # days since the latest Saturday (0 on a Saturday)
    return ref - timedelta(days=back + 7 if back < 2 else back)


def _ago(ref: date, amount: int, unit: str) -> date:
    if unit == "day":
        return ref - timedelta(days=amount)
    if unit == "week":
        return ref - timedelta(weeks=amount)
    return _add_months(ref, -amount * (12 if unit == "year" else 1))


def _relative_unit(ref: date, direction: str, unit: str) -> date:
    sign = -1 if direction == "last" else 1
    if unit == "week":
        return ref + timedelta(days=7 * sign)
    if unit == "weekend":
        return _last_weekend(ref)
    if unit == "month":
        return _add_months(ref.replace(day=1), sign)
    return date(ref.year + sign, 1, 1)


def _weekday(ref: date, which: str, name: str) -> date:
    target = _WEEKDAYS[name]
    if which == "next":
        return ref + timedelta(days=(target - ref.weekday() - 1) % 7 + 1)
    return ref - timedelta(days=(ref.weekday() - target - 1) % 7 + 1)


Resolver = Callable[[re.Match[str], date], date | None]

# Each rule: a pattern and how its match becomes a date. Overlaps go to the earliest, then the
# longest match ("the day before yesterday" beats "yesterday", "8 May 2023" beats "May 2023").
_RULES: list[tuple[str, Resolver]] = [
    (
        r"\bthe day (before yesterday|after tomorrow)\b",
        lambda m, ref: ref + timedelta(days=-2 if _word(m[1]).startswith("before") else 2),
    ),
    (
        r"\b(yesterday|today|tonight|tomorrow)\b",
        lambda m, ref: ref + timedelta(days={"yesterday": -1, "tomorrow": 1}.get(_word(m[1]), 0)),
    ),
    (r"\blast night\b", lambda m, ref: ref - timedelta(days=1)),
    (
        r"\b(?:this )?past weekend\b",
        lambda m, ref: ref - timedelta(days=(ref.weekday() - 5) % 7 or 7),
    ),
    (
        r"\blast (week|weekend|month|year)\b",
        lambda m, ref: _relative_unit(ref, "last", _word(m[1])),
    ),
    (r"\bnext (week|month|year)\b", lambda m, ref: _relative_unit(ref, "next", _word(m[1]))),
    (
        rf"\b{_NUMBER} (day|week|month|year)s? ago\b",
        lambda m, ref: _ago(ref, _count(m[1]), _word(m[2])),
    ),
    (
        rf"\b(last|on|this past|this|next) {_WEEKDAY}\b",
        lambda m, ref: _weekday(ref, _word(m[1]), _word(m[2])),
    ),
    (
        rf"\b{DAY_RE} (?:of )?{MONTH_RE},? {YEAR_RE}\b",
        lambda m, ref: _on(int(m[3]), MONTHS[_word(m[2])], int(m[1])),
    ),
    (
        rf"\b{MONTH_RE} {DAY_RE},? {YEAR_RE}\b",
        lambda m, ref: _on(int(m[3]), MONTHS[_word(m[1])], int(m[2])),
    ),
    (rf"\b{MONTH_RE},? {YEAR_RE}\b", lambda m, ref: date(int(m[2]), MONTHS[_word(m[1])], 1)),
    (
        r"\b(\d{4})-(\d{2})-(\d{2})\b",
        lambda m, ref: _on(int(m[1]), int(m[2]), int(m[3])),
    ),
    (
        rf"\b(?:in|since|during|from|until|till|by|before|after|of|around) "
        rf"(?:(?:early|mid|late) )?{YEAR_RE}\b(?![-/:.]\d)",
        lambda m, ref: date(int(m[1]), 1, 1),
    ),
]
_COMPILED = [(re.compile(p.replace(" ", r"\s+"), re.IGNORECASE), r) for p, r in _RULES]


def reference_date(timestamp: datetime) -> date:
    """The UTC calendar date of `timestamp`; a naive timestamp is taken to be UTC already."""
    if timestamp.tzinfo is None:
        return timestamp.date()
    return timestamp.astimezone(UTC).date()


def resolve_dates(text: str, timestamp: datetime) -> tuple[date, ...]:
    """Absolute dates of the time expressions in `text`, in order of appearance, deduplicated."""
    ref = reference_date(timestamp)
    found: list[tuple[int, int, date]] = []
    for pattern, resolve in _COMPILED:
        for match in pattern.finditer(text):
            resolved = resolve(match, ref)
            if resolved is not None:
                found.append((match.start(), -match.end(), resolved))
    found.sort(key=lambda hit: hit[:2])
    dates: list[date] = []
    covered = -1
    for start, neg_end, resolved in found:
        if start < covered:
            continue  # inside a match that starts earlier or is longer
        covered = -neg_end
        if resolved not in dates:
            dates.append(resolved)
    return tuple(dates)


def human_date(day: date) -> str:
    """8 May 2023: unambiguous in any locale, and the form LoCoMo's questions use."""
    return f"{day.day} {day:%B} {day.year}"
