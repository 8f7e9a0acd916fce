"""The read-and-flatten step: an input file → its row and schema fragment, or a dead letter.

``ReadInstances`` reads the header (up to Pixel Data) through :mod:`transforms.storage`,
selects it against the filter file (a side input), and flattens it with the pure
:func:`schemas.convert.flatten_instance`. An input that fails becomes a dead-letter
record on the :data:`DEAD_LETTERS` tagged output, the way Beam's own sinks emit failed
rows: failures are values, never exceptions that stop a worker. Messages never quote tag
values.

The rule for one input is :func:`read_input`, a function of the input, an opener and the
filter file; the DoFn only wires it. It reads ``opener.concurrency(input)`` inputs at
once on a thread pool created with the DoFn: remote inputs (Cloud Storage, and every
other kind ``Opener.open`` serves) wait on the network, not the CPU. Beam's metrics are
bound to the DoFn's own thread, so the threads return what happened and the DoFn counts
it.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from schemas.convert import BASE_FRAGMENT, flatten_instance
from schemas.merge import add_fragment, merge_fragments
from transforms import counters
from transforms.filter_file import FilterFile
from transforms.header import describe_error, read_header, silence_pydicom
from transforms.storage import REMOTE_CONCURRENCY, InputFile, Opener

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


class Outcome(NamedTuple):
    """What reading one input came to: an :class:`Instance`, a ``failure``
    ``(stage, error_type, message)``, or neither (not selected by the filter file)."""

    instance: Instance | None = None
    failure: tuple[str, str, str] | None = None
    bytes_read: int = 0
    counts: dict | None = None
    source_counts: dict | None = None  # a source's own counters (DICOMweb requests, retries)


def read_input(input_file: InputFile, opener: Opener, filter_file: FilterFile | None = None) -> Outcome:
    """Read, select and flatten one input; never raises for a bad input (its failure is
    in the outcome). Safe to call from several threads with one ``opener``."""
    if input_file.error is not None:
        return Outcome(failure=(LIST, *input_file.error))
    stage = READ
    counting = None
    try:
        fileobj, counting = opener.open(input_file)
        with fileobj:
            header = read_header(fileobj)
            lines: tuple = ()
            if filter_file is not None:
                lines = tuple(filter_file.selecting_lines(*header.uids))
                if not lines:
                    return Outcome(bytes_read=counting.bytes_read, source_counts=_source_counts(counting))
            stage = CONVERT
            flattened = flatten_instance(
                header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred
            )
    except Exception as error:  # any failure of one input is that input's dead letter
        bytes_read = counting.bytes_read if counting is not None else 0
        return Outcome(failure=(stage, type(error).__name__, describe_error(error)), bytes_read=bytes_read,
                       source_counts=_source_counts(counting))
    instance = Instance(flattened.row, flattened.fragment, lines, input_file.path)
    return Outcome(instance, None, counting.bytes_read, flattened.counts, _source_counts(counting))


def _source_counts(counting) -> dict | None:
    """The counters an opened input's source kept (a DICOMweb retrieve: requests, retries)."""
    return getattr(counting, "counts", None) if counting is not None else None


def dead_letter(path: str, stage: str, error_type: str, message: str, run_started: str | None = None) -> dict:
    """The dead-letter record of one failed input (the ``TABLE_errors`` row)."""
    return {"path": path, "stage": stage, "error_type": error_type, "message": message, "run_started": run_started}


class ReadInstances(beam.DoFn):
    """An input file → :class:`Instance` (main output) or a dead letter (``DEAD_LETTERS``).

    Inputs are read ``opener.concurrency(input)`` at a time on a thread pool: each
    ``process`` call submits its input and emits the outcomes already done, in input
    order, keeping at most ``2 × concurrency`` in flight; ``finish_bundle`` emits the
    rest. One at a time (local disk) reads in the calling thread. With a filter file
    (side input), instances no line selects are counted as ``not_selected`` and
    dropped: they are neither successes nor failures.
    """

    def __init__(self, pipeline_options=None, run_started: str | None = None, reporter=None,
                 opener: Opener | None = None):
        self._options = pipeline_options
        self._opener_settings = opener  # an Opener with the archive options (else the default one)
        self._reporter = reporter  # pipeline.progress.ProgressReporter, or None
        self._run_started = run_started
        self.counters = {name: Metrics.counter(counters.NAMESPACE, name) for name in counters.READ_COUNTERS}
        self.bytes_per_instance = Metrics.distribution(counters.NAMESPACE, counters.BYTES_READ_PER_INSTANCE)

    def setup(self):
        silence_pydicom()
        self._opener = self._opener_settings or Opener(self._options)
        self._pool = None

    def teardown(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self):
        self._pending: collections.deque = collections.deque()

    def process(self, input_file: InputFile, filter_file: FilterFile | None = None):
        concurrency = self._opener.concurrency(input_file)
        if concurrency <= 1 and not self._pending:
            yield from self._emit(input_file, read_input(input_file, self._opener, filter_file))
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(REMOTE_CONCURRENCY, thread_name_prefix="read")
        self._pending.append((input_file, self._pool.submit(read_input, input_file, self._opener, filter_file)))
        while self._pending and (self._pending[0][1].done() or len(self._pending) > 2 * concurrency):
            done_file, future = self._pending.popleft()
            yield from self._emit(done_file, future.result())

    def finish_bundle(self):
        while self._pending:
            done_file, future = self._pending.popleft()
            for output in self._emit(done_file, future.result()):
                if isinstance(output, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
                else:
                    yield GlobalWindows.windowed_value(output)
        if self._reporter is not None:
            self._reporter.flush()

    def _emit(self, input_file: InputFile, outcome: Outcome):
        if self._reporter is not None:
            self._reporter.read(1)
        self.counters[counters.BYTES_READ].inc(outcome.bytes_read)
        for name, count in (outcome.source_counts or {}).items():
            if count:
                self.counters[name].inc(count)
        if outcome.failure is not None:
            yield self._failed(input_file, *outcome.failure)
            return
        if outcome.instance is None:
            self.counters[counters.NOT_SELECTED].inc()
            return
        self.counters[counters.SUCCEEDED].inc()
        self.bytes_per_instance.update(outcome.bytes_read)
        for name, count in outcome.counts.items():
            if name in self.counters:
                self.counters[name].inc(count)
        yield outcome.instance

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
