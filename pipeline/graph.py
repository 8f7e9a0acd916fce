"""The pipeline graph: listing units → files → instances → rows, schema, dead letters.

Sources branch here: archives are expanded after the files are matched (ZIP and tar
members join the files; each ``.tar.gz`` is streamed and converted by one worker);
DICOMweb instances are listed from their own units and, in instance mode, read with the
files through the opener, or in metadata mode converted from each series' DICOM JSON.

``build_pipeline`` only assembles transforms; every rule lives in ``schemas`` and
``transforms``. It returns its outputs so that destinations and tests can use them.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
from apache_beam.pvalue import AsSingleton, PCollection

from pipeline import ledger
from pipeline.spool import CompleteRows
from schemas.merge import to_bigquery_schema
from transforms.filter_file import parse_filter_file, uid_layout_patterns
from transforms.flatten import DEAD_LETTERS, FILE_RECORDS, MergeFragments, ReadInstances, UnionOfLines
from transforms.listing import units_may_overlap
from transforms.match import CountMatched, MatchInputs
from transforms.read import JSON, PICKLE
from transforms.sources.archives import ExpandArchiveInputs
from transforms.sources.dicomweb import ListDicomWebInputs, ReadDicomWebMetadataRows
from transforms.storage import Opener


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What preflight decided: how to list the input, and whether to filter.

    ``listing_units`` are file patterns listed as given. With ``uid_roots``, each line
    of the filter file instead becomes patterns under those roots (UID layout).
    """

    listing_units: tuple[str, ...] = ()
    filter_uri: str | None = None
    uid_roots: tuple[str, ...] = ()
    run_started: str | None = None  # UTC timestamp stamped on the dead letters
    dicomweb_units: tuple = ()  # transforms.sources.dicomweb.ListingUnit per server (and filter line)
    dicomweb_mode: str = "instance"  # or "metadata"
    expand_archives: bool = True
    nested_archives: bool = False
    incremental: bool = False  # one row per SOPInstanceUID (pipeline/ledger.py)
    spool: str | None = None  # a folder of this run: rows complete through files there (pipeline/spool.py)
    prune_missing: bool = False  # find the recorded files no longer listed
    # The files to read, when the launcher has listed a local or Cloud Storage input of
    # plain files (no archive among them; with --incremental, compared with the files
    # table, only the changed ones): the pipeline neither lists nor compares
    # (pipeline.main._list_here).
    listed_files: tuple | None = None
    # Local files and Cloud Storage objects are read on this many processes of this
    # machine (a local run in one Beam process: transforms.read.ReadProcesses); 0 reads
    # them in the calling thread (remote ones on its threads).
    read_processes: int = 0
    # The destination takes the rows as read and completes them as it loads them (DuckDB
    # fills the REPEATED fields in SQL): no spool and no completion step, and the read
    # processes hand rows over as JSON text. Not with --incremental, whose choice of one
    # row per instance is made where rows are completed (pipeline/spool.py).
    rows_as_read: bool = False

    @property
    def row_form(self) -> str:
        """How read processes hand rows over (transforms.read.PICKLE or JSON)."""
        return JSON if self.rows_as_read else PICKLE


class ExportOutputs(NamedTuple):
    # dict per instance, in the BigQuery JSON row form, [] for absent REPEATED fields; with
    # ExportPlan.rows_as_read, the rows as read (no [] filled in; a dict or a
    # transforms.read.JsonRow), as a tuple of PCollections, one per source of instances
    rows: PCollection | tuple
    schema: PCollection  # one element: the merged BigQuery schema (list of fields)
    dead_letters: PCollection  # dict per failed input: path, stage, error_type, message
    filter_lines_used: PCollection | None  # one element: line numbers that selected something
    # dict per input: the files table's records (pipeline/ledger.py), or a tuple of PCollections of them
    files: PCollection | tuple | None = None
    gone: PCollection | None = None  # {"path": ...} per recorded path no longer listed (--prune-missing)


def build_pipeline(
    pipeline: beam.Pipeline, plan: ExportPlan, pipeline_options=None, reporter=None, recorded=None
) -> ExportOutputs:
    """Add the export's reading steps to ``pipeline``; return its outputs (no writes).

    ``reporter`` (a :class:`pipeline.progress.ProgressReporter`) receives the counts of
    files listed and read, for a local run's progress display. ``recorded``: the files
    table's records (``--incremental`` on an existing table); files recorded as exported
    with the same version are then not read.
    """
    filter_file = None
    if plan.filter_uri:
        filter_file = (
            pipeline
            | "MatchFilterFile" >> fileio.MatchFiles(plan.filter_uri)
            | "ReadFilterFile" >> fileio.ReadMatches()
            | "ParseFilterFile" >> beam.Map(lambda f: parse_filter_file(f.read().decode("utf-8-sig")))
        )

    if plan.uid_roots:
        roots = plan.uid_roots
        units = filter_file | "FilterLinesToPaths" >> beam.FlatMap(
            lambda parsed: [p for root in roots for line in parsed.lines for p in uid_layout_patterns(root, line)]
        )
    elif plan.listed_files is None:
        units = pipeline | "ListingUnits" >> beam.Create(list(plan.listing_units))

    if plan.listed_files is None:
        deduplicate = bool(plan.uid_roots) or units_may_overlap(plan.listing_units)
        files = units | "MatchInputs" >> MatchInputs(reporter, deduplicate, pipeline_options)
    else:
        # the launcher shows them as listed before the run (the bar's total from the start)
        if not _runs_here(pipeline_options):  # carried in the graph (spread over workers if several)
            listed = pipeline | "ListedFiles" >> beam.Create(list(plan.listed_files),
                                                             reshuffle=_several_workers(pipeline_options))
        else:  # the workers are this process: taken from it, in order
            token = uuid.uuid4().hex
            _HANDED_FILES[token] = plan.listed_files
            listed = pipeline | "ListedFiles" >> beam.Create([token]) | "HandedFiles" >> beam.FlatMap(_handed_files)
        files = listed | "CountDistinct" >> beam.ParDo(CountMatched())
    web_files = None
    if plan.dicomweb_units:
        web_files = (
            pipeline
            | "DicomWebUnits" >> beam.Create(list(plan.dicomweb_units))
            | "ListDicomWeb" >> ListDicomWebInputs(reporter)
        )
    unchanged = []  # paths skipped as unchanged (for --prune-missing)
    if recorded is not None:
        files, skipped = files | "CompareWithLedger" >> ledger.CompareWithLedger(recorded)
        unchanged.append(skipped)
        if web_files is not None:
            web_files, skipped = web_files | "CompareDicomWebWithLedger" >> ledger.CompareWithLedger(recorded)
            unchanged.append(skipped)
    side_inputs = [AsSingleton(filter_file)] if filter_file is not None else []
    opener = Opener(pipeline_options, expand_archives=plan.expand_archives, nested_archives=plan.nested_archives)
    instance_parts, dead_letter_parts = [], []
    unread_inputs = []  # inputs recorded in the files table that do not pass the read step
    expanded = None  # the archives read whole

    if plan.expand_archives and plan.listed_files is None:
        archives = files | "Archives" >> ExpandArchiveInputs(
            opener, nested_archives=plan.nested_archives, run_started=plan.run_started, reporter=reporter,
            filter_side_inputs=side_inputs,
        )
        files = archives.files
        instance_parts.append(archives.instances)
        dead_letter_parts.append(archives.dead_letters)
        unread_inputs += [archives.streamed_inputs, archives.expanded]
        expanded = archives.expanded

    if web_files is not None:
        if plan.dicomweb_mode == "metadata":
            web_instances, web_dead_letters = web_files | "DicomWebMetadata" >> ReadDicomWebMetadataRows(
                plan.run_started, reporter, side_inputs
            )
            instance_parts.append(web_instances)
            dead_letter_parts.append(web_dead_letters)
            unread_inputs.append(web_files)
        else:  # instance mode: read like files, through the opener
            files = (files, web_files) | "FilesAndDicomWeb" >> beam.Flatten()

    as_read = plan.row_form == JSON
    # Without --incremental (whose duplicates are decided across all instances), what the
    # read step made of each of its inputs is that input's whole record (ledger.RecordRead)
    records_as_read = not plan.incremental
    read = ReadInstances(pipeline_options, plan.run_started, reporter, opener, plan.read_processes, plan.row_form,
                         ledger.RecordRead(plan.run_started) if records_as_read else None)
    read_outputs = files | "ReadInstances" >> beam.ParDo(read, *side_inputs).with_outputs(
        DEAD_LETTERS, FILE_RECORDS, main="instances"
    )
    # Each source of instances is consumed on its own and only small values are
    # flattened: Beam's local runner keeps a flattened PCollection whole (pipeline/spool.py).
    parts = [read_outputs.instances, *instance_parts]
    dead_letters = read_outputs[DEAD_LETTERS]
    if dead_letter_parts:
        dead_letters = [dead_letters, *dead_letter_parts] | "AllDeadLetters" >> beam.Flatten()
    duplicates = kept_paths = inputs = None
    if plan.incremental:  # every input, for the files table: a Flatten built only where it is used,
        # since Beam's local runner holds a Flatten's output whole even with no consumer (300,000
        # small elements: +84 MiB)
        inputs = (files, *unread_inputs) | "EveryInput" >> beam.Flatten() if unread_inputs else files
        one_each = tuple(parts) | "KeepOnePerInstance" >> ledger.KeepOnePerInstance()
        duplicates = one_each[ledger.DUPLICATES]
        kept_paths = one_each.kept | "KeptPaths" >> beam.Map(lambda path_uids: path_uids[0])
        file_records = inputs | "RecordFiles" >> ledger.RecordFiles(
            [one_each.kept], duplicates, dead_letters, plan.run_started, expanded)
    else:
        # The inputs no read step read (archives read whole, the members of streamed
        # archives, DICOMweb series) are joined with what their own steps made of them;
        # each part is staged on its own (never flattened whole on Beam's local runner).
        file_records = read_outputs[FILE_RECORDS]
        if unread_inputs:
            kept = [part | f"PathAndUIDs{index + 1}" >> beam.Map(ledger.path_and_uids)
                    for index, part in enumerate(instance_parts)]
            failed = (dead_letter_parts | "UnreadDeadLetters" >> beam.Flatten() if len(dead_letter_parts) > 1
                      else dead_letter_parts[0] if dead_letter_parts else pipeline | "NoDeadLetters" >> beam.Create([]))
            unread = unread_inputs | "UnreadInputs" >> beam.Flatten() if len(unread_inputs) > 1 else unread_inputs[0]
            file_records = (file_records, unread | "RecordFiles" >> ledger.RecordFiles(
                kept, None, failed, plan.run_started, expanded))
    gone = None
    if recorded is not None and plan.prune_missing:
        gone = (
            [inputs | "InputPaths" >> beam.Map(lambda input_file: input_file.path), *unchanged]
            | "PresentPaths" >> beam.Flatten()
            | "FindGone" >> ledger.FindGone(recorded)
        )

    schema = (
        _combine_each(parts, "Fragments", "MergeFragments", lambda instance: instance.fragment, MergeFragments)
        | "ToBigQuerySchema" >> beam.Map(to_bigquery_schema)
    )
    if kept_paths is None:
        rows = tuple(part | f"Rows{index or ''}" >> beam.Map(lambda instance: instance.row) for index, part in enumerate(parts))
    else:  # (path, row): the rows of the kept paths are chosen as they are completed
        rows = tuple(
            part | f"PathsAndRows{index or ''}" >> beam.Map(lambda instance: (instance.path, instance.row))
            for index, part in enumerate(parts)
        )
    if not as_read:
        rows = rows | "CompleteRows" >> CompleteRows(schema, plan.spool, kept_paths)

    lines_used = None
    if filter_file is not None:
        lines_used = _combine_each(
            parts, "FilterLines", "LinesThatSelected", lambda instance: instance.filter_lines, UnionOfLines
        )
    return ExportOutputs(rows, schema, dead_letters, lines_used, file_records, gone)


#: The files the launcher listed for a pipeline whose workers are this process (Beam's
#: ``in_memory`` mode), by a token of the pipeline's: its first step takes them from here
#: rather than from its graph, where Beam would pickle and bz2-compress them (~35 µs of
#: CPU a file, and a second copy of them in memory). Emptied by :func:`forget_handed_files`.
_HANDED_FILES: dict[str, tuple] = {}


def _handed_files(token: str) -> tuple:
    return _HANDED_FILES[token]


def forget_handed_files() -> None:
    """Drop the files handed to pipelines built in this process (after they ran)."""
    _HANDED_FILES.clear()


def _runs_here(pipeline_options) -> bool:
    """True if the pipeline's workers are this process: Beam's FnApiRunner (which a local
    run uses unless told otherwise) in ``in_memory`` mode."""
    if pipeline_options is None:
        return False
    runner = pipeline_options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    return name == "FnApiRunner" and not _several_workers(pipeline_options)


def _several_workers(pipeline_options) -> bool:
    """False for a local run in this process (Beam's ``in_memory`` mode), else True."""
    if pipeline_options is None:
        return True
    return pipeline_options.view_as(DirectOptions).direct_running_mode != "in_memory"


def _combine_each(parts: list, label: str, combine_label: str, value, combine_fn):
    """``combine_fn`` over ``value(instance)`` of every part's instances: combined within
    each part first, so that only one value per part is flattened."""
    partial = [
        part
        | f"{label}{index or ''}" >> beam.Map(value)
        | f"{combine_label}{index or ''}" >> beam.CombineGlobally(combine_fn())
        for index, part in enumerate(parts)
    ]
    if len(partial) == 1:
        return partial[0]
    return partial | f"All{label}" >> beam.Flatten() | f"{combine_label}OfAll" >> beam.CombineGlobally(combine_fn())
