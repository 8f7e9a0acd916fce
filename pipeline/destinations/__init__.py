"""Where rows go, and the write-disposition rules every destination follows (SPEC §4).

| Situation                               | Result                          |
|-----------------------------------------|---------------------------------|
| table absent                            | created, whatever the options   |
| exists, ``--overwrite-table``           | overwritten                     |
| exists, neither option                  | error, even if the table is empty |
| exists and empty, WRITE_EMPTY           | export succeeds                 |
| exists and not empty, WRITE_EMPTY       | error, table untouched          |
| exists, WRITE_APPEND                    | rows added, schema extended     |
| exists, WRITE_TRUNCATE                  | old rows and schema replaced    |

Each destination (:mod:`.duckdb`, :mod:`.bigquery`, :mod:`.parquet`) implements the
interface of :mod:`.base`; the rules here hold for all of them: the table above
(:func:`check_table_state`), ``--max-failures`` (:func:`check_max_failures`) and the
schema of an append (:func:`append_schema`).
"""

from __future__ import annotations

import enum

from schemas.merge import extend_schema, schema_conflicts


class DestinationError(Exception):
    """A problem with the destination the user must fix; reported before anything is written."""


class TooManyFailures(DestinationError):
    """More instances failed than ``--max-failures`` allows; nothing was written."""


class Disposition(enum.Enum):
    """What to do with an existing table. DEFAULT is "neither option given"."""

    DEFAULT = "DEFAULT"
    OVERWRITE = "OVERWRITE"  # --overwrite-table, the legacy ``force``
    WRITE_EMPTY = "WRITE_EMPTY"
    WRITE_APPEND = "WRITE_APPEND"
    WRITE_TRUNCATE = "WRITE_TRUNCATE"

    @property
    def replaces(self) -> bool:
        """True if an existing table's rows and schema are replaced."""
        return self in (Disposition.OVERWRITE, Disposition.WRITE_TRUNCATE)


WRITE_DISPOSITIONS = ("WRITE_EMPTY", "WRITE_APPEND", "WRITE_TRUNCATE")


def parse_write_disposition(text: str) -> Disposition:
    """``WRITE_APPEND``, ``write-append``, ``write_append``… → Disposition."""
    normalised = text.strip().upper().replace("-", "_")
    if normalised not in WRITE_DISPOSITIONS:
        raise ValueError(
            f"--write-disposition must be one of {', '.join(WRITE_DISPOSITIONS)} "
            f"(or write-empty, write-append, write-truncate), not {text!r}"
        )
    return Disposition(normalised)


def resolve_disposition(write_disposition: str | None, overwrite_table: bool) -> Disposition:
    """The disposition from the two flags; giving both is a usage error."""
    if write_disposition and overwrite_table:
        raise ValueError("give either --write-disposition or --overwrite-table, not both")
    if overwrite_table:
        return Disposition.OVERWRITE
    if write_disposition:
        return parse_write_disposition(write_disposition)
    return Disposition.DEFAULT


def check_table_state(table: str, disposition: Disposition, exists: bool, row_count: int | None) -> None:
    """Raise :class:`DestinationError` if ``disposition`` forbids writing to the table as it is.

    ``row_count`` may be None when only existence is known (it is then asked for only
    when WRITE_EMPTY needs it).
    """
    if not exists:
        return
    if disposition is Disposition.DEFAULT:
        raise DestinationError(
            f"table {table} already exists. Pass --write-disposition WRITE_APPEND to add rows, "
            f"--write-disposition WRITE_TRUNCATE (or --overwrite-table) to replace it, or "
            f"--write-disposition WRITE_EMPTY to write only if it is empty."
        )
    if disposition is Disposition.WRITE_EMPTY and row_count:
        raise DestinationError(
            f"table {table} is not empty ({row_count:,} rows) and --write-disposition is WRITE_EMPTY"
        )


#: The dead-letter table ``TABLE_errors``: one row per input that did not become a row.
ERRORS_SCHEMA = [
    {"name": "path", "type": "STRING", "mode": "NULLABLE"},
    {"name": "stage", "type": "STRING", "mode": "NULLABLE"},
    {"name": "error_type", "type": "STRING", "mode": "NULLABLE"},
    {"name": "message", "type": "STRING", "mode": "NULLABLE"},
    {"name": "run_started", "type": "TIMESTAMP", "mode": "NULLABLE"},
]


def errors_table_name(table: str) -> str:
    return f"{table}_errors"


def check_max_failures(failed: int, max_failures: int | None, destination: str) -> None:
    """Raise :class:`TooManyFailures` if more instances failed than ``--max-failures``
    allows. Called before anything is written."""
    if max_failures is not None and failed > max_failures:
        raise TooManyFailures(
            f"{failed:,} instances failed, more than --max-failures {max_failures:,}; "
            f"nothing was written to {destination}"
        )


def append_schema(new: list[dict], existing: list[dict], destination: str) -> list[dict]:
    """The schema after appending rows of schema ``new`` to a table with ``existing``:
    ``existing`` extended by the new fields. A field of another type or mode raises
    :class:`DestinationError` naming every conflict, before anything is written."""
    conflicts = schema_conflicts(new, existing)
    if conflicts:
        raise DestinationError(f"cannot append to {destination}: " + "; ".join(conflicts))
    return extend_schema(existing, new)


def load_schema(schema: list[dict], existing: list[dict] | None, destination: str, replaces: bool) -> list[dict]:
    """The schema a run writes with: the export's own when the table is new or replaced,
    else the table's extended by it (:func:`append_schema`, which raises on a conflict)."""
    if existing is None or replaces:
        return schema
    return append_schema(schema, existing, destination)


def errors_disposition(disposition: Disposition) -> Disposition:
    """The dead-letter table is appended to by WRITE_APPEND and replaced otherwise."""
    return Disposition.WRITE_APPEND if disposition is Disposition.WRITE_APPEND else Disposition.WRITE_TRUNCATE
