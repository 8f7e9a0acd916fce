"""Value conversions from DICOM text to what a BigQuery JSON load accepts.

Each function takes one value (already decoded and split on backslash) and returns the
column value, or raises ``ValueError`` when the text does not fit the column: the caller
then keeps the element's raw text in ``OtherElements`` (SPEC §2, "values that do not
fit"). Nothing here logs or puts the value into an exception message: values are
patient data.
"""

from __future__ import annotations

import datetime as _dt
import math
import re

_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")
_DT = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?"
)

#: BigQuery INT64 bounds: UV and SV values outside them do not fit an INTEGER column.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_NOT_FIT = "value does not fit its column"


def to_date(text: str) -> str:
    """DA ``YYYYMMDD`` (or ACR-NEMA ``YYYY.MM.DD``) → ``YYYY-MM-DD``, a real calendar date."""
    match = _DA.fullmatch(text)
    if match is None:
        raise ValueError(_NOT_FIT)
    year, month, day = (int(part) for part in match.groups())
    return _dt.date(year, month, day).isoformat()


def to_time(text: str) -> str:
    """TM ``HH[MM[SS[.F{1,6}]]]`` (or ACR-NEMA ``HH:MM:SS``) → ``HH:MM:SS.ffffff``.

    Partial values are completed with zeros. A leap second (``60``) does not fit
    BigQuery's TIME and raises ``ValueError``.
    """
    match = _TM.fullmatch(text)
    if match is None:
        raise ValueError(_NOT_FIT)
    hours, minutes, seconds, fraction = match.groups()
    return _dt.time(
        int(hours), int(minutes or 0), int(seconds or 0), int((fraction or "").ljust(6, "0"))
    ).isoformat(timespec="microseconds")


def to_timestamp(text: str) -> str:
    """DT ``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]`` → a UTC timestamp BigQuery accepts.

    Missing components take their lowest value; the offset ``&ZZXX`` is applied, and a
    value without one is taken as UTC. The result looks like
    ``2020-01-31 13:45:00.000000+00:00``.
    """
    match = _DT.fullmatch(text)
    if match is None:
        raise ValueError(_NOT_FIT)
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    offset = _dt.timedelta(0)
    if sign:
        offset = _dt.timedelta(hours=int(off_h), minutes=int(off_m))
        if sign == "-":
            offset = -offset
        if not -_dt.timedelta(hours=14) <= offset <= _dt.timedelta(hours=14):
            raise ValueError(_NOT_FIT)
    try:
        local = _dt.datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "").ljust(6, "0")),
            tzinfo=_dt.timezone(offset),
        )
        utc = local.astimezone(_dt.timezone.utc)
    except (ValueError, OverflowError):
        raise ValueError(_NOT_FIT) from None
    return utc.isoformat(sep=" ", timespec="microseconds")


def to_integer(number: int) -> int:
    """An integer that fits BigQuery's INT64 (UV and SV may not)."""
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(_NOT_FIT)
    return number


def to_float(number: float) -> float | str:
    """A FLOAT64 value; NaN and ±Infinity become the strings BigQuery's JSON load accepts."""
    if math.isfinite(number):
        return number
    if math.isnan(number):
        return "NaN"
    return "Infinity" if number > 0 else "-Infinity"


PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


def to_person_name(groups: list[str]) -> dict | None:
    """PN component groups (already decoded, split on ``=``) → the export's PN record.

    Components are split on ``^``; empty components and groups are left out, so an empty
    name is ``None``. More than three groups or five components do not fit.
    """
    if len(groups) > 3:
        raise ValueError(_NOT_FIT)
    record = {}
    for group_name, group in zip(PN_GROUPS, groups):
        components = group.split("^")
        if len(components) > 5:
            raise ValueError(_NOT_FIT)
        parts = {
            name: component
            for name, component in zip(PN_COMPONENTS, components)
            if component
        }
        if parts:
            record[group_name] = parts
    return record or None
