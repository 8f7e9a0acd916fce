"""Benchmark: writing the export's rows as Parquet against JSON lines + DuckDB's read_json load.

    python bench/destinations.py [--rows 3000,10000] [--sweep]

Rows are those of samples/dicom (218 columns, 543 leaf fields once merged), converted
once by schemas.convert and repeated with new SOPInstanceUIDs, so the figures measure the
writing alone (no reading or flattening; one process, no Beam):

* ``json+duckdb``: the rows as newline-delimited JSON (what the pipeline stages today),
  then ``DuckDBTable.write`` (``read_json`` against the schema, one transaction);
* ``parquet``: the rows as Parquet shards, as ``WriteParquetShards`` writes them
  (``ROWS_PER_ROW_GROUP`` rows per row group, ``WRITER_OPTIONS``): the Parquet destination;
* ``parquet+duckdb``: those shards loaded into the same DuckDB table with
  ``load_parquet_into_duckdb``: staging DuckDB rows as Parquet instead of JSON lines.

``--sweep`` also measures row-group sizes and codecs: write time, bytes, and two DuckDB
reads of the folder (a filter on one column; a scan of a nested repeated column).

``--load-memory 100000,300000``: the launcher's DuckDB load alone (``DuckDBTable.write``,
one transaction, the file closed) of that many rows staged as JSON lines (10,000 rows per
file), each in a fresh process: its wall time and peak resident memory with the load
connection's settings (``LOAD_ROW_GROUP_SIZE``, ``LOAD_THREADS``, ``LOAD_MEMORY_LIMIT``) and
with DuckDB's defaults (122,880 rows per row group, one thread per core, no memory limit),
and with the load connection's settings but two threads.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import pyarrow  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.destinations import Disposition  # noqa: E402
from pipeline.destinations.duckdb import DuckDBTable, duckdb_type, quote  # noqa: E402
from pipeline.destinations import parquet  # noqa: E402
from pipeline.destinations.parquet import (  # noqa: E402
    ROWS_PER_FILE,
    ROWS_PER_ROW_GROUP,
    WRITER_OPTIONS,
    load_parquet_into_duckdb,
)
from schemas.convert import flatten_instance  # noqa: E402
from schemas.merge import count_leaves, merge_fragments, to_bigquery_schema  # noqa: E402
from transforms.header import read_header, silence_pydicom  # noqa: E402


def sample_rows(count: int) -> tuple[list[dict], list[dict]]:
    silence_pydicom()
    flattened = []
    for path in sorted((ROOT / "samples" / "dicom").rglob("*.dcm")):
        with open(path, "rb") as handle:
            header = read_header(handle)
        flattened.append(flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag,
                                          read_deferred=header.read_deferred))
    schema = to_bigquery_schema(merge_fragments(f.fragment for f in flattened))
    rows = []
    for index in range(count):
        row = copy.deepcopy(flattened[index % len(flattened)].row)
        row["SOPInstanceUID"] = f"{row['SOPInstanceUID']}.{index}"
        rows.append(row)
    return rows, schema


def write_parquet(rows, schema, folder, rows_per_group=ROWS_PER_ROW_GROUP, options=None) -> list[str]:
    """The rows as one bundle of WriteParquetShards' DoFn writes them (Beam's runner aside)."""
    os.makedirs(folder, exist_ok=True)
    parquet.WRITER_OPTIONS = options or WRITER_OPTIONS
    try:
        fn = parquet._WriteShardsFn(folder, schema, rows_per_group, ROWS_PER_FILE, "part")
        fn.start_bundle()
        shards = [shard for row in rows for shard in fn.process(row)]
        shards += [value.value for value in fn.finish_bundle()]
    finally:
        parquet.WRITER_OPTIONS = WRITER_OPTIONS
    return [shard.path for shard in shards]


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def compare(rows, schema, workdir: pathlib.Path) -> None:
    count = len(rows)
    ndjson = workdir / "rows.json"

    def stage_json():
        with open(ndjson, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")

    json_stage, _ = timed(stage_json)
    json_load, _ = timed(DuckDBTable(str(workdir / "json.duckdb"), "t").write, schema, [str(ndjson)],
                         Disposition.DEFAULT)
    parquet_stage, files = timed(write_parquet, rows, schema, str(workdir / "parquet"))

    def load_parquet():
        con = duckdb.connect(str(workdir / "parquet.duckdb"))
        con.execute("BEGIN TRANSACTION")
        columns = ", ".join(f"{quote(f['name'])} {duckdb_type(f)}" for f in schema)
        con.execute(f"CREATE TABLE t ({columns})")
        load_parquet_into_duckdb(con, "t", schema, files)
        con.execute("COMMIT")
        con.close()

    parquet_load, _ = timed(load_parquet)
    json_bytes = ndjson.stat().st_size
    parquet_bytes = sum(os.path.getsize(f) for f in files)
    print(f"\n{count:,} rows, {len(schema)} columns ({count_leaves(schema)} leaf fields)")
    print(f"  {'':28} {'stage s':>8} {'load s':>8} {'total s':>8} {'rows/s':>9} {'staged MB':>10}")
    for name, stage, load, size in (
        ("json lines + DuckDB", json_stage, json_load, json_bytes),
        ("Parquet (the destination)", parquet_stage, 0.0, parquet_bytes),
        ("Parquet + DuckDB", parquet_stage, parquet_load, parquet_bytes),
    ):
        total = stage + load
        print(f"  {name:28} {stage:8.2f} {load:8.2f} {total:8.2f} {count / total:9,.0f} {size / 1e6:10.1f}")


def sweep(rows, schema, workdir: pathlib.Path) -> None:
    print(f"\nrow groups and codecs, {len(rows):,} rows (DuckDB reads: a filter on Modality; "
          "sum(len(OtherElements)) over the nested list)")
    print(f"  {'rows/group':>10} {'codec':>7} {'write s':>8} {'MB':>7} {'footer KB':>10} {'filter s':>9} {'nested s':>9}")
    for rows_per_group in (1_000, 10_000, 20_000, 50_000):
        for codec in ("snappy", "zstd"):
            folder = workdir / f"sweep-{rows_per_group}-{codec}"
            options = dict(WRITER_OPTIONS, compression=codec)
            seconds, files = timed(write_parquet, rows, schema, str(folder), rows_per_group, options)
            size = sum(os.path.getsize(f) for f in files)
            footer = sum(pq.ParquetFile(f).metadata.serialized_size for f in files)
            con = duckdb.connect()
            pattern = f"{folder}/*.parquet"
            filter_s, _ = timed(lambda: con.execute(
                f"SELECT count(*) FROM read_parquet('{pattern}') WHERE Modality = 'CT'").fetchall())
            nested_s, _ = timed(lambda: con.execute(
                f"SELECT sum(len(OtherElements)) FROM read_parquet('{pattern}')").fetchall())
            con.close()
            print(f"  {rows_per_group:>10,} {codec:>7} {seconds:8.2f} {size / 1e6:7.1f} {footer / 1e3:10.0f} "
                  f"{filter_s:9.3f} {nested_s:9.3f}")
            shutil.rmtree(folder)


def load_memory(counts: list[int]) -> None:
    from pipeline.destinations import duckdb as destination

    rows, schema = sample_rows(10_000)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="dicom-bench-load-"))
    try:
        staged = workdir / "rows.json"
        with open(staged, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        (workdir / "schema.json").write_text(json.dumps(schema))
        settings = {
            "load connection": (destination.LOAD_ROW_GROUP_SIZE, destination.LOAD_THREADS,
                                destination.LOAD_MEMORY_LIMIT),
            "DuckDB's defaults": (122_880, os.cpu_count() or 1, ""),
            "2 threads": (destination.LOAD_ROW_GROUP_SIZE, 2, destination.LOAD_MEMORY_LIMIT),
        }
        print(f"\nDuckDB load alone, rows of samples/dicom staged 10,000 per file ({staged.stat().st_size / 1e6:.0f} MB)")
        for count in counts:
            for name, (row_group_size, threads, memory_limit) in settings.items():
                files = [str(staged)] * -(-count // len(rows))  # the same rows again: memory, not content
                command = [sys.executable, __file__, "--load-once", str(workdir), str(row_group_size), str(threads),
                           json.dumps(files), memory_limit]
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                print(f"  {len(files) * len(rows):>9,} rows  {name:18} (row groups of {row_group_size:,}, "
                      f"{threads} thread{'s' if threads > 1 else ''}, memory limit {memory_limit or 'none'}): "
                      f"{result['seconds']:6.1f} s, peak {result['peak_mib']:,} MiB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def load_once(workdir: str, row_group_size: str, threads: str, files: str, memory_limit: str) -> None:
    """In a fresh process: one DuckDBTable.write of ``files``; prints seconds and peak RSS."""
    import resource

    from pipeline.destinations import duckdb as destination

    destination.LOAD_ROW_GROUP_SIZE, destination.LOAD_THREADS = int(row_group_size), int(threads)
    destination.LOAD_MEMORY_LIMIT = memory_limit or None
    schema = json.loads(pathlib.Path(workdir, "schema.json").read_text())
    database = pathlib.Path(workdir, f"load-{row_group_size}-{threads}.duckdb")
    seconds, _ = timed(DuckDBTable(str(database), "t").write, schema, json.loads(files), Disposition.WRITE_TRUNCATE)
    database.unlink()
    print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def main() -> None:
    if sys.argv[1:2] == ["--load-once"]:
        load_once(*sys.argv[2:7])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="3000", help="comma-separated row counts (default 3000)")
    parser.add_argument("--sweep", action="store_true", help="also compare row-group sizes and codecs")
    parser.add_argument("--load-memory", default=None, help="comma-separated row counts: the DuckDB load alone")
    args = parser.parse_args()
    if args.load_memory:
        load_memory([int(c) for c in args.load_memory.split(",")])
        return
    print(f"machine: {os.cpu_count()} cores; duckdb {duckdb.__version__}; "
          f"pyarrow {pyarrow.__version__}")
    for count in (int(c) for c in args.rows.split(",")):
        rows, schema = sample_rows(count)
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="dicom-bench-dest-"))
        try:
            compare(rows, schema, workdir)
            if args.sweep:
                sweep(rows, schema, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            for leftover in glob.glob(str(workdir) + "*"):
                shutil.rmtree(leftover, ignore_errors=True)


if __name__ == "__main__":
    main()
