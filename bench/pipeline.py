"""Benchmark: the whole export pipeline against the bare pydicom walk, on the same files.

    python bench/pipeline.py [--sizes 2000,10000] [--repeat 2] [--workers N] [--keep DIR]
                             [--destinations duckdb,parquet]

For each size it writes that many instances (copies of samples/dicom with new study,
series and SOP instance UIDs) to a temporary folder, then measures, interleaved and
``--repeat`` times (the machine is shared: compare within a round; the median of the
rounds' ratios, and in how many rounds each aim was met, close each size; with
``--baseline``, its export and this checkout's take turns at going first):

* the bare single-process pydicom walk over all of them (bench/convert.py's
  ``bare_walk``: ``dcmread(stop_before_pixels=True)`` touching every value);
* bench/user_script.py, the ~20-line script a user would write instead (top-level
  keywords → pandas → Parquet → DuckDB), end to end as a process;
* ``dicom-bq-export`` as a user runs it (default local runner) into each of
  ``--destinations`` (a DuckDB file, a Parquet folder), wall time from process start
  to exit, with the CPU time of the whole process tree (launcher, read processes and
  their fork server: each one's as last sampled, so at most 50 ms short per process;
  less sensitive than wall time to what else the machine runs) and its peak resident
  memory, both sampled every 50 ms.

Before measuring, the checkouts' own modules are byte-compiled (``compileall``), as
``pip install`` does at install time: a machine with ``PYTHONDONTWRITEBYTECODE`` set
would otherwise compile them from source in every run (~0.2 s of the launcher's CPU
and again in the read processes' fork server), which no installed copy does.

Aims (issue 12), on 2 cores: the export faster than the user's script; ≥ 1.5× the bare
walk's throughput at 2,000 instances and ≥ 2.5× at 10,000; peak memory flat in the
number of instances. Needs the ``bench`` extra (pandas) for the user's script.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import pathlib
import random
import shutil
import statistics
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


def tree_rss_bytes(pid: int, cpu_ticks: dict | None = None) -> int:
    """Resident memory of a process and all its descendants (Linux /proc); with
    ``cpu_ticks``, also each one's CPU time so far (user + system, in clock ticks) by pid."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            if cpu_ticks is not None:
                with open(f"/proc/{current}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
                cpu_ticks[current] = int(fields[11]) + int(fields[12])  # utime, stime
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    stack += [int(c) for c in children.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def byte_compile(source: pathlib.Path) -> None:
    """Byte-compile a checkout's packages, as ``pip install`` would (see above)."""
    for package in ("pipeline", "transforms", "schemas"):
        compileall.compile_dir(str(source / package), quiet=1)


DESTINATIONS = {
    "duckdb": lambda workdir, run: f"duckdb://{workdir / f'bench-{run}.duckdb'}#instances",
    "parquet": lambda workdir, run: f"parquet://{workdir / f'bench_parquet-{run}'}",
}


def run_sampled(command: list[str], cwd: pathlib.Path, env: dict | None = None) -> dict:
    """Run ``command`` as a process, sampling its process tree every 50 ms: wall time
    from start to exit, CPU time (each process's user + system time as last sampled),
    peak resident memory, return code and standard error."""
    peak = 0
    cpu_ticks: dict[int, int] = {}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_bytes(process.pid, cpu_ticks))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    cpu = sum(cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")
    return {"wall_seconds": wall, "cpu_seconds": cpu, "peak_rss_bytes": peak, "returncode": process.returncode,
            "stderr": stderr}


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a running process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_export(folder: pathlib.Path, workdir: pathlib.Path, workers: int | None, destination: str = "duckdb",
               source: pathlib.Path = ROOT) -> dict:
    """The export of ``folder`` as a process, with the code in ``source`` (this checkout,
    or another one to compare with, e.g. the main branch)."""
    run = time.monotonic_ns()
    summary_path = workdir / f"summary-{destination}-{run}.json"
    command = [sys.executable, "-m", "pipeline.cli", "--input", str(folder),
               f"--bq-table={DESTINATIONS[destination](workdir, run)}", "--progress-seconds=0",
               f"--summary-json={summary_path}"]
    if workers:
        command += ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    result = run_sampled(command, source)
    if result["returncode"]:
        raise SystemExit(f"export failed:\n{result['stderr']}")
    return dict(result, summary=json.loads(summary_path.read_text()))


def run_user_script(folder: pathlib.Path, workdir: pathlib.Path) -> float:
    database = workdir / f"user-{time.monotonic_ns()}.duckdb"
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "bench" / "user_script.py"), str(folder), str(database)], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,10000", help="comma-separated instance counts")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds per size (each reported, then the median)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: the export's own choice)")
    parser.add_argument("--keep", default=None, help="keep the generated files in this folder")
    parser.add_argument("--destinations", default="duckdb",
                        help="comma-separated: duckdb, parquet (default duckdb); one export each")
    parser.add_argument("--no-compare", action="store_true", help="only the export (e.g. for peak memory)")
    parser.add_argument("--baseline", default=None,
                        help="another checkout of the project (e.g. a clone of main beside this one): its export runs in each round too")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; Python {sys.version.split()[0]}; pydicom {pydicom.__version__}")
    for source in [ROOT] + ([pathlib.Path(args.baseline)] if args.baseline else []):
        byte_compile(source)
    for size in (int(s) for s in args.sizes.split(",")):
        workdir = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="dicom-bench-"))
        try:
            folder = workdir / "input"
            paths = make_instances(folder, size)
            megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
            print(f"\n{size:,} instances ({megabytes:.0f} MB on disk)", flush=True)
            ratios: dict[str, list[tuple[float, float]]] = {}  # destination → (× walk, × script) per round
            for round_ in range(1, args.repeat + 1):
                line = [f"  round {round_}:"]
                if not args.no_compare:
                    started = time.perf_counter()
                    for path in paths:
                        bare_walk(path)
                    bare = time.perf_counter() - started
                    user = run_user_script(folder, workdir)
                    line.append(f"bare walk {size / bare:5.0f}/s ({bare:5.1f} s); "
                                f"user's script {size / user:5.0f}/s ({user:5.1f} s);")
                # This checkout and the baseline run in turn, each first in every other
                # round: on a shared machine the first of two runs is often the faster.
                exports = [(destination, ROOT) for destination in args.destinations.split(",")]
                if args.baseline:
                    exports.insert(0, ("baseline", pathlib.Path(args.baseline)))
                    if round_ % 2 == 0:
                        exports.reverse()
                results = {name: run_export(folder, workdir, args.workers, "duckdb" if name == "baseline" else name,
                                            source) for name, source in exports}
                if args.baseline:
                    result = results.pop("baseline")
                    wall = result["wall_seconds"]
                    line.append(f"baseline export {size / wall:5.0f}/s ({wall:5.1f} s, "
                                f"cpu {result['cpu_seconds']:5.1f} s, "
                                f"peak {result['peak_rss_bytes'] / 2**20:4.0f} MiB);")
                for destination, result in results.items():
                    summary = result["summary"]
                    assert summary["succeeded"] == size, summary
                    wall = result["wall_seconds"]
                    line.append(f"export into {destination} {size / wall:5.0f}/s ({wall:5.1f} s, "
                                f"cpu {result['cpu_seconds']:5.1f} s, "
                                f"peak {result['peak_rss_bytes'] / 2**20:4.0f} MiB)")
                    if not args.no_compare:
                        line.append(f"= {bare / wall:4.2f}x the bare walk (aim {1.5 if size <= 2000 else 2.5}x), "
                                    f"{user / wall:4.2f}x the user's script (aim > 1x)")
                        ratios.setdefault(destination, []).append((bare / wall, user / wall))
                print(" ".join(line), flush=True)
            aim = 1.5 if size <= 2000 else 2.5
            for destination, rounds in ratios.items():
                walk, script = [r[0] for r in rounds], [r[1] for r in rounds]
                print(f"  median of {len(rounds)} rounds, into {destination}: {statistics.median(walk):4.2f}x the bare walk "
                      f"(aim {aim}x met in {sum(r >= aim for r in walk)} of {len(rounds)}), "
                      f"{statistics.median(script):4.2f}x the user's script (aim > 1x met in "
                      f"{sum(r > 1 for r in script)} of {len(rounds)})", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
