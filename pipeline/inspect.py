"""``dicom-bq-export inspect FILE...``: what each file will become, one JSON line per file.

A FILE may also be an archive member (``ARCHIVE.zip#member/path``) or a DICOMweb instance
URL (``dicomweb+https://HOST/ROOT/studies/S/series/SE/instances/I``, credentials from the
environment as for an export): both are read as the export reads them.

Each line is ``{"path": ..., "row": {...}, "schema": [...]}`` for an instance, or
``{"path": ..., "error": {"type": ..., "message": ...}}`` for a file that cannot be
converted. Folders are expanded to the files below them. The exit status is 0 unless
the arguments are wrong: a file that fails is a result, not an error of the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, TextIO

from schemas.convert import flatten_instance
from schemas.merge import to_bigquery_schema
from transforms.header import describe_error, read_header


def inspect_file(path: str) -> dict:
    """The JSON object ``inspect`` prints for one path."""
    try:
        with _open(path) as fileobj:
            header = read_header(fileobj)
            flattened = flatten_instance(
                header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred
            )
        return {"path": path, "row": flattened.row, "schema": to_bigquery_schema(flattened.fragment)}
    except Exception as error:  # every failure is reported as data, like a dead letter
        return {"path": path, "error": {"type": type(error).__name__, "message": describe_error(error)}}


def _open(path: str):
    """Local files directly; remote ones, archive members and DICOMweb instances as the
    pipeline reads them (ranged reads, one member, a streamed retrieve)."""
    from transforms.sources import archives, dicomweb
    from transforms.storage import InputFile, Opener

    if dicomweb.is_instance_url(path) or (
        "://" not in path and not os.path.lexists(path) and archives.split_member_path(path) is not None
    ):
        fileobj, _counter = Opener().open(InputFile(path, 0))
        return fileobj
    if "://" not in path:
        from transforms.limits import open_regular_file

        return open_regular_file(path)  # a FIFO or device would block or never end
    from transforms.listing import match_files
    from transforms.storage import Opener

    matched = match_files(path)
    if not matched:
        raise FileNotFoundError(f"no such file: {path}")
    fileobj, _counter = Opener().open(matched[0])
    return fileobj


def _expand(paths: list[str]) -> Iterator[str]:
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield os.path.join(root, name)
        else:
            yield path


def run(argv: list[str], out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="dicom-bq-export inspect",
        description="Print, for each DICOM file, the BigQuery row and schema it becomes (JSON lines).",
    )
    parser.add_argument("paths", nargs="+", metavar="FILE", help="DICOM files or folders (gs:// too)")
    args = parser.parse_args(argv)
    try:
        for path in _expand(args.paths):
            out.write(json.dumps(inspect_file(path), ensure_ascii=False) + "\n")
        out.flush()
    except BrokenPipeError:  # the reader stopped (| head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
