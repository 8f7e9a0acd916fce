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
    return _completer(schema)(row)


_completers: dict = {}  # id(schema) -> (schema, its completer); the schema kept alive so its id stays its own


def _completer(schema: list[dict]):
    """The function that completes rows of ``schema`` (made once per schema object: a
    table's schema has hundreds of fields, a row a fraction of them)."""
    cached = _completers.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    complete = _make_completer(schema)
    if len(_completers) > 64:
        _completers.clear()
    _completers[id(schema)] = (schema, complete)
    return complete


def _make_completer(schema: list[dict]):
    repeated = tuple(field["name"] for field in schema if field.get("mode") == "REPEATED")
    records = {
        field["name"]: (field.get("mode") == "REPEATED", _make_completer(field["fields"]))
        for field in schema
        if field.get("type") in _RECORD_TYPES and field.get("fields")
    }

    def complete(row: dict) -> dict:
        completed = dict(row)
        for name in repeated:
            if completed.get(name) is None:
                completed[name] = []
        if records:
            for name in records.keys() & completed.keys():
                value = completed[name]
                if value is None:
                    continue
                is_list, member = records[name]
                if is_list:
                    completed[name] = [member(item) if item is not None else item for item in value]
                else:
                    completed[name] = member(value)
        return completed

    return complete
