"""From ``--input`` patterns and filter lines to the files to read (SPEC §1).

Listing is done inside the pipeline, one *listing unit* (a file pattern) per element,
so that a large input is listed by many workers at once rather than by the launcher
(Beam does not parallelise one pattern's listing, apache/beam#20557). The units come
from :func:`listing_units`, or from the filter file when the input is laid out by UID.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from typing import Iterable, Iterator, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.filter_file import FilterFile, uid_layout_patterns

NAMESPACE = "dicom_bq_export"
_GLOB_CHARS = set("*?[")


class InputFile(NamedTuple):
    path: str
    size: int
    error: tuple[str, str] | None = None  # (error_type, message): a dead letter, never opened


def _has_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


def _is_remote(pattern: str) -> bool:
    return "://" in pattern


def listing_units(pattern: str) -> list[str]:
    """The file patterns that list what one ``--input`` value means.

    A folder (local ``dir`` or ``dir/``, ``gs://bucket/prefix/``) means every file
    below it, at any depth and with any name. A Cloud Storage path without a glob may
    be an object or a prefix, so both are listed. Globs are Beam's (``**`` recurses).
    """
    if _is_remote(pattern):
        if pattern.endswith("/"):
            return [pattern + "**"]
        if not _has_glob(pattern):
            return [pattern, pattern + "/**"]
        return [pattern]
    if os.path.isdir(pattern):
        return [os.path.join(glob.escape(pattern), "**")]
    return [pattern]


def input_root(pattern: str) -> str | None:
    """The folder a pattern stands for (``root``, ``root/``, ``root/**``), else None."""
    if pattern.endswith("/**"):
        root = pattern[:-3]
    elif pattern.endswith("/"):
        root = pattern.rstrip("/")
    elif not _has_glob(pattern) and (_is_remote(pattern) or os.path.isdir(pattern)):
        root = pattern
    else:
        return None
    return None if _has_glob(root) else root


#: Sharding stops once a pattern has been split into this many listing units.
SHARD_TARGET = 64
#: …or after this many folder levels.
SHARD_MAX_DEPTH = 3


def shard_listing_units(units: Iterable[str], pipeline_options=None) -> list[str]:
    """Split each folder unit (``ROOT/**``) into one unit per sub-folder, so many workers
    list at once: ``ROOT/*`` (its own files) plus ``ROOT/SUB/**`` for each sub-folder,
    going deeper while there are few sub-folders (``ROOT/studies/**`` → one unit per
    study). Costs one delimiter listing per folder split, never a listing of objects.
    The shards match exactly the files the unit matched.
    """
    sharded: list[str] = []
    for unit in units:
        if not unit.endswith("/**") or _has_glob(unit[:-3]):
            sharded.append(unit)
            continue
        root = unit[:-3]
        level = [root]
        done: list[str] = []
        for _ in range(SHARD_MAX_DEPTH):
            if len(level) + len(done) >= SHARD_TARGET:
                break
            next_level = []
            for folder in level:
                done.append(_pattern(root, folder) + "/*")
                next_level += _sub_folders(folder, pipeline_options)
            level = next_level
        sharded += done + [_pattern(root, folder) + "/**" for folder in level]
    return sharded


def _pattern(root: str, folder: str) -> str:
    """``folder`` (a real folder below the unit's ``root``) as a pattern matching only
    itself: the names found below the root are escaped (``[``, ``*``, ``?``)."""
    return root + glob.escape(folder[len(root):])


def _sub_folders(folder: str, pipeline_options=None) -> list[str]:
    """The immediate sub-folders of a local folder or Cloud Storage prefix."""
    if folder.startswith("gs://"):
        from apache_beam.io.gcp import gcsio

        if pipeline_options is None:
            from apache_beam.options.pipeline_options import PipelineOptions

            pipeline_options = PipelineOptions([])
        bucket, _, prefix = folder[len("gs://"):].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        client = gcsio.create_storage_client(pipeline_options)
        blobs = client.list_blobs(bucket, prefix=prefix, delimiter="/")
        for _page in blobs.pages:
            pass
        return sorted(f"gs://{bucket}/{sub.rstrip('/')}" for sub in blobs.prefixes)
    if _is_remote(folder):
        return []
    try:
        return sorted(entry.path for entry in os.scandir(folder) if entry.is_dir())
    except OSError:
        return []


def match_files(pattern: str) -> list[InputFile]:
    """Files matching one pattern (folders excluded); an absent path matches nothing."""
    result = FileSystems.match([pattern])[0]
    files = []
    for metadata in result.metadata_list:
        path = metadata.path
        if not _is_remote(path) and os.path.isdir(path):
            continue
        if _is_remote(path) and path.endswith("/"):
            continue  # a "folder" placeholder object
        files.append(InputFile(path, metadata.size_in_bytes))
    return files


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
    """A listing unit (file pattern) → the files it matches, with their sizes."""

    def __init__(self, progress_seconds: float = 0):
        self.progress_seconds = progress_seconds
        self.matched = Metrics.counter(NAMESPACE, "files_listed")

    def setup(self):
        self._listed = 0
        self._last = time.monotonic()

    def process(self, pattern: str):
        files = match_files(pattern)
        self.matched.inc(len(files))
        self._listed += len(files)
        now = time.monotonic()
        if self.progress_seconds and now - self._last >= self.progress_seconds:
            self._last = now
            print(f"dicom-bq-export: worker {os.getpid()} has listed {self._listed:,} files", file=sys.stderr, flush=True)
        yield from files


class MatchInputs(beam.PTransform):
    """Listing units → distinct input files, spread over workers.

    The units are reshuffled so that each is listed by some worker, and the files are
    deduplicated (overlapping patterns) by a GroupByKey, which also redistributes them
    for the read step.
    """

    def __init__(self, progress_seconds: float = 0):
        super().__init__()
        self.progress_seconds = progress_seconds

    def expand(self, units):
        return (
            units
            | "SpreadUnits" >> beam.Reshuffle()
            | "List" >> beam.ParDo(ListFiles(self.progress_seconds))
            | "KeyByPath" >> beam.Map(lambda f: (f.path, f.size))
            | "Deduplicate" >> beam.CombinePerKey(max)
            | "AsInputFile" >> beam.MapTuple(InputFile)
            | "CountDistinct" >> beam.ParDo(_CountMatched())
        )


class _CountMatched(beam.DoFn):
    def __init__(self):
        self.matched = Metrics.counter(NAMESPACE, "files_matched")

    def process(self, input_file: InputFile):
        self.matched.inc()
        yield input_file
