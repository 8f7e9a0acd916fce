"""The files table and incremental selection (SPEC §7).

Every run records its input files in ``TABLE_files`` beside the table, one record per
path (:data:`FILES_SCHEMA`): its version, size, the instance's UIDs when it gave a row,
its outcome and the run. It answers "which file gave this row?" and "which files gave
the same SOPInstanceUID?".

With ``--incremental`` the table holds one row per SOPInstanceUID, and the files table is
the ledger that keeps it current for the price of reading only what changed:

* the listing gives each file's version (the object generation on Cloud Storage, from
  the listing page itself; ``MTIME_NS:SIZE`` locally; a DICOMweb instance's is a digest
  of its QIDO record, see :mod:`transforms.sources.dicomweb`), and
  :class:`CompareWithLedger` looks each path up in the files table, read once as a side
  input. A file recorded as exported (:data:`EXPORTED`) with the same version is
  *unchanged* and not read; a new or changed file, or one that failed or was not
  selected before, is read again. A local run over plain files makes the same
  comparison in the launcher before any pipeline (:func:`compare_listing`) and hands the
  pipeline only the files to read, or ends there when there are none;
* an archive is the unit of change: its members (``ARCHIVE#member``) are versioned
  ``ARCHIVE_VERSION|MEMBER`` (:func:`transforms.sources.archives.member_version`), and an
  archive read whole has a record of its own (outcome ``archive``). An archive recorded
  so with this version, whose members were all exported from it, is skipped without
  being opened (:func:`archive_unchanged`); a changed one is read again whole; the
  records of members it no longer holds keep an older version (and are gone);
* :class:`FindGone`: a recorded path that is neither an input of this run nor skipped as
  unchanged is *gone* (used by ``--prune-missing``);
* :class:`KeepOnePerInstance`: of several files of this run with the same
  SOPInstanceUID, the one with the greatest path (code-point order) gives the row, the
  others are recorded as ``duplicate`` and counted — a deterministic rule whatever the
  order of the files or the number of workers;
* the destination then, in one atomic step, replaces the rows of the SOPInstanceUIDs
  read, adds the new ones, updates the files table by path and, with
  ``--prune-missing``, drops the records of gone files and the rows of instances that no
  exported file records any more.

Pure functions hold the rules; the Beam transforms only wire them.
"""

from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsDict, AsMultiMap

from pipeline.destinations import Disposition
from transforms import counters
from transforms.sources.archives import VERSION_SEPARATOR, is_archive, split_member_path
from transforms.listing import distinct_files
from transforms.read import UID_COLUMNS, instance_uids
from transforms.storage import InputFile

#: Outcomes of a file in the files table.
ROW = "row"  # its instance's row is in the table
DUPLICATE = "duplicate"  # another file of the same run gave its SOPInstanceUID's row
FAILED = "failed"  # a dead letter in TABLE_errors; read again by the next incremental run
NOT_SELECTED = "not_selected"  # the filter file did not select it
ARCHIVE = "archive"  # an archive read whole: its members are recorded as ARCHIVE#member
#: Outcomes an incremental run does not read again while the version is the same.
EXPORTED = (ROW, DUPLICATE)


#: The files table ``TABLE_files``: one record per input path, the latest run's.
FILES_SCHEMA = [
    {"name": "path", "type": "STRING", "mode": "NULLABLE"},
    {"name": "version", "type": "STRING", "mode": "NULLABLE"},
    {"name": "size", "type": "INTEGER", "mode": "NULLABLE"},
    {"name": "StudyInstanceUID", "type": "STRING", "mode": "NULLABLE"},
    {"name": "SeriesInstanceUID", "type": "STRING", "mode": "NULLABLE"},
    {"name": "SOPInstanceUID", "type": "STRING", "mode": "NULLABLE"},
    {"name": "outcome", "type": "STRING", "mode": "NULLABLE"},
    {"name": "run_started", "type": "TIMESTAMP", "mode": "NULLABLE"},
]

#: Tagged output of :class:`KeepOnePerInstance`.
DUPLICATES = "duplicates"


def files_table_name(table: str) -> str:
    return f"{table}_files"


def check_incremental_options(export_options, disposition: Disposition) -> None:
    """Raise ValueError (a usage error) for flags ``--incremental`` does not combine with.

    ``--incremental`` updates a table in place, so an existing table needs WRITE_APPEND
    (WRITE_TRUNCATE or ``--overwrite-table`` rebuild it from every listed file, with one
    row per instance); WRITE_EMPTY would refuse the second run. ``--prune-missing`` treats
    the run's listing as the whole archive, so it needs ``--incremental`` and no filter
    file (which would prune every instance it does not select).
    """
    incremental = bool(getattr(export_options, "incremental", False))
    prune = bool(getattr(export_options, "prune_missing", False))
    if prune and not incremental:
        raise ValueError("--prune-missing needs --incremental")
    if not incremental:
        return
    if disposition is Disposition.WRITE_EMPTY:
        raise ValueError(
            "--incremental updates the table: use --write-disposition WRITE_APPEND (or WRITE_TRUNCATE to "
            "rebuild it), not WRITE_EMPTY"
        )
    if prune and getattr(export_options, "filter_config_gcs_uri", None):
        raise ValueError(
            "--prune-missing treats the listed files as the whole archive; it cannot be combined with "
            "--filter-config-gcs-uri"
        )


def is_unchanged(input_file: InputFile, record: dict | None) -> bool:
    """True if the files table records this very version of the file as exported."""
    return (
        record is not None
        and input_file.error is None
        and input_file.version is not None
        and record.get("version") == input_file.version
        and record.get("outcome") in EXPORTED
    )


def archive_members(archive: InputFile, members: list[dict] | None) -> list[dict]:
    """The recorded members of this very version of an archive (records of members it no
    longer holds carry an older version)."""
    if archive.error is not None or archive.version is None:
        return []
    return [
        record for record in members or ()
        if (record.get("version") or "").partition(VERSION_SEPARATOR)[0] == archive.version
    ]


def archive_unchanged(archive: InputFile, record: dict | None, members: list[dict] | None) -> bool:
    """True if this very version of the archive was read whole before (its own record,
    outcome ``archive``) and each of its members exported: it need not be opened."""
    return (
        record is not None
        and record.get("outcome") == ARCHIVE
        and archive.version is not None
        and record.get("version") == archive.version
        and all(member.get("outcome") in (*EXPORTED, ARCHIVE) for member in archive_members(archive, members))
    )


def choose_instance(paths: Iterable[str]) -> str:
    """Of several files with one SOPInstanceUID in a run, the one whose row is kept:
    the greatest path (code-point order)."""
    return max(paths)


def file_record(input_file: InputFile, outcome: str, uids: dict | None, run_started: str | None) -> dict:
    """One record of the files table."""
    record = {"path": input_file.path, "version": input_file.version, "size": input_file.size}
    record.update(uids or dict.fromkeys(UID_COLUMNS))
    record.update(outcome=outcome, run_started=run_started)
    return record


# -- Beam wiring -------------------------------------------------------------------------


#: Tagged output of :class:`CompareWithLedger`: the paths skipped as unchanged.
UNCHANGED = "unchanged"


class _SkipUnchanged(beam.DoFn):
    """A listed input → itself if it must be read; if unchanged, counted and its path
    (an unchanged archive: its own and its members' paths) on the ``unchanged`` output."""

    def __init__(self):
        self.unchanged = Metrics.counter(counters.NAMESPACE, counters.UNCHANGED_FILES)
        self.matched = Metrics.counter(counters.NAMESPACE, counters.FILES_MATCHED)

    def process(self, input_file: InputFile, recorded: dict, archives):  # archives: a multimap
        if is_unchanged(input_file, recorded.get(input_file.path)):
            self.unchanged.inc()
            yield beam.pvalue.TaggedOutput(UNCHANGED, input_file.path)
        elif is_archive(input_file.path) and archive_unchanged(
            input_file, recorded.get(input_file.path), list(archives[input_file.path])
        ):
            members = archive_members(input_file, list(archives[input_file.path]))
            self.unchanged.inc(len(members))
            self.matched.inc(len(members) - 1)  # listed as one file; its members replace it, as when expanded
            yield beam.pvalue.TaggedOutput(UNCHANGED, input_file.path)
            for record in members:
                yield beam.pvalue.TaggedOutput(UNCHANGED, record["path"])
        else:
            yield input_file


def _by_archive(record):
    split = split_member_path(record["path"])
    if split is not None:
        yield split[0], record


class CompareWithLedger(beam.PTransform):
    """Listed inputs → ``(changed, unchanged)``: the inputs to read, and the paths
    skipped as unchanged (for :class:`FindGone`).

    The files table's records (dicts with ``path``, ``version``, ``outcome``) are a side
    input read once, by path and, for the records of ``ARCHIVE#member`` paths, by archive
    (a multimap: no grouping step): the comparison reads no instance and nothing of the
    main table.
    """

    def __init__(self, recorded):
        super().__init__()
        self.recorded = recorded

    def expand(self, files):
        by_path = self.recorded | "RecordsByPath" >> beam.Map(lambda r: (r["path"], r))
        by_archive = self.recorded | "MemberRecords" >> beam.FlatMap(_by_archive)
        compared = files | "SkipUnchanged" >> beam.ParDo(
            _SkipUnchanged(), AsDict(by_path), AsMultiMap(by_archive)
        ).with_outputs(UNCHANGED, main="changed")
        return compared.changed, compared[UNCHANGED]


class FindGone(beam.PTransform):
    """The paths present in this run (its inputs, and those skipped as unchanged) →
    ``{"path": ...}`` for each recorded path not among them: a join by path."""

    def __init__(self, recorded):
        super().__init__()
        self.recorded = recorded

    def expand(self, present_paths):
        return (
            {
                "listed": present_paths | "PresentByPath" >> beam.Map(lambda path: (path, None)),
                "recorded": self.recorded | "RecordedByPath" >> beam.Map(lambda r: (r["path"], None)),
            }
            | "JoinByPath" >> beam.CoGroupByKey()
            | "NotPresent" >> beam.FlatMap(_not_recorded_now)
        )


def _not_recorded_now(element):
    path, groups = element
    if list(groups["recorded"]) and not list(groups["listed"]):
        yield {"path": path}


class _KeepOne(beam.DoFn):
    def __init__(self):
        self.duplicates = Metrics.counter(counters.NAMESPACE, counters.DUPLICATE_INSTANCES)

    def process(self, element):
        _sop, files = element
        files = list(files)
        kept = choose_instance(path for path, _uids in files)
        for path, uids in files:
            if path == kept:
                yield path, uids
                kept = None  # the same path twice (cannot happen after listing): keep one
            else:
                self.duplicates.inc()
                yield beam.pvalue.TaggedOutput(DUPLICATES, (path, uids))


def path_and_uids(instance) -> tuple[str, dict]:
    """What the files table needs of an instance: its path and UIDs (not its row)."""
    return instance.path, instance_uids(instance)


class KeepOnePerInstance(beam.PTransform):
    """Instances (one PCollection or a list of them) → ``(path, uids)`` of the one kept
    per SOPInstanceUID (main output ``kept``, see :func:`choose_instance`), the others'
    on ``duplicates``. Only paths and UIDs are grouped, never rows: the rows of the
    kept paths are chosen where they are written (:class:`pipeline.spool.CompleteRows`)."""

    def expand(self, instances):
        parts = instances if isinstance(instances, (list, tuple)) else [instances]
        keyed = [
            part | f"KeyBySOPInstanceUID{index or ''}" >> beam.Map(
                lambda instance: (instance_uids(instance)["SOPInstanceUID"], path_and_uids(instance))
            )
            for index, part in enumerate(parts)
        ]
        if len(keyed) > 1:
            keyed = [keyed | "AllInstances" >> beam.Flatten()]
        return (
            keyed[0]
            | "GroupBySOPInstanceUID" >> beam.GroupByKey()
            | "KeepOne" >> beam.ParDo(_KeepOne()).with_outputs(DUPLICATES, main="kept")
        )


def _record(element, run_started):
    path, groups = element
    outcomes = list(groups["outcome"])
    outcome, uids = outcomes[0] if outcomes else (NOT_SELECTED, None)
    for input_file in groups["file"]:
        yield file_record(input_file, outcome, uids, run_started)


class RecordFiles(beam.PTransform):
    """The files table's records of the inputs of this run: the inputs joined by path
    with what each became (a row, a duplicate, a dead letter, an archive read whole;
    nothing: not selected). ``kept``: ``(path, uids)`` of the instances that became
    rows, one PCollection or a list of them (:func:`path_and_uids`); ``duplicates``:
    ``(path, uids)`` of the others of an instance (``--incremental``; else None)."""

    def __init__(self, kept, duplicates, dead_letters, run_started: str | None, archives=None):
        super().__init__()
        self.kept, self.duplicates, self.dead_letters = kept, duplicates, dead_letters
        self.run_started = run_started
        self.archives = archives  # InputFiles of the archives read whole (outcome ARCHIVE)

    def expand(self, files):
        kept = self.kept if isinstance(self.kept, (list, tuple)) else [self.kept]
        outcomes = (
            (
                *(
                    part | f"RowOutcome{index or ''}" >> beam.Map(lambda kept: (kept[0], (ROW, kept[1])))
                    for index, part in enumerate(kept)
                ),
                *(
                    [self.duplicates | "DuplicateOutcome" >> beam.Map(lambda d: (d[0], (DUPLICATE, d[1])))]
                    if self.duplicates is not None else []
                ),
                self.dead_letters | "FailedOutcome" >> beam.Map(lambda d: (d["path"], (FAILED, None))),
                *(
                    [self.archives | "ArchiveOutcome" >> beam.Map(lambda f: (f.path, (ARCHIVE, None)))]
                    if self.archives is not None else []
                ),
            )
            | "Outcomes" >> beam.Flatten()
        )
        keyed = files | "KeyReadByPath" >> beam.Map(lambda f: (f.path, f))
        return (
            {"file": keyed, "outcome": outcomes}
            | "JoinOutcomes" >> beam.CoGroupByKey()
            | "FileRecords" >> beam.FlatMap(_record, self.run_started)
        )


class RecordRead:
    """The files table's record of an input from its read outcome
    (``transforms.read.Outcome``): a row, a failure, or nothing (not selected). For a run
    in which nothing but the read step decides what an input became (no --incremental:
    no duplicates; no archive read whole, no DICOMweb metadata series): the read step
    emits the records as it reads (``transforms.flatten.ReadInstances(record_file=)``),
    the same records as :class:`RecordFiles` joins, without grouping every input by path."""

    def __init__(self, run_started: str | None):
        self.run_started = run_started

    def __call__(self, input_file: InputFile, outcome) -> dict:
        if outcome.failure is not None:
            return file_record(input_file, FAILED, None, self.run_started)
        if outcome.instance is None:
            return file_record(input_file, NOT_SELECTED, None, self.run_started)
        return file_record(input_file, ROW, instance_uids(outcome.instance), self.run_started)


#: :func:`compare_listing`'s answer when more files changed than it may hand over.
TOO_MANY_CHANGED = "too many changed"


def compare_listing(
    files: Iterable[InputFile], records: Iterable[dict], identity=None, most_changed: int | None = None
) -> tuple[dict, list[InputFile]] | str:
    """Compare a listing with the files table, as :class:`CompareWithLedger` does, before
    any pipeline: ``(counts, changed)``, the counters of the listing (``files_listed``;
    ``files_matched`` and ``unchanged_files`` of the unchanged files, :func:`is_unchanged`)
    and the files to read, in listing order; or :data:`TOO_MANY_CHANGED` as soon as more
    than ``most_changed`` files must be read (the pipeline then lists and compares itself).

    ``identity`` (``transforms.listing.file_identity``; give it when the listing units may
    overlap) makes the paths of one file one input, the first in path order, as
    :class:`transforms.match.MatchInputs` deduplicates. Archives are the caller's to
    exclude.
    """
    recorded = {record["path"]: record for record in records}
    listed = 0
    if identity is not None:
        distinct = distinct_files(files, identity, None if recorded else most_changed)
        if distinct is None:
            return TOO_MANY_CHANGED  # with no records every file is to be read
        listed, files = distinct
    unchanged, changed = 0, []
    for input_file in files:
        if identity is None:
            listed += 1
        if is_unchanged(input_file, recorded.get(input_file.path)):
            unchanged += 1
            continue
        changed.append(input_file)
        if most_changed is not None and len(changed) > most_changed:
            return TOO_MANY_CHANGED
    counts = {counters.FILES_LISTED: listed, counters.FILES_MATCHED: unchanged, counters.UNCHANGED_FILES: unchanged}
    return counts, changed
