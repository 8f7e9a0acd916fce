"""What one input of a source became, counted and recorded exactly as the read step
(``transforms.flatten.ReadInstances``) does for a file: an :class:`Instance`, a dead letter
on the ``DEAD_LETTERS`` output, or nothing (not selected by the filter file).

The sources whose inputs are not read one by one through the opener — a streamed
``.tar.gz``, DICOMweb metadata mode — convert with this, so that their rows, dead letters
and counters cannot drift from the files'. Every input recorded here is also counted in
``files_matched`` (it was not counted when listed), so the run's accounting stays exact:
``succeeded + failed == files_matched − not_selected``.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import counters
from transforms.flatten import DEAD_LETTERS, Instance, dead_letter


class Outcomes:
    """The counters and records of one DoFn's inputs (create it in the DoFn's ``__init__``)."""

    def __init__(self, run_started: str | None = None, reporter=None):
        self._run_started = run_started
        self._reporter = reporter
        self.counters = {name: Metrics.counter(counters.NAMESPACE, name) for name in counters.READ_COUNTERS}
        self.matched = Metrics.counter(counters.NAMESPACE, counters.FILES_MATCHED)

    def seen(self) -> None:
        """One more input, not counted when listed: matched, listed and read."""
        self.matched.inc()
        if self._reporter is not None:
            self._reporter.listed(1)
        self.read()

    def read(self) -> None:
        """One more input read (for the progress display)."""
        if self._reporter is not None:
            self._reporter.read(1)

    def failed(self, path: str, stage: str, error_type: str, message: str):
        """The dead letter of one input, as a tagged output."""
        self.counters[counters.FAILED].inc()
        Metrics.counter(counters.NAMESPACE, counters.failed_counter(error_type)).inc()
        return beam.pvalue.TaggedOutput(DEAD_LETTERS, dead_letter(path, stage, error_type, message, self._run_started))

    def selected_lines(self, uids, filter_file) -> tuple | None:
        """The filter lines selecting an instance (``()`` without a filter file), or None
        (counted as ``not_selected``)."""
        if filter_file is None:
            return ()
        lines = tuple(filter_file.selecting_lines(*uids))
        if not lines:
            self.counters[counters.NOT_SELECTED].inc()
            return None
        return lines

    def succeeded(self, flattened, lines: tuple, path: str = "") -> Instance:
        self.counters[counters.SUCCEEDED].inc()
        for name, count in flattened.counts.items():
            if name in self.counters and count:
                self.counters[name].inc(count)
        return Instance(flattened.row, flattened.fragment, lines, path)

    def bytes_read(self, count: int) -> None:
        if count:
            self.counters[counters.BYTES_READ].inc(count)

    def flush(self) -> None:
        if self._reporter is not None:
            self._reporter.flush()
