"""BigQuery JSON schema and rows → Apache Arrow, for the Parquet destination (SPEC §4).

Pure: a schema (as ``bq mk --schema`` takes it) and rows in the BigQuery JSON form that
:mod:`schemas.convert` produces in, an Arrow schema and table out. The Arrow types are the
ones BigQuery's Parquet conversion maps back to the same schema
(https://cloud.google.com/bigquery/docs/loading-data-cloud-storage-parquet):

| BigQuery          | Arrow                      | Parquet                                   |
|-------------------|----------------------------|-------------------------------------------|
| STRING            | string                     | BYTE_ARRAY, STRING                        |
| INTEGER           | int64                      | INT64                                     |
| FLOAT             | float64                    | DOUBLE                                    |
| BOOLEAN           | bool                       | BOOLEAN                                   |
| DATE              | date32                     | INT32, DATE                               |
| TIME              | time64[us]                 | INT64, TIME(MICROS)                       |
| TIMESTAMP         | timestamp[us, tz=UTC]      | INT64, TIMESTAMP(isAdjustedToUTC, MICROS) |
| RECORD            | struct                     | group                                     |
| mode REPEATED     | list, never null           | 3-level LIST (``list`` / ``element``)     |

A REPEATED field is never NULL, as in BigQuery: a row without it holds ``[]``, at every
depth. NULLABLE fields are nullable; the list and its elements are not.
"""

from __future__ import annotations

import datetime as _dt
from typing import Callable, Iterable

import pyarrow as pa

_UTC = _dt.timezone.utc

_SCALARS = {
    "STRING": pa.string(),
    "INTEGER": pa.int64(),
    "INT64": pa.int64(),
    "FLOAT": pa.float64(),
    "FLOAT64": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "BOOL": pa.bool_(),
    "DATE": pa.date32(),
    "TIME": pa.time64("us"),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
}
_RECORDS = ("RECORD", "STRUCT")

#: BigQuery's JSON spellings of the non-finite FLOAT64 values (see schemas.values.to_float).
_NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _mode(field: dict) -> str:
    return str(field.get("mode") or "NULLABLE").upper()


def arrow_type(field: dict) -> pa.DataType:
    """The Arrow type of one BigQuery field (a list type if it is REPEATED)."""
    bq_type = str(field["type"]).upper()
    if bq_type in _RECORDS:
        base = pa.struct([arrow_field(child) for child in field.get("fields") or []])
    else:
        base = _SCALARS[bq_type]
    if _mode(field) == "REPEATED":
        return pa.list_(pa.field("element", base, nullable=False))
    return base


def arrow_field(field: dict) -> pa.Field:
    return pa.field(field["name"], arrow_type(field), nullable=_mode(field) == "NULLABLE")


def arrow_schema(schema: list[dict]) -> pa.Schema:
    """The Arrow schema of a BigQuery JSON schema (fields in the same order)."""
    return pa.schema([arrow_field(field) for field in schema])


# -- values ---------------------------------------------------------------------------

def _date(value):
    return _dt.date.fromisoformat(value) if isinstance(value, str) else value


def _time(value):
    return _dt.time.fromisoformat(value) if isinstance(value, str) else value


def _timestamp(value):
    """``2020-01-31 13:45:00.000000+00:00`` (any offset, or none: UTC) → an aware UTC datetime."""
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value.replace("T", " ").replace("Z", "+00:00"))
    if value.tzinfo is None:
        return value.replace(tzinfo=_UTC)
    return value.astimezone(_UTC)


def _float(value):
    if isinstance(value, str):
        return _NON_FINITE[value] if value in _NON_FINITE else float(value)
    return value


_VALUE_CONVERTERS = {
    "DATE": _date,
    "TIME": _time,
    "TIMESTAMP": _timestamp,
    "FLOAT": _float,
    "FLOAT64": _float,
}


def _needs_conversion(field: dict) -> bool:
    if str(field["type"]).upper() in _RECORDS:
        return any(_needs_conversion(child) for child in field.get("fields") or [])
    return str(field["type"]).upper() in _VALUE_CONVERTERS


def _field_converter(field: dict) -> Callable | None:
    """A function from the field's JSON value (not None) to what Arrow takes, or None
    if the value passes unchanged."""
    if not _needs_conversion(field):
        return None
    bq_type = str(field["type"]).upper()
    convert = record_converter(field["fields"]) if bq_type in _RECORDS else _VALUE_CONVERTERS[bq_type]
    if _mode(field) != "REPEATED":
        return convert
    return lambda values: [convert(value) for value in values]


def record_converter(schema: list[dict]) -> Callable[[dict], dict]:
    """A function from one row (or record) in BigQuery JSON form to a dict whose DATE, TIME,
    TIMESTAMP and FLOAT values are Python values Arrow takes. Only the fields that hold
    such values are visited, and a record is copied only if one of its values changes."""
    converters = [(field["name"], c) for field in schema if (c := _field_converter(field)) is not None]

    def convert(record: dict) -> dict:
        out = record
        for name, converter in converters:
            value = record.get(name)
            if value is not None:
                if out is record:
                    out = dict(record)
                out[name] = converter(value)
        return out

    return convert


def _loose(data_type: pa.DataType) -> pa.DataType:
    """The type with every field nullable: what Arrow builds from Python values, where an
    absent REPEATED field is a null list until :func:`_conform` makes it ``[]``."""
    if pa.types.is_list(data_type):
        return pa.list_(_loose(data_type.value_type))
    if pa.types.is_struct(data_type):
        return pa.struct([pa.field(f.name, _loose(f.type)) for f in data_type])
    return data_type


def _conform(array: pa.Array, target: pa.DataType) -> pa.Array:
    """``array`` (of ``_loose(target)``) as ``target``: null lists become empty lists, at every depth."""
    if pa.types.is_list(target):
        values = _conform(array.values, target.value_type)
        return pa.ListArray.from_arrays(array.offsets, values, type=target)
    if pa.types.is_struct(target):
        children = [_conform(array.field(i), target.field(i).type) for i in range(target.num_fields)]
        mask = array.is_null() if array.null_count else None
        return pa.StructArray.from_arrays(children, fields=list(target), mask=mask)
    return array


def to_arrow_table(rows: Iterable[dict], schema: list[dict] | pa.Schema, convert: Callable | None = None) -> pa.Table:
    """Rows in BigQuery JSON form → an Arrow table with ``arrow_schema(schema)``.

    Keys of a row that the schema does not have are ignored; an absent REPEATED field is
    ``[]``. Pass ``convert`` (``record_converter(schema)``) to reuse it over many calls.
    """
    target = schema if isinstance(schema, pa.Schema) else arrow_schema(schema)
    if convert is None:
        if isinstance(schema, pa.Schema):
            raise TypeError("pass convert= with an Arrow schema")
        convert = record_converter(schema)
    row_type = pa.struct(list(target))
    loose = pa.array([convert(row) for row in rows], type=_loose(row_type))
    batch = pa.RecordBatch.from_struct_array(_conform(loose, row_type))
    return pa.Table.from_batches([batch], schema=target)
