"""Benchmark: where an export's time goes, stage by stage, on the same instances.

    python bench/stages.py [--count 2000] [--keep DIR] [--read-threads 1,2,4]

It writes ``count`` instances (bench/pipeline.py's ``make_instances``), then times, in
this process and one stage after another, the functions the pipeline runs, and last
the whole export as a user runs it (a subprocess, end to end). The stages:

* start-up: ``import pipeline.main`` in a fresh interpreter; a three-file export in
  one process and with two worker processes (the fixed cost of each mode);
* listing (``transforms.listing.iter_files``); read (open + header up to Pixel Data) and
  flatten (``schemas.convert.flatten_instance``), one instance at a time with nothing
  kept (as in a worker); schema combine (``add_fragment`` over
  every fragment, then ``to_bigquery_schema``); row completion (``with_empty_lists``);
* staging and the final DuckDB load, both ways: JSON lines (what the DuckDB destination
  stages today) and Parquet shards (``schemas.arrow`` + ``load_parquet_into_duckdb``);
* the read step's thread count on local disk (``--read-threads``), to choose
  ``transforms.storage.LOCAL_CONCURRENCY``.

The sum of the single-process stages set against the export's wall time shows what
Beam itself costs (worker start, per-element work, the graph).
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import make_instances  # noqa: E402  (bench/pipeline.py)

sys.path.remove(str(ROOT / "bench"))
sys.modules.pop("pipeline", None)  # from here on, "pipeline" is the project's package


def _clock(label: str, seconds: float, count: int | None, results: list) -> None:
    per = f"{seconds / count * 1000:7.2f} ms/instance" if count else ""
    results.append((label, seconds))
    print(f"  {label:<44} {seconds:7.2f} s  {per}", flush=True)


def _export(folder: pathlib.Path, workdir: pathlib.Path, extra: list[str] = ()) -> float:
    db = workdir / f"profile-{time.monotonic_ns()}.duckdb"
    command = [sys.executable, "-m", "pipeline.cli", "--input", str(folder), f"--bq-table=duckdb://{db}#instances",
               "--progress-seconds=0", *extra]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--keep", default=None)
    parser.add_argument("--read-threads", default="1,2,4")
    args = parser.parse_args()

    import duckdb
    import pyarrow.parquet as pq

    from pipeline.destinations.duckdb import duckdb_type, quote
    from pipeline.destinations.parquet import WRITER_OPTIONS, load_parquet_into_duckdb
    from schemas.arrow import arrow_schema, record_converter, to_arrow_table
    from schemas.convert import BASE_FRAGMENT, flatten_instance
    from schemas.merge import add_fragment, to_bigquery_schema
    from schemas.rows import with_empty_lists
    from transforms.flatten import read_input
    from transforms.header import read_header, silence_pydicom
    from transforms.listing import iter_files
    from transforms.storage import Opener

    silence_pydicom()
    workdir = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="dicom-profile-"))
    results: list = []
    try:
        folder = workdir / "input"
        small = workdir / "small"
        make_instances(folder, args.count)
        make_instances(small, 3, seed=2)
        n = args.count
        print(f"{n:,} instances, {os.cpu_count()} cores")

        print("start-up (fixed):")
        env_import = [sys.executable, "-c", "import pipeline.main"]
        started = time.perf_counter()
        subprocess.run(env_import, cwd=ROOT, check=True)
        _clock("python -c 'import pipeline.main'", time.perf_counter() - started, None, results)
        _clock("3-file export, one process", _export(small, workdir, ["--direct_running_mode=in_memory"]), None, results)
        _clock("3-file export, two worker processes", _export(small, workdir, [
            "--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]), None, results)

        print("per stage, this process, one after another:")
        started = time.perf_counter()
        files = list(iter_files(os.path.join(str(folder), "**")))
        _clock("listing", time.perf_counter() - started, n, results)

        opener = Opener()
        # One instance at a time, nothing kept, as a worker does: holding every parsed
        # header would make the garbage collector walk them all, over and over, and the
        # stages would be charged for it.
        read_seconds = flatten_seconds = 0.0
        for input_file in files:
            started = time.perf_counter()
            fileobj, _ = opener.open(input_file)
            with fileobj:
                header = read_header(fileobj)
                read_done = time.perf_counter()
                flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag,
                                 read_deferred=header.read_deferred)
            flatten_seconds += time.perf_counter() - read_done
            read_seconds += read_done - started
        del header
        _clock("read (open + header up to Pixel Data)", read_seconds, n, results)
        _clock("flatten", flatten_seconds, n, results)
        flattened = [read_input(input_file, opener).instance for input_file in files]  # for the stages below

        started = time.perf_counter()
        merged = BASE_FRAGMENT
        for item in flattened:
            merged = add_fragment(merged, item.fragment)
        schema = to_bigquery_schema(merged)
        _clock("schema combine", time.perf_counter() - started, n, results)

        started = time.perf_counter()
        rows = [with_empty_lists(item.row, schema) for item in flattened]
        _clock("row completion", time.perf_counter() - started, n, results)
        del flattened
        print(f"  (row size as JSON: {sum(len(json.dumps(r)) for r in rows[:200]) / min(200, n):,.0f} bytes)")

        columns = ", ".join(f"{quote(f['name'])} {duckdb_type(f)}" for f in schema)
        for fmt in ("json", "parquet"):
            stage = workdir / f"stage-{fmt}"
            stage.mkdir()
            started = time.perf_counter()
            if fmt == "json":
                path = stage / "rows.json"
                with open(path, "w", encoding="utf-8") as handle:
                    for row in rows:
                        handle.write(json.dumps(row) + "\n")
            else:
                path = stage / "rows.parquet"
                arrow, convert = arrow_schema(schema), record_converter(schema)
                with pq.ParquetWriter(path, arrow, **WRITER_OPTIONS) as writer:
                    for index in range(0, n, 500):
                        writer.write_table(to_arrow_table(rows[index:index + 500], arrow, convert))
            _clock(f"staging, {fmt}", time.perf_counter() - started, n, results)
            con = duckdb.connect(str(workdir / f"load-{fmt}.duckdb"))
            con.execute(f"CREATE TABLE t ({columns})")
            started = time.perf_counter()
            if fmt == "json":
                from pipeline.destinations.duckdb import DuckDBTable

                DuckDBTable._insert(con, "t", schema, [str(path)])
            else:
                load_parquet_into_duckdb(con, "t", schema, [str(path)])
            _clock(f"final load into DuckDB, from {fmt}", time.perf_counter() - started, n, results)
            con.close()

        print("read step on local disk (read_input = read + flatten), by threads:")
        for threads in (int(t) for t in args.read_threads.split(",")):
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda f: read_input(f, opener), files))
            _clock(f"{threads} thread(s)", time.perf_counter() - started, n, results)

        single = sum(s for label, s in results if label in {
            "listing", "read (open + header up to Pixel Data)", "flatten", "schema combine", "row completion",
            "staging, json", "final load into DuckDB, from json"})
        print("the whole export (default runner), end to end:")
        wall = _export(folder, workdir)
        _clock("dicom-bq-export", wall, n, results)
        print(f"  stages above, one process, JSON staging : {single:7.2f} s; the rest is Beam and start-up, spread over"
              f" {os.cpu_count()} cores")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
