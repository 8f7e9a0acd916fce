"""Merging instance schema fragments into the table's schema, and checking it (SPEC §3).

A fragment is a set of field paths (see :mod:`schemas.convert`). Merging is set union, so
it is associative and commutative: the table's schema does not depend on the order in
which instances are read or on how the work was split between workers. Only when the
merged set is turned into a BigQuery schema are fields ordered, by the ``(kind, order,
name)`` every field carries.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from schemas.vr_types import RECORD

#: BigQuery's limit on the number of columns of a table, nested leaves included.
MAX_LEAF_FIELDS = 10_000


class SchemaConflictError(ValueError):
    """Two definitions of the same field disagree on type or mode."""


class SchemaTooWideError(ValueError):
    """The merged schema has more leaf fields than BigQuery allows."""


def merge_fragments(fragments: Iterable[frozenset]) -> frozenset:
    """Union of fragments: the paths of every field any instance has."""
    merged: set = set()
    for fragment in fragments:
        merged |= fragment
    return frozenset(merged)


def add_fragment(merged: frozenset, fragment: frozenset) -> frozenset:
    """``merged`` ∪ ``fragment``, as :func:`merge_fragments` of the two; ``merged`` itself
    when it already holds every path of ``fragment`` (the usual case once a few
    instances are merged), so adding one instance costs a subset test, not a copy."""
    return merged if fragment <= merged else merged | fragment


def to_bigquery_schema(fragment: Iterable[tuple]) -> list[dict]:
    """The BigQuery JSON schema (as ``bq mk --schema`` takes it) for a set of paths.

    Fields are ordered by kind, then tag order, then name (SPEC §3). Raises
    :class:`SchemaConflictError` if one name has two types or modes in one record, and
    :class:`SchemaTooWideError` past BigQuery's 10,000 leaf fields.
    """
    root: dict = {}
    for path in fragment:
        level = root
        for depth, (kind, order, name, bq_type, mode) in enumerate(path):
            node = level.get(name)
            if node is None:
                node = level[name] = {"key": (kind, order, name), "type": bq_type, "mode": mode, "children": {}}
            elif (node["type"], node["mode"]) != (bq_type, mode):
                where = ".".join(field[2] for field in path[: depth + 1])
                raise SchemaConflictError(
                    f"field {where} is {node['type']} {node['mode']} in one instance "
                    f"and {bq_type} {mode} in another"
                )
            level = node["children"]
    schema = _fields(root)
    _check_width(schema)
    return schema


def _fields(level: dict) -> list[dict]:
    fields = []
    for name, node in sorted(level.items(), key=lambda item: item[1]["key"]):
        field = {"name": name, "type": node["type"], "mode": node["mode"]}
        if node["children"]:
            field["fields"] = _fields(node["children"])
        fields.append(field)
    return fields


def count_leaves(fields: list[dict]) -> int:
    return sum(count_leaves(f["fields"]) if f.get("fields") else 1 for f in fields)


def _check_width(schema: list[dict]) -> None:
    total = count_leaves(schema)
    if total <= MAX_LEAF_FIELDS:
        return
    widest = Counter({f["name"]: count_leaves(f.get("fields") or [f]) for f in schema})
    parts = ", ".join(f"{name} ({count:,})" for name, count in widest.most_common(5))
    raise SchemaTooWideError(
        f"the merged schema has {total:,} leaf fields; BigQuery allows {MAX_LEAF_FIELDS:,}. "
        f"The widest columns are: {parts}. Exclude the instances that carry them "
        f"(for example with a filter file) or export them to a separate table."
    )


# -- an existing table's schema -------------------------------------------------------

_TYPE_ALIASES = {
    "INT64": "INTEGER",
    "FLOAT64": "FLOAT",
    "BOOL": "BOOLEAN",
    "STRUCT": RECORD,
}


def _normalise(field: dict) -> tuple[str, str]:
    bq_type = str(field.get("type", "")).upper()
    return _TYPE_ALIASES.get(bq_type, bq_type), str(field.get("mode") or "NULLABLE").upper()


def schema_conflicts(new: list[dict], existing: list[dict], prefix: str = "") -> list[str]:
    """Fields of ``new`` that exist in ``existing`` with another type or mode.

    Names compare case-insensitively, as BigQuery's do. An empty list means ``new`` can
    be appended to a table with the ``existing`` schema, adding its new fields.
    """
    by_name = {field["name"].lower(): field for field in existing}
    conflicts = []
    for field in new:
        old = by_name.get(field["name"].lower())
        if old is None:
            continue
        path = prefix + field["name"]
        if _normalise(field) != _normalise(old):
            old_type, old_mode = _normalise(old)
            new_type, new_mode = _normalise(field)
            conflicts.append(
                f"{path}: the table has {old_type} {old_mode}, the export needs {new_type} {new_mode}"
            )
        elif field.get("fields"):
            conflicts += schema_conflicts(field["fields"], old.get("fields") or [], path + ".")
    return conflicts


def extend_schema(existing: list[dict], new: list[dict]) -> list[dict]:
    """``existing`` with the fields only ``new`` has appended, recursively (WRITE_APPEND).

    BigQuery only adds fields at the end of a record, so existing fields keep their
    place and new ones follow in the export's order.
    """
    by_name = {field["name"].lower(): field for field in new}
    known = {field["name"].lower() for field in existing}
    merged = []
    for field in existing:
        field = dict(field)
        addition = by_name.get(field["name"].lower())
        if addition is not None and field.get("fields") and addition.get("fields"):
            field["fields"] = extend_schema(field["fields"], addition["fields"])
        merged.append(field)
    merged += [field for field in new if field["name"].lower() not in known]
    return merged
