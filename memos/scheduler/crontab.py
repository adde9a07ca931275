"""Crontab expressions as APScheduler triggers, with crontab's meaning of weekdays.

A schedule such as `"0 3 * * 1-5"` (03:00 UTC, Monday to Friday) is the standard five fields:
minute, hour, day of month, month, day of week. APScheduler 3's `CronTrigger.from_crontab`
reads day-of-week numbers with 0 = Monday (its issue 286), so `1-5` would run Tuesday to
Saturday. Here the day-of-week field is read as crontab does (0 and 7 = Sunday, names allowed,
ranges, lists and steps) and handed to APScheduler as an explicit list of day names. Cron runs
a line whose day of month and day of week are both restricted when *either* matches, APScheduler
when both do: such an expression is refused rather than read differently.
"""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger

from memcube.errors import InvalidArgument

DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _day(token: str, expr: str) -> int:
    token = token.strip().lower()
    if token[:3] in DAYS and token.isalpha():
        return DAYS.index(token[:3])
    if token.isdigit() and 0 <= int(token) <= 7:
        return int(token) % 7
    raise InvalidArgument(f"cron {expr!r}: day of week {token!r} is not 0-7 or sun..sat")


def _weekdays(field: str, expr: str) -> list[int]:
    """Crontab days (0 = Sunday) a day-of-week field selects, in order."""
    chosen: set[int] = set()
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise InvalidArgument(f"cron {expr!r}: step {step_text!r} is not positive")
            step = int(step_text)
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            low, high = span.split("-", 1)
            first, last = _day(low, expr), _day(high, expr)
            if high.strip() == "7":
                last = 7  # "5-7": Friday to Sunday
            if last < first:
                raise InvalidArgument(f"cron {expr!r}: day range {span!r} runs backwards")
        else:
            first = last = _day(span, expr)
            if step_text:
                last = 6  # "1/2": from Monday, every other day
        chosen.update(day % 7 for day in range(first, last + 1, step))
    return sorted(chosen)


def cron_trigger(expr: str) -> CronTrigger:
    """A trigger for a five-field crontab expression, in UTC; InvalidArgument if malformed."""
    fields = expr.split()
    if len(fields) != 5:
        raise InvalidArgument(
            f"cron {expr!r} has {len(fields)} fields; it needs 5: minute hour day month weekday"
        )
    minute, hour, day, month, weekday = fields
    if day != "*" and weekday != "*":
        raise InvalidArgument(
            f"cron {expr!r} restricts both the day of month and the day of week, which cron "
            "reads as either one matching; give one of them as *"
        )
    days = _weekdays(weekday, expr)
    try:
        return CronTrigger(
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=",".join(DAYS[d] for d in days),
            timezone="UTC",
        )
    except ValueError as exc:
        raise InvalidArgument(f"cron {expr!r}: {exc}") from None
