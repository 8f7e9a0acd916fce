"""Benchmark: an incremental run against a full export of the same files (issue 9).

    python bench/incremental.py [--size 10000] [--changed 0.01] [--keep DIR] [--destination parquet]

Writes ``--size`` instances (copies of samples/dicom with new UIDs, as bench/pipeline.py
does), then, in one run of this script, each as a user runs it (``python -m
pipeline.main``, default local runner), into DuckDB (or, with ``--destination parquet``,
a ``parquet://`` folder):

1. a full export of every file (WRITE_TRUNCATE): the baseline;
2. a first ``--incremental`` run (builds the files table; costs about a full export);
3. ``--incremental`` with nothing changed: lists, compares with the files table, reads nothing;
4. ``--incremental`` after rewriting ``--changed`` of the files (new content, same instances).

It reports wall time from process start to exit and the pipeline's own duration (the
summary's ``duration_seconds``) for each, and the speed-ups of 3 and 4 over 1.
Aim: ≥ 20× with nothing changed, ≥ 10× with 1% changed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

import importlib.util

import pydicom

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
_spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
bench_pipeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_pipeline)
make_instances = bench_pipeline.make_instances  # the same instances as bench/pipeline.py


DESTINATIONS = {
    "duckdb": lambda workdir, table: f"duckdb://{workdir / 'bench.duckdb'}#{table}",
    "parquet": lambda workdir, table: f"parquet://{workdir / table}",
}
destination = DESTINATIONS["duckdb"]


def export(workdir: pathlib.Path, folder: pathlib.Path, table: str, name: str, *flags: str) -> dict:
    summary_path = workdir / f"summary-{name}.json"
    command = [sys.executable, "-m", "pipeline.cli", "--input", str(folder),
               f"--bq-table={destination(workdir, table)}", "--progress-seconds=0",
               f"--summary-json={summary_path}", *flags]
    started = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"{name} failed:\n{process.stderr}")
    summary = json.loads(summary_path.read_text())
    return {"wall": wall, "duration": summary["duration_seconds"], "summary": summary}


def rewrite(paths: list[str], fraction: float, seed: int = 2) -> int:
    """Rewrite ``fraction`` of the files with new content (same instance)."""
    chosen = random.Random(seed).sample(paths, max(1, round(len(paths) * fraction)))
    for path in chosen:
        ds = pydicom.dcmread(path, force=True)
        ds.ImageComments = "corrected"
        ds.save_as(path)
    return len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10_000, help="instances (default 10,000)")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction rewritten for run 4 (default 0.01)")
    parser.add_argument("--keep", default=None, help="keep the files and the database in this folder")
    parser.add_argument("--destination", choices=sorted(DESTINATIONS), default="duckdb",
                        help="duckdb:// file (default) or parquet:// folder")
    args = parser.parse_args()
    global destination
    destination = DESTINATIONS[args.destination]
    print(f"machine: {os.cpu_count()} cores; Python {sys.version.split()[0]}")
    workdir = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="dicom-bench-incremental-"))
    try:
        folder = workdir / "input"
        paths = make_instances(folder, args.size)
        print(f"{args.size:,} instances, {sum(os.path.getsize(p) for p in paths) / 1e6:.0f} MB on disk\n")
        full = export(workdir, folder, "full", "full", "--write-disposition=WRITE_TRUNCATE")
        assert full["summary"]["succeeded"] == args.size
        first = export(workdir, folder, "current", "first", "--incremental")
        assert first["summary"]["rows_added"] == args.size
        unchanged = export(workdir, folder, "current", "unchanged", "--incremental", "--write-disposition=WRITE_APPEND")
        assert unchanged["summary"]["bytes_read"] == 0 and unchanged["summary"]["unchanged_files"] == args.size
        count = rewrite(paths, args.changed)
        changed = export(workdir, folder, "current", "changed", "--incremental", "--write-disposition=WRITE_APPEND")
        assert changed["summary"]["rows_replaced"] == count and changed["summary"]["succeeded"] == count

        def line(label, result, aim=None):
            text = f"  {label:<38} {result['wall']:7.1f} s wall   {result['duration']:7.1f} s run()"
            if aim:
                text += (f"   {full['wall'] / result['wall']:6.1f}x wall, {full['duration'] / result['duration']:6.1f}x "
                         f"run()  (aim >= {aim}x)")
            print(text)

        line("full export (WRITE_TRUNCATE)", full)
        line("first --incremental run", first)
        line("--incremental, nothing changed", unchanged, 20)
        line(f"--incremental, {count:,} files ({args.changed:.0%}) changed", changed, 10)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
