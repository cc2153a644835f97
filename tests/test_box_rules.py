"""The exchange box's pure rules: office hours, number formats, reminder times."""

from __future__ import annotations

import datetime as dt

import pytest

from exchanged.box import BoxError, OfficeHours, check_number_format, number, reminder_time_passed

CST = dt.timezone(dt.timedelta(hours=8))


def at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    """December 2026, local time (the 7th is a Monday)."""
    return dt.datetime(2026, 12, day, hour, minute, tzinfo=CST)


def test_office_hours_edges_days_and_holidays() -> None:
    hours = OfficeHours(holidays=frozenset({dt.date(2026, 12, 8)}))
    assert not hours.open_at(at(7, 8, 29)) and hours.open_at(at(7, 8, 30))
    assert hours.open_at(at(7, 17, 29)) and not hours.open_at(at(7, 17, 30))
    assert not hours.open_at(at(8, 10))  # a holiday
    assert not hours.open_at(at(12, 10))  # a Saturday
    assert hours.open_at(at(7, 10).astimezone(dt.UTC))  # any zone: the unit's local time
    always = OfficeHours(days=(1, 2, 3, 4, 5, 6, 7), start=dt.time(0), end=dt.time(0))
    assert always.open_at(at(12, 23, 59)) and always.open_at(at(13, 0, 0))


def test_number_formats() -> None:
    fmt = check_number_format("收文〔{year}〕{seq:04d}", "incoming")
    assert number(fmt, "office", 2026, 42) == "收文〔2026〕0042"
    for bad in ("no sequence {year}", "{seq} {nope}", "{seq:q}", "{"):
        with pytest.raises(BoxError):
            check_number_format(bad, "incoming")


def test_reminder_times_of_day() -> None:
    times = (dt.time(9, 0), dt.time(14, 30))
    hours = OfficeHours()
    assert reminder_time_passed(at(7, 8, 59), at(7, 9, 0), times, hours)
    assert not reminder_time_passed(at(7, 9, 0), at(7, 9, 5), times, hours)
    assert reminder_time_passed(at(7, 14, 29), at(7, 14, 31), times, hours)
    assert reminder_time_passed(at(7, 23, 0), at(9, 1, 0), times, hours)  # days pass too
    assert not reminder_time_passed(at(7, 15, 0), at(7, 23, 0), times, hours)
