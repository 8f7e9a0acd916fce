"""The read-and-flatten step: an input file → its row and schema fragment, or a dead letter.

``ReadInstances`` reads the header (up to Pixel Data) through :mod:`transforms.storage`,
selects it against the filter file (a side input), and flattens it with the pure
:func:`schemas.convert.flatten_instance`. An input that fails becomes a dead-letter
record on the :data:`DEAD_LETTERS` tagged output, the way Beam's own sinks emit failed
rows: failures are values, never exceptions that stop a worker. Messages never quote tag
values.

The rule for one input is :func:`transforms.read.read_input`, a function of the input,
an opener and the filter file; the DoFn only wires it, and decides where it runs:

* remote inputs (Cloud Storage, DICOMweb, every other kind ``Opener.open`` serves) wait
  on the network, not the CPU: ``opener.concurrency(input)`` of them are read at once on
  a thread pool created with the DoFn;
* local inputs are read in the calling thread, or, with ``processes`` (a local run in
  one Beam process), in chunks on that many processes of this machine
  (:class:`transforms.read.ReadProcesses`), which is how a local run uses every core;
* with ``processes``, so are Cloud Storage objects, each process with the launcher's
  client settings and its own threads: the requests wait and the headers are parsed
  outside Beam's process.

Beam's metrics are bound to the DoFn's own thread, so threads and processes return what
happened and the DoFn counts it, in input order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from schemas.convert import BASE_FRAGMENT
from schemas.merge import add_fragment, merge_fragments
from transforms import counters
from transforms.filter_file import FilterFile
from transforms.header import silence_pydicom
from transforms.read import (  # noqa: F401 (the read step's values, named here too)
    CHUNK_FILES,
    CONVERT,
    LIST,
    PICKLE,
    READ,
    REMOTE_CHUNK_FILES,
    Instance,
    Outcome,
    ReadProcesses,
    chunk_files,
    dead_letter,
    on_processes,
    read_input,
    same_filter,
    take,
)
from transforms.storage import REMOTE_CONCURRENCY, InputFile, Opener, client_settings

#: The tag of the dead-letter output of :class:`ReadInstances`.
DEAD_LETTERS = "dead_letters"
#: The tag of its files-table output (with ``record_file``): one record per input read.
FILE_RECORDS = "file_records"


class ReadInstances(beam.DoFn):
    """An input file → :class:`Instance` (main output) or a dead letter (``DEAD_LETTERS``).

    Remote inputs are read ``opener.concurrency(input)`` at a time on a thread pool;
    local inputs in the calling thread, or with ``processes`` > 0 (whole files; archive
    members stay here, where their archive's index is) in chunks of
    :data:`CHUNK_FILES` on that many processes, and so are Cloud Storage objects
    (:data:`REMOTE_CHUNK_FILES`; the processes get this process's client settings).
    Each ``process`` call emits the
    outcomes already done, in input order, keeping a bounded number in flight;
    ``finish_bundle`` emits the rest. With a filter file (side input), instances no line
    selects are counted as ``not_selected`` and dropped: they are neither successes nor
    failures.

    The processes are this machine's: ``processes`` is for a run whose Beam workers
    share the launcher's process (a local ``in_memory`` run). Should a read process die,
    its chunk is read again in this process and so is the rest of the run: no input is
    lost. Rows read there arrive encoded (``row_form``: :class:`transforms.read.PickledRow`
    or :class:`transforms.read.JsonRow`), rows read here as dicts.

    With ``record_file`` (``record_file(input_file, outcome)`` → a record), each input's
    files-table record is emitted on ``FILE_RECORDS`` as it is read: for a run where what
    the read step made of an input is all its record says (``pipeline.ledger.RecordRead``).
    """

    def __init__(self, pipeline_options=None, run_started: str | None = None, reporter=None,
                 opener: Opener | None = None, processes: int = 0, row_form: str = PICKLE, record_file=None):
        self._options = pipeline_options
        self._opener_settings = opener  # an Opener with the archive options (else the default one)
        self._reporter = reporter  # pipeline.progress.ProgressReporter, or None
        self._run_started = run_started
        self._processes = processes
        self._row_form = row_form  # how the processes hand rows over (transforms.read.PICKLE, JSON)
        self._record_file = record_file
        self.counters = {name: Metrics.counter(counters.NAMESPACE, name) for name in counters.READ_COUNTERS}
        self.bytes_per_instance = Metrics.distribution(counters.NAMESPACE, counters.BYTES_READ_PER_INSTANCE)

    def setup(self):
        silence_pydicom()
        self._opener = self._opener_settings or Opener(self._options)
        self._threads = None
        self._read_processes = None
        self._use_processes = self._processes > 0
        self._client = _UNKNOWN  # this process's Cloud Storage client settings, for the read processes
        self._most_in_flight = max(2 * REMOTE_CONCURRENCY, 2 * self._processes * max(CHUNK_FILES, REMOTE_CHUNK_FILES))

    def teardown(self):
        if getattr(self, "_threads", None) is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "_read_processes", None) is not None:
            self._read_processes.shutdown()

    def start_bundle(self):
        self._pending: collections.deque = collections.deque()  # (inputs, future of their outcomes)
        self._in_flight = 0
        self._chunk: list = []  # local inputs not yet handed to a read process
        self._filter_file = None

    def process(self, input_file: InputFile, filter_file: FilterFile | None = None):
        self._filter_file = filter_file
        local = self._opener.concurrency(input_file) <= 1
        if self._use_processes and on_processes(self._opener, input_file, self._cloud_storage(input_file)):
            self._chunk.append(input_file)
            if len(self._chunk) >= chunk_files(self._chunk[0]):
                self._submit_chunk()
        elif local and not self._pending and not self._chunk:
            yield from self._emit(input_file, read_input(input_file, self._opener, filter_file))
            return
        else:
            self._submit_chunk()  # inputs keep their order
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(REMOTE_CONCURRENCY, thread_name_prefix="read")
            self._add_pending([input_file], self._threads.submit(_read_one, input_file, self._opener, filter_file))
        while self._pending and (self._pending[0][1].done() or self._in_flight > self._most_in_flight):
            yield from self._emit_next()

    def finish_bundle(self):
        self._submit_chunk()
        while self._pending:
            for output in self._emit_next():
                if isinstance(output, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
                else:
                    yield GlobalWindows.windowed_value(output)
        if self._reporter is not None:
            self._reporter.flush()

    def _add_pending(self, inputs: list, future) -> None:
        self._pending.append((inputs, future))
        self._in_flight += len(inputs)

    def _submit_chunk(self) -> None:
        if not self._chunk:
            return
        chunk, self._chunk = self._chunk, []
        pool, future = self._processes_for(self._filter_file), None
        if pool is not None:
            try:
                future = pool.submit(chunk)
            except Exception as error:  # the processes could not start (BrokenProcessPool, a daemonic host…)
                self._stop_processes(f"could not start read processes ({type(error).__name__})")
        if future is None:
            future = concurrent.futures.Future()
            future.set_result([read_input(input_file, self._opener, self._filter_file) for input_file in chunk])
        self._add_pending(chunk, future)

    def _cloud_storage(self, input_file: InputFile) -> bool:
        """True if the read processes may read Cloud Storage objects: this process's
        client settings can be handed to them (asked for at the first object)."""
        if self._client is _UNKNOWN:
            if not self._opener.is_cloud_storage_object(input_file):
                return False
            try:
                self._client = client_settings(self._options)
            except Exception:  # noqa: BLE001 — no client here: the read on threads reports it, per input
                self._client = None
        return self._client is not None

    def _processes_for(self, filter_file):
        """The read processes (those the launcher started reading ahead, or started on
        first use, with the run's filter file), or None once they could not start or one
        died."""
        if not self._use_processes:
            return None
        if self._read_processes is None or not same_filter(self._read_processes.filter_file, filter_file):
            if self._read_processes is not None:
                self._read_processes.shutdown()
            client = self._client if self._client is not _UNKNOWN else None
            self._read_processes = take(self._processes, self._opener, filter_file, self._row_form, client is not None)
            if self._read_processes is not None:  # started by the launcher, reading ahead
                return self._read_processes
            try:
                self._read_processes = ReadProcesses(self._processes, self._opener, filter_file, self._row_form, client)
            except Exception as error:  # no fork server here, no room for its socket…
                self._stop_processes(f"could not start read processes ({type(error).__name__})")
                return None
        return self._read_processes

    def _stop_processes(self, why: str) -> None:
        if self._use_processes:
            logging.warning("dicom-bq-export: %s; reading in the launcher's process instead", why)
        self._use_processes = False
        if self._read_processes is not None:
            self._read_processes.shutdown()
            self._read_processes = None

    def _emit_next(self):
        inputs, future = self._pending.popleft()
        self._in_flight -= len(inputs)
        try:
            outcomes = future.result()
        except Exception as error:  # a read process died (BrokenProcessPool): its inputs are read here
            self._stop_processes(f"a read process failed ({type(error).__name__})")
            outcomes = [read_input(input_file, self._opener, self._filter_file) for input_file in inputs]
        for input_file, outcome in zip(inputs, outcomes):
            yield from self._emit(input_file, outcome)

    def _emit(self, input_file: InputFile, outcome: Outcome):
        if self._reporter is not None:
            self._reporter.read(1)
        if self._record_file is not None:
            yield beam.pvalue.TaggedOutput(FILE_RECORDS, self._record_file(input_file, outcome))
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


_UNKNOWN = object()


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


def _read_one(input_file: InputFile, opener: Opener, filter_file: FilterFile | None) -> list[Outcome]:
    return [read_input(input_file, opener, filter_file)]

