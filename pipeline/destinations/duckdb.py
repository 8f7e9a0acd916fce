"""The embedded local destination: a table in a DuckDB file, ``duckdb://PATH#TABLE``.

Same schema as the BigQuery table (records → STRUCT, repeated → LIST, DATE, TIME,
TIMESTAMP in UTC) and the same disposition rules. Rows arrive as the newline-delimited
JSON a BigQuery load job would take, and DuckDB parses them against the schema, so a
value that BigQuery would reject fails here too.

The whole write is one DuckDB transaction: a failed or interrupted run leaves the table
as it was, and WRITE_TRUNCATE replaces rows and schema atomically.
"""

from __future__ import annotations

import dataclasses
import os
import re

import duckdb

from pipeline.destinations import (
    ERRORS_SCHEMA,
    DestinationError,
    Disposition,
    check_table_state,
    errors_table_name,
)
from schemas.merge import extend_schema, schema_conflicts

SCHEME = "duckdb://"
DEFAULT_URI = "duckdb://dicom_metadata.duckdb#dicom_metadata"

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,1023}")
_DUCKDB_TYPES = {
    "STRING": "VARCHAR",
    "INTEGER": "BIGINT",
    "FLOAT": "DOUBLE",
    "DATE": "DATE",
    "TIME": "TIME",
    "TIMESTAMP": "TIMESTAMP",
    "BOOLEAN": "BOOLEAN",
}
_BIGQUERY_TYPES = {
    "varchar": "STRING",
    "bigint": "INTEGER",
    "integer": "INTEGER",
    "double": "FLOAT",
    "float": "FLOAT",
    "date": "DATE",
    "time": "TIME",
    "timestamp": "TIMESTAMP",
    "timestamp with time zone": "TIMESTAMP",
    "boolean": "BOOLEAN",
}
#: BigQuery's limit on a row; DuckDB's JSON reader defaults to 16 MB per object.
_MAX_ROW_BYTES = 100 * 1024 * 1024


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def duckdb_type(field: dict) -> str:
    """The DuckDB type of a BigQuery schema field."""
    if field["type"] in ("RECORD", "STRUCT"):
        members = ", ".join(f"{quote(f['name'])} {duckdb_type(f)}" for f in field["fields"])
        base = f"STRUCT({members})"
    else:
        base = _DUCKDB_TYPES[field["type"]]
    return base + "[]" if field.get("mode") == "REPEATED" else base


def _bigquery_field(name: str, duck_type) -> dict:
    mode = "NULLABLE"
    if duck_type.id == "list":
        mode, duck_type = "REPEATED", duck_type.child
    if duck_type.id == "struct":
        fields = [_bigquery_field(n, t) for n, t in duck_type.children]
        return {"name": name, "type": "RECORD", "mode": mode, "fields": fields}
    return {"name": name, "type": _BIGQUERY_TYPES.get(duck_type.id, duck_type.id.upper()), "mode": mode}


@dataclasses.dataclass(frozen=True)
class DuckDBTable:
    """A table in a DuckDB database file."""

    path: str
    table: str

    @classmethod
    def parse(cls, uri: str) -> "DuckDBTable":
        """``duckdb://PATH#TABLE`` (PATH relative or absolute) → DuckDBTable."""
        if not uri.startswith(SCHEME) or "#" not in uri:
            raise DestinationError(f"a DuckDB destination looks like {DEFAULT_URI}, not {uri!r}")
        path, table = uri[len(SCHEME):].rsplit("#", 1)
        if not path:
            raise DestinationError(f"{uri!r} names no database file")
        if not _TABLE_NAME.fullmatch(table):
            raise DestinationError(
                f"DuckDB table name {table!r} must start with a letter or underscore and hold "
                "only letters, digits and underscores"
            )
        return cls(path, table)

    def __str__(self) -> str:
        return f"{SCHEME}{self.path}#{self.table}"

    def errors_table_uri(self) -> str:
        return f"{SCHEME}{self.path}#{errors_table_name(self.table)}"

    # -- reading the table's state -------------------------------------------------------

    def _connect(self, read_only: bool = False):
        if read_only and not os.path.exists(self.path):
            return None
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise DestinationError(f"the folder for {self.path} does not exist")
        return duckdb.connect(self.path, read_only=read_only)

    @staticmethod
    def _exists(con, table: str) -> bool:
        return bool(
            con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = ? AND table_schema = 'main'",
                [table],
            ).fetchone()[0]
        )

    @staticmethod
    def _schema(con, table: str) -> list[dict]:
        relation = con.table(quote(table))
        return [_bigquery_field(name, t) for name, t in zip(relation.columns, relation.types)]

    def preflight(self, disposition: Disposition) -> None:
        """Check the table against the disposition before any file is read."""
        con = self._connect(read_only=True)
        if con is None:
            return
        try:
            exists = self._exists(con, self.table)
            count = con.execute(f"SELECT count(*) FROM {quote(self.table)}").fetchone()[0] if exists else None
        finally:
            con.close()
        check_table_state(str(self), disposition, exists, count)

    def schema(self) -> list[dict] | None:
        """The table's schema as BigQuery JSON, or None if it does not exist."""
        con = self._connect(read_only=True)
        if con is None:
            return None
        try:
            return self._schema(con, self.table) if self._exists(con, self.table) else None
        finally:
            con.close()

    # -- writing ---------------------------------------------------------------------

    def write(
        self,
        schema: list[dict],
        row_files: list[str],
        disposition: Disposition,
        error_files: list[str] = (),
    ) -> None:
        """Load the rows (NDJSON files) and dead letters, all or nothing.

        The table's state is checked again inside the transaction, so a table that
        changed since preflight is never overwritten against the disposition.
        """
        con = self._connect()
        try:
            con.execute("BEGIN TRANSACTION")
            exists = self._exists(con, self.table)
            count = con.execute(f"SELECT count(*) FROM {quote(self.table)}").fetchone()[0] if exists else None
            check_table_state(str(self), disposition, exists, count)
            if exists and not disposition.replaces:
                existing = self._schema(con, self.table)
                conflicts = schema_conflicts(schema, existing)
                if conflicts:
                    raise DestinationError(
                        f"cannot append to {self}: " + "; ".join(conflicts)
                    )
                schema = extend_schema(existing, schema)
                if schema != existing:
                    self._replace(con, self.table, schema, copy_rows=True)
            else:
                self._replace(con, self.table, schema, copy_rows=False)
            try:
                self._insert(con, self.table, schema, row_files)
            except duckdb.Error as error:
                raise DestinationError(
                    f"DuckDB rejected a row of the export ({type(error).__name__}); nothing was written to "
                    f"{self}. The message is withheld: it may quote a value."
                ) from None

            errors = errors_table_name(self.table)
            append_errors = disposition is Disposition.WRITE_APPEND and self._exists(con, errors)
            if not append_errors:
                self._replace(con, errors, ERRORS_SCHEMA, copy_rows=False)
            self._insert(con, errors, ERRORS_SCHEMA, error_files)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    @staticmethod
    def _replace(con, table: str, schema: list[dict], copy_rows: bool) -> None:
        """(Re)create ``table`` with ``schema``, keeping its rows if ``copy_rows``."""
        columns = ", ".join(f"{quote(f['name'])} {duckdb_type(f)}" for f in schema)
        if not copy_rows:
            con.execute(f"CREATE OR REPLACE TABLE {quote(table)} ({columns})")
            return
        staging = quote(table + "__staging")
        con.execute(f"CREATE OR REPLACE TABLE {staging} ({columns})")
        con.execute(f"INSERT INTO {staging} BY NAME SELECT * FROM {quote(table)}")
        con.execute(f"DROP TABLE {quote(table)}")
        con.execute(f"ALTER TABLE {staging} RENAME TO {quote(table)}")

    @staticmethod
    def _insert(con, table: str, schema: list[dict], files: list[str]) -> None:
        files = [f for f in files if os.path.getsize(f)]
        if not files:
            return
        columns = "{" + ", ".join(f"{_sql_string(f['name'])}: {_sql_string(duckdb_type(f))}" for f in schema) + "}"
        con.execute(
            f"INSERT INTO {quote(table)} BY NAME SELECT * FROM read_json(?, format='newline_delimited', "
            f"columns={columns}, maximum_object_size={_MAX_ROW_BYTES})",
            [list(files)],
        )

    def read_rows(self, table: str | None = None) -> list[dict]:
        """All rows of the table (or of ``table`` in the same file), for tests and tools."""
        con = self._connect(read_only=True)
        try:
            relation = con.table(quote(table or self.table))
            names = relation.columns
            return [dict(zip(names, values)) for values in relation.fetchall()]
        finally:
            con.close()


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
