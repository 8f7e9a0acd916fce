"""Listing ``--input`` patterns: which files a run reads (SPEC §1). No Beam here.

The pipeline lists in :class:`transforms.match.MatchInputs`, one *listing unit* (a file
pattern) per element, so that a large input is listed by many workers at once rather than
by the launcher (Beam does not parallelise one pattern's listing, apache/beam#20557). The
units come from :func:`listing_units`, split by :func:`shard_listing_units`. The launcher
lists a local run's files itself with the same functions, before Beam is imported
(:mod:`pipeline.early`) or after (``pipeline.main``), which is why this module imports
no Beam: a pattern with a glob in it imports Beam's glob rules when it is matched
(:func:`_glob_regex`); a folder's own units (``FOLDER/**``, ``FOLDER/*``) need none.

Local inputs are listed by walking the folders here (not Beam's listing, which neither
follows folder links nor reports what it cannot read): symbolic links are followed
once, a folder reached twice (a link, a link loop) is walked once, and what must not be
opened — a FIFO, a device, a socket, a dangling link, a link loop — is listed with an
``error``, which the read step turns into a dead letter without opening it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import os
import re
import stat
import threading
from typing import Iterable, Iterator

from transforms.limits import input_type_error
from transforms.storage import InputFile, is_remote, storage_client

_GLOB_CHARS = set("*?[")


def has_glob(pattern: str) -> bool:
    """True if a pattern holds a glob character (``*``, ``?``, ``[``)."""
    return any(c in _GLOB_CHARS for c in pattern)


def listing_units(pattern: str) -> list[str]:
    """The file patterns that list what one ``--input`` value means.

    A folder (local ``dir`` or ``dir/``, ``gs://bucket/prefix/``) means every file
    below it, at any depth and with any name. A Cloud Storage path without a glob may
    be an object or a prefix, so both are listed. Globs are Beam's (``**`` recurses).
    """
    if is_remote(pattern):
        if pattern.endswith("/"):
            return [pattern + "**"]
        if not has_glob(pattern):
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
    elif not has_glob(pattern) and (is_remote(pattern) or os.path.isdir(pattern)):
        root = pattern
    else:
        return None
    return None if has_glob(root) else root


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
        if not unit.endswith("/**") or has_glob(unit[:-3]):
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
            for folder, subs in zip(level, _sub_folders_of(level, pipeline_options)):
                done.append(_pattern(root, folder) + "/*")
                for sub in subs:
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


def _sub_folders_of(folders: list[str], pipeline_options=None) -> list[list[str]]:
    """:func:`_sub_folders` of each folder; Cloud Storage prefixes LISTING_CONCURRENCY at a
    time (each is a request that mostly waits)."""
    if len(folders) < 2 or not any(folder.startswith("gs://") for folder in folders):
        return [_sub_folders(folder, pipeline_options) for folder in folders]
    with concurrent.futures.ThreadPoolExecutor(LISTING_CONCURRENCY, thread_name_prefix="shard") as pool:
        return list(pool.map(lambda folder: _sub_folders(folder, pipeline_options), folders))


def _sub_folders(folder: str, pipeline_options=None) -> list[str]:
    """The immediate sub-folders of a local folder or Cloud Storage prefix. On Cloud
    Storage the listing pages through the prefix's own objects as well (a page holds up
    to 1,000 objects and sub-folders): only the sub-folders' names are asked for, not the
    objects' metadata, which the listing of the files asks for again."""
    if folder.startswith("gs://"):
        bucket, _, prefix = folder[len("gs://"):].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        client = storage_client(pipeline_options)
        blobs = client.list_blobs(bucket, prefix=prefix, delimiter="/", fields="prefixes,nextPageToken")
        for _page in blobs.pages:
            pass
        return sorted(f"gs://{bucket}/{sub.rstrip('/')}" for sub in blobs.prefixes)
    if is_remote(folder):
        return []
    try:  # a folder's type comes with its entry: no stat of each file (links are followed)
        with os.scandir(folder or ".") as scan:  # only the sub-folders' names are kept
            names = [entry.name for entry in scan if _is_folder(entry)]
    except OSError:
        return []
    return sorted(os.path.join(folder, name) if folder else name for name in names)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop, a link to an unreadable place: not a folder to list
        return False


def _identity(path: str) -> tuple[int, int] | None:
    """A local folder's ``(device, inode)``; None for a remote one."""
    if is_remote(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _entries(folder: str) -> Iterator[tuple[str, os.stat_result | None]]:
    """``(path, stat after following links)`` of a local folder's entries, in name order;
    ``stat`` is None for a link that cannot be followed. Never raises. Only the names are
    held while the folder is listed: sorted ``DirEntry`` objects, each keeping its stat,
    took ~90 MB for a folder of 100,000 files (memory the process keeps afterwards)."""
    try:
        with os.scandir(folder or ".") as scan:
            names = sorted(entry.name for entry in scan)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name) if folder else name
        try:
            yield path, os.stat(path)
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
    literal = _literal_folder(pattern)
    if literal is not None:  # a folder's own unit: walk just that folder, no glob to match
        root, recursive = literal
        depth = None if recursive else 1

        def matches(path: str) -> bool:
            return _matched_name(path[len(root) + 1:], recursive)
    else:
        matches = _glob_regex(pattern).match
        root = os.path.dirname(prefix)
        depth = None if "**" in pattern else pattern.count("/") - root.count("/") + (not root)
    for path, st in _walk(root, depth):
        if matches(path):
            found = _local_input(path, st)
            if found is not None:
                yield found


def _match_gcs(pattern: str, pipeline_options=None) -> Iterator[InputFile]:
    """Objects matching a ``gs://`` pattern (Beam's glob rules), as the listing's pages
    arrive: one request per 1,000 objects below the pattern's literal prefix through the
    process's shared client (:func:`transforms.storage.storage_client`), or one metadata
    request for a pattern without a glob. No object is fetched."""
    bucket, _, name = pattern[len("gs://"):].partition("/")
    client = storage_client(pipeline_options)
    if not has_glob(name):
        blob = client.bucket(bucket).get_blob(name) if name else None
        if blob is not None and not name.endswith("/"):
            yield InputFile(pattern, blob.size or 0, version=str(blob.generation))
        return
    literal = _literal_folder(pattern)
    if literal is not None:  # a folder's own unit: everything below its prefix, no glob to match
        folder, recursive = literal
        prefix = folder[len(f"gs://{bucket}/"):] + "/" if folder != f"gs://{bucket}" else ""

        def matches(path: str) -> bool:
            return _matched_name(path[len(f"gs://{bucket}/") + len(prefix):], recursive)
    else:
        prefix = re.match(r"^[^[*?]*", name).group(0)
        matches = _glob_regex(pattern).match
    # size and generation (the files table's version) come with each listing page
    for blob in client.list_blobs(bucket, prefix=prefix, fields="items(name,size,generation),nextPageToken"):
        path = f"gs://{bucket}/{blob.name}"
        if not blob.name.endswith("/") and matches(path):  # "folder/" placeholders are no files
            yield InputFile(path, blob.size or 0, version=str(blob.generation))


def iter_files(pattern: str, pipeline_options=None) -> Iterator[InputFile]:
    """Files matching one pattern (folders excluded), as listing finds them; an absent
    path matches nothing."""
    if not is_remote(pattern):
        return _match_local(pattern)
    if pattern.startswith("gs://"):
        return _match_gcs(pattern, pipeline_options)
    return iter(match_files(pattern))


def iter_units(units: Iterable[str], pipeline_options=None) -> Iterator[InputFile]:
    """The files of several listing units, unit by unit in the order given; remote units
    are listed LISTING_CONCURRENCY at a time on threads (each is a chain of requests that
    mostly waits), as :class:`ListFiles` lists them in the pipeline. Closing the iterator
    early cancels the units not yet started and stops the others at their next page,
    without waiting for them."""
    units = list(units)
    if len(units) < 2 or not any(is_remote(unit) for unit in units):
        for unit in units:
            yield from iter_files(unit, pipeline_options)
        return
    stop = threading.Event()

    def list_unit(unit: str) -> list[InputFile]:
        files = []
        for input_file in iter_files(unit, pipeline_options):
            if stop.is_set():
                break
            files.append(input_file)
        return files

    pool = concurrent.futures.ThreadPoolExecutor(LISTING_CONCURRENCY, thread_name_prefix="list")
    try:
        for files in pool.map(list_unit, units):
            yield from files
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


def _literal_prefix(pattern: str) -> str:
    return re.match(r"^[^[*?]*", pattern).group(0)


def units_may_overlap(units: Iterable[str]) -> bool:
    """False only if no file can match two of the listing units, which is then known
    from the patterns alone: Cloud Storage units (no links there) that are one object,
    a folder's own files (``P/*``) or a prefix none of the others starts in. Local units
    may always overlap (a folder link leads into another unit), and their
    deduplication is also what spreads a single folder's files over the workers."""
    units = list(units)
    if len(units) > 256 or any(not unit.startswith("gs://") for unit in units):
        return True
    for index, a in enumerate(units):
        for b in units[index + 1:]:
            if _may_share_a_file(a, b) and _may_share_a_file(b, a):
                return True
    return False


def _may_share_a_file(a: str, b: str) -> bool:
    """Whether a file matching ``a`` may also match ``b`` (conservative: True if unsure)."""
    if not has_glob(a):
        return bool(_glob_regex(b).match(a))
    prefix_a, prefix_b = _literal_prefix(a), _literal_prefix(b)
    if a == prefix_a + "*" and prefix_a.endswith("/"):  # the files directly in one folder
        rest = prefix_b[len(prefix_a):] if prefix_b.startswith(prefix_a) else None
        if rest is not None and "/" in rest:
            return False
    return prefix_a.startswith(prefix_b) or prefix_b.startswith(prefix_a)


#: Remote listing units listed at once by one worker (each is a chain of page requests).
LISTING_CONCURRENCY = 8


def file_identity(input_file: InputFile) -> str:
    """What makes two listed paths the same file: for a local file its device and inode
    (a file reached through a link, or twice through a folder link, is read once), else
    its path (overlapping patterns)."""
    if input_file.error is None and not is_remote(input_file.path):
        try:
            st = os.stat(input_file.path)
            return f"inode:{st.st_dev}:{st.st_ino}"
        except OSError:
            pass
    return input_file.path


def first_path(files: Iterable[InputFile]) -> InputFile:
    """Of the paths of one file, the first in path order (deterministic)."""
    return min(files, key=lambda f: (f.path, -f.size))


def distinct_files(files: Iterable[InputFile], identity=None, most: int | None = None
                   ) -> tuple[int, list[InputFile]] | None:
    """``(listed, distinct)``: how many paths were listed, and the files among them in
    listing order, a file listed under several paths (the same ``identity``:
    :func:`file_identity`) once, under the first of its paths (:func:`first_path`), as
    :class:`transforms.match.MatchInputs` deduplicates. None as soon as there are more
    than ``most`` distinct files."""
    chosen: dict = {}
    listed = 0
    for input_file in files:
        listed += 1
        key = listed if identity is None else identity(input_file)  # None: each path a file
        chosen[key] = first_path((chosen[key], input_file)) if key in chosen else input_file
        if most is not None and len(chosen) > most:
            return None
    return listed, list(chosen.values())


def input_units(patterns: Iterable[str], pipeline_options=None) -> list[str]:
    """The listing units of ``--input`` patterns (:func:`listing_units`), folders split
    by :func:`shard_listing_units`."""
    return shard_listing_units([unit for pattern in patterns for unit in listing_units(pattern)], pipeline_options)


def list_plain_files(units: Iterable[str], most: int, expand_archives: bool = True, pipeline_options=None
                     ) -> tuple[int, list[InputFile]] | None:
    """The files of listing units, listed by the launcher to hand to the pipeline:
    ``(paths listed, files)``, each file once (:func:`distinct_files`, by
    :func:`file_identity` where the units may overlap). None where the pipeline lists
    instead: an archive among the files (its archive steps list the members; not with
    ``expand_archives`` off, when an archive is a plain file) or more than ``most`` files."""
    units = list(units)
    files = iter_units(units, pipeline_options)
    if expand_archives:
        files = no_archives(files)
    try:
        return distinct_files(files, file_identity if units_may_overlap(units) else None, most)
    except ArchiveListed:
        return None


class ArchiveListed(Exception):
    """An archive is among the files: the pipeline's archive steps list its members
    (and, on an --incremental run, find out whether it changed)."""


def no_archives(files: Iterable[InputFile]) -> Iterator[InputFile]:
    """The files, raising :class:`ArchiveListed` at the first archive among them."""
    for input_file in files:
        if is_archive(input_file.path):
            raise ArchiveListed
        yield input_file


def match_files(pattern: str) -> list[InputFile]:
    """Files matching one pattern (folders excluded); an absent path matches nothing."""
    if not is_remote(pattern) or pattern.startswith("gs://"):
        return list(iter_files(pattern))
    from apache_beam.io.filesystems import FileSystems  # another scheme: Beam's file systems

    result = FileSystems.match([pattern])[0]
    files = []
    for metadata in result.metadata_list:
        path = metadata.path
        if path.endswith("/"):
            continue  # a "folder" placeholder object
        files.append(InputFile(path, metadata.size_in_bytes))
    return files


#: Archive kinds by name suffix (case-insensitive); longest suffix first.
_ARCHIVE_KINDS = ((".tar.gz", "tar.gz"), (".tgz", "tar.gz"), (".tar", "tar"), (".zip", "zip"))


def archive_kind(path: str) -> str | None:
    """``"zip"``, ``"tar"`` or ``"tar.gz"`` for a name with an archive suffix, else None
    (:mod:`transforms.sources.archives` reads them member by member)."""
    lowered = path.lower()
    for suffix, kind in _ARCHIVE_KINDS:
        if lowered.endswith(suffix):
            return kind
    return None


def is_archive(path: str) -> bool:
    """True for names ending in .zip, .tar, .tar.gz or .tgz (any case)."""
    return archive_kind(path) is not None


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern:
    """Beam's glob rules for ``pattern`` (``FileSystem.translate_pattern``: ``**`` any
    depth, ``*`` and ``?`` within a name, ``[...]``), imported only when a pattern has a glob."""
    from apache_beam.io.filesystem import FileSystem

    return re.compile(FileSystem.translate_pattern(pattern))


_ESCAPED_CHAR = re.compile(r"\[([*?[])\]")


def _literal_folder(pattern: str) -> tuple[str, bool] | None:
    """``(folder, recursive)`` for a folder's own unit, ``FOLDER/**`` (every file below
    it) or ``FOLDER/*`` (its own files), whose folder is literal or ``glob.escape``-d
    (as :func:`listing_units` and :func:`shard_listing_units` make them); else None.
    Such a unit matches every path below the folder, or each of the folder's own
    entries. (By Beam's rules ``*`` matches no backslash, a Windows separator: a file
    named ``a\\b`` directly in a folder split into units would be listed by none.)"""
    for suffix, recursive in (("/**", True), ("/*", False)):
        if pattern.endswith(suffix):
            head = pattern[: -len(suffix)]
            folder = _ESCAPED_CHAR.sub(r"\1", head)
            if head and not head.endswith("/") and glob.escape(folder) == head and not head.endswith("://"):
                return folder, recursive
            return None
    return None


def _matched_name(name: str, recursive: bool) -> bool:
    """Whether a path below a :func:`_literal_folder` (``name``: the part after the
    folder and its slash) matches the unit: any, or one of the folder's own."""
    return recursive or "/" not in name
