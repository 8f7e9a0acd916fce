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

Each destination module (:mod:`.duckdb`, :mod:`.bigquery`) implements ``preflight``
(before any file is read) and the write itself on top of :func:`check_table_state`.
"""

from __future__ import annotations

import enum


class DestinationError(Exception):
    """A problem with the destination the user must fix; reported before anything is written."""


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
