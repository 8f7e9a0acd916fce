"""Benchmark: the export from ``gs://`` through added latency, against the same files on disk.

    python bench/remote.py [--count 400] [--delays 20,50] [--repeat 3] [--folders N] [--baseline CHECKOUT] [--keep DIR]

One run measures, on the same ``count`` instances (copies of samples/dicom with new UIDs):

* the export from local disk (``--input FOLDER``), end to end, into DuckDB;
* the export from ``gs://`` on the Cloud Storage emulator (gcp-storage-emulator, run as a
  *threaded* server so that concurrent requests are served concurrently) through
  bench/latency_proxy.py adding ``delay`` ms to every request, for each delay: wall
  time, requests per instance (every request the export made: listing, metadata,
  reads), bytes served per instance; and where the CPU went: the export's process tree
  (against the local run's), and the emulator's and the latency proxy's (the proxy runs
  as threads of this process), as a share of the machine's cores over the run. The
  servers share the machine's cores with the export: near 100%, the run waits for CPU,
  not for the network;
* a plain reader with 32 threads fetching the first 64 KiB of every object through the
  same proxy (no conversion): what the network alone allows.

Aim (issue 12): gs:// at 50 ms ≥ 0.75× local disk, with ≤ 1.2 requests per instance.
Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import latency_proxy  # noqa: E402
from pipeline import byte_compile, make_instances, process_cpu_seconds, run_sampled  # noqa: E402  (bench/pipeline.py)

_THREADED_EMULATOR = """
import sys, time
from http import server
server.HTTPServer = server.ThreadingHTTPServer  # serve requests concurrently
server.ThreadingHTTPServer.request_queue_size = 1024  # (socketserver's backlog of 5 drops connection attempts)
import threading
from gcp_storage_emulator import server as emulator
_lock = threading.Lock()  # its in-memory store is not thread-safe: the work is serial, the waiting is not
_handle = emulator.Router.handle
def handle(self, *args):
    with _lock:
        return _handle(self, *args)
emulator.Router.handle = handle
from gcp_storage_emulator.server import create_server
create_server("127.0.0.1", int(sys.argv[1]), in_memory=True).start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_emulator() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-c", _THREADED_EMULATOR, str(port)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process, f"http://127.0.0.1:{port}"


def upload(emulator: str, bucket: str, files: list[str], prefix: str, folders: int = 1) -> list[str]:
    """Upload ``files`` under ``prefix`` (spread over ``folders`` sub-folders, as study
    folders would be, if more than one); returns the object names."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    os.environ["STORAGE_EMULATOR_HOST"] = emulator
    client = storage.Client(project="bench", credentials=AnonymousCredentials())
    client.create_bucket(bucket)
    names = []
    def name_of(index: int, path: str) -> str:
        folder = f"{prefix}/study{index % folders:03d}" if folders > 1 else prefix
        return f"{folder}/{os.path.basename(path)}"

    def put(item) -> str:
        name = name_of(*item)
        client.bucket(bucket).blob(name).upload_from_filename(item[1])
        return name

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        names.extend(pool.map(put, enumerate(files)))
    return names


#: Stands in for Application Default Credentials in the export's processes (launcher and
#: workers): without any, google.auth retries for about 30 s per process before Beam
#: falls back to an anonymous client, a cost a machine with ADC never pays.
_ANONYMOUS_ADC = """
import google.auth
from google.auth.credentials import AnonymousCredentials
google.auth.default = lambda *args, **kwargs: (AnonymousCredentials(), "bench")
"""


def export(input_: str, workdir: pathlib.Path, env: dict, source: pathlib.Path = ROOT) -> dict:
    db = workdir / f"bench-{time.monotonic_ns()}.duckdb"
    summary_path = workdir / f"summary-{time.monotonic_ns()}.json"
    command = [sys.executable, "-m", "pipeline.cli", "--input", input_, f"--bq-table=duckdb://{db}#instances",
               "--progress-seconds=0", f"--summary-json={summary_path}"]
    env = dict(env, PYTHONPATH=env["PYTHONPATH"].replace(str(ROOT), str(source)))
    result = run_sampled(command, source, env)
    if result["returncode"]:
        raise SystemExit(f"export failed:\n{result['stderr'][-3000:]}")
    return {"wall": result["wall_seconds"], "cpu": result["cpu_seconds"],
            "summary": json.loads(summary_path.read_text())}


def servers_cpu(emulator: subprocess.Popen) -> float:
    """CPU time so far of the servers an export from ``gs://`` makes work: the emulator's
    process, and this one (the latency proxy's threads, and the export's sampler)."""
    return process_cpu_seconds(emulator.pid) + time.process_time()


def plain_reader(proxy: str, bucket: str, names: list[str], threads: int = 32) -> float:
    """Seconds for ``threads`` threads to GET the first 64 KiB of every object."""
    import http.client
    import threading
    import urllib.parse

    host = urllib.parse.urlsplit(proxy)
    local = threading.local()

    def get(name: str) -> int:
        if getattr(local, "conn", None) is None:
            local.conn = http.client.HTTPConnection(host.hostname, host.port)
        path = f"/download/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
        local.conn.request("GET", path, headers={"Range": "bytes=0-65535"})
        response = local.conn.getresponse()
        return len(response.read())

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, names))
    return time.perf_counter() - started


def _stats(proxy: str, reset: bool = False) -> dict:
    with urllib.request.urlopen(f"{proxy}/__proxy/{'reset' if reset else 'stats'}") as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--delays", default="20,50", help="milliseconds added per request, comma-separated")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds, each running every variant once (the machine is shared: compare within a round)")
    parser.add_argument("--folders", type=int, default=1,
                        help="spread the objects over this many sub-folders (study folders: several listing units)")
    parser.add_argument("--keep", default=None)
    parser.add_argument("--baseline", default=None,
                        help="another checkout of the project (e.g. a clone of main beside this one): its gs:// exports run in each round too")
    args = parser.parse_args()
    for source in [ROOT] + ([pathlib.Path(args.baseline)] if args.baseline else []):
        byte_compile(source)  # as an installed copy is (bench/pipeline.py)
    workdir = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="dicom-bench-remote-"))
    emulator, emulator_url = start_emulator()
    proxies = []
    try:
        files = make_instances(workdir / "input", args.count)
        bucket = "bench-remote"
        names = upload(emulator_url, bucket, files, "dicom", args.folders)
        site = workdir / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_ANONYMOUS_ADC)
        env = dict(os.environ, NO_GCE_CHECK="true", PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
        env.pop("STORAGE_EMULATOR_HOST", None)
        delays = [float(d) for d in args.delays.split(",")]
        proxies = [latency_proxy.start(emulator_url, delay) for delay in delays]
        layout = f" in {args.folders} folders" if args.folders > 1 else ""
        cores = os.cpu_count()
        print(f"{args.count:,} instances{layout}, {cores} cores; {args.repeat} interleaved rounds", flush=True)
        for round_ in range(1, args.repeat + 1):
            local = export(str(workdir / "input"), workdir, env)
            local_rate = args.count / local["wall"]
            print(f" round {round_}: local disk {local_rate:6.1f} instances/s ({local['wall']:.1f} s end to end)")
            for delay, (server, proxy) in zip(delays, proxies):
                _stats(proxy, reset=True)
                servers_before = servers_cpu(emulator)
                remote = export(f"gs://{bucket}/dicom/", workdir, dict(env, STORAGE_EMULATOR_HOST=proxy))
                servers = servers_cpu(emulator) - servers_before
                stats = _stats(proxy, reset=True)
                rate = args.count / remote["wall"]
                print(f"   gs:// + {delay:3.0f} ms/request: {rate:6.1f} instances/s ({remote['wall']:.1f} s) = "
                      f"{rate / local_rate:4.2f}x local (aim >= 0.75x at 50 ms); "
                      f"{stats['total'] / args.count:.2f} requests/instance (aim <= 1.2) {stats['requests']}, "
                      f"up to {stats['max_in_flight']} in flight; {stats['bytes_out'] / args.count:,.0f} bytes/instance",
                      flush=True)
                print(f"     cpu: export {remote['cpu']:.1f} s (local {local['cpu']:.1f} s), emulator and proxy "
                      f"{servers:.1f} s; {(remote['cpu'] + servers) / (cores * remote['wall']):.0%} of "
                      f"{cores} cores over the run", flush=True)
                if args.baseline:
                    base = export(f"gs://{bucket}/dicom/", workdir, dict(env, STORAGE_EMULATOR_HOST=proxy),
                                  pathlib.Path(args.baseline))
                    stats = _stats(proxy, reset=True)
                    rate = args.count / base["wall"]
                    print(f"     baseline: {rate:6.1f} instances/s ({base['wall']:.1f} s) = {rate / local_rate:4.2f}x local; "
                          f"{stats['total'] / args.count:.2f} requests/instance, up to {stats['max_in_flight']} in flight",
                          flush=True)
        for delay, (server, proxy) in zip(delays, proxies):
            plain = plain_reader(proxy, bucket, names)
            print(f" plain 32-thread reader, {delay:3.0f} ms: {args.count / plain:6.1f} objects/s "
                  "(first 64 KiB, no conversion)")
    finally:
        for server, _ in proxies:
            server.shutdown()
        emulator.terminate()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
