"""Benchmark: bytes and requests read per instance, as the pipeline reads them.

    python bench/bytes_read.py [--json OUT] [FILE_OR_FOLDER...]

Without arguments: the samples (``samples/dicom``) and pydicom's bundled instances. Each
file is opened the way the read step opens it (``transforms.storage.Opener``: a 64 KiB
buffer over a raw reader that fetches exactly what is asked for, as ranged GETs do on
Cloud Storage), its header read and flattened; what the raw reader delivered is counted,
and each call to it, which on Cloud Storage is one ranged GET. Prints totals and means
per instance, for the samples and the bundled files separately.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.convert import instance_files  # noqa: E402
from schemas.convert import flatten_instance  # noqa: E402
from transforms import storage  # noqa: E402
from transforms.header import read_header  # noqa: E402

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "dicom")


class _CountingRequests(storage.CountingRaw):
    """``CountingRaw`` that also counts the raw reads (one ranged GET each on gs://)."""

    def __init__(self, raw):
        super().__init__(raw)
        self.requests = 0

    def readinto(self, buffer) -> int:
        count = super().readinto(buffer)
        if count:
            self.requests += 1
        return count


def measure(path: str) -> tuple[int, int]:
    """``(bytes, requests)`` to read and flatten one file as the pipeline does."""
    raw = _CountingRequests(open(path, "rb", buffering=0))
    import io

    with io.BufferedReader(raw, buffer_size=storage.READ_BUFFER_BYTES) as fileobj:
        header = read_header(fileobj)
        flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred)
    return raw.bytes_read, raw.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--json", help="also write {path: [bytes, requests]} here")
    args = parser.parse_args()
    groups = {"given": instance_files(args.paths)} if args.paths else {
        "samples": instance_files([SAMPLES]),
        "pydicom bundled": instance_files([]),
    }
    everything = {}
    for name, files in groups.items():
        results = {path: measure(path) for path in files}
        everything.update(results)
        total_bytes = sum(b for b, _ in results.values())
        total_requests = sum(r for _, r in results.values())
        count = len(results) or 1
        print(f"{name:16s} {len(results):4d} instances  {total_bytes:12,d} bytes  {total_bytes / count:10,.0f} per instance"
              f"  {total_requests:5d} requests  {total_requests / count:5.2f} per instance")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(everything, out, indent=0, sort_keys=True)


if __name__ == "__main__":
    main()
