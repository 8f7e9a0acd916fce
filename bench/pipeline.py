"""Benchmark: the whole export pipeline against the bare pydicom walk, on the same files.

    python bench/pipeline.py [--sizes 1000,10000] [--workers N] [--keep DIR] [--destinations duckdb,parquet]

For each size it writes that many instances (copies of samples/dicom with new study,
series and SOP instance UIDs) to a temporary folder, then measures in one run:

* the bare single-process pydicom walk over all of them (bench/convert.py's
  ``bare_walk``: ``dcmread(stop_before_pixels=True)`` touching every value);
* ``dicom-bq-export`` as a user runs it (default local runner: one worker process per
  core) into each of ``--destinations`` (a DuckDB file, a Parquet folder), wall time
  from process start to exit, with the peak resident memory of the whole process tree
  (launcher + workers), sampled every 50 ms.

Aim (issue 3): with 2 cores, pipeline throughput ≥ 1.5× the bare walk's.
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
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from convert import bare_walk  # noqa: E402


def make_instances(folder: pathlib.Path, count: int, seed: int = 1) -> list[str]:
    """``count`` instances: the samples round-robin, each with new UIDs."""
    samples = sorted((ROOT / "samples" / "dicom").rglob("*.dcm"))
    templates = [pydicom.dcmread(path, force=True) for path in samples]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    study = series = None
    for index in range(count):
        ds = templates[index % len(templates)]
        if index % 50 == 0:
            study = generate_uid()
        if index % 10 == 0:
            series = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        if getattr(ds, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in ds.file_meta:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{rng.getrandbits(64):016x}"
        ds.save_as(path)
        paths.append(str(path))
    return paths


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    stack += [int(c) for c in children.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


DESTINATIONS = {
    "duckdb": lambda workdir: f"duckdb://{workdir / 'bench.duckdb'}#instances",
    "parquet": lambda workdir: f"parquet://{workdir / 'bench_parquet'}",
}


def run_export(folder: pathlib.Path, workdir: pathlib.Path, workers: int | None, destination: str = "duckdb") -> dict:
    summary_path = workdir / f"summary-{destination}.json"
    command = [sys.executable, "-m", "pipeline.main", "--input", str(folder),
               f"--bq-table={DESTINATIONS[destination](workdir)}", "--progress-seconds=0",
               f"--summary-json={summary_path}"]
    if workers:
        command += ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    peak = 0
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_bytes(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"export failed:\n{stderr}")
    summary = json.loads(summary_path.read_text())
    return {"wall_seconds": wall, "peak_rss_bytes": peak, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000", help="comma-separated instance counts (default 1000)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--keep", default=None, help="keep the generated files in this folder")
    parser.add_argument("--destinations", default="duckdb",
                        help="comma-separated: duckdb, parquet (default duckdb); one export each")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; Python {sys.version.split()[0]}; pydicom {pydicom.__version__}")
    for size in (int(s) for s in args.sizes.split(",")):
        workdir = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="dicom-bench-"))
        try:
            folder = workdir / "input"
            paths = make_instances(folder, size)
            megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
            started = time.perf_counter()
            for path in paths:
                bare_walk(path)
            bare = time.perf_counter() - started
            print(f"\n{size:,} instances ({megabytes:.0f} MB on disk)")
            print(f"  bare pydicom walk, 1 process : {size / bare:8.0f} instances/s")
            for destination in args.destinations.split(","):
                result = run_export(folder, workdir, args.workers, destination)
                summary = result["summary"]
                assert summary["succeeded"] == size, summary
                print(f"  into {destination}:")
                print(f"    dicom-bq-export, end to end  : {size / result['wall_seconds']:8.0f} instances/s "
                      f"({result['wall_seconds']:.1f} s wall, incl. start-up and the write)")
                print(f"    dicom-bq-export, pipeline    : {summary['instances_per_second']:8.0f} instances/s "
                      f"(run() duration {summary['duration_seconds']:.1f} s)")
                print(f"    ratio end-to-end / bare      : {bare / result['wall_seconds']:8.2f}x (aim >= 1.5x)")
                print(f"    bytes read per instance      : {summary['bytes_read_per_instance']:8,}")
                print(f"    peak memory, process tree    : {result['peak_rss_bytes'] / 2**20:8.0f} MiB")
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
