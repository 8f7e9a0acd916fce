"""Benchmark: instances per second and bytes read per instance, from archives against the
same files unpacked, in one run.

    python bench/archives.py [--copies 20] [--repeat 3] [FILE_OR_FOLDER...]

Without arguments it uses samples/dicom and pydicom's bundled test files that are
instances, each copied ``--copies`` times under its own folder. It builds, in a temporary
folder, the files unpacked, a stored ZIP, a deflated ZIP, a tar and a tar.gz of them, then
converts every instance (``read_header`` + ``flatten_instance``) the way the pipeline
does: each file or member opened through a 64 KiB buffer over a reader that counts the
bytes it delivers (what a ranged Cloud Storage reader would fetch). ZIP and tar members
are listed, then opened one by one (:func:`open_input`); the tar.gz is streamed once
(:func:`iter_streamed_members`). Archive listing is included in the time and bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pydicom.data import get_charset_files, get_testdata_files  # noqa: E402

from schemas.convert import flatten_instance  # noqa: E402
from transforms.header import InstanceError, read_header  # noqa: E402
from transforms.sources import archives  # noqa: E402

BUFFER = 64 * 1024
SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "dicom")


class Counting(io.RawIOBase):
    """A local file counting the bytes it delivers."""

    total = 0

    def __init__(self, path: str):
        self._file = open(path, "rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._file.readinto(buffer)
        Counting.total += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        super().close()


def open_counted(path: str):
    return io.BufferedReader(Counting(path), BUFFER)


def convert_header(header) -> None:
    flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred)


def convert(fileobj) -> None:
    convert_header(read_header(fileobj))


def instance_files(paths: list[str]) -> list[str]:
    if not paths:
        paths = [SAMPLES] + get_testdata_files() + get_charset_files()
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(r, n) for r, _, names in os.walk(path) for n in names)
        else:
            files.append(path)
    instances = []
    for path in files:
        try:
            with open(path, "rb") as fileobj:
                convert(fileobj)
        except (InstanceError, Exception):
            continue
        instances.append(path)
    return instances


def run_unpacked(folder: str) -> int:
    count = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with open_counted(os.path.join(root, name)) as fileobj:
                convert(fileobj)
            count += 1
    return count


def run_random_access(archive: str) -> int:
    archives._INDEX.clear()  # as a worker that has not listed it
    with open_counted(archive) as fileobj:
        members = archives.list_members(fileobj, archive)
    for member in members:
        with archives.open_input(member.path, open_counted) as fileobj:
            convert(fileobj)
    return len(members)


def run_streamed(archive: str) -> int:
    count = 0
    with open_counted(archive) as fileobj:
        for _member, header in archives.iter_streamed_members(fileobj, archive):
            if isinstance(header, Exception):
                raise header
            convert_header(header)
            count += 1
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    files = instance_files(args.paths)
    work = tempfile.mkdtemp(prefix="bench-archives-")
    try:
        unpacked = os.path.join(work, "unpacked")
        names = []
        for copy in range(args.copies):
            for index, path in enumerate(files):
                name = f"copy{copy:03d}/{index:04d}.dcm"
                os.makedirs(os.path.join(unpacked, os.path.dirname(name)), exist_ok=True)
                shutil.copyfile(path, os.path.join(unpacked, name))
                names.append(name)
        built = {}
        for label, compression in (("zip stored", zipfile.ZIP_STORED), ("zip deflated", zipfile.ZIP_DEFLATED)):
            built[label] = os.path.join(work, label.replace(" ", "-") + ".zip")
            with zipfile.ZipFile(built[label], "w", compression) as zf:
                for name in names:
                    zf.write(os.path.join(unpacked, name), name)
        for label, mode, suffix in (("tar", "w", ".tar"), ("tar.gz", "w:gz", ".tar.gz")):
            built[label] = os.path.join(work, "archive" + suffix)
            with tarfile.open(built[label], mode) as tf:
                for name in names:
                    tf.add(os.path.join(unpacked, name), name)
        size = sum(os.path.getsize(os.path.join(unpacked, n)) for n in names)
        print(f"{len(names):,} instances ({len(files)} files × {args.copies}), {size / 2**20:.1f} MiB unpacked")
        cases = [("unpacked files", run_unpacked, unpacked)]
        cases += [(label, run_random_access, built[label]) for label in ("zip stored", "zip deflated", "tar")]
        cases.append(("tar.gz (streamed)", run_streamed, built["tar.gz"]))
        best, read = {}, {}
        for _ in range(args.repeat):  # round robin, so that a busy moment hits every case alike
            for label, run, target in cases:
                Counting.total = 0
                started = time.perf_counter()
                count = run(target)
                elapsed = time.perf_counter() - started
                assert count == len(names), (label, count)
                best[label] = min(best.get(label, elapsed), elapsed)
                read[label] = Counting.total
        for label, _run, target in cases:
            archive_size = os.path.getsize(target) if os.path.isfile(target) else size
            print(f"{label:18} {len(names) / best[label]:8,.0f} instances/s"
                  f"  {read[label] / len(names) / 1024:8.1f} KiB read/instance"
                  f"  ({read[label] / archive_size:6.1%} of {archive_size / 2**20:.1f} MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
