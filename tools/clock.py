"""Current date and time in any time zone, and converting a time between zones.

Zones are IANA names ("Europe/Paris"), looked up case-insensitively; a bare city
("tokyo", "new york"), a common abbreviation ("PST", "CET") or a fixed offset
("UTC+5:30") also works. Conversions use the zone rules of the actual date, so
daylight saving time is handled. Tests freeze time by replacing `utc_now`.
"""
# No `from __future__ import annotations`: the agent reads tool annotations as real types.
import datetime as dt
import difflib
import functools
import re
import zoneinfo
from typing import Optional

UTC = dt.timezone.utc

# Canonical IANA areas; other top-level names (US/, Etc/, SystemV/) are legacy aliases.
CANONICAL_AREAS = ("Africa", "America", "Antarctica", "Asia", "Atlantic", "Australia",
                   "Europe", "Indian", "Pacific")

# People say "3pm EST" in July and mean New York time, so abbreviations name a
# region, not the fixed offset of the abbreviation itself.
ABBREVIATIONS = {
    "est": "America/New_York", "edt": "America/New_York", "et": "America/New_York",
    "cst": "America/Chicago", "cdt": "America/Chicago", "ct": "America/Chicago",
    "mst": "America/Denver", "mdt": "America/Denver", "mt": "America/Denver",
    "pst": "America/Los_Angeles", "pdt": "America/Los_Angeles", "pt": "America/Los_Angeles",
    "akst": "America/Anchorage", "hst": "Pacific/Honolulu",
    "bst": "Europe/London", "wet": "Europe/Lisbon", "cet": "Europe/Paris",
    "cest": "Europe/Paris", "eet": "Europe/Athens", "eest": "Europe/Athens",
    "msk": "Europe/Moscow", "ist": "Asia/Kolkata", "jst": "Asia/Tokyo", "kst": "Asia/Seoul",
    "aest": "Australia/Sydney", "aedt": "Australia/Sydney", "nzst": "Pacific/Auckland",
}

OFFSET_PATTERN = re.compile(r"^(?:utc|gmt)?\s*([+-])\s*(\d{1,2})(?::?(\d{2}))?$")
TIME_PATTERN = re.compile(
    r"^(?:(?P<date>\d{4}-\d{2}-\d{2})[ t])?"
    r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?(?::(?P<second>\d{2}))?"
    r"(?:\s*(?P<meridiem>[ap])\.?m\.?)?$"
)


def utc_now() -> dt.datetime:
    """The current moment in UTC. Tests replace this to freeze time."""
    return dt.datetime.now(UTC)


@functools.lru_cache(maxsize=1)
def _zone_index() -> tuple[dict[str, str], dict[str, str]]:
    """(lower-case IANA name -> name, lower-case city -> preferred IANA name)."""
    names = zoneinfo.available_timezones()
    by_name = {name.lower(): name for name in names}
    by_city: dict[str, str] = {}
    # Shortest canonical name wins, so "buenos_aires" is America/Buenos_Aires (a link
    # to America/Argentina/Buenos_Aires: same rules either way).
    for name in sorted(names, key=lambda n: (n.count("/"), n)):
        if name.split("/")[0] in CANONICAL_AREAS:
            by_city.setdefault(name.rsplit("/", 1)[-1].lower(), name)
    return by_name, by_city


def _fixed_offset(sign: str, hours: str, minutes: Optional[str]) -> dt.timezone:
    offset = dt.timedelta(hours=int(hours), minutes=int(minutes or 0))
    if offset > dt.timedelta(hours=14) or (minutes and int(minutes) >= 60):
        raise ValueError(f"UTC offset {sign}{hours}:{minutes or '00'} is out of range (max ±14:00)")
    offset = -offset if sign == "-" else offset
    return dt.timezone(offset, "UTC" + _format_offset(offset)) if offset else UTC


def resolve_timezone(name: str) -> tuple[dt.tzinfo, str]:
    """Find a zone by IANA name, city, abbreviation or UTC offset: (tzinfo, display name)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("time zone name is empty; use an IANA name like 'Europe/Paris'")
    key = " ".join(name.strip().lower().split())
    if key in ("utc", "gmt", "z", "zulu", "etc/utc"):
        return UTC, "UTC"
    offset_match = OFFSET_PATTERN.match(key)
    if offset_match:
        zone = _fixed_offset(*offset_match.groups())
        return zone, str(zone.tzname(None))
    by_name, by_city = _zone_index()
    if not by_name:
        raise ValueError("no time zone database found on this machine; install the 'tzdata' package")
    key = key.replace(" ", "_")
    iana_name = by_name.get(key) or ABBREVIATIONS.get(key) or by_city.get(key)
    if iana_name is None:
        close = difflib.get_close_matches(key, list(by_name) + list(by_city), n=3, cutoff=0.6)
        suggestions = [by_name.get(match) or by_city[match] for match in close]
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        raise ValueError(f"unknown time zone {name!r}; use an IANA name like 'Europe/Paris' "
                         f"or 'America/New_York'.{hint}")
    return zoneinfo.ZoneInfo(iana_name), iana_name


def _format_offset(offset: Optional[dt.timedelta]) -> str:
    total_minutes = int((offset or dt.timedelta()).total_seconds() // 60)
    sign = "-" if total_minutes < 0 else "+"
    hours, minutes = divmod(abs(total_minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def _describe(moment: dt.datetime, zone_name: str) -> dict:
    return {
        "timezone": zone_name,
        "datetime": moment.isoformat(timespec="seconds"),
        "date": moment.date().isoformat(),
        "time": moment.strftime("%H:%M:%S"),
        "weekday": moment.strftime("%A"),
        "utc_offset": _format_offset(moment.utcoffset()),
        "abbreviation": moment.tzname(),
        "is_dst": bool(moment.dst()),
    }


def _parse_local_time(text: str, today: dt.date) -> dt.datetime:
    """'14:30', '2:30 pm', '2024-07-01 09:00' or 'now' -> naive datetime (date defaults to today)."""
    match = TIME_PATTERN.match(" ".join(text.strip().lower().split()))
    if not match:
        raise ValueError(f"cannot read time {text!r}; use 'HH:MM', 'h:mm am/pm' or 'YYYY-MM-DD HH:MM'")
    hour, minute, second = (int(match[part] or 0) for part in ("hour", "minute", "second"))
    if match["meridiem"]:
        if not 1 <= hour <= 12:
            raise ValueError(f"hour {hour} is not valid with am/pm")
        hour = hour % 12 + (12 if match["meridiem"] == "p" else 0)
    try:
        day = dt.date.fromisoformat(match["date"]) if match["date"] else today
        return dt.datetime.combine(day, dt.time(hour, minute, second))
    except ValueError as exc:
        raise ValueError(f"invalid date or time {text!r}: {exc}") from None


def current_time(timezone: str = "UTC") -> dict:
    """Get the current date, time and weekday in a time zone.

    Args:
        timezone: IANA time zone name such as "Europe/Paris" or "America/New_York";
            a city name, an abbreviation like "PST" or an offset like "UTC+5:30" also works.

    Returns:
        The local date, time, weekday, UTC offset and whether daylight saving time is in effect.
    """
    zone, zone_name = resolve_timezone(timezone)
    return _describe(utc_now().astimezone(zone), zone_name)


def convert_time(time: str, from_timezone: str, to_timezone: str) -> dict:
    """Convert a clock time from one time zone to another, taking daylight saving time into account.

    Args:
        time: The time to convert: "HH:MM", "h:mm pm", "YYYY-MM-DD HH:MM" or "now";
            without a date, today's date in from_timezone is used.
        from_timezone: Time zone the given time is in, e.g. "America/New_York".
        to_timezone: Time zone to convert to, e.g. "Asia/Tokyo".

    Returns:
        The same moment described in both zones, with a note if the time was ambiguous.
    """
    source_zone, source_name = resolve_timezone(from_timezone)
    target_zone, target_name = resolve_timezone(to_timezone)
    if not isinstance(time, str):
        raise ValueError("time must be a string such as '14:30' or '2024-07-01 09:00'")
    note = None
    if time.strip().lower() == "now":
        moment = utc_now().astimezone(source_zone)
    else:
        naive = _parse_local_time(time, today=utc_now().astimezone(source_zone).date())
        moment = naive.replace(tzinfo=source_zone)
        # A wall time skipped by a DST jump does not survive the round trip through UTC.
        if moment.astimezone(UTC).astimezone(source_zone).replace(tzinfo=None) != naive:
            raise ValueError(f"{naive:%Y-%m-%d %H:%M} does not exist in {source_name}: "
                             "the clocks jump forward over it (daylight saving time)")
        later = moment.replace(fold=1)
        if later.utcoffset() != moment.utcoffset():
            note = (f"{naive:%Y-%m-%d %H:%M} happens twice in {source_name} (clocks go back); "
                    f"used the first one ({moment.tzname()}), the second is {later.tzname()}")
    result = {"from": _describe(moment, source_name),
              "to": _describe(moment.astimezone(target_zone), target_name)}
    if note:
        result["note"] = note
    return result
