"""The Parquet destination: ``parquet://DIR`` (a local folder) or ``parquet+gs://BUCKET/PREFIX``.

The table is the folder's ``*.parquet`` files plus ``_schema.json`` (the BigQuery JSON
schema, as ``bq mk`` and ``bq load --schema`` take it) and ``_manifest.json`` (the run
that wrote it, its files and row counts). Every shard carries the whole schema, so DuckDB
``read_parquet('DIR/**/*.parquet')``, ``pyarrow.dataset``, Spark and Polars read the folder
as one table, and ``bq load --source_format=PARQUET --parquet_enable_list_inference``
yields exactly ``_schema.json`` (types: :mod:`schemas.arrow`). Dead letters go to the
sibling folder ``DIR_errors`` the same way, and the files table (:mod:`pipeline.ledger`)
to ``DIR_files``, whose shards the table's own ``_manifest.json`` lists
(``files_table``): one manifest write commits the table and its files table together.

How a run stays atomic. Workers write shards into a staging folder beside the table
(``.NAME.staging-RUN``), never into it; one commit step at the end of the pipeline
checks the table's state again and puts the new folder in place:

* **Locally** the staging folder is made complete (new shards, old shards hard-linked
  for WRITE_APPEND, ``_schema.json``, ``_manifest.json``) and swapped with the table
  folder in one ``renameat2(RENAME_EXCHANGE)``; where that is missing, two renames, and
  the next run puts the old folder back if it was killed between them.
* **On Cloud Storage** (no rename, no multi-object transaction) the new shards are copied
  into the folder under new names, then ``_manifest.json`` is written (a single-object
  write, so atomic: this is the commit), then ``_schema.json``, then the replaced shards
  are deleted. A reader that follows ``_manifest.json`` always sees one whole table. A
  reader that globs ``*.parquet`` sees, during the seconds between the copies and the
  deletes, the old table plus (some of) the new shards; after the run, exactly the new
  table. A run killed in that window leaves shards the manifest does not list: the next
  run (or any preflight) deletes them, and the manifest's table is the one kept.

The files table's new shards are put into ``DIR_files`` under new names *before* the
table's commit (no manifest lists them yet), and after it ``DIR_files/_manifest.json`` is
rewritten and the shards no longer listed are deleted; recovery does either half again
from the table's manifest. So a reader that follows ``DIR/_manifest.json`` always sees a
table and a files table of the same run, and a killed run leaves the old pair or the new
one. One that globs ``DIR_files/*.parquet`` may see both runs' records during the commit
(and after a run killed then, until the next run or preflight tidies the folder).

``--incremental`` (WRITE_APPEND on a table with a files table) replaces the rows of the
SOPInstanceUIDs the run wrote and, with ``--prune-missing``, removes the rows no exported
file records: only the shards holding such rows are rewritten (found by reading their
``SOPInstanceUID`` column alone), the others are kept as they are, and a run that changes
nothing writes nothing. :meth:`ParquetTable.recorded_files` reads the ledger from the
files table's shards alone.

WRITE_APPEND keeps the old shards. When it widens the schema, the old shards are
rewritten with the widened schema (new fields NULL, new REPEATED fields ``[]``), so
that every shard still carries the whole schema: readers that take the first file's
schema (``pyarrow.dataset``, BigQuery external tables, Spark without ``mergeSchema``)
see the new columns, and a REPEATED field is never NULL. A folder holds one export's
table: other files in it are an error, and two exports must not write one folder at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import posixpath
import re
import shutil
import uuid
from typing import NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsList, AsSingleton
from apache_beam.transforms.window import GlobalWindows

from pipeline.destinations import (
    ERRORS_SCHEMA,
    DestinationError,
    Disposition,
    check_table_state,
    load_schema,
)
from pipeline.destinations.base import Destination, RunContext
from pipeline.ledger import EXPORTED, FILES_SCHEMA, files_table_name
from schemas.arrow import arrow_schema, record_converter, to_arrow_table
from schemas.merge import extend_schema, schema_conflicts
from transforms import counters

LOCAL_SCHEME = "parquet://"
GCS_SCHEME = "parquet+gs://"
SCHEMA_FILE = "_schema.json"
MANIFEST_FILE = "_manifest.json"
SHARD_SUFFIX = ".parquet"

#: Rows per row group. Measured with bench/destinations.py on the samples' rows (218
#: columns, 543 leaf fields): row groups of 1,000 rows make a footer of 1.7 MB per 20,000
#: rows and reads 2-4x slower; 10,000 to 50,000 rows compress 2-7x better and read fast.
#: 20,000 rows of this width are about 75 MB in Arrow, the most a worker holds per file.
ROWS_PER_ROW_GROUP = 20_000
#: Rows converted to Arrow at a time, so that few rows are held as Python dicts.
ROWS_PER_BATCH = 1_000
#: Rows per file before a bundle starts a new one (files of a few tens of MB).
ROWS_PER_FILE = 200_000
#: Parquet writer settings: zstd compresses the export's repetitive text about as fast as
#: snappy and much smaller; pages of 1 MiB (the format's default) keep page indexes small.
WRITER_OPTIONS = {"compression": "zstd", "data_page_size": 1 << 20, "write_statistics": True,
                  "use_compliant_nested_type": True}


class ParquetShard(NamedTuple):
    """One Parquet file written by :class:`WriteParquetShards`."""

    path: str
    rows: int


# -- writing shards in the pipeline ---------------------------------------------------------

class _WriteShardsFn(beam.DoFn):
    """Rows → Parquet files in ``directory``, one or more per bundle, each with the whole schema.

    Rows are converted to Arrow ``ROWS_PER_BATCH`` at a time and written
    ``rows_per_row_group`` at a time as one row group; a file is closed after
    ``rows_per_file`` rows and at the end of the bundle. Yields a :class:`ParquetShard`
    per closed file: a retried bundle's files are never yielded twice, so the consumer
    uses the yielded list, not a listing of the folder.
    """

    def __init__(self, directory: str, schema: list[dict] | None, rows_per_row_group: int, rows_per_file: int,
                 file_prefix: str):
        self.directory = directory
        self.schema = schema
        self.rows_per_row_group = rows_per_row_group
        self.rows_per_file = rows_per_file
        self.file_prefix = file_prefix
        self._schema = self._schema_key = None

    def start_bundle(self):
        self._pending: list[dict] = []
        self._batches: list[pa.Table] = []
        self._batched = 0
        self._writer = None

    def process(self, row, schema=None):
        schema = self.schema if schema is None else schema
        if schema is not self._schema:
            key = json.dumps(schema, sort_keys=True)
            if key != self._schema_key:
                yield from self._flush(close=True)
                self._schema_key = key
                self._arrow = arrow_schema(schema)
                self._convert = record_converter(schema)
            self._schema = schema
        self._pending.append(row)
        if len(self._pending) >= min(ROWS_PER_BATCH, self.rows_per_row_group):
            self._convert_pending()
            if self._batched >= self.rows_per_row_group:
                yield from self._flush(close=False)

    def finish_bundle(self):
        for shard in self._flush(close=True):
            yield GlobalWindows.windowed_value(shard)

    def _convert_pending(self):
        if self._pending:
            self._batches.append(to_arrow_table(self._pending, self._arrow, self._convert))
            self._batched += len(self._pending)
            self._pending = []

    def _flush(self, close: bool):
        self._convert_pending()
        if self._batches:
            table = pa.concat_tables(self._batches)
            self._batches, self._batched = [], 0
            if self._writer is None:
                self._path = FileSystems.join(self.directory, f"{self.file_prefix}-{uuid.uuid4().hex}{SHARD_SUFFIX}")
                self._handle = FileSystems.create(self._path, compression_type=CompressionTypes.UNCOMPRESSED)
                self._writer = pq.ParquetWriter(self._handle, self._arrow, **WRITER_OPTIONS)
                self._rows = 0
            self._writer.write_table(table, row_group_size=len(table))
            self._rows += len(table)
        if self._writer is not None and (close or self._rows >= self.rows_per_file):
            self._writer.close()
            self._handle.close()
            self._writer = None
            yield ParquetShard(self._path, self._rows)


class WriteParquetShards(beam.PTransform):
    """Rows (dicts in BigQuery JSON form) → Parquet files in ``directory`` (local or ``gs://``).

    ``schema`` is the BigQuery JSON schema: a PCollection holding it as its one element
    (a side input, e.g. the merged schema) or a plain list. Returns a PCollection of
    :class:`ParquetShard`. Files that a failed bundle left behind are not in it.
    """

    def __init__(self, directory: str, schema, *, rows_per_row_group: int = ROWS_PER_ROW_GROUP,
                 rows_per_file: int = ROWS_PER_FILE, file_prefix: str = "part"):
        super().__init__()
        self.directory = directory
        self.schema = schema
        self.rows_per_row_group = rows_per_row_group
        self.rows_per_file = rows_per_file
        self.file_prefix = file_prefix

    def expand(self, rows):
        fixed = None if isinstance(self.schema, beam.PCollection) else list(self.schema)
        fn = _WriteShardsFn(self.directory, fixed, self.rows_per_row_group, self.rows_per_file, self.file_prefix)
        if fixed is not None:
            return rows | "WriteShards" >> beam.ParDo(fn)
        return rows | "WriteShards" >> beam.ParDo(fn, AsSingleton(self.schema))


def load_parquet_into_duckdb(con, table: str, schema: list[dict], files: list[str]) -> None:
    """Insert the rows of Parquet ``files`` (written with ``schema``) into the DuckDB ``table``.

    Columns match by name. TIMESTAMP columns are stored adjusted to UTC in Parquet; the
    insert runs with the session time zone set to UTC so that DuckDB's TIMESTAMPTZ →
    TIMESTAMP cast keeps the UTC wall time (as the JSON load does), whatever the
    machine's zone.
    """
    files = list(files)
    if not files:
        return
    columns = ", ".join('"' + field["name"].replace('"', '""') + '"' for field in schema)
    previous = con.execute("SELECT current_setting('TimeZone')").fetchall()[0][0]
    con.execute("SET TimeZone = 'UTC'")
    try:
        con.execute(
            f'INSERT INTO "{table.replace(chr(34), chr(34) * 2)}" BY NAME '
            f"SELECT {columns} FROM read_parquet(?, union_by_name = true)",
            [files],
        )
    finally:
        con.execute("SET TimeZone = ?", [previous])


# -- the table's state ----------------------------------------------------------------------

@dataclasses.dataclass
class FolderState:
    """What a table folder holds: its schema and files (names relative to the folder)."""

    exists: bool
    schema: list[dict] | None = None
    files: dict[str, int] = dataclasses.field(default_factory=dict)  # name → rows
    run: str | None = None
    unlisted: list[str] = dataclasses.field(default_factory=list)  # *.parquet not in the manifest
    files_table: dict[str, int] | None = None  # the files table's shards in DIR_files (None: no files table)

    @property
    def rows(self) -> int:
        return sum(self.files.values())


def _list_folder(path: str) -> list[str]:
    """Names of every file under ``path`` (relative, with ``/`` for subfolders)."""
    if path.startswith("gs://"):
        prefix = path + "/"
        matched = FileSystems.match([prefix + "**"])[0].metadata_list
        return sorted(m.path[len(prefix):] for m in matched)
    if not os.path.isdir(path):
        return []
    names = []
    for root, _dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        names += [name if rel == "." else posixpath.join(rel.replace(os.sep, "/"), name) for name in files]
    return sorted(names)


def _read_json(path: str):
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return json.loads(handle.read().decode("utf-8"))


def _write_bytes(path: str, data: bytes) -> None:
    uncompressed = CompressionTypes.UNCOMPRESSED
    with FileSystems.create(path, mime_type="application/json", compression_type=uncompressed) as handle:
        handle.write(data)


def _footer_rows(path: str) -> int:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def read_folder_state(path: str, uri: str) -> FolderState:
    """The table in the folder ``path``; :class:`DestinationError` if the folder holds
    anything that is not part of one."""
    names = _list_folder(path)
    foreign = [n for n in names if "/" in n or not (n.endswith(SHARD_SUFFIX) or n in (SCHEMA_FILE, MANIFEST_FILE))]
    if foreign:
        raise DestinationError(
            f"{uri} holds {len(foreign):,} file(s) that are not part of a Parquet table this export writes "
            f"(e.g. {foreign[0]!r}); name an empty or new folder, or the folder of an earlier export"
        )
    shards = [n for n in names if n.endswith(SHARD_SUFFIX)]
    if MANIFEST_FILE in names:
        manifest = _read_json(FileSystems.join(path, MANIFEST_FILE))
        files = {entry["name"]: int(entry["rows"]) for entry in manifest["files"]}
        missing = sorted(set(files) - set(shards))
        if missing:
            raise DestinationError(f"{uri} is damaged: {missing[0]!r}, listed in {MANIFEST_FILE}, is missing")
        files_table = manifest.get("files_table")
        if files_table is not None:
            files_table = {entry["name"]: int(entry["rows"]) for entry in files_table}
        return FolderState(True, manifest["schema"], files, manifest.get("run"),
                           [n for n in shards if n not in files], files_table)
    if SCHEMA_FILE in names:
        files = {n: _footer_rows(FileSystems.join(path, n)) for n in shards}
        return FolderState(True, _read_json(FileSystems.join(path, SCHEMA_FILE)), files)
    if shards:
        raise DestinationError(
            f"{uri} holds Parquet files but no {SCHEMA_FILE}, so it is not a table this export wrote; "
            "name an empty or new folder"
        )
    return FolderState(False)


def _manifest(schema: list[dict], files: dict[str, int], run: str, files_table: dict[str, int] | None = None) -> bytes:
    """The manifest: the run, the schema, the shards and, for a table, the shards of its
    files table in the sibling folder ``DIR_files`` (so that one write commits both)."""

    def entries(listing):
        return [{"name": name, "rows": rows} for name, rows in sorted(listing.items())]

    manifest = {"run": run, "schema": schema, "files": entries(files)}
    if files_table is not None:
        manifest["files_table"] = entries(files_table)
    return json.dumps(manifest, indent=1).encode("utf-8")


def _schema_json(schema: list[dict]) -> bytes:
    return json.dumps(schema, indent=2).encode("utf-8")


# -- local swaps -----------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), a)


def _sibling(path: str, tag: str, run_id: str) -> str:
    """``PARENT/.NAME.TAG-RUN`` beside the folder ``path`` (local or gs://)."""
    parent, name = path.rsplit("/", 1)
    return f"{parent}/.{name}.{tag}-{run_id}"


def _siblings(path: str, tag: str) -> list[str]:
    """Existing leftovers ``.NAME.TAG-*`` beside ``path``."""
    parent, name = path.rsplit("/", 1)
    if path.startswith("gs://"):
        matched = FileSystems.match([f"{parent}/.{name}.{tag}-*/**"])[0].metadata_list
        return sorted({m.path[: m.path.index("/", len(parent) + 1)] for m in matched})
    if not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, e) for e in os.listdir(parent) if e.startswith(f".{name}.{tag}-"))


def _delete_tree(path: str) -> None:
    if path.startswith("gs://"):
        matched = FileSystems.match([path + "/**"])[0].metadata_list
        if matched:
            FileSystems.delete([m.path for m in matched])
    elif os.path.isfile(path):
        os.remove(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover_folder(path: str) -> None:
    """Undo what a killed run left beside (or, on Cloud Storage, in) the table folder.

    Locally: a folder moved aside by an interrupted two-rename swap is put back; staging
    and moved-aside folders are removed. On Cloud Storage: shards the manifest does not
    list are deleted, ``_schema.json`` is rewritten from the manifest, staging removed.
    """
    if path.startswith("gs://"):
        names = _list_folder(path)
        if MANIFEST_FILE in names:
            manifest = _read_json(FileSystems.join(path, MANIFEST_FILE))
            listed = {entry["name"] for entry in manifest["files"]}
            unlisted = [FileSystems.join(path, n) for n in names if n.endswith(SHARD_SUFFIX) and n not in listed]
            if unlisted:
                FileSystems.delete(unlisted)
            if SCHEMA_FILE not in names or _read_json(FileSystems.join(path, SCHEMA_FILE)) != manifest["schema"]:
                _write_bytes(FileSystems.join(path, SCHEMA_FILE), _schema_json(manifest["schema"]))
    else:
        aside = _siblings(path, "old")
        if aside and not os.path.exists(path):
            os.rename(aside[-1], path)
            aside = aside[:-1]
        for leftover in aside:
            _delete_tree(leftover)
    for leftover in _siblings(path, "staging"):
        _delete_tree(leftover)


# -- the files table ---------------------------------------------------------------------------

#: How this module names the shards it writes: the only ``*.parquet`` files recovery deletes.
_SHARD_NAME = re.compile(r"[A-Za-z0-9_]+-[0-9a-f]{32}\.parquet")


def files_folder(path: str) -> str:
    """The folder of the files table of the table folder ``path``: ``DIR_files``."""
    return files_table_name(path)


def _listed_files_table(path: str) -> tuple[dict[str, int], str | None]:
    """The files table's shards that the table's ``_manifest.json`` lists, and its run."""
    manifest_path = FileSystems.join(path, MANIFEST_FILE)
    if not FileSystems.exists(manifest_path):
        return {}, None
    manifest = _read_json(manifest_path)
    return {entry["name"]: int(entry["rows"]) for entry in manifest.get("files_table") or []}, manifest.get("run")


def _replace_bytes(path: str, data: bytes) -> None:
    """Write a small file so that a reader sees the old or the new content, never a part:
    on Cloud Storage one object write is that; locally a write beside, then a rename."""
    if path.startswith("gs://"):
        _write_bytes(path, data)
        return
    folder, name = os.path.split(path)
    temporary = _sibling(folder, "staging", f"{name}-{uuid.uuid4().hex}")
    _write_bytes(temporary, data)
    os.replace(temporary, path)


def recover_files_folder(path: str) -> None:
    """Make ``DIR_files`` hold exactly the files table that the table's ``_manifest.json``
    (the commit point of both) lists.

    Shards of a run killed before its commit are deleted; after a commit, the files
    table's own ``_schema.json`` and ``_manifest.json`` are written and the shards it no
    longer lists deleted; staging leftovers beside it are removed. A folder holding
    anything this module does not write is left alone (preflight refuses it), and only
    shards named as this module names them are deleted.
    """
    folder = files_folder(path)
    for leftover in _siblings(folder, "staging"):  # records of a killed run, a manifest not yet in place
        _delete_tree(leftover)
    names = _list_folder(folder)
    if not names or any(not (_SHARD_NAME.fullmatch(n) or n in (SCHEMA_FILE, MANIFEST_FILE)) for n in names):
        return
    listed, run = _listed_files_table(path)
    stray = [FileSystems.join(folder, n) for n in names if n.endswith(SHARD_SUFFIX) and n not in listed]
    if stray:
        FileSystems.delete(stray)
    if listed:
        manifest = _manifest(FILES_SCHEMA, listed, run)
        if SCHEMA_FILE not in names or _read_json(FileSystems.join(folder, SCHEMA_FILE)) != FILES_SCHEMA:
            _replace_bytes(FileSystems.join(folder, SCHEMA_FILE), _schema_json(FILES_SCHEMA))
        if MANIFEST_FILE not in names or _read_json(FileSystems.join(folder, MANIFEST_FILE)) != json.loads(manifest):
            _replace_bytes(FileSystems.join(folder, MANIFEST_FILE), manifest)
        return
    metadata = [FileSystems.join(folder, n) for n in (SCHEMA_FILE, MANIFEST_FILE) if n in names]
    if metadata:
        FileSystems.delete(metadata)
    if not folder.startswith("gs://"):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def read_file_records(path: str):
    """The records (``path``, ``version``, ``outcome``) of one shard of a files table."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=10_000, columns=["path", "version", "outcome"]):
            yield from batch.to_pylist()


def _read_columns(path: str, columns: list[str]) -> pa.Table:
    """Only ``columns`` of a shard (those it has)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        parquet = pq.ParquetFile(handle)
        return parquet.read(columns=[c for c in columns if c in parquet.schema_arrow.names])


def _strings(values) -> pa.Array:
    """Distinct non-NULL strings of arrays or chunked arrays, as one array (an ``is_in`` value set)."""
    chunks = [chunk for value in values
              for chunk in (value.chunks if isinstance(value, pa.ChunkedArray) else [value])]
    if not chunks:
        return pa.array([], pa.string())
    return pc.unique(pc.drop_null(pa.concat_arrays([c.cast(pa.string()) for c in chunks])))


def _in(values, value_set: pa.Array) -> pa.Array:
    """``values IN value_set`` per value, NULL counting as not in it."""
    result = pc.fill_null(pc.is_in(values, value_set=value_set), False)
    return result.combine_chunks() if isinstance(result, pa.ChunkedArray) else result


def rows_to_keep(sops, replaced: pa.Array | None, exported: pa.Array | None) -> tuple[pa.Array, int, int]:
    """Which rows of a shard an update keeps, from its ``SOPInstanceUID`` column.

    Removed are, as DuckDB's transaction deletes them: the rows of the ``replaced``
    instances (read again by this run), then with ``exported`` (``--prune-missing``: the
    SOPInstanceUIDs that exported files record) the rows of every other instance, a NULL
    SOPInstanceUID included. Returns the mask of kept rows and the numbers of rows
    replaced and pruned.
    """
    length = len(sops)
    replace = _in(sops, replaced) if replaced is not None else pa.array([False] * length, pa.bool_())
    prune = pa.array([False] * length, pa.bool_())
    if exported is not None:
        prune = pc.and_(pc.invert(_in(sops, exported)), pc.invert(replace))
    keep = pc.invert(pc.or_(replace, prune))
    return keep, pc.sum(replace).as_py() or 0, pc.sum(prune).as_py() or 0


@dataclasses.dataclass
class FilesTableChange:
    """A table run's part in its files table ``DIR_files``: its records (shards written
    into ``staging``), the recorded paths no longer listed, and how the table follows."""

    shards: list[ParquetShard]
    staging: str
    gone: list[str] = dataclasses.field(default_factory=list)
    incremental: bool = False
    prune_missing: bool = False


def _update_files_table(path: str, change: FilesTableChange, old: dict[str, int]):
    """Write the new files table's shards into ``DIR_files`` under new names (invisible to
    a reader that follows a manifest until the table's manifest lists them); return its
    listing and, with ``--prune-missing``, the SOPInstanceUIDs its exported files record.

    ``old`` (the listing to update by path; empty to replace the files table) loses the
    records of the paths this run recorded again and, with ``--prune-missing``, of the
    gone paths: only the shards holding such a path are rewritten, found by reading their
    ``path`` column alone.
    """
    folder = files_folder(path)
    staged = {posixpath.basename(s.path): s.rows for s in change.shards if s.rows}
    moved = {n for n in staged if not FileSystems.exists(FileSystems.join(change.staging, n))}  # a retried commit
    listing: dict[str, int] = {}
    if old:
        dropped = [pa.array(change.gone if change.prune_missing else [], pa.string())]
        dropped += [_read_columns(FileSystems.join(folder if n in moved else change.staging, n), ["path"]).column(0)
                    for n in staged]
        dropped = _strings(dropped)
        for name, rows in old.items():
            source = FileSystems.join(folder, name)
            keep = None
            if len(dropped) and rows:
                keep = pc.invert(_in(_read_columns(source, ["path"]).column("path"), dropped))
            if keep is None or pc.all(keep).as_py():
                listing[name] = rows
            elif pc.any(keep).as_py():
                fresh = _new_name()
                listing[fresh] = _write_shard(source, FileSystems.join(folder, fresh), FILES_SCHEMA, keep)
    if staged.keys() - moved:
        if not folder.startswith("gs://"):
            os.makedirs(folder, exist_ok=True)
        names = sorted(staged.keys() - moved)
        FileSystems.rename([FileSystems.join(change.staging, n) for n in names],
                           [FileSystems.join(folder, n) for n in names])
    listing.update(staged)
    if not listing:
        if not folder.startswith("gs://"):
            os.makedirs(folder, exist_ok=True)
        name = _new_name()
        _write_empty_shard(FileSystems.join(folder, name), FILES_SCHEMA)
        listing[name] = 0
    exported = None
    if change.prune_missing:
        recorded = []
        for name in listing:
            table = _read_columns(FileSystems.join(folder, name), ["SOPInstanceUID", "outcome"])
            recorded.append(pc.filter(table.column("SOPInstanceUID"), _in(table.column("outcome"), pa.array(EXPORTED))))
        exported = _strings(recorded)
    return listing, exported


# -- the commit ------------------------------------------------------------------------------

def _write_shard(source: str, target: str, schema: list[dict], keep: pa.Array | None = None) -> int:
    """Copy a shard with ``schema`` (widened: new fields NULL, new REPEATED fields []),
    keeping only the rows ``keep`` marks (all without it); row group by row group."""
    target_schema = arrow_schema(schema)
    convert = None
    rows = offset = 0
    with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as src, \
            FileSystems.create(target, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
        parquet = pq.ParquetFile(src)
        same = parquet.schema_arrow.remove_metadata().equals(target_schema)
        with pq.ParquetWriter(dst, target_schema, **WRITER_OPTIONS) as writer:
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                if keep is not None:
                    table = table.filter(keep.slice(offset, len(table)))
                    offset += parquet.metadata.row_group(group).num_rows
                if not same:
                    convert = convert or record_converter(schema)
                    table = to_arrow_table(table.to_pylist(), target_schema, convert)
                if len(table):
                    writer.write_table(table, row_group_size=max(len(table), 1))
                rows += len(table)
    return rows


def _write_empty_shard(path: str, schema: list[dict]) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        pq.write_table(to_arrow_table([], schema), handle, **WRITER_OPTIONS)


def _new_name() -> str:
    return f"part-{uuid.uuid4().hex}{SHARD_SUFFIX}"


@dataclasses.dataclass
class _Shard:
    """A shard of the new table: an old one (in the table folder) or a new one (in staging)."""

    name: str
    source: str
    rows: int
    old: bool
    keep: pa.Array | None = None  # rows kept when some are removed
    widen: bool = False  # written with an older schema

    @property
    def rewritten(self) -> bool:
        return self.keep is not None or self.widen


def commit_folder(path: str, uri: str, staging: str, schema: list[dict], shards: list[ParquetShard],
                  disposition: Disposition, run_id: str, files: FilesTableChange | None = None) -> dict:
    """Make the folder ``path`` hold the table the disposition asks for, all or nothing;
    return the row counts of :mod:`transforms.counters` that DuckDB's write reports.

    ``shards`` were written with ``schema`` into ``staging``. The folder's state is checked
    again first (it may have changed since preflight); a run that already committed
    (a retried step) only finishes cleaning up.

    With ``files`` (a table's run, not its dead letters) the files table ``DIR_files`` is
    replaced, or on WRITE_APPEND updated by path, and committed by the same manifest
    write. With ``files.incremental`` the rows of the SOPInstanceUIDs this run wrote are
    removed from the old shards, and with ``files.prune_missing`` the rows no exported
    file records any more: only the shards holding such rows are rewritten, found by
    reading their ``SOPInstanceUID`` column alone; the others are kept as they are. A
    run that changes nothing writes nothing.
    """
    state = read_folder_state(path, uri)
    if state.exists and state.run == run_id:
        recover_folder(path)
        if files is not None:
            recover_files_folder(path)
            _delete_tree(files.staging)
        return {}
    check_table_state(uri, disposition, state.exists, state.rows)
    appended = state.exists and not disposition.replaces
    if appended:
        conflicts = schema_conflicts(schema, state.schema)
        if conflicts:
            raise DestinationError(f"cannot append to {uri}: " + "; ".join(conflicts))
        schema = extend_schema(state.schema, schema)
    target = arrow_schema(schema)

    files_table, exported = (state.files_table if appended else None), None
    if files is not None:
        updates = appended and disposition is Disposition.WRITE_APPEND and state.files_table is not None
        files_table, exported = _update_files_table(path, files, state.files_table if updates else {})
    new = [_Shard(posixpath.basename(s.path), s.path, s.rows, False) for s in shards if s.rows]
    old = [_Shard(name, FileSystems.join(path, name), rows, True)
           for name, rows in (state.files.items() if appended else ()) if rows]

    counts = {}
    if files is not None and "SOPInstanceUID" in target.names:
        counts = _mark_removed_rows(old, new, appended, files, exported)
    kept = [s for s in old + new if s.keep is None or pc.any(s.keep).as_py()]
    for shard in kept:
        shard.widen = _file_schema(shard.source) != target
    unchanged = not new and len(kept) == len(old) and not any(s.rewritten for s in kept)
    if appended and unchanged and schema == state.schema and files_table == state.files_table:
        _delete_tree(staging)  # nothing to change: the folder stays as it is, byte for byte
    elif path.startswith("gs://"):
        _commit_gcs(path, staging, schema, state, kept, files_table, run_id)
    else:
        _commit_local(path, staging, schema, kept, files_table, run_id)
    if files is not None:
        recover_files_folder(path)
        _delete_tree(files.staging)
    return counts


def _sop_column(shard: _Shard):
    return _read_columns(shard.source, ["SOPInstanceUID"]).column(0)


def _mark_removed_rows(old: list[_Shard], new: list[_Shard], appended: bool, files: FilesTableChange,
                       exported: pa.Array | None) -> dict:
    """Set ``keep`` on the shards that lose rows (see :func:`rows_to_keep`) and return the
    counts DuckDB's write reports: with ``--incremental`` rows added, replaced (on an
    existing table) and, with ``--prune-missing``, pruned; for a plain append, the
    instances already in the table. Reads only the ``SOPInstanceUID`` column, and only
    when a row can be concerned."""
    counts: dict[str, int] = {}
    new_sops = _strings(_sop_column(s) for s in new) if appended else pa.array([], pa.string())
    if not files.incremental:
        if appended:
            already = [pc.filter(sops, _in(sops, new_sops)) for sops in map(_sop_column, old if len(new_sops) else [])]
            counts[counters.ALREADY_IN_TABLE] = len(_strings(already))
        return counts
    replaced_rows = pruned_rows = 0
    if len(new_sops) or exported is not None:
        for shard in old + new:
            replaced = new_sops if shard.old else None
            keep, replaced_count, pruned_count = rows_to_keep(_sop_column(shard), replaced, exported)
            if replaced_count or pruned_count:
                shard.keep = keep
            replaced_rows += replaced_count
            pruned_rows += pruned_count
    if appended:
        counts[counters.ROWS_REPLACED] = replaced_rows
    counts[counters.ROWS_ADDED] = sum(s.rows for s in new) - replaced_rows
    if files.prune_missing:
        counts[counters.ROWS_PRUNED] = pruned_rows
    return counts


def _file_schema(path: str) -> pa.Schema:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return pq.ParquetFile(handle).schema_arrow.remove_metadata()


def _commit_local(path, staging, schema, shards: list[_Shard], files_table, run_id) -> None:
    os.makedirs(staging, exist_ok=True)
    for name in set(os.listdir(staging)) - {s.name for s in shards if not s.old}:  # failed bundles, emptied shards
        os.remove(os.path.join(staging, name))
    files = {}
    for shard in shards:
        if shard.rewritten:
            fresh = _new_name()
            files[fresh] = _write_shard(shard.source, os.path.join(staging, fresh), schema, shard.keep)
            if not shard.old:
                os.remove(shard.source)
        elif shard.old:
            try:
                os.link(shard.source, os.path.join(staging, shard.name))
            except OSError:
                shutil.copy2(shard.source, os.path.join(staging, shard.name))
            files[shard.name] = shard.rows
        else:
            files[shard.name] = shard.rows
    if not files:
        name = _new_name()
        _write_empty_shard(os.path.join(staging, name), schema)
        files[name] = 0
    _write_bytes(os.path.join(staging, SCHEMA_FILE), _schema_json(schema))
    _write_bytes(os.path.join(staging, MANIFEST_FILE), _manifest(schema, files, run_id, files_table))
    _fsync_tree(staging)
    if not os.path.exists(path):
        os.rename(staging, path)
    elif _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)
    else:
        aside = _sibling(path, "old", run_id)
        os.rename(path, aside)
        os.rename(staging, path)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(path)


def _commit_gcs(path, staging, schema, state, shards: list[_Shard], files_table, run_id) -> None:
    files: dict[str, int] = {}
    copies_from, copies_to = [], []
    for shard in shards:
        if shard.rewritten:
            fresh = _new_name()
            files[fresh] = _write_shard(shard.source, FileSystems.join(path, fresh), schema, shard.keep)
        elif shard.old:
            files[shard.name] = shard.rows
        else:
            copies_from.append(shard.source)
            copies_to.append(FileSystems.join(path, shard.name))
            files[shard.name] = shard.rows
    if copies_from:
        FileSystems.copy(copies_from, copies_to)
    if not files:
        name = _new_name()
        _write_empty_shard(FileSystems.join(path, name), schema)
        files[name] = 0
    _write_bytes(FileSystems.join(path, MANIFEST_FILE), _manifest(schema, files, run_id, files_table))  # the commit
    _write_bytes(FileSystems.join(path, SCHEMA_FILE), _schema_json(schema))
    replaced = [FileSystems.join(path, name) for name in state.files.keys() | set(state.unlisted) if name not in files]
    if replaced:
        FileSystems.delete(replaced)
    _delete_tree(staging)


# -- the destination ---------------------------------------------------------------------------

_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_RUN_ID = re.compile(r"[^A-Za-z0-9_-]+")


class CommitPlan(NamedTuple):
    table: str  # folder path
    table_uri: str
    table_staging: str
    errors: str
    errors_uri: str
    errors_staging: str
    disposition: str  # a Disposition value
    run_id: str
    max_failures: int | None
    files_staging: str | None = None  # the files table's records; None: the run records no files
    incremental: bool = False
    prune_missing: bool = False


class CommitParquet(beam.DoFn):
    """After every shard is written: check --max-failures, then commit the table with its
    files table, then its dead letters (see the module docstring); count the rows added,
    replaced and pruned. Runs once; safe to retry."""

    def __init__(self, plan: CommitPlan):
        self.plan = plan

    def process(self, schema, failures, shards, error_shards, record_shards, gone):
        plan = self.plan
        if plan.max_failures is not None and failures > plan.max_failures:
            for staging in (plan.table_staging, plan.errors_staging, plan.files_staging):
                if staging:
                    _delete_tree(staging)
            raise DestinationError(
                f"{failures:,} instances failed, more than --max-failures {plan.max_failures:,}; "
                f"nothing was written to {plan.table_uri}"
            )
        disposition = Disposition(plan.disposition)
        files = None
        if plan.files_staging:
            files = FilesTableChange(list(record_shards), plan.files_staging, list(gone), plan.incremental,
                                     plan.prune_missing)
        counts = commit_folder(plan.table, plan.table_uri, plan.table_staging, schema, shards, disposition,
                               plan.run_id, files)
        for name, value in counts.items():
            Metrics.counter(counters.NAMESPACE, name).inc(value)
        appends = disposition is Disposition.WRITE_APPEND
        errors_disposition = Disposition.WRITE_APPEND if appends else Disposition.WRITE_TRUNCATE
        commit_folder(plan.errors, plan.errors_uri, plan.errors_staging, ERRORS_SCHEMA, error_shards,
                      errors_disposition, plan.run_id)
        yield plan.table_uri


@dataclasses.dataclass
class ParquetTable(Destination):
    """A table as a folder of Parquet files: ``parquet://DIR`` or ``parquet+gs://BUCKET/PREFIX``."""

    path: str  # an absolute local path, or gs://BUCKET/PREFIX, without a trailing slash
    existing_schema: list[dict] | None = dataclasses.field(default=None, compare=False)
    existing_files_table: dict[str, int] | None = dataclasses.field(default=None, compare=False)
    incremental: bool = dataclasses.field(default=False, compare=False)

    @classmethod
    def parse(cls, uri: str, pipeline_options=None) -> "ParquetTable":
        """``parquet://DIR`` (relative or absolute) or ``parquet+gs://BUCKET/PREFIX`` → ParquetTable."""
        if uri.startswith(GCS_SCHEME):
            rest = uri[len(GCS_SCHEME):].strip("/")
            bucket, _, prefix = rest.partition("/")
            if not _BUCKET.fullmatch(bucket) or not prefix or "//" in prefix:
                raise DestinationError(
                    f"a Cloud Storage Parquet destination looks like parquet+gs://BUCKET/FOLDER, not {uri!r}"
                )
            return cls(f"gs://{bucket}/{prefix}")
        if uri.startswith(LOCAL_SCHEME):
            folder = uri[len(LOCAL_SCHEME):]
            if not folder or folder.strip("/") == "":
                raise DestinationError(f"a local Parquet destination looks like parquet://FOLDER, not {uri!r}")
            path = os.path.abspath(folder)
            if not os.path.isdir(os.path.dirname(path)):
                raise DestinationError(f"{uri}: the folder that would hold {path} does not exist; create it first")
            return cls(path)
        raise DestinationError(f"a Parquet destination is parquet://FOLDER or parquet+gs://BUCKET/FOLDER, not {uri!r}")

    @property
    def local(self) -> bool:
        return not self.path.startswith("gs://")

    @property
    def errors_path(self) -> str:
        return self.path + "_errors"

    @property
    def files_path(self) -> str:
        return files_folder(self.path)

    def _uri(self, path: str) -> str:
        return LOCAL_SCHEME + path if self.local else GCS_SCHEME + path[len("gs://"):]

    def __str__(self) -> str:
        return self._uri(self.path)

    def errors_uri(self) -> str:
        return self._uri(self.errors_path)

    def files_uri(self) -> str:
        return self._uri(self.files_path)

    def check_options(self, export_options) -> None:
        super().check_options(export_options)
        self.incremental = bool(getattr(export_options, "incremental", False))

    def check_runner(self, local: bool) -> None:
        """A local folder can only be written by a runner on this machine."""
        if self.local and not local:
            raise ValueError(
                "a parquet:// folder needs a local runner; on Dataflow use parquet+gs://BUCKET/FOLDER"
            )

    def staging_prefix(self) -> str:
        """A local folder's run stages (and spools its rows) beside it, not in the
        system's temporary folder."""
        if self.local:
            return _sibling(self.path, "run", "")[:-1]  # PARENT/.NAME.run
        return super().staging_prefix()

    def preflight(self, disposition: Disposition) -> None:
        """Before any file is read: clean up after a killed run, then check the table's
        state against the disposition (and remember its schema for WRITE_APPEND)."""
        for path in (self.path, self.errors_path):
            recover_folder(path)
        recover_files_folder(self.path)
        state = read_folder_state(self.path, str(self))
        read_folder_state(self.errors_path, self.errors_uri())
        read_folder_state(self.files_path, self.files_uri())
        check_table_state(str(self), disposition, state.exists, state.rows)
        self.existing_schema = state.schema if state.exists else None
        self.existing_files_table = state.files_table if state.exists else None
        if self.incremental and state.exists and not disposition.replaces and state.files_table is None:
            raise DestinationError(
                f"table {self} has no files table {self.files_uri()} (it was written by an older version), "
                "so --incremental cannot tell which files it holds; rebuild it once with "
                "--incremental --write-disposition WRITE_TRUNCATE"
            )

    def recorded_files(self, context: RunContext):
        """The files table's records, read by the pipeline's workers shard by shard (the
        shards the table's manifest lists at preflight; only three columns of each)."""
        if context.disposition.replaces or self.existing_files_table is None:
            return None
        shards = [FileSystems.join(self.files_path, name) for name in sorted(self.existing_files_table)]
        return beam.Create(shards) | "Records" >> beam.FlatMap(read_file_records)

    def read_recorded_files(self, context: RunContext):
        if context.disposition.replaces or self.existing_files_table is None:
            return None
        shards = [FileSystems.join(self.files_path, name) for name in sorted(self.existing_files_table)]
        return (record for shard in shards for record in read_file_records(shard))

    def attach(self, outputs, context: RunContext):
        """The Destination interface: see :meth:`attach_run`."""
        return self.attach_run(outputs, context.disposition, context.run_id, context.max_failures,
                               incremental=context.incremental, prune_missing=context.prune_missing)

    def attach_run(self, outputs, disposition: Disposition, run_id: str, max_failures: int | None, *,
                   incremental: bool = False, prune_missing: bool = False):
        """Add the writing of ``outputs`` (rows, schema, dead_letters and, when it has them,
        the files table's records ``files`` and the ``gone`` paths) and the commit to the
        pipeline; returns the commit's output (the table's URI, once committed)."""
        run_id = _RUN_ID.sub("_", str(run_id)) or uuid.uuid4().hex
        records = getattr(outputs, "files", None)
        gone = getattr(outputs, "gone", None)
        plan = CommitPlan(
            table=self.path,
            table_uri=str(self),
            table_staging=_sibling(self.path, "staging", run_id),
            errors=self.errors_path,
            errors_uri=self.errors_uri(),
            errors_staging=_sibling(self.errors_path, "staging", run_id),
            disposition=disposition.value,
            run_id=run_id,
            max_failures=max_failures,
            files_staging=_sibling(self.files_path, "staging", run_id) if records is not None else None,
            incremental=incremental,
            prune_missing=prune_missing,
        )
        write_schema = outputs.schema | "ParquetSchema" >> beam.Map(
            load_schema, self.existing_schema, str(self), disposition.replaces
        )
        shards = outputs.rows | "WriteParquetRows" >> WriteParquetShards(plan.table_staging, write_schema)
        error_shards = outputs.dead_letters | "WriteParquetDeadLetters" >> WriteParquetShards(
            plan.errors_staging, ERRORS_SCHEMA
        )
        pipeline = outputs.dead_letters.pipeline
        if records is not None:
            record_shards = records | "WriteParquetFileRecords" >> WriteParquetShards(plan.files_staging, FILES_SCHEMA)
        else:
            record_shards = pipeline | "NoFileRecords" >> beam.Create([])
        if gone is not None:
            gone_paths = gone | "GonePaths" >> beam.Map(lambda record: record["path"])
        else:
            gone_paths = pipeline | "NothingGone" >> beam.Create([])
        failures = outputs.dead_letters | "CountParquetFailures" >> beam.combiners.Count.Globally()
        return write_schema | "CommitParquet" >> beam.ParDo(
            CommitParquet(plan), AsSingleton(failures), AsList(shards), AsList(error_shards), AsList(record_shards),
            AsList(gone_paths),
        )

    def finish(self, context: RunContext | None = None) -> None:
        """Nothing: the commit is the pipeline's last step."""

    # -- reading, for tests and tools --------------------------------------------------------

    def files(self, errors: bool = False) -> list[str]:
        """The current table's files (from its manifest)."""
        path = self.errors_path if errors else self.path
        state = read_folder_state(path, self._uri(path))
        return [FileSystems.join(path, name) for name in sorted(state.files)]

    def file_record_files(self) -> list[str]:
        """The current files table's shards (from the table's manifest)."""
        state = read_folder_state(self.path, str(self))
        return [FileSystems.join(self.files_path, name) for name in sorted(state.files_table or {})]

    def schema(self) -> list[dict] | None:
        state = read_folder_state(self.path, str(self))
        return state.schema if state.exists else None
