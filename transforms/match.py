"""From ``--input`` patterns and filter lines to the files to read (SPEC §1).

Listing is done inside the pipeline, one *listing unit* (a file pattern) per element,
so that a large input is listed by many workers at once rather than by the launcher
(Beam does not parallelise one pattern's listing, apache/beam#20557). The units come
from :func:`listing_units`, or from the filter file when the input is laid out by UID.

Local inputs are listed by walking the folders here (not Beam's listing, which neither
follows folder links nor reports what it cannot read): symbolic links are followed
once, a folder reached twice (a link, a link loop) is walked once, and what must not be
opened — a FIFO, a device, a socket, a dangling link, a link loop — is listed with an
``error``, which the read step turns into a dead letter without opening it.
"""

from __future__ import annotations

import glob
import os
import re
import stat
import sys
import time
from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.counters import NAMESPACE
from transforms.filter_file import FilterFile, uid_layout_patterns
from transforms.limits import input_type_error
from transforms.storage import InputFile

_GLOB_CHARS = set("*?[")


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
        seen = {_identity(root)}  # local folders, by (device, inode): a link loop is split once
        for _ in range(SHARD_MAX_DEPTH):
            if len(level) + len(done) >= SHARD_TARGET:
                break
            next_level = []
            for folder in level:
                done.append(_pattern(root, folder) + "/*")
                for sub in _sub_folders(folder, pipeline_options):
                    identity = _identity(sub)
                    if identity is None or identity not in seen:
                        seen.add(identity)
                        next_level.append(sub)
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
    return sorted(path for path, st in _entries(folder) if st is not None and stat.S_ISDIR(st.st_mode))


def _identity(path: str) -> tuple[int, int] | None:
    """A local folder's ``(device, inode)``; None for a remote one."""
    if _is_remote(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _entries(folder: str) -> Iterator[tuple[str, os.stat_result | None]]:
    """``(path, stat after following links)`` of a local folder's entries, in name order;
    ``stat`` is None for a link that cannot be followed. Never raises."""
    try:
        with os.scandir(folder or ".") as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError:
        return
    for entry in entries:
        path = os.path.join(folder, entry.name) if folder else entry.name
        try:
            yield path, entry.stat(follow_symlinks=True)
        except OSError:
            yield path, None


def _walk(root: str, max_depth: int | None = None) -> Iterator[tuple[str, os.stat_result | None]]:
    """Every non-folder below a local folder (at most ``max_depth`` levels down), following
    folder links: each folder is walked once (by device and inode), so a link loop ends
    and a folder reached by two paths is listed once."""
    try:
        st = os.stat(root or ".")
    except OSError:
        return
    visited = {(st.st_dev, st.st_ino)}
    stack = [(root, 1)]
    while stack:
        folder, depth = stack.pop()
        subfolders = []
        for path, st in _entries(folder):
            if st is not None and stat.S_ISDIR(st.st_mode):
                if (max_depth is None or depth < max_depth) and (st.st_dev, st.st_ino) not in visited:
                    visited.add((st.st_dev, st.st_ino))
                    subfolders.append((path, depth + 1))
            else:
                yield path, st
        stack.extend(reversed(subfolders))


def _local_input(path: str, st: os.stat_result | None) -> InputFile | None:
    """A listed local path as an input: a regular file, or one to dead-letter unopened
    (None for a path gone since it was listed)."""
    if st is not None and stat.S_ISREG(st.st_mode):
        return InputFile(path, st.st_size, version=local_version(st))
    error = input_type_error(path, st)
    if error is None:
        return None
    return InputFile(path, 0, (type(error).__name__, str(error)))


def local_version(st: os.stat_result) -> str:
    """A local file's version: ``MTIME_NS:SIZE`` (rewriting a file changes one or both)."""
    return f"{st.st_mtime_ns}:{st.st_size}"


def _match_local(pattern: str) -> Iterator[InputFile]:
    """Local files matching a pattern with Beam's glob rules (``**`` any depth, ``*`` and
    ``?`` within a name, ``[...]``), listed by :func:`_walk`."""
    if pattern.endswith("/"):
        pattern += "*"
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    if prefix == pattern:
        try:
            os.lstat(pattern)
        except OSError:
            return  # an absent path matches nothing
        try:
            st = os.stat(pattern)
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            found = _local_input(pattern, st)
            if found is not None:
                yield found
        return
    matches = re.compile(FileSystem.translate_pattern(pattern)).match
    root = os.path.dirname(prefix)
    depth = None if "**" in pattern else pattern.count("/") - root.count("/") + (not root)
    for path, st in _walk(root, depth):
        if matches(path):
            found = _local_input(path, st)
            if found is not None:
                yield found


def match_files(pattern: str) -> list[InputFile]:
    """Files matching one pattern (folders excluded); an absent path matches nothing."""
    if not _is_remote(pattern):
        return list(_match_local(pattern))
    if pattern.startswith("gs://"):
        return list(_match_gcs(pattern))
    result = FileSystems.match([pattern])[0]
    files = []
    for metadata in result.metadata_list:
        path = metadata.path
        if path.endswith("/"):
            continue  # a "folder" placeholder object
        files.append(InputFile(path, metadata.size_in_bytes))
    return files


def _match_gcs(pattern: str, pipeline_options=None) -> Iterator[InputFile]:
    """Objects matching a ``gs://`` pattern (Beam's glob rules), listed with
    google-cloud-storage's ``list_blobs``: each object's size and generation come with the
    listing page, so versions cost no request per object."""
    from apache_beam.io.gcp import gcsio
    from apache_beam.options.pipeline_options import PipelineOptions

    bucket, _, name_pattern = pattern[len("gs://"):].partition("/")
    prefix = re.match(r"^[^[*?]*", name_pattern).group(0)
    matches = re.compile(FileSystem.translate_pattern(name_pattern)).match
    client = gcsio.create_storage_client(pipeline_options or PipelineOptions([]))
    for blob in client.list_blobs(bucket, prefix=prefix, fields="items(name,size,generation),nextPageToken"):
        if blob.name.endswith("/") or not matches(blob.name):
            continue  # a "folder" placeholder object, or outside the pattern
        yield InputFile(f"gs://{bucket}/{blob.name}", int(blob.size or 0), version=str(blob.generation))


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
            | "KeyByFile" >> beam.Map(lambda f: (file_identity(f), f))
            | "Deduplicate" >> beam.CombinePerKey(_first_path)
            | "AsInputFile" >> beam.Values()
            | "CountDistinct" >> beam.ParDo(_CountMatched())
        )


def file_identity(input_file: InputFile) -> str:
    """What makes two listed paths the same file: for a local file its device and inode
    (a file reached through a link, or twice through a folder link, is read once), else
    its path (overlapping patterns)."""
    if input_file.error is None and not _is_remote(input_file.path):
        try:
            st = os.stat(input_file.path)
            return f"inode:{st.st_dev}:{st.st_ino}"
        except OSError:
            pass
    return input_file.path


def _first_path(files: Iterable[InputFile]) -> InputFile:
    """Of the paths of one file, the first in path order (deterministic)."""
    return min(files, key=lambda f: (f.path, -f.size))


class _CountMatched(beam.DoFn):
    def __init__(self):
        self.matched = Metrics.counter(NAMESPACE, "files_matched")

    def process(self, input_file: InputFile):
        self.matched.inc()
        yield input_file
