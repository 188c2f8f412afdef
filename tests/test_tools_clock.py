"""Current time and zone conversion, with "now" frozen and DST edges checked."""
import datetime as dt

import pytest

from tools import clock
from tools.clock import convert_time, current_time, resolve_timezone

FROZEN_NOW = dt.datetime(2024, 7, 1, 12, 0, 0, tzinfo=dt.timezone.utc)  # a Monday, summer time


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    monkeypatch.setattr(clock, "utc_now", lambda: FROZEN_NOW)


def test_current_time_in_utc_by_default():
    now = current_time()
    assert now["datetime"] == "2024-07-01T12:00:00+00:00"
    assert now["weekday"] == "Monday"
    assert now["timezone"] == "UTC"


def test_current_time_in_a_zone_with_summer_time():
    now = current_time("Europe/Paris")
    assert now["time"] == "14:00:00"
    assert now["utc_offset"] == "+02:00"
    assert now["abbreviation"] == "CEST"
    assert now["is_dst"] is True


def test_current_time_can_cross_midnight():
    now = current_time("Pacific/Auckland")
    assert now["date"] == "2024-07-02"
    assert now["weekday"] == "Tuesday"


@pytest.mark.parametrize("name, expected", [
    ("europe/PARIS", "Europe/Paris"),
    ("America/New_York", "America/New_York"),
    ("america/new york", "America/New_York"),
    ("Tokyo", "Asia/Tokyo"),
    ("new york", "America/New_York"),
    ("PST", "America/Los_Angeles"),
    ("utc", "UTC"),
    ("GMT", "UTC"),
    ("UTC+5:30", "UTC+05:30"),
    ("gmt-3", "UTC-03:00"),
    ("+0100", "UTC+01:00"),
])
def test_zone_names_are_found_forgivingly(name, expected):
    assert resolve_timezone(name)[1] == expected


def test_fixed_offset_zone_has_that_offset():
    assert current_time("UTC+5:30")["time"] == "17:30:00"


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "Nowhere", "../../etc/passwd", "/etc/localtime",
                                  "UTC+15"])
def test_unknown_zone_is_a_clear_error(name):
    with pytest.raises(ValueError, match="unknown time zone|out of range"):
        current_time(name)


def test_unknown_zone_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean: Europe/Paris"):
        current_time("Europ/Pari")


def test_empty_zone():
    with pytest.raises(ValueError, match="empty"):
        current_time("  ")


def test_convert_uses_the_rules_of_the_given_date():
    # New York moves its clocks three weeks before Paris: the gap is 5 h, not 6 h.
    result = convert_time("2024-03-10 09:00", "America/New_York", "Europe/Paris")
    assert result["from"]["abbreviation"] == "EDT"
    assert result["to"]["datetime"] == "2024-03-10T14:00:00+01:00"
    winter = convert_time("2024-01-10 09:00", "America/New_York", "Europe/Paris")
    assert winter["to"]["time"] == "15:00:00"


def test_convert_without_date_uses_today_in_the_source_zone():
    result = convert_time("9:30 pm", "America/Los_Angeles", "Asia/Tokyo")
    assert result["from"]["datetime"] == "2024-07-01T21:30:00-07:00"
    assert result["to"]["datetime"] == "2024-07-02T13:30:00+09:00"


def test_convert_now():
    assert convert_time("now", "UTC", "Asia/Kolkata")["to"]["time"] == "17:30:00"


@pytest.mark.parametrize("text, expected", [
    ("14:30", "14:30:00"), ("2:30 pm", "14:30:00"), ("12 am", "00:00:00"),
    ("12pm", "12:00:00"), ("7 a.m.", "07:00:00"), ("08:15:42", "08:15:42"),
    ("2024-07-01T09:00", "09:00:00"),
])
def test_time_formats(text, expected):
    assert convert_time(text, "UTC", "UTC")["to"]["time"] == expected


def test_time_that_does_not_exist_because_of_dst():
    with pytest.raises(ValueError, match="does not exist"):
        convert_time("2024-03-10 02:30", "America/New_York", "UTC")


def test_ambiguous_time_takes_first_occurrence_with_a_note():
    result = convert_time("2024-11-03 01:30", "America/New_York", "UTC")
    assert result["to"]["time"] == "05:30:00"
    assert "happens twice" in result["note"]


@pytest.mark.parametrize("text", ["25:00", "13 pm", "2024-02-30 10:00", "noon-ish", "9.30", ""])
def test_bad_times_are_clear_errors(text):
    with pytest.raises(ValueError, match="cannot read time|invalid date or time|not valid with am/pm"):
        convert_time(text, "UTC", "Europe/Paris")


def test_convert_unknown_zone():
    with pytest.raises(ValueError, match="unknown time zone 'Atlantis'"):
        convert_time("10:00", "Atlantis", "UTC")


def test_real_clock_is_timezone_aware(monkeypatch):
    monkeypatch.undo()
    assert clock.utc_now().utcoffset() == dt.timedelta(0)
