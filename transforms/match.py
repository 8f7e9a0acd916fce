"""The pipeline's listing: ``--input`` patterns and filter lines → the files to read (SPEC §1).

Listing is done inside the pipeline, one *listing unit* (a file pattern) per element,
so that a large input is listed by many workers at once rather than by the launcher
(Beam does not parallelise one pattern's listing, apache/beam#20557). What a unit
matches, and how an input is split into units, is :mod:`transforms.listing` (which the
launcher also uses, before Beam is imported); the units come from its
:func:`~transforms.listing.listing_units`, or from the filter file when the input is
laid out by UID.
"""

from __future__ import annotations

import concurrent.futures
import queue
from typing import Iterable, Iterator, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from transforms.counters import NAMESPACE
from transforms.filter_file import FilterFile, uid_layout_patterns
from transforms.listing import LISTING_CONCURRENCY, file_identity, first_path, iter_files, match_files
from transforms.storage import InputFile, is_remote


def looks_laid_out_by_uid(roots: Iterable[str], filter_file: FilterFile, probe_lines: int = 10) -> bool:
    """True if the first filter lines find files under the roots' UID layouts.

    Only a handful of small listings: enough to decide that each filter line can be
    turned into path prefixes, so that only the selected objects are listed and read.
    """
    for root in roots:
        for line in filter_file.lines[:probe_lines]:
            for pattern in uid_layout_patterns(root, line):
                if match_files(pattern):
                    return True
    return False


def uid_listing_units(roots: Iterable[str], filter_file: FilterFile) -> Iterator[str]:
    for root in roots:
        for line in filter_file.lines:
            yield from uid_layout_patterns(root, line)


class ListFiles(beam.DoFn):
    """A listing unit (file pattern) → the files it matches, with their sizes, emitted
    as listing finds them (Cloud Storage: page by page).

    Remote units are listed ``LISTING_CONCURRENCY`` at a time on threads, since each is
    a chain of requests that mostly waits: ``process`` starts its unit and emits the files
    already found by any unit, waiting only while too many are in flight;
    ``finish_bundle`` emits the rest as it arrives. A listing error fails the bundle, as
    it would listed inline. Local units are listed inline.
    """

    def __init__(self, reporter=None, pipeline_options=None):
        self._options = pipeline_options
        self.matched = Metrics.counter(NAMESPACE, "files_listed")
        self._reporter = reporter  # pipeline.progress.ProgressReporter, or None

    def setup(self):
        self._pool = None

    def teardown(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self):
        self._found: queue.Queue = queue.Queue()
        self._in_flight = 0

    def process(self, pattern: str):
        if not is_remote(pattern):
            yield from self._emit(iter_files(pattern, self._options))
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(LISTING_CONCURRENCY, thread_name_prefix="list")
        self._in_flight += 1
        self._pool.submit(self._list, pattern, self._found)
        yield from self._emit(self._arrived(until_in_flight=LISTING_CONCURRENCY))

    def finish_bundle(self):
        for input_file in self._emit(self._arrived(until_in_flight=0)):
            yield GlobalWindows.windowed_value(input_file)
        if self._reporter is not None:
            self._reporter.flush()

    def _list(self, pattern: str, found: queue.Queue) -> None:
        """On a listing thread: every file of the unit into ``found`` (its bundle's queue),
        then its end (or the error that ended it)."""
        try:
            for input_file in iter_files(pattern, self._options):
                found.put(input_file)
        except BaseException as error:  # re-raised in the bundle's thread
            found.put(_ListingFailed(error))
        else:
            found.put(_UNIT_LISTED)

    def _arrived(self, until_in_flight: int):
        """The files found so far; then, while more than ``until_in_flight`` units are
        being listed, the files as they arrive."""
        while True:
            try:
                item = self._found.get(block=self._in_flight > until_in_flight)
            except queue.Empty:
                return
            if item is _UNIT_LISTED:
                self._in_flight -= 1
            elif isinstance(item, _ListingFailed):
                self._in_flight -= 1
                raise item.error
            else:
                yield item

    def _emit(self, input_files):
        for input_file in input_files:
            self.matched.inc()
            if self._reporter is not None:
                self._reporter.listed(1)
            yield input_file


class _ListingFailed(NamedTuple):
    error: BaseException


_UNIT_LISTED = object()


class MatchInputs(beam.PTransform):
    """Listing units → distinct input files, spread over workers.

    The units are reshuffled so that each is listed by some worker. If the units may
    overlap (:func:`units_may_overlap`: overlapping patterns, local links), the files
    are deduplicated by a GroupByKey, which also redistributes them for the read step.
    Otherwise nothing waits for the listing to end: each file goes on to be read as soon
    as its listing page arrives.
    """

    def __init__(self, reporter=None, deduplicate: bool = True, pipeline_options=None):
        super().__init__()
        self.reporter = reporter
        self.deduplicate = deduplicate
        self.pipeline_options = pipeline_options

    def expand(self, units):
        files = (
            units
            | "SpreadUnits" >> beam.Reshuffle()
            | "List" >> beam.ParDo(ListFiles(self.reporter, self.pipeline_options))
        )
        if self.deduplicate:
            files = (
                files
                | "KeyByFile" >> beam.Map(lambda f: (file_identity(f), f))
                | "Deduplicate" >> beam.CombinePerKey(first_path)
                | "AsInputFile" >> beam.Values()
            )
        return files | "CountDistinct" >> beam.ParDo(CountMatched())


class CountMatched(beam.DoFn):
    """Each distinct input file → itself, counted as matched (``files_matched``)."""

    def __init__(self):
        self.matched = Metrics.counter(NAMESPACE, "files_matched")

    def process(self, input_file: InputFile):
        self.matched.inc()
        yield input_file
