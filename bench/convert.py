"""Benchmark: convert-from-file against a bare pydicom header walk, on the same files.

    python bench/convert.py [--repeat 20] [--multiframe FRAMES] [FILE_OR_FOLDER...]

Without arguments it uses pydicom's bundled test files that are instances. With
``--multiframe`` it measures instead (or besides the files given) two synthetic enhanced
MR headers of that many frames, each frame an item of the Per-frame Functional Groups
Sequence holding five one-item sequences (a header made mostly of sequence items, where
the Datasets pydicom builds for them cost the most), once with sequences and items of
defined length and once of undefined length. For each
file both ways read it from disk: the bare walk is ``dcmread(stop_before_pixels=True)``
and touching every value (sequences included); the conversion is what the pipeline does
per instance (``read_header`` + ``flatten_instance``, the file buffered as the pipeline's
are). It prints instances per second of each and the ratio of their costs (aim:
conversion ≤ 1.3× the bare walk).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pydicom  # noqa: E402
from pydicom.data import get_charset_files, get_testdata_files  # noqa: E402

from schemas.convert import flatten_instance  # noqa: E402
from transforms.header import InstanceError, read_header  # noqa: E402
from transforms.storage import READ_BUFFER_BYTES  # noqa: E402


def bare_walk(path: str) -> int:
    """Read the header with pydicom and touch every value; returns elements touched."""

    def walk(dataset) -> int:
        count = 0
        for element in dataset:
            value = element.value
            count += 1
            if element.VR == "SQ":
                for item in value:
                    count += walk(item)
        return count

    dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return walk(dataset.file_meta) + walk(dataset)


def convert(path: str) -> int:
    with open(path, "rb", buffering=READ_BUFFER_BYTES) as fileobj:  # buffered as the pipeline's files
        header = read_header(fileobj)
        flattened = flatten_instance(
            header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred
        )
    return len(flattened.row)


def instance_files(paths: list[str]) -> list[str]:
    if not paths:
        paths = get_testdata_files() + get_charset_files()
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += [os.path.join(r, n) for r, _, names in os.walk(path) for n in names]
        elif os.path.isfile(path):
            files.append(path)
    usable = []
    for path in sorted(set(files)):
        try:
            convert(path)
            bare_walk(path)
        except (InstanceError, Exception):
            continue
        usable.append(path)
    return usable


def multiframe_files(folder: str, frames: int) -> list[str]:
    """Two enhanced MR headers of ``frames`` frames (no pixel data) in ``folder``: one
    with sequences and items of defined length, one of undefined length."""
    from tests.builders import enhanced_multiframe, to_bytes, undefined_lengths

    paths = []
    for kind, mark in (("defined", lambda ds: ds), ("undefined", undefined_lengths)):
        path = os.path.join(folder, f"enhanced-mr-{frames}-{kind}.dcm")
        with open(path, "wb") as out:
            out.write(to_bytes(mark(enhanced_multiframe(frames))))
        paths.append(path)
    return paths


def timed(function, files: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for path in files:
            function(path)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--repeat", type=int, default=20, help="rounds; the best round counts")
    parser.add_argument("--multiframe", type=int, metavar="FRAMES",
                        help="measure two synthetic enhanced MR headers of FRAMES frames (defined and undefined lengths)")
    args = parser.parse_args()
    if args.multiframe is not None and args.multiframe < 1:
        parser.error("--multiframe needs a number of frames of 1 or more")
    with tempfile.TemporaryDirectory() as folder:
        files = instance_files(args.paths) if args.paths or not args.multiframe else []
        if args.multiframe:
            files += instance_files(multiframe_files(folder, args.multiframe))
        measure(files, args.repeat)


def measure(files: list[str], repeat: int) -> None:
    if not files:
        sys.exit("no instance among the files given")
    size = sum(os.path.getsize(f) for f in files)
    print(f"{len(files)} instances, {size / 1e6:.1f} MB on disk, best of {repeat} rounds")
    bare = timed(bare_walk, files, repeat)
    ours = timed(convert, files, repeat)
    print(f"bare pydicom walk : {len(files) / bare:8.0f} instances/s  ({bare * 1e3 / len(files):.3f} ms each)")
    print(f"convert (ours)    : {len(files) / ours:8.0f} instances/s  ({ours * 1e3 / len(files):.3f} ms each)")
    print(f"cost ratio convert/bare: {ours / bare:.2f}x (aim <= 1.30x)")


if __name__ == "__main__":
    main()
