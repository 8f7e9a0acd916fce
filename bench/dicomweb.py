"""Benchmark: reading from a DICOMweb server with many requests in flight vs one at a time.

    python bench/dicomweb.py [--count 400] [--latency 0.02] [--workers 16]

Starts Orthanc (Debian's packages: apt-get install -y orthanc orthanc-dicomweb), uploads
``--count`` instances (copies of samples/dicom with new UIDs) and one 40 MB instance, and
puts a proxy adding ``--latency`` seconds to every request in front of it, in its own
process (it stands for the network; it must not share the measured interpreter). Then,
in one run, on the same server and the same pooled session:

* instance mode, serial: one retrieve at a time (``read_instance`` in a loop);
* instance mode, concurrent: ``read_many(max_workers=--workers)``;
  each measured twice: the read alone (retrieve + header) and read + flatten (the row);
* metadata mode: one request per series, serial and concurrent;
* bytes received for the 40 MB instance in instance mode, against its header's size,
  and the bytes the proxy had written into the connection when the client closed the
  answer (the proxy's send buffer is small, so that is about what the client's kernel
  had received: its receive window, which does not grow while the reader reads little).

Aim (issue 8): concurrent ≥ 8× serial at 20 ms; bytes received ≤ 2× the header.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
import requests  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from tests.dicomweb_proxy import run_orthanc, upload  # noqa: E402
from tests.test_dicomweb import _big_instance  # noqa: E402
from transforms.header import read_header  # noqa: E402
from transforms.sources import dicomweb as dw  # noqa: E402

USER, PASSWORD = "bench", "bench-password"


def copies(count: int) -> list[bytes]:
    """``count`` instances: the samples round-robin with new UIDs, 10 per series, 50 per
    study (one patient per study)."""
    samples = sorted((ROOT / "samples" / "dicom").rglob("*.dcm"))
    templates = [pydicom.dcmread(path, force=True) for path in samples]
    out = []
    study = series = None
    for index in range(count):
        ds = templates[index % len(templates)]
        if index % 50 == 0:
            study = generate_uid()
        if index % 10 == 0:
            series = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.PatientID = "BENCH-" + study[-12:]  # Orthanc files a study under one patient
        if getattr(ds, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in ds.file_meta:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer)
        out.append(buffer.getvalue())
    return out


def header_only(stream):
    return read_header(stream).uids


def rate(label: str, count: int, seconds: float, cpu: float) -> float:
    per_second = count / seconds
    print(f"  {label:<44} {count:5d} in {seconds:6.2f} s = {per_second:7.1f}/s"
          f"   (this process's CPU: {cpu / count * 1000:.1f} ms per instance)")
    return per_second


class Clock:
    """Wall and CPU time of a block."""

    def __enter__(self):
        self.started, self.cpu_started = time.monotonic(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.monotonic() - self.started
        self.cpu = time.process_time() - self.cpu_started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--serial-count", type=int, default=100, help="instances read serially (it is slow)")
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()
    os.environ.update(DICOMWEB_USER=USER, DICOMWEB_PASSWORD=PASSWORD)
    os.environ.pop("DICOMWEB_TOKEN", None)

    with tempfile.TemporaryDirectory() as home, run_orthanc(pathlib.Path(home) / "orthanc", USER, PASSWORD) as url:
        started = time.monotonic()
        instances = copies(args.count)
        big, header_size = _big_instance()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda data: upload(url, data, USER, PASSWORD), instances + [big]))
        print(f"uploaded {len(instances) + 1} instances to Orthanc in {time.monotonic() - started:.1f} s")

        port_file = pathlib.Path(home) / "proxy.port"
        proxy = subprocess.Popen(
            [sys.executable, "-m", "tests.dicomweb_proxy", url, "--latency", str(args.latency), "--port-file", str(port_file)],
            cwd=ROOT, stdout=subprocess.DEVNULL,
        )
        try:
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.05)
            root = f"dicomweb+http://127.0.0.1:{port_file.read_text()}/dicom-web"
            run(root, args, instances, big, header_size)
        finally:
            proxy.terminate()
            proxy.wait()


def run(root: str, args, instances: list[bytes], big: bytes, header_size: int) -> None:
    client = dw.client_for(root)
    dw.check_server(root)
    refs = [ref for unit in dw.listing_units(root) for ref in dw.expand(unit, client)]
    big_uid = read_header(io.BytesIO(big)).uids.instance
    urls = [ref.url for ref in refs if ref.instance != big_uid]
    assert len(urls) == len(instances), (len(urls), len(instances))
    print(f"listed {len(urls) + 1} instances through a proxy adding {args.latency * 1000:.0f} ms per request")

    dw.read_instance(urls[0])  # warm the pool
    results = {}
    for label, handle in (("read (retrieve + header)", header_only), ("read + flatten (the row)", dw.convert_stream)):
        print(f"instance mode, {label}:")
        serial = urls[: args.serial_count]
        with Clock() as clock:
            for url in serial:
                dw.read_instance(url, handle)
        results[label, "serial"] = rate("serial (one request at a time)", len(serial), clock.seconds, clock.cpu)
        with Clock() as clock:
            outcomes = list(dw.read_many(urls, handle, max_workers=args.workers))
        assert not any(isinstance(r, Exception) for _u, r in outcomes)
        results[label, "concurrent"] = rate(
            f"concurrent (read_many, {args.workers} in flight)", len(urls), clock.seconds, clock.cpu
        )
        print(f"  speed-up {results[label, 'concurrent'] / results[label, 'serial']:.1f}x")

    print("metadata mode (one request per series, 10 instances each):")
    series = sorted({ref.series_url for ref in refs if ref.instance != big_uid})

    def series_rows(series_url):
        return [dw.convert_metadata(item) for item in dw.read_series_metadata(series_url)]

    with Clock() as clock:
        count = sum(len(series_rows(s)) for s in series[: max(1, args.serial_count // 10)])
    serial = rate("serial", count, clock.seconds, clock.cpu)
    with Clock() as clock, ThreadPoolExecutor(args.workers) as pool:
        count = sum(len(rows) for rows in pool.map(series_rows, series))
    concurrent = rate(f"concurrent ({args.workers} in flight)", count, clock.seconds, clock.cpu)
    print(f"  speed-up {concurrent / serial:.1f}x")

    print("the 40 MB instance in instance mode:")
    tally = dw.Tally()
    big_ref = next(ref for ref in refs if ref.instance == big_uid)
    dw.read_instance(big_ref.url, tally=tally)
    print(f"  file {len(big):,} bytes, header {header_size:,} bytes, received {tally.bytes_received:,} bytes "
          f"({tally.bytes_received / header_size:.2f}x the header)")
    stats = requests.get(dw.http_url(root).rsplit("/dicom-web", 1)[0] + "/proxy-stats", timeout=10).json()
    sent = stats["bytes_sent"].get("/dicom-web" + big_ref.resource_path, 0)
    print(f"  the proxy had written {sent:,} bytes of that answer into the connection when the client closed it")


if __name__ == "__main__":
    main()
