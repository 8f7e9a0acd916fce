"""Rows completed against the table's schema.

In BigQuery a REPEATED field is never NULL: absent, it is an empty array. A row built
from one instance only holds the fields that instance has, so before it is written to a
destination that would store an absent field as NULL (DuckDB, Parquet), every REPEATED
field the merged schema has is filled in as ``[]``, recursively inside records.
"""

from __future__ import annotations

from schemas.vr_types import RECORD

_RECORD_TYPES = (RECORD, "STRUCT")


def with_empty_lists(row: dict, schema: list[dict]) -> dict:
    """``row`` with ``[]`` for every REPEATED field of ``schema`` it lacks or holds as
    None, at every level of nesting. Other fields are left as they are (absent means
    NULL). The input row is not modified."""
    completed = dict(row)
    for field in schema:
        name = field["name"]
        value = completed.get(name)
        repeated = field.get("mode") == "REPEATED"
        if value is None:
            if repeated:
                completed[name] = []
            continue
        if field.get("type") in _RECORD_TYPES and field.get("fields"):
            members = field["fields"]
            if repeated:
                completed[name] = [with_empty_lists(item, members) if item is not None else item for item in value]
            else:
                completed[name] = with_empty_lists(value, members)
    return completed
