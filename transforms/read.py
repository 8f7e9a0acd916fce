"""Header-only reads from any filesystem Beam knows, counting bytes; the flatten step.

``ReadInstances`` turns each input file into an :class:`Instance` (row, schema fragment,
the filter lines that selected it) or fails it with an :class:`InstanceFailure` that
Beam's exception handling routes to the dead-letter output. Messages never quote tag
values.

Reading: a 64 KiB buffer over a raw reader that fetches only what is asked for. On
Cloud Storage that raw reader issues ranged GETs through the storage client Beam itself
configures, so a header of a few KB costs one small request, not the whole object, and
``bytes_read`` counts what was really transferred.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.convert import BASE_FRAGMENT, flatten_instance
from transforms.filter_file import FilterFile
from transforms.header import describe_error, read_header, silence_pydicom
from transforms.match import NAMESPACE, InputFile
from pipeline.progress import reporter_from_environment  # progress wiring

#: Read-ahead of the buffer in front of every file: one request covers most headers.
READ_BUFFER_BYTES = 64 * 1024

#: The counters of a run (Beam metrics in the ``dicom_bq_export`` namespace).
COUNTERS = (
    "succeeded",
    "failed",
    "not_selected",
    "bytes_read",
    "dropped_tags",
    "moved_to_other_elements",
    "charset_fallbacks",
    "undecodable_values",
    "too_deep",
)


class Instance(NamedTuple):
    """What one input file became."""

    row: dict
    fragment: frozenset
    filter_lines: tuple


class InstanceFailure(Exception):
    """An input that failed: raised so that Beam's exception handling dead-letters it.

    Its repr is the dead letter itself (JSON), because that repr is what Beam passes on.
    """

    def __init__(self, path: str, stage: str, error_type: str, message: str):
        super().__init__(path, stage, error_type, message)
        self.record = {"path": path, "stage": stage, "error_type": error_type, "message": message}

    def __repr__(self) -> str:
        return json.dumps(self.record)

    __str__ = __repr__


def dead_letter(failed, run_started: str | None = None) -> dict:
    """Beam's dead-letter element ``(input, (type, repr, traceback))`` → our record.

    The traceback is not kept: its text can quote values.
    """
    _element, (_error_class, error_repr, _traceback) = failed  # only InstanceFailure is caught
    record = json.loads(error_repr)
    record["run_started"] = run_started
    return record


class _CountingRaw(io.RawIOBase):
    """A raw reader that counts the bytes it delivers (what was read from storage)."""

    def __init__(self, raw):
        self._raw = raw
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._raw.readinto(buffer)
        self.bytes_read += count or 0
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._raw.close()
        super().close()


class _RangedBlob(io.RawIOBase):
    """A Cloud Storage object read by ranged GETs, exactly the ranges asked for."""

    def __init__(self, blob, size: int):
        self._blob = blob
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._size - self._position)
        if count <= 0:
            return 0
        data = self._blob.download_as_bytes(
            start=self._position, end=self._position + count - 1, raw_download=True, checksum=None
        )
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._position = offset
        elif whence == io.SEEK_CUR:
            self._position += offset
        else:
            self._position = self._size + offset
        return self._position

    def tell(self) -> int:
        return self._position


class Opener:
    """Opens input files for header reads; one per DoFn instance (holds the GCS client)."""

    def __init__(self, pipeline_options=None):
        self._options = pipeline_options
        self._storage = None

    def open(self, input_file: InputFile):
        """``(file object, counter)``; ``counter.bytes_read`` is what came from storage."""
        path = input_file.path
        if path.startswith("gs://"):
            raw = _RangedBlob(self._blob(path), input_file.size)
        elif "://" in path:  # other filesystems Beam knows: their own reader, counted
            from apache_beam.io.filesystems import FileSystems

            raw = FileSystems.open(path)
        else:
            raw = io.FileIO(path, "rb")
        counting = _CountingRaw(raw)
        return io.BufferedReader(counting, buffer_size=READ_BUFFER_BYTES), counting

    def _blob(self, path: str):
        if self._storage is None:
            from apache_beam.io.gcp import gcsio

            self._storage = gcsio.create_storage_client(self._options or _default_options())
        bucket, name = path[len("gs://"):].split("/", 1)
        return self._storage.bucket(bucket).blob(name)


def _default_options():
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions([])


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
    """An input file → :class:`Instance`, or :class:`InstanceFailure` for the dead letters.

    With a filter file (side input), instances no line selects are counted as
    ``not_selected`` and dropped: they are neither successes nor failures.
    """

    def __init__(self, pipeline_options=None, progress_seconds: float = 0):
        self._options = pipeline_options
        self._progress_seconds = progress_seconds
        self._reporter = reporter_from_environment()  # progress wiring
        self.counters = {name: Metrics.counter(NAMESPACE, name) for name in COUNTERS}
        self.bytes_per_instance = Metrics.distribution(NAMESPACE, "bytes_read_per_instance")

    def setup(self):
        silence_pydicom()
        self._opener = Opener(self._options)

    def finish_bundle(self):  # progress wiring
        self._reporter.flush()  # progress wiring

    def process(self, input_file: InputFile, filter_file: FilterFile | None = None):
        self._reporter.read(1)  # progress wiring
        stage = "read"
        counting = None
        try:
            fileobj, counting = self._opener.open(input_file)
            with fileobj:
                header = read_header(fileobj)
                lines: tuple = ()
                if filter_file is not None:
                    lines = tuple(filter_file.selecting_lines(*header.uids))
                    if not lines:
                        self.counters["not_selected"].inc()
                        return
                stage = "convert"
                flattened = flatten_instance(
                    header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred
                )
        except Exception as error:
            self.counters["failed"].inc()
            raise InstanceFailure(input_file.path, stage, type(error).__name__, describe_error(error)) from None
        finally:
            if counting is not None:
                self.counters["bytes_read"].inc(counting.bytes_read)
        self.counters["succeeded"].inc()
        self.bytes_per_instance.update(counting.bytes_read if counting is not None else 0)
        for name, count in flattened.counts.items():
            if name in self.counters:
                self.counters[name].inc(count)
        yield Instance(flattened.row, flattened.fragment, lines)


class MergeFragments(beam.CombineFn):
    """Union of schema fragments (associative and commutative, see schemas.merge)."""

    def create_accumulator(self):
        return set(BASE_FRAGMENT)

    def add_input(self, accumulator, fragment):
        accumulator |= fragment
        return accumulator

    def merge_accumulators(self, accumulators):
        return set().union(*accumulators)

    def extract_output(self, accumulator):
        return frozenset(accumulator)


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
