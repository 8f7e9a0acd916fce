"""The embedded local destination: a table in a DuckDB file, ``duckdb://PATH#TABLE``.

Same schema as the BigQuery table (records → STRUCT, repeated → LIST, DATE, TIME,
TIMESTAMP in UTC) and the same disposition rules. Rows arrive as the newline-delimited
JSON a BigQuery load job would take, and DuckDB parses them against the schema, so a
value that BigQuery would reject fails here too.

The launcher writes the table once the pipeline has finished: the graph stages rows and
dead letters in a folder beside the database file (:mod:`pipeline.staging`), and
:meth:`DuckDBTable.finish` loads them in one DuckDB transaction, so a failed or
interrupted run leaves the table as it was, and WRITE_TRUNCATE replaces rows and schema
atomically. Every problem with the file itself (a folder, not a database, an unwritable
folder, a database another process holds open) is found by preflight, before any input
is read, and reported in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import uuid

import duckdb

from pipeline.destinations import (
    ERRORS_SCHEMA,
    DestinationError,
    Disposition,
    append_schema,
    check_max_failures,
    check_table_state,
    errors_disposition,
    errors_table_name,
)
from pipeline.destinations.base import DEFAULT_URI, Destination, RunContext
from pipeline.ledger import EXPORTED, FILES_SCHEMA, ROW, files_table_name
from pipeline.staging import read_staged, stage_table
from transforms import counters
from schemas.rows import with_empty_lists
from schemas.vr_types import RECORD

SCHEME = "duckdb://"

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,1023}")

#: How the launcher's load connection is set up. A transaction's new rows are written to
#: the file ahead of the commit a whole row group at a time: with DuckDB's 122,880 rows per
#: group and rows of this width (hundreds of columns), a 100,000-row load held them all in
#: memory. With smaller row groups and one thread (with two, the checkpoint when the file is
#: closed held the whole load again) the load alone peaked at 695 MiB against 1,289 MiB for
#: 100,000 rows (4.7 s against 4.8 s) and at 769 MiB against 1,782 MiB for 300,000 rows, at
#: the price of time there (13.8 s against 9.3 s): ``bench/destinations.py --load-memory``.
LOAD_ROW_GROUP_SIZE = 8192
LOAD_THREADS = 1
#: Row groups a load gathers before writing them together (DuckDB's
#: ``write_buffer_row_group_count``, 5 by default, in the DuckDB versions that have it): one
#: is written as it fills. A 100,000-row load alone peaked at 503 MiB against 531 MiB, in
#: the same time (7.4 s); a 10,000-row load, under two row groups, the same either way.
LOAD_BUFFERED_ROW_GROUPS = 1
#: The load connection's memory limit: DuckDB otherwise keeps up to 80% of the machine's
#: memory of written blocks cached (692 MiB for a 100,000-row load alone, 492 MiB with
#: this limit; 769 against 539 MiB at 300,000). A load that needs more (DuckDB's
#: OutOfMemoryException: a far wider schema) is rolled back and done again without it.
LOAD_MEMORY_LIMIT = "400MB"
#: The load connection's ``checkpoint_threshold``: a commit whose log would pass it writes
#: its changes into the file itself (a checkpoint) instead of the write-ahead log, which
#: closing the connection would otherwise read back and write into the file a second time.
#: With any commit past it, a load's commit checkpoints: 2,000 rows of the samples took
#: 0.29 s to load against 0.33 s (the log's write, ~0.07 s, and the checkpoint at close,
#: ~0.065 s, against one checkpoint at commit, ~0.08 s); the same time and peak at 10,000
#: and 100,000 rows.
LOAD_CHECKPOINT_THRESHOLD = "0KB"
_ATTACHED = "export"  # the database file's name in a loading connection
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
#: The JSON reader's ``maximum_object_size`` a load starts with. DuckDB reads staged files
#: through a buffer twice that size, filled whenever a file is that large: with
#: :data:`_MAX_ROW_BYTES` a 200 MB buffer, 120 MiB more at the peak of a 100,000-row load
#: staged in files of 276 MB (648 MiB against 528 MiB). Rows DuckDB cannot read within it
#: (from ~32 MB) make the load roll back and run again with :data:`_MAX_ROW_BYTES`.
LOAD_OBJECT_SIZE = 16 * 1024 * 1024
#: Rows come as read, their absent REPEATED fields filled in as they load
#: (:func:`_lists_filled`), for a schema whose lists of records nest at most this deep.
#: DuckDB's memory for nested list_transform grows about twofold per level (a 12-deep
#: chain: ~130 MiB more, 15 deep: ~2.9 GiB; SR documents nest ContentSequence 15 deep),
#: so deeper schemas have their rows completed in Python first (schemas.rows).
MOST_SQL_FILL_DEPTH = 6


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


class DuckDBTable(Destination):
    """A table in a DuckDB database file."""

    takes_rows_as_read = True  # staged as JSON lines; their lists are filled in SQL as they load

    def __init__(self, path: str, table: str):
        self.path, self.table = path, table
        self.incremental = False

    def __eq__(self, other) -> bool:
        return isinstance(other, DuckDBTable) and (self.path, self.table) == (other.path, other.table)

    def __hash__(self) -> int:
        return hash((self.path, self.table))

    def __repr__(self) -> str:
        return f"DuckDBTable({self.path!r}, {self.table!r})"

    @classmethod
    def parse(cls, uri: str, pipeline_options=None) -> "DuckDBTable":
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

    def errors_uri(self) -> str:
        return f"{SCHEME}{self.path}#{errors_table_name(self.table)}"

    def files_uri(self) -> str:
        return f"{SCHEME}{self.path}#{files_table_name(self.table)}"

    def check_options(self, export_options) -> None:
        super().check_options(export_options)
        self.incremental = bool(getattr(export_options, "incremental", False))

    def check_runner(self, local: bool) -> None:
        if not local:
            raise ValueError("a duckdb:// destination needs a local runner; use bq:// or parquet+gs:// on Dataflow")

    def staging_prefix(self) -> str:
        """Beside the database file, hidden: ``DIR/.NAME.staging-RUN``."""
        folder, name = os.path.split(os.path.abspath(self.path))
        return os.path.join(folder, "." + name)

    # -- opening the file ----------------------------------------------------------------

    def _connect(self, read_only: bool = False, load: bool = False, memory_limit: str | None = None):
        """A connection, or DestinationError in one line saying what is wrong with the file.
        With ``read_only``, None if the file does not exist. With ``load``, a connection to
        load rows with (see :data:`LOAD_ROW_GROUP_SIZE`), within ``memory_limit``."""
        self._check_path()
        if read_only and not os.path.exists(self.path):
            return None
        try:
            if not load:
                return duckdb.connect(self.path, read_only=read_only)
            # spills go beside the database, as with a connection to the file itself
            config = {"threads": LOAD_THREADS, "temp_directory": self.path + ".tmp",
                      "checkpoint_threshold": LOAD_CHECKPOINT_THRESHOLD}
            if memory_limit:
                config["memory_limit"] = memory_limit
            con = duckdb.connect(config=config)
            try:  # the row group size is an option of ATTACH only
                if con.execute("SELECT count(*) FROM duckdb_settings() WHERE name = 'write_buffer_row_group_count'"
                               ).fetchone()[0]:
                    con.execute(f"SET write_buffer_row_group_count = {LOAD_BUFFERED_ROW_GROUPS}")
                con.execute(f"ATTACH {_sql_string(self.path)} AS {quote(_ATTACHED)} (ROW_GROUP_SIZE {LOAD_ROW_GROUP_SIZE})")
                con.execute(f"USE {quote(_ATTACHED)}")
            except BaseException:
                con.close()
                raise
            return con
        except duckdb.OutOfMemoryException:
            raise  # a load within too small a memory limit: done again without one (write)
        except duckdb.Error as error:
            raise DestinationError(self._open_problem(error)) from None

    def _check_path(self) -> None:
        if os.path.isdir(self.path):
            raise DestinationError(
                f"{self.path} is a folder; a duckdb:// destination names a database file in it, "
                f"e.g. duckdb://{os.path.join(self.path, 'dicom_metadata.duckdb')}#{self.table}"
            )
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise DestinationError(f"the folder for {self.path} does not exist; create it first")

    def _open_problem(self, error: Exception) -> str:
        text = str(error)
        if "lock" in text.lower():
            holder = re.search(r"\(PID (\d+)\)", text)
            by = f" (process {holder.group(1)})" if holder else ""
            return (
                f"the DuckDB database {self.path} is open in another process{by}; close it there "
                "(e.g. the notebook's connection) and run again"
            )
        if "not a valid DuckDB database" in text or "not a DuckDB" in text:
            return f"{self.path} is not a DuckDB database file; name a new file or an existing DuckDB database"
        if "permission denied" in text.lower() or "read-only" in text.lower():
            return f"cannot write to {self.path} (permission denied); choose a file in a folder you can write to"
        first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return f"cannot open the DuckDB database {self.path}: {first_line}"

    def _check_folder_writable(self) -> None:
        """The database does not exist yet: prove that it can be created."""
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise DestinationError(
                f"cannot create {self.path}: the folder {folder} is not writable ({error.strerror}); "
                "choose a folder you can write to"
            ) from None

    # -- reading the table's state -------------------------------------------------------

    @staticmethod
    def _exists(con, table: str) -> bool:
        return bool(
            con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = ? AND table_schema = 'main' "
                "AND table_catalog = current_database()",
                [table],
            ).fetchone()[0]
        )

    @staticmethod
    def _schema(con, table: str) -> list[dict]:
        relation = con.table(quote(table))
        return [_bigquery_field(name, t) for name, t in zip(relation.columns, relation.types)]

    def _state(self, con) -> tuple[bool, int | None]:
        exists = self._exists(con, self.table)
        count = con.execute(f"SELECT count(*) FROM {quote(self.table)}").fetchone()[0] if exists else None
        return exists, count

    def preflight(self, disposition: Disposition) -> None:
        """Before any file is read: the file can be opened for writing (by this process
        alone) or created, and the table's state allows ``disposition``."""
        self._check_path()
        if not os.path.exists(self.path):
            self._check_folder_writable()
            return
        if not os.access(self.path, os.W_OK):
            raise DestinationError(f"cannot write to {self.path} (permission denied); choose a file you can write to")
        con = self._connect()
        try:
            exists, count = self._state(con)
            has_files = self._exists(con, files_table_name(self.table))
        finally:
            con.close()
        check_table_state(str(self), disposition, exists, count)
        if self.incremental and exists and not disposition.replaces and not has_files:
            raise DestinationError(
                f"table {self} has no files table {files_table_name(self.table)} (it was written by an older "
                "version), so --incremental cannot tell which files it holds; rebuild it once with "
                "--incremental --write-disposition WRITE_TRUNCATE"
            )

    def recorded_files(self, context: RunContext):
        """The files table's records, read once by a worker of the pipeline (the
        database is not open in the launcher meanwhile)."""
        import apache_beam as beam

        if not self._read_ledger(context, lambda con, files_table: True):
            return None
        reference = (self.path, files_table_name(self.table))
        return beam.Create([reference]) | "Records" >> beam.FlatMap(_read_files_table)

    def read_recorded_files(self, context: RunContext):
        return self._read_ledger(context, lambda con, files_table: list(_records(con, files_table)))

    def _read_ledger(self, context: RunContext, read):
        """``read(connection, files table)`` on a read-only connection; None if the run
        rebuilds the table or there is no table with a files table to compare with (a new
        table: every listed file is read)."""
        if context.disposition.replaces:
            return None
        con = self._connect(read_only=True)
        if con is None:
            return None
        try:
            files_table = files_table_name(self.table)
            if not self._exists(con, self.table) or not self._exists(con, files_table):
                return None
            return read(con, files_table)
        finally:
            con.close()

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

    def attach(self, outputs, context: RunContext) -> None:
        """Stage rows, dead letters and schema in the run's folder beside the database."""
        stage_table(outputs, context.staging)

    def finish(self, context: RunContext) -> None:
        """Load what the run staged, unless too many instances failed."""
        check_max_failures(context.counts.get("failed", 0), context.max_failures, str(self))
        staged = read_staged(context.staging)
        written = self.write(
            staged.schema,
            staged.row_files,
            context.disposition,
            error_files=staged.dead_letter_files,
            file_record_files=staged.file_record_files,
            gone_files=staged.gone_files,
            incremental=context.incremental,
            prune_missing=context.prune_missing,
        )
        context.counts.update(written)

    def write(
        self,
        schema: list[dict],
        row_files: list[str],
        disposition: Disposition,
        error_files: list[str] = (),
        file_record_files: list[str] = (),
        gone_files: list[str] = (),
        incremental: bool = False,
        prune_missing: bool = False,
    ) -> dict:
        """Load the rows (NDJSON files), dead letters and file records, all or nothing;
        return the row counts (rows added, replaced, pruned; SOPInstanceUIDs already in
        the table for a plain WRITE_APPEND).

        The table's state is checked again inside the transaction, so a table that
        changed since preflight is never overwritten against the disposition. With
        ``incremental``, the rows of the SOPInstanceUIDs read are replaced, the files
        table is updated by path and, with ``prune_missing``, the gone files' records and
        the rows no exported file records any more are deleted — in the same transaction.
        """
        arguments = (schema, row_files, disposition, error_files, file_record_files, gone_files, incremental,
                     prune_missing)
        memory_limit, object_size = LOAD_MEMORY_LIMIT, LOAD_OBJECT_SIZE
        while True:  # each failed attempt was rolled back: nothing was written
            try:
                return self._write(*arguments, memory_limit=memory_limit, object_size=object_size)
            except _OutOfMemoryBeforeCommit:
                if memory_limit is None:
                    raise DestinationError(
                        f"DuckDB ran out of memory loading the export; nothing was written to {self}"
                    ) from None
                logging.getLogger(__name__).info("DuckDB's load needs more than %s; loading without a limit",
                                                 memory_limit)
                memory_limit = None
            except _RowLargerThanBuffer:  # raised only below _MAX_ROW_BYTES
                logging.getLogger(__name__).info("A row is larger than DuckDB's JSON buffer; loading with a "
                                                 "larger one")
                object_size = _MAX_ROW_BYTES

    def _write(self, schema, row_files, disposition, error_files, file_record_files, gone_files, incremental,
               prune_missing, memory_limit: str | None, object_size: int = _MAX_ROW_BYTES) -> dict:
        try:
            con = self._connect(load=True, memory_limit=memory_limit)
        except duckdb.OutOfMemoryException:
            raise _OutOfMemoryBeforeCommit() from None
        try:
            con.execute("BEGIN TRANSACTION")
            exists, count = self._state(con)
            check_table_state(str(self), disposition, exists, count)
            appended = exists and not disposition.replaces
            extended = False
            if appended:
                existing = self._schema(con, self.table)
                schema = append_schema(schema, existing, str(self))
                extended = schema != existing
                if extended:
                    self._replace(con, self.table, schema, copy_rows=True)
            else:
                self._replace(con, self.table, schema, copy_rows=False)

            new_files = "__dicom_bq_export_new_files"
            self._replace(con, new_files, FILES_SCHEMA, copy_rows=False, temporary=True)
            self._insert(con, new_files, FILES_SCHEMA, file_record_files)
            new_sops = f"SELECT SOPInstanceUID FROM {new_files} WHERE outcome = '{ROW}'"
            written = {}
            replaced = 0
            if appended and incremental:
                replaced = con.execute(
                    f"DELETE FROM {quote(self.table)} WHERE SOPInstanceUID IN ({new_sops})"
                ).fetchone()[0]
                written[counters.ROWS_REPLACED] = replaced
            elif appended:
                written[counters.ALREADY_IN_TABLE] = con.execute(
                    f"SELECT count(DISTINCT SOPInstanceUID) FROM {quote(self.table)} "
                    f"WHERE SOPInstanceUID IN ({new_sops})"
                ).fetchone()[0]
            # Rows as read: their lists (the table's too, on an append) are filled in as they
            # are inserted, or, for a deep schema, in Python first (MOST_SQL_FILL_DEPTH).
            fill_lists = _fill_depth(schema) <= MOST_SQL_FILL_DEPTH
            if not fill_lists:
                row_files = _completed_copies(row_files, schema)
            try:
                inserted = self._insert(con, self.table, schema, row_files, fill_lists=fill_lists,
                                        object_size=object_size)
            except duckdb.OutOfMemoryException:
                raise
            except duckdb.Error as error:
                if (isinstance(error, duckdb.InvalidInputException) and object_size < _MAX_ROW_BYTES
                        and "maximum_object_size" in str(error)):
                    raise _RowLargerThanBuffer() from None
                raise DestinationError(
                    f"DuckDB rejected a row of the export ({type(error).__name__}); nothing was written to "
                    f"{self}. The message is withheld: it may quote a value."
                ) from None
            if extended:  # the table's own rows lack the REPEATED fields this run added
                _fill_empty_lists(con, self.table, schema)
            if incremental:
                written[counters.ROWS_ADDED] = inserted - replaced

            errors = errors_table_name(self.table)
            if errors_disposition(disposition) is not Disposition.WRITE_APPEND or not self._exists(con, errors):
                self._replace(con, errors, ERRORS_SCHEMA, copy_rows=False)
            self._insert(con, errors, ERRORS_SCHEMA, error_files)

            files = quote(files_table_name(self.table))
            if (
                not appended
                or errors_disposition(disposition) is not Disposition.WRITE_APPEND
                or not self._exists(con, files_table_name(self.table))
            ):
                self._replace(con, files_table_name(self.table), FILES_SCHEMA, copy_rows=False)
            else:
                con.execute(f"DELETE FROM {files} WHERE path IN (SELECT path FROM {new_files})")
            con.execute(f"INSERT INTO {files} SELECT * FROM {new_files}")
            if prune_missing:
                gone = "__dicom_bq_export_gone"
                self._replace(con, gone, [{"name": "path", "type": "STRING"}], copy_rows=False, temporary=True)
                self._insert(con, gone, [{"name": "path", "type": "STRING"}], gone_files)
                con.execute(f"DELETE FROM {files} WHERE path IN (SELECT path FROM {gone})")
                exported = ", ".join(f"'{outcome}'" for outcome in EXPORTED)
                written[counters.ROWS_PRUNED] = con.execute(
                    f"DELETE FROM {quote(self.table)} WHERE SOPInstanceUID IS NULL OR SOPInstanceUID NOT IN "
                    f"(SELECT SOPInstanceUID FROM {files} WHERE outcome IN ({exported}) AND SOPInstanceUID IS NOT NULL)"
                ).fetchone()[0]
            con.execute("COMMIT")
        except duckdb.OutOfMemoryException:  # COMMIT included: a failed commit is rolled back
            with contextlib.suppress(duckdb.Error):  # DuckDB may have rolled back already
                con.execute("ROLLBACK")
            raise _OutOfMemoryBeforeCommit() from None
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return written

    @staticmethod
    def _replace(con, table: str, schema: list[dict], copy_rows: bool, temporary: bool = False) -> None:
        """(Re)create ``table`` with ``schema``, keeping its rows if ``copy_rows``."""
        columns = ", ".join(f"{quote(f['name'])} {duckdb_type(f)}" for f in schema)
        if not copy_rows:
            kind = "TEMPORARY TABLE" if temporary else "TABLE"
            con.execute(f"CREATE OR REPLACE {kind} {quote(table)} ({columns})")
            return
        staging = quote(table + "__staging")
        con.execute(f"CREATE OR REPLACE TABLE {staging} ({columns})")
        con.execute(f"INSERT INTO {staging} BY NAME SELECT * FROM {quote(table)}")
        con.execute(f"DROP TABLE {quote(table)}")
        con.execute(f"ALTER TABLE {staging} RENAME TO {quote(table)}")

    @staticmethod
    def _insert(con, table: str, schema: list[dict], files: list[str], fill_lists: bool = False,
                object_size: int = _MAX_ROW_BYTES) -> int:
        """Insert the rows of NDJSON ``files``, each at most ``object_size`` bytes (DuckDB's
        ``maximum_object_size``); return how many. With ``fill_lists``, absent or null
        REPEATED fields become ``[]`` at every level (rows as read, see :func:`_lists_filled`)."""
        files = [f for f in files if os.path.getsize(f)]
        if not files:
            return 0
        columns = "{" + ", ".join(f"{_sql_string(f['name'])}: {_sql_string(duckdb_type(f))}" for f in schema) + "}"
        select = "*"
        if fill_lists and _has_repeated(schema):
            select = ", ".join(
                f"{_lists_filled(quote(f['name']), f)} AS {quote(f['name'])}" if _has_repeated([f]) else quote(f["name"])
                for f in schema
            )
        return con.execute(
            f"INSERT INTO {quote(table)} BY NAME SELECT {select} FROM read_json(?, format='newline_delimited', "
            f"columns={columns}, maximum_object_size={int(object_size)})",
            [list(files)],
        ).fetchone()[0]

    def read_rows(self, table: str | None = None) -> list[dict]:
        """All rows of the table (or of ``table`` in the same file), for tests and tools."""
        con = self._connect(read_only=True)
        try:
            relation = con.table(quote(table or self.table))
            names = relation.columns
            return [dict(zip(names, values)) for values in relation.fetchall()]
        finally:
            con.close()


def _read_files_table(reference: tuple[str, str]):
    """The records (path, version, outcome) of a files table in a DuckDB file."""
    path, table = reference
    with duckdb.connect(path, read_only=True) as con:
        yield from _records(con, table)


def _records(con, table: str):
    cursor = con.execute(f"SELECT path, version, outcome FROM {quote(table)}")
    while batch := cursor.fetchmany(10_000):
        for record_path, version, outcome in batch:
            yield {"path": record_path, "version": version, "outcome": outcome}


def _fill_depth(fields: list[dict]) -> int:
    """How deep :func:`_lists_filled` nests list_transform for ``fields``: lists of
    records with REPEATED fields inside, counted along the deepest path."""
    depth = 0
    for field in fields:
        members = field.get("fields") or []
        if members and _has_repeated(members):
            depth = max(depth, _fill_depth(members) + (field.get("mode") == "REPEATED"))
    return depth


def _completed_copies(files: list[str], schema: list[dict]) -> list[str]:
    """Each NDJSON file of rows as read copied beside it with every row completed
    (:func:`schemas.rows.with_empty_lists`), one row at a time; the copies' paths. A copy
    made for the same schema (a load done again without the memory limit) is reused."""
    key = uuid.uuid5(uuid.NAMESPACE_OID, json.dumps(schema, sort_keys=True)).hex[:12]
    completed = []
    for path in files:
        copy = f"{path[: -len('.json')]}.completed-{key}"  # not a staged file name (pipeline.staging.read_staged)
        if not os.path.exists(copy):
            with open(path, encoding="utf-8") as rows, open(copy + ".partial", "w", encoding="ascii") as out:
                for line in rows:
                    out.write(json.dumps(with_empty_lists(json.loads(line), schema)) + "\n")
            os.replace(copy + ".partial", copy)
        completed.append(copy)
    return completed


def _has_repeated(fields: list[dict]) -> bool:
    return any(f.get("mode") == "REPEATED" or _has_repeated(f.get("fields") or []) for f in fields)


def _lists_filled(expr: str, field: dict, depth: int = 0) -> str:
    """A SQL expression for ``expr`` (of ``field``'s type) with NULL lists as ``[]`` at
    every level, the SQL twin of :func:`schemas.rows.with_empty_lists`: for rows as they
    are loaded, and for rows already in a table that gains REPEATED fields."""
    repeated = field.get("mode") == "REPEATED"
    if field["type"] not in (RECORD, "STRUCT"):
        return f"coalesce({expr}, CAST([] AS {duckdb_type(field)}))" if repeated else expr
    members = field["fields"]
    if not repeated:
        return _struct_filled(expr, members, depth) if _has_repeated(members) else expr
    listed = f"coalesce({expr}, CAST([] AS {duckdb_type(field)}))"
    if not _has_repeated(members):
        return listed
    # The NULL list is replaced before its items are transformed, never after: coalesce()
    # around the transform would repeat it, twice per level (2^depth: SR documents nest
    # ContentSequence 15 deep), where around a field reference it repeats only that.
    item = f"item{depth}"
    return f"list_transform({listed}, lambda {item}: {_struct_filled(item, members, depth + 1)})"


def _struct_filled(expr: str, members: list[dict], depth: int) -> str:
    packed = ", ".join(
        f"{quote(member['name'])} := {_lists_filled(expr + '.' + quote(member['name']), member, depth)}"
        for member in members
    )
    return f"CASE WHEN {expr} IS NULL THEN NULL ELSE struct_pack({packed}) END"


def _fill_empty_lists(con, table: str, schema: list[dict]) -> None:
    """Replace NULL lists by ``[]`` in every column that has a REPEATED field."""
    assignments = [
        f"{quote(field['name'])} = {_lists_filled(quote(field['name']), field)}"
        for field in schema
        if field.get("mode") == "REPEATED" or _has_repeated(field.get("fields") or [])
    ]
    if assignments:
        con.execute(f"UPDATE {quote(table)} SET " + ", ".join(assignments))


class _OutOfMemoryBeforeCommit(Exception):
    """DuckDB ran out of memory before the load committed: nothing was written."""


class _RowLargerThanBuffer(Exception):
    """A staged row is larger than the JSON reader's ``maximum_object_size`` of the attempt
    (below BigQuery's row limit): rolled back, nothing was written."""


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
