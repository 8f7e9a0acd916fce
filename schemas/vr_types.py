"""The one table mapping DICOM value representations (VRs) to BigQuery types.

Both the schema builder and the value converter read this table: a keyword's column
type is ``bigquery_type(dictionary VR)`` and its mode is ``bigquery_mode(dictionary VM)``,
so neither ever depends on which instance an element came from (SPEC §2).
"""

from __future__ import annotations

import functools

STRING = "STRING"
INTEGER = "INTEGER"
FLOAT = "FLOAT"
DATE = "DATE"
TIME = "TIME"
TIMESTAMP = "TIMESTAMP"
RECORD = "RECORD"

NULLABLE = "NULLABLE"
REPEATED = "REPEATED"

#: VR → BigQuery type. ``None`` marks a VR that BigQuery cannot hold: the element gets
#: no column and is named in ``DroppedTags`` instead.
VR_TO_BIGQUERY: dict[str, str | None] = {
    # Text. DS and IS stay text, as in the Healthcare API's export.
    "AE": STRING,
    "AS": STRING,
    "CS": STRING,
    "DS": STRING,
    "IS": STRING,
    "LO": STRING,
    "LT": STRING,
    "SH": STRING,
    "ST": STRING,
    "UC": STRING,
    "UI": STRING,
    "UR": STRING,
    "UT": STRING,
    # Dates and times.
    "DA": DATE,
    "TM": TIME,
    "DT": TIMESTAMP,
    # Binary numbers.
    "FL": FLOAT,
    "FD": FLOAT,
    "AT": INTEGER,
    "SL": INTEGER,
    "SS": INTEGER,
    "SV": INTEGER,
    "UL": INTEGER,
    "US": INTEGER,
    "UV": INTEGER,
    # Structures.
    "PN": RECORD,
    "SQ": RECORD,
    # Bulk binary data: excluded.
    "OB": None,
    "OD": None,
    "OF": None,
    "OL": None,
    "OV": None,
    "OW": None,
    "UN": None,
}

#: The VRs whose values are decoded with the Specific Character Set (PS3.5 §6.1.2.3);
#: every other text VR uses the default repertoire.
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})

#: Text VRs whose value is never split on backslash (PS3.5 §6.2: VM is always 1).
SINGLE_VALUE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})

#: Text VRs whose leading spaces are padding too (PS3.5 §6.2); others keep them.
LEADING_SPACE_PADDED_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})


@functools.lru_cache(maxsize=None)
def bigquery_type(vr: str) -> str | None:
    """Return the BigQuery type for a dictionary VR, ``None`` if it is excluded.

    Ambiguous dictionary VRs (``"US or SS"``, ``"OB or OW"``, ``"US or SS or OW"``) map to
    the shared type of their alternatives; an alternative that is a binary VR excludes
    the element, because some instances would hold bulk data in it.
    """
    types = {VR_TO_BIGQUERY.get(alternative) for alternative in vr.split(" or ")}
    if len(types) != 1:
        return None
    return types.pop()


def bigquery_mode(vm: str) -> str:
    """Return the BigQuery mode for a dictionary VM: ``1`` is NULLABLE, any other REPEATED."""
    return NULLABLE if vm == "1" else REPEATED


@functools.lru_cache(maxsize=None)
def is_excluded(vr: str | None) -> bool:
    """True for a VR (or an unknown one) whose values are never exported."""
    return vr is None or bigquery_type(vr) is None
