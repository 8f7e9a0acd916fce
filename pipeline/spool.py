"""Rows completed with the merged schema without holding them in memory.

A row built from one instance holds only the fields that instance has; every
REPEATED field of the merged schema must be filled in as ``[]``
(:func:`schemas.rows.with_empty_lists`). The merged schema is known only once every
instance has been read, so completing rows as they come means waiting for it as a side
input, and then Beam's local runner keeps every row in memory until reading ends
(3.8 GiB at 100,000 instances). Beam's local runner also keeps whole any PCollection
that flattens the outputs of different steps (files read, streamed ``.tar.gz`` members,
DICOMweb metadata), so those are spooled each on its own and only file paths are
flattened.

:class:`CompleteRows` instead spools the rows to files as they are read, in the same
fused step as reading (a file per ``ROWS_PER_SPOOL_FILE`` rows, so that completion
spreads over the workers), and only the files' paths wait for the schema. The next
step reads each file back, one row at a time, and yields it completed to whatever
writes it (fused with it), so a worker holds one row, not the table.

A row read by a local run's read process arrives already pickled
(:class:`transforms.read.PickledRow`) and is written as it is (with ``--incremental``'s
``(path, row)`` pairs, the pair's pickle holds those bytes, unpickled where the row is
kept).

The spool files are pickles this run wrote into its own staging folder (made 0700 by
:mod:`pipeline.staging`) and read back; they are never read from anywhere else, and are
removed with that folder.
"""

from __future__ import annotations

import pickle
import uuid

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsList, AsSingleton
from apache_beam.transforms.window import GlobalWindows

from schemas.rows import with_empty_lists
from transforms.read import PickledRow, as_row

#: Rows per spool file: enough that a file's overhead is negligible, few enough that
#: a 10,000-instance run gives the completion step work for every worker.
ROWS_PER_SPOOL_FILE = 2_000
_SUFFIX = ".rows.pickle"


class _SpoolRows(beam.DoFn):
    """Rows → spool files in ``directory``; yields each file's path once it is closed
    (a retried bundle's files are never yielded, so they are never read)."""

    def __init__(self, directory: str, rows_per_file: int):
        self.directory = directory
        self.rows_per_file = rows_per_file

    def start_bundle(self):
        self._handle = None

    def process(self, row):
        if self._handle is None:
            self._path = FileSystems.join(self.directory, f"{uuid.uuid4().hex}{_SUFFIX}")
            self._handle = FileSystems.create(self._path, compression_type=CompressionTypes.UNCOMPRESSED)
            self._rows = 0
        if type(row) is PickledRow:  # pickled by a read process: written as it is
            self._handle.write(row)
        else:
            pickle.dump(row, self._handle, protocol=pickle.HIGHEST_PROTOCOL)  # one pickle per row: its own memo
        self._rows += 1
        if self._rows >= self.rows_per_file:
            yield self._close()

    def finish_bundle(self):
        if self._handle is not None:
            yield GlobalWindows.windowed_value(self._close())

    def _close(self) -> str:
        self._handle.close()
        self._handle = None
        return self._path


def read_spooled(path: str):
    """The rows of one spool file, one at a time."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        while True:
            try:
                yield pickle.load(handle)
            except EOFError:
                return


def _complete_spooled(path: str, schema: list[dict]):
    for row in read_spooled(path):
        yield with_empty_lists(row, schema)


class _CompleteKept(beam.DoFn):
    """``(path, row)`` pairs (or spool files of them) → the rows of the kept paths, completed."""

    def __init__(self, spooled: bool):
        self.spooled = spooled
        self._kept_list = self._kept = None

    def process(self, element, schema, kept_paths):
        if kept_paths is not self._kept_list:  # the side input, made a set once per worker
            self._kept_list, self._kept = kept_paths, set(kept_paths)
        for path, row in read_spooled(element) if self.spooled else [element]:
            if path in self._kept:
                yield with_empty_lists(as_row(row), schema)


class CompleteRows(beam.PTransform):
    """Row PCollections (a tuple: one per source of instances) → one PCollection of the
    rows completed with ``schema`` (a one-element PCollection, the merged BigQuery schema).

    With ``kept_paths`` (a PCollection of input paths: ``--incremental``'s one instance
    per SOPInstanceUID) the parts hold ``(path, row)`` pairs, and only the rows of those
    paths come out: the choice is made where rows are written, so that no step groups
    whole rows.

    With ``directory`` (local or ``gs://``, removed by the caller after the run) each part
    is spooled there and only file paths are flattened and wait for the schema; without
    it, the rows wait for the schema as a side input (what a runner that does not keep a
    waiting PCollection in memory, such as Dataflow, does well).
    """

    def __init__(self, schema, directory: str | None, kept_paths=None, rows_per_file: int = ROWS_PER_SPOOL_FILE):
        super().__init__()
        self.schema = schema
        self.directory = directory
        self.kept_paths = kept_paths
        self.rows_per_file = rows_per_file

    def expand(self, parts):
        parts = tuple(parts) if isinstance(parts, (tuple, list)) else (parts,)
        schema = AsSingleton(self.schema)
        if self.directory is None:
            rows = parts[0] if len(parts) == 1 else parts | "AllRows" >> beam.Flatten()
            if self.kept_paths is not None:
                return rows | "CompleteKept" >> beam.ParDo(_CompleteKept(False), schema, AsList(self.kept_paths))
            return rows | "Complete" >> beam.Map(lambda row, schema: with_empty_lists(as_row(row), schema), schema)
        spooled = [
            part | f"Spool{index}" >> beam.ParDo(_SpoolRows(self.directory, self.rows_per_file))
            for index, part in enumerate(parts)
        ]
        files = spooled[0] if len(spooled) == 1 else spooled | "AllSpoolFiles" >> beam.Flatten()
        if self.kept_paths is not None:
            return files | "ReadCompletedKept" >> beam.ParDo(_CompleteKept(True), schema, AsList(self.kept_paths))
        return files | "ReadCompleted" >> beam.FlatMap(_complete_spooled, schema)
