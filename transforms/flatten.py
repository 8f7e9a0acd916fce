"""The read-and-flatten step: an input file → its row and schema fragment, or a dead letter.

``ReadInstances`` reads the header (up to Pixel Data) through :mod:`transforms.storage`,
selects it against the filter file (a side input), and flattens it with the pure
:func:`schemas.convert.flatten_instance`. An input that fails becomes a dead-letter
record on the :data:`DEAD_LETTERS` tagged output, the way Beam's own sinks emit failed
rows: failures are values, never exceptions that stop a worker. Messages never quote tag
values.
"""

from __future__ import annotations

import os
import sys
import time
from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.convert import BASE_FRAGMENT, flatten_instance
from schemas.merge import add_fragment, merge_fragments
from transforms import counters
from transforms.filter_file import FilterFile
from transforms.header import describe_error, read_header, silence_pydicom
from transforms.storage import InputFile, Opener

#: The tag of the dead-letter output of :class:`ReadInstances`.
DEAD_LETTERS = "dead_letters"
#: The stages a dead letter names: listing (set on the InputFile), reading, converting.
LIST, READ, CONVERT = "list", "read", "convert"


class Instance(NamedTuple):
    """What one input file became."""

    row: dict
    fragment: frozenset
    filter_lines: tuple
    path: str = ""  # the input file's path (the files table, pipeline/ledger.py)


def dead_letter(path: str, stage: str, error_type: str, message: str, run_started: str | None = None) -> dict:
    """The dead-letter record of one failed input (the ``TABLE_errors`` row)."""
    return {"path": path, "stage": stage, "error_type": error_type, "message": message, "run_started": run_started}


class Progress:
    """Prints, at most every ``seconds``, how many files this process has read."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.count = 0
        self.started = self.last = time.monotonic()

    def tick(self) -> None:
        self.count += 1
        if not self.seconds:
            return
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            rate = self.count / (now - self.started)
            print(
                f"dicom-bq-export: worker {os.getpid()} has read {self.count:,} files ({rate:,.0f}/s)",
                file=sys.stderr,
                flush=True,
            )


class ReadInstances(beam.DoFn):
    """An input file → :class:`Instance` (main output) or a dead letter (``DEAD_LETTERS``).

    With a filter file (side input), instances no line selects are counted as
    ``not_selected`` and dropped: they are neither successes nor failures.
    """

    def __init__(self, pipeline_options=None, progress_seconds: float = 0, run_started: str | None = None):
        self._options = pipeline_options
        self._progress_seconds = progress_seconds
        self._run_started = run_started
        self.counters = {name: Metrics.counter(counters.NAMESPACE, name) for name in counters.READ_COUNTERS}
        self.bytes_per_instance = Metrics.distribution(counters.NAMESPACE, counters.BYTES_READ_PER_INSTANCE)

    def setup(self):
        silence_pydicom()
        self._opener = Opener(self._options)
        self._progress = Progress(self._progress_seconds)

    def process(self, input_file: InputFile, filter_file: FilterFile | None = None):
        self._progress.tick()
        if input_file.error is not None:
            yield self._failed(input_file, LIST, *input_file.error)
            return
        stage = READ
        counting = None
        try:
            fileobj, counting = self._opener.open(input_file)
            with fileobj:
                header = read_header(fileobj)
                lines: tuple = ()
                if filter_file is not None:
                    lines = tuple(filter_file.selecting_lines(*header.uids))
                    if not lines:
                        self.counters[counters.NOT_SELECTED].inc()
                        return
                stage = CONVERT
                flattened = flatten_instance(
                    header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred
                )
        except Exception as error:  # any failure of one input is that input's dead letter
            yield self._failed(input_file, stage, type(error).__name__, describe_error(error))
            return
        finally:
            if counting is not None:
                self.counters[counters.BYTES_READ].inc(counting.bytes_read)
        self.counters[counters.SUCCEEDED].inc()
        self.bytes_per_instance.update(counting.bytes_read)
        for name, count in flattened.counts.items():
            if name in self.counters:
                self.counters[name].inc(count)
        yield Instance(flattened.row, flattened.fragment, lines, input_file.path)

    def _failed(self, input_file: InputFile, stage: str, error_type: str, message: str):
        self.counters[counters.FAILED].inc()
        Metrics.counter(counters.NAMESPACE, counters.failed_counter(error_type)).inc()
        record = dead_letter(input_file.path, stage, error_type, message, self._run_started)
        return beam.pvalue.TaggedOutput(DEAD_LETTERS, record)


class MergeFragments(beam.CombineFn):
    """The table's schema fragment: :func:`schemas.merge.merge_fragments` of the
    instances' fragments and the fields every table has (:data:`BASE_FRAGMENT`)."""

    def create_accumulator(self):
        return BASE_FRAGMENT

    def add_input(self, accumulator, fragment):
        return add_fragment(accumulator, fragment)

    def merge_accumulators(self, accumulators):
        return merge_fragments(accumulators)

    def extract_output(self, accumulator):
        return accumulator


class UnionOfLines(beam.CombineFn):
    """The set of filter line numbers that selected at least one instance."""

    def create_accumulator(self):
        return set()

    def add_input(self, accumulator, lines):
        accumulator.update(lines)
        return accumulator

    def merge_accumulators(self, accumulators):
        return set().union(*accumulators)

    def extract_output(self, accumulator):
        return sorted(accumulator)
