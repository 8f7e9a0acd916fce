"""From ``--input`` patterns and filter lines to the files to read (SPEC §1).

Listing is done inside the pipeline, one *listing unit* (a file pattern) per element,
so that a large input is listed by many workers at once rather than by the launcher
(Beam does not parallelise one pattern's listing, apache/beam#20557). The units come
from :func:`listing_units`, or from the filter file when the input is laid out by UID.
"""

from __future__ import annotations

import logging
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

LOG = logging.getLogger(__name__)


class InputFile(NamedTuple):
    path: str
    size: int


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
        return [os.path.join(pattern, "**")]
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

    def process(self, pattern: str):
        files = match_files(pattern)
        self.matched.inc(len(files))
        if self.progress_seconds and files:
            print(f"dicom-bq-export: listed {len(files):,} files ({time.strftime('%H:%M:%S')})", file=sys.stderr)
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
