"""Staging a local run's outputs as files, for destinations loaded after the pipeline
(DuckDB) and for the launcher's summary.

Rows and dead letters are written as newline-delimited JSON shards (what a BigQuery
load job takes), the schema and the filter lines that selected something as one small
JSON file each.

Where: a folder per run, ``PREFIX.staging-RUN-PID``, whose prefix the destination
chooses (beside a DuckDB file, so rows never land in the system's temporary folder).
The run removes it when it ends, however it ends; a run that was killed cannot, so
every run first removes the folders of runs whose process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import uuid
from typing import Iterator, NamedTuple

import apache_beam as beam

from pipeline.graph import ExportOutputs
from transforms.read import JsonRow

_STAGING = ".staging-"
_PID = re.compile(r"-(\d+)$")


@contextlib.contextmanager
def staging_folder(prefix: str, run_id: str) -> Iterator[str]:
    """A new folder ``PREFIX.staging-RUN_ID`` (``run_id`` ends with this process's id),
    removed on exit; leftovers of killed runs with the same prefix are removed first."""
    remove_leftovers(prefix)
    path = f"{prefix}{_STAGING}{run_id}"
    os.makedirs(path, mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(prefix: str) -> list[str]:
    """Remove the staging folders under ``prefix`` whose run's process no longer exists;
    return their paths."""
    removed = []
    for path in glob.glob(glob.escape(prefix) + _STAGING + "*"):
        match = _PID.search(path)
        if match and os.path.isdir(path) and not _process_exists(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

ROWS = "rows"
DEAD_LETTERS = "dead_letters"
SCHEMA = "schema"
FILTER_LINES = "filter_lines_used"
FILES = "files"  # the files table's records (pipeline/ledger.py)
GONE = "gone"  # recorded paths no longer listed (--incremental)
SPOOL = "spool"  # a folder of rows as read, before completion (pipeline/spool.py)


class _WriteJsonLines(beam.DoFn):
    """Each bundle's elements → one JSON-lines file in a local staging folder.

    Unlike ``WriteToText`` this adds no stage to the graph (no temporary files to
    finalise): the launcher globs the folder once the pipeline is done. Only for local
    runners, where a failed bundle fails the run, so no bundle is ever written twice.
    """

    def __init__(self, directory: str, name: str):
        self.directory = directory
        self.name = name

    def start_bundle(self):
        self._handle = None

    def process(self, element):
        if self._handle is None:
            path = os.path.join(self.directory, f"{self.name}-{uuid.uuid4().hex}.json.partial")
            self._handle = open(path, "wb")
        if type(element) is JsonRow:  # encoded by a read process: written as it is
            self._handle.write(element + b"\n")
        else:
            self._handle.write(json.dumps(element).encode("ascii") + b"\n")  # ASCII: non-ASCII is escaped

    def finish_bundle(self):
        if self._handle is not None:
            self._handle.close()
            os.replace(self._handle.name, self._handle.name[: -len(".partial")])
            self._handle = None


def _stage(pcoll, directory: str, name: str) -> None:
    """Stage ``pcoll`` (or each PCollection of a tuple, on its own: never flattened,
    which Beam's local runner would keep whole) as ``name`` files."""
    for index, part in enumerate(pcoll if isinstance(pcoll, tuple) else (pcoll,)):
        part | f"Stage_{name}{index or ''}" >> beam.ParDo(_WriteJsonLines(directory, name))


def stage_table(outputs: ExportOutputs, directory: str) -> None:
    """Add the writes of the rows, dead letters and schema under ``directory``."""
    _stage(outputs.rows, directory, ROWS)
    _stage(outputs.dead_letters, directory, DEAD_LETTERS)
    _stage(outputs.schema, directory, SCHEMA)
    if outputs.files is not None:
        _stage(outputs.files, directory, FILES)
    if outputs.gone is not None:
        _stage(outputs.gone, directory, GONE)


def stage_summary(outputs: ExportOutputs, directory: str) -> None:
    """Add the write of what the launcher's summary needs (filter lines used) under
    ``directory``."""
    if outputs.filter_lines_used is not None:
        _stage(outputs.filter_lines_used, directory, FILTER_LINES)


class StagedRun(NamedTuple):
    row_files: list[str]
    dead_letter_files: list[str]
    schema: list[dict]
    filter_lines_used: list[int] | None
    file_record_files: list[str] = []
    gone_files: list[str] = []


def read_staged(directory: str) -> StagedRun:
    def files(name):
        return sorted(glob.glob(os.path.join(directory, f"{name}*.json")))

    def single(name):
        paths = files(name)
        if not paths:
            return None
        with open(paths[0], encoding="utf-8") as handle:
            text = handle.read().strip()
        return json.loads(text) if text else None

    return StagedRun(
        files(ROWS), files(DEAD_LETTERS), single(SCHEMA) or [], single(FILTER_LINES), files(FILES), files(GONE)
    )
