"""Entry point: ``dicom-bq-export`` (also ``python -m pipeline.main``).

    dicom-bq-export --input PATTERN... [--bq-table URI] [--write-disposition D] ...
    dicom-bq-export inspect FILE...

``run(argv)``: parse → preflight (usage, filter file, destination; before any file is
read) → build the graph → attach the destination's writing → run → finish the
destination's write (local runs) → print the summary.

Locally, without ``--runner``, it runs on Beam's portable runner (FnApiRunner) in this
process, its local files and Cloud Storage objects read on one process per core
(``transforms.read``), or, for a DICOMweb input, with one Beam worker process per core. Examples:

    dicom-bq-export --input samples/ --bq-table duckdb://dicom.duckdb#instances
    dicom-bq-export --input 'gs://bucket/dicom/**' --bq-table bq://proj.ds.instances \\
        --write-disposition WRITE_APPEND --temp_location gs://bucket/tmp \\
        --runner DataflowRunner --project proj --region europe-west4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import glob
import logging
import os
import re
import shutil
import sys
import threading
import time
import traceback

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipeline import summary as run_summary
from pipeline.destinations import DestinationError, TooManyFailures, resolve_disposition
from pipeline.destinations.base import DEFAULT_URI, RunContext, parse_destination
from pipeline.graph import ExportPlan, build_pipeline, forget_handed_files
from pipeline import early, ledger
from pipeline.cli import descriptor_2_to_devnull
from pipeline.early import MOST_HANDED_FILES, MOST_HANDED_OBJECTS, READ_PROCESSES_MIN_FILES
from pipeline.ledger import check_incremental_options
from pipeline.options import (
    COMMAND_FLAGS,
    ExportOptions,
    UsageError,
    parse_pipeline_options,
    split_command_flags,
    strict_argv,
    tool_version,
)
from pipeline.progress import LocalProgress
from pipeline.staging import SPOOL, read_staged, stage_summary, staging_folder
from pipeline.usage import check_inputs_exist
from transforms.filter_file import FilterFileError, read_filter_file
from transforms.header import silence_pydicom
from transforms.read import (
    ReadProcesses,
    kill_read_processes,
    offer,
    processes_available,
    start_fork_server,
    stop_read_processes,
    usable_cores,
)
from transforms.storage import Opener, client_settings
from transforms.listing import (
    ArchiveListed,
    file_identity,
    input_root,
    input_units,
    iter_units,
    list_plain_files,
    no_archives,
    units_may_overlap,
)
from transforms.match import looks_laid_out_by_uid
from transforms import counters
from transforms.counters import COUNTERS
from transforms.sources import dicomweb

#: Runners that execute in (or next to) this process, so the launcher waits and loads.
LOCAL_RUNNERS = {"DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "PrismRunner", "SwitchingDirectRunner"}




def _runner_name(options: PipelineOptions) -> str:
    runner = options.view_as(StandardOptions).runner
    if runner is None:
        return "FnApiRunner"
    return runner if isinstance(runner, str) else type(runner).__name__


#: A run whose input is remote and not read on read processes (DICOMweb; Cloud Storage in
#: several listing units where there are none) is spread over one Beam worker process per
#: core; an --incremental update of fewer files than this runs in the launcher's process
#: instead. Two worker processes cost about 3.5 s
#: more CPU than one (each imports Beam; elements cross processes encoded) and about
#: 2.5 s more wall time on three files.
MULTI_PROCESS_MIN_FILES = 3000


def _local_defaults(options: PipelineOptions, plan: ExportPlan) -> bool:
    """Without ``--runner``: Beam's portable runner in this process, or, for a remote
    input that several workers can share (:func:`_one_beam_process`), one worker process
    per core. (DirectRunner would first try to download the Prism runner from GitHub.)
    True if it chose worker processes.
    """
    standard = options.view_as(StandardOptions)
    if standard.runner is not None:
        return False
    standard.runner = "FnApiRunner"
    direct = options.view_as(DirectOptions)
    cores = usable_cores()
    if _given(options, "direct_running_mode", "direct_num_workers"):
        return False  # the user chose how the local run is spread
    one_process = _one_beam_process(plan)
    if one_process and _all_cloud_storage(plan) and not _client_handed_over(options):
        one_process = _one_beam_process(plan, read_processes=False)  # the objects cannot go to read processes
    if cores > 1 and direct.direct_running_mode == "in_memory" and not one_process:
        direct.direct_running_mode = "multi_processing"
        direct.direct_num_workers = cores
        return True
    return False


def _read_processes(options: PipelineOptions, plan: ExportPlan, files: int | None = None) -> int:
    """How many processes read the files of a local run in one Beam process: one per core
    if the input is all local or all on Cloud Storage and holds at least
    READ_PROCESSES_MIN_FILES files (``files``, when the launcher already knows how many
    it reads; a Cloud Storage input the pipeline lists itself counts as large), else 0
    (read in Beam's own thread, remote inputs on its threads). 0 too when the user chose
    how the run is spread."""
    cores = usable_cores()
    direct = options.view_as(DirectOptions)
    if (cores < 2 or direct.direct_running_mode != "in_memory" or not processes_available()
            or _given(options, "runner", "direct_running_mode", "direct_num_workers")):
        return 0  # (processes_available: not where a host runs us as a daemonic process, nor on Windows)
    if not _all_local(plan):  # Cloud Storage: each process reads a chunk of objects at once
        if not _all_cloud_storage(plan) or not _client_handed_over(options):
            return 0
        return cores if files is None or files >= READ_PROCESSES_MIN_FILES else 0
    if files is None:
        files = _count_local_files(plan, READ_PROCESSES_MIN_FILES)
    return cores if files >= READ_PROCESSES_MIN_FILES else 0


def _given(options: PipelineOptions, *names: str) -> bool:
    """True if the command line set any of these Beam options (even to its default value,
    which ``PipelineOptions`` cannot tell apart from an option left out)."""
    flags = getattr(options, "_flags", None) or ()
    return any(re.match(rf"--{name}(=|$)", flag) for flag in flags for name in names)


def _all_local(plan: ExportPlan) -> bool:
    """True if every input is on this machine's disk (no Cloud Storage, no DICOMweb)."""
    return not plan.dicomweb_units and not any("://" in unit for unit in plan.listing_units + plan.uid_roots)


def _all_cloud_storage(plan: ExportPlan) -> bool:
    """True if every input is on Cloud Storage (``gs://``)."""
    units = plan.listing_units + plan.uid_roots
    return bool(units) and not plan.dicomweb_units and all(unit.startswith("gs://") for unit in units)


def _client_handed_over(options: PipelineOptions) -> bool:
    """True if this process's Cloud Storage client can be rebuilt in the read processes
    (:func:`transforms.storage.client_settings`: its credentials can be pickled)."""
    try:
        return client_settings(options) is not None
    except Exception:  # noqa: BLE001 — no client at all: the reads report it, per input
        return False


def _one_beam_process(plan: ExportPlan, read_processes: bool | None = None) -> bool:
    """True if the run is best in one Beam process: a local or Cloud Storage input (its
    files are read on processes of this machine, :func:`_read_processes`, which cost
    less than Beam's workers: each of those imports Beam again; where there are none, a
    local input under MULTI_PROCESS_MIN_FILES files), or one Cloud Storage listing unit
    (listed and read by one worker, its reads in parallel threads: a second process
    would only cost its start-up)."""
    if read_processes is None:
        read_processes = processes_available()
    if plan.dicomweb_units:
        return False
    if not _all_local(plan):
        if _all_cloud_storage(plan) and read_processes:
            return True
        return not plan.uid_roots and len(plan.listing_units) == 1 and not units_may_overlap(plan.listing_units)
    if read_processes:
        return True
    # no read processes here (Windows): Beam's workers, for an input large enough to pay their start
    return _count_local_files(plan, MULTI_PROCESS_MIN_FILES) < MULTI_PROCESS_MIN_FILES


def _count_local_files(plan: ExportPlan, at_most: int) -> int:
    """The files under a local input's listing units, counted up to ``at_most``. With a
    filter file the files under the input count, whether listed by UID layout or not:
    the filter can only select fewer of them."""
    count = 0
    for unit in plan.listing_units:
        if unit.endswith("/*") and os.path.isdir(unit[:-2]):
            count += sum(1 for entry in os.scandir(unit[:-2]) if entry.is_file())
        elif unit.endswith("/**") and os.path.isdir(unit[:-3]):
            for _root, _dirs, files in os.walk(unit[:-3]):
                count += len(files)
                if count >= at_most:
                    return count
        else:
            count += len(glob.glob(unit, recursive=True))
        if count >= at_most:
            return count
    return count


def input_patterns(values: list[str]) -> list[str]:
    """``--input`` values; one value may hold several gs:// patterns or DICOMweb roots
    separated by commas (a template parameter is one string)."""
    return [pattern for value in values for pattern in re.split(r",(?=gs://|dicomweb\+)", value) if pattern]


def dicomweb_roots(patterns: list[str]) -> list[str]:
    """The DICOMweb roots among the inputs, canonical and each once; then each server is
    checked (:func:`transforms.sources.dicomweb.check_server`: reachable, credentials,
    permission) before anything is read. A malformed root is a UsageError; a server that
    cannot be used raises DicomWebError, one line saying what to fix."""
    roots = []
    for pattern in patterns:
        try:
            roots.append(dicomweb.parse_root(pattern))
        except dicomweb.DicomWebError as error:
            raise UsageError(f"--input: {error}") from None
    roots = list(dict.fromkeys(roots))
    for root in roots:
        dicomweb.check_server(root)
    return roots


def _checked_units(patterns: list[str], pipeline_options) -> tuple[str, ...]:
    """The listing units of the inputs (sharded: :func:`transforms.listing.input_units`),
    once every input is checked to exist (:func:`pipeline.usage.check_inputs_exist`).
    On Cloud Storage both wait on requests: the sharding runs on a thread meanwhile, and
    a failed check is what the user is told."""
    if not any("://" in pattern for pattern in patterns):
        check_inputs_exist(patterns, pipeline_options)
        return tuple(input_units(patterns, pipeline_options))
    sharded: concurrent.futures.Future = concurrent.futures.Future()

    def shard() -> None:
        try:
            sharded.set_result(tuple(input_units(patterns, pipeline_options)))
        except BaseException as error:  # noqa: BLE001 — raised below, unless the check failed first
            sharded.set_exception(error)

    # a daemon thread: a usage error is reported (and the command exits) without waiting for it
    threading.Thread(target=shard, name="shard", daemon=True).start()
    check_inputs_exist(patterns, pipeline_options)
    return sharded.result()


def plan_export(export: ExportOptions, pipeline_options: PipelineOptions | None = None) -> tuple[ExportPlan, object]:
    """Check everything that can be checked before reading a file; return the plan.

    Returns ``(plan, filter_file)``. Raises UsageError, FilterFileError or
    DestinationError, each with a message saying what to fix.
    """
    if not export.input:
        raise UsageError("give at least one --input (a folder, file, glob or gs:// pattern)")
    patterns = input_patterns(export.input)
    web_patterns = [p for p in patterns if dicomweb.is_dicomweb_input(p)]
    patterns = [p for p in patterns if not dicomweb.is_dicomweb_input(p)]
    units = _checked_units(patterns, pipeline_options)
    web_roots = dicomweb_roots(web_patterns)
    filter_file = None
    uid_roots: tuple[str, ...] = ()
    if export.filter_config_gcs_uri:
        filter_file = read_filter_file(export.filter_config_gcs_uri)
        roots = [input_root(p) for p in patterns]
        if export.input_layout == "by-uid":
            if None in roots:
                raise UsageError("--input-layout by-uid needs folder inputs (ROOT, ROOT/ or ROOT/**), not globs")
            uid_roots = tuple(roots)
        elif export.input_layout == "auto" and None not in roots and looks_laid_out_by_uid(roots, filter_file):
            uid_roots = tuple(roots)
    plan = ExportPlan(
        listing_units=units,
        filter_uri=export.filter_config_gcs_uri,
        uid_roots=uid_roots,
        dicomweb_units=tuple(u for root in web_roots for u in dicomweb.listing_units(root, filter_file)),
        dicomweb_mode=export.dicomweb_mode,
        expand_archives=not export.no_archives,
        nested_archives=export.nested_archives,
    )
    return plan, filter_file


def run(argv: list[str] | None = None) -> dict:
    """Run an export; return the summary (also printed)."""
    silence_pydicom()
    options = parse_pipeline_options(argv)
    export = options.view_as(ExportOptions)
    disposition = _usage(resolve_disposition, export.write_disposition, export.overwrite_table)
    destination = _usage(parse_destination, export.bq_table or DEFAULT_URI, options)
    plan, filter_file = plan_export(export, options)
    defaulted = _local_defaults(options, plan)
    runner = _runner_name(options)
    local = runner in LOCAL_RUNNERS
    _usage(destination.check_runner, local)
    _usage(destination.check_options, export)
    _usage(check_incremental_options, export, disposition)
    destination.preflight(disposition)

    started = time.monotonic()
    context = RunContext(disposition, dt.datetime.now(dt.timezone.utc), export.max_failures, local)
    context.incremental, context.prune_missing = bool(export.incremental), bool(export.prune_missing)
    plan = dataclasses.replace(
        plan, run_started=context.run_started, incremental=context.incremental, prune_missing=context.prune_missing,
        rows_as_read=local and destination.takes_rows_as_read and not context.incremental,
    )
    listed_counts, read_ledger = {}, None  # listed_counts: what the launcher listed, when it compared
    too_many = False  # more changed files than the launcher hands over: a large update
    if context.incremental and local:
        compared = _compare_before_pipeline(plan, destination, context, options)
        too_many = compared is ledger.TOO_MANY_CHANGED
        if compared is not None and not too_many:
            listed_counts, changed = compared
            if not changed:  # the scheduled run with nothing new: no pipeline at all
                counts = {**dict.fromkeys(COUNTERS, 0), counters.ROWS_ADDED: 0, counters.ROWS_REPLACED: 0,
                          **listed_counts}
                return _finish_summary(export, destination, disposition, plan, filter_file, started, counts, None)
            plan = dataclasses.replace(plan, listed_files=tuple(changed))
            if defaulted and len(changed) < MULTI_PROCESS_MIN_FILES:
                options.view_as(DirectOptions).direct_running_mode = "in_memory"
    elif local:
        listed = _list_here(plan, options)
        if listed is not None:
            listed_counts, files = listed
            plan = dataclasses.replace(plan, listed_files=tuple(files))
    handed = None if plan.listed_files is None else len(plan.listed_files)
    plan = dataclasses.replace(plan, read_processes=_read_processes(options, plan, handed))
    if context.incremental and plan.listed_files is None:
        read_ledger = destination.recorded_files(context)
        if read_ledger is not None and defaulted and not too_many:  # an update reads few files: worker
            options.view_as(DirectOptions).direct_running_mode = "in_memory"  # processes cost more than they save
    ahead = None  # read processes the launcher starts on the files it listed
    if plan.read_processes and read_ledger is None:
        try:
            start_fork_server(_all_cloud_storage(plan))  # the read processes' server starts while the pipeline is built
            if plan.listed_files:
                ahead = _read_ahead(plan, filter_file, options)
        except Exception as error:  # noqa: BLE001 — then the files are read in Beam's thread
            logging.warning("dicom-bq-export: could not start read processes (%s); reading in one process",
                            type(error).__name__)
            plan = dataclasses.replace(plan, read_processes=0)
    early.discard()  # read processes started while Beam was imported, for another run than this
    try:
        return _run_pipeline(options, export, destination, disposition, plan, filter_file, context, runner, local,
                             started, listed_counts, read_ledger)
    finally:
        if ahead is not None:
            ahead.shutdown()


def _read_ahead(plan: ExportPlan, filter_file, options) -> ReadProcesses:
    """Start the read processes on the first files the launcher listed, for the read
    step to take (``transforms.read.ReadProcesses.read_ahead``): they read local files
    and Cloud Storage objects while Beam builds and starts the pipeline. Those the
    command started while Beam was imported (:func:`pipeline.early.claim`) if they read
    these very files the same way."""
    opener = Opener(options, expand_archives=plan.expand_archives, nested_archives=plan.nested_archives)
    client = client_settings(options) if _all_cloud_storage(plan) else None
    if filter_file is None and (client is not None or not _all_cloud_storage(plan)):
        ahead = early.claim(plan.read_processes, opener, plan.row_form, plan.listed_files, client)
        if ahead is not None:
            offer(ahead)
            return ahead
    early.discard()
    ahead = ReadProcesses(plan.read_processes, opener, filter_file, plan.row_form, client)
    try:
        ahead.read_ahead(plan.listed_files)
    except BaseException:
        ahead.shutdown()
        raise
    offer(ahead)
    return ahead


def _run_pipeline(options, export, destination, disposition, plan, filter_file, context, runner, local, started,
                  listed_counts, read_ledger) -> dict:
    pipeline = beam.Pipeline(options=options)
    try:
        return _build_and_run(pipeline, options, export, destination, disposition, plan, filter_file, context, runner,
                              local, started, listed_counts, read_ledger)
    finally:  # Beam removes its temporary folder in run(), which a build that fails never reaches
        shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)


def _build_and_run(pipeline, options, export, destination, disposition, plan, filter_file, context, runner, local,
                   started, listed_counts, read_ledger) -> dict:
    progress = LocalProgress(export.progress_seconds if local else 0)
    recorded = pipeline | "ReadFilesTable" >> read_ledger if read_ledger is not None else None
    if not local:
        outputs = build_pipeline(pipeline, plan, options, progress.reporter, recorded)
        destination.attach(outputs, context)
        pipeline.run()
        print(f"dicom-bq-export: submitted the job to {runner}; it writes {destination}", file=sys.stderr)
        return {"submitted": True, "destination": str(destination)}
    with progress, staging_folder(destination.staging_prefix(), context.run_id) as context.staging:
        plan = dataclasses.replace(plan, spool=os.path.join(context.staging, SPOOL))  # rows never all in memory
        if plan.listed_files is not None:  # listed here: the progress bar's total from the start
            progress.reporter.listed(len(plan.listed_files))
            progress.reporter.flush()
        outputs = build_pipeline(pipeline, plan, options, progress.reporter, recorded)
        destination.attach(outputs, context)
        stage_summary(outputs, context.staging)
        try:
            with progress.display():
                context.counts = run_summary.counters(_run_to_completion(pipeline))
        finally:
            forget_handed_files()
        stop_read_processes()  # their fork server would add to the peak of the load below
        for name, value in listed_counts.items():
            context.counts[name] = context.counts.get(name, 0) + value
        destination.finish(context)
        lines_used = read_staged(context.staging).filter_lines_used
    return _finish_summary(export, destination, disposition, plan, filter_file, started, context.counts, lines_used)


def _finish_summary(export, destination, disposition, plan, filter_file, started, counts, lines_used) -> dict:
    """Build, print (and with --summary-json write) the run's summary; return it."""
    summary = run_summary.build(
        counts,
        duration=time.monotonic() - started,
        destination=str(destination),
        errors_table=destination.errors_uri(),
        disposition=disposition,
        filter_file=filter_file,
        lines_used=lines_used,
        listing="filter paths under " + ", ".join(plan.uid_roots) if plan.uid_roots else "patterns",
    )
    print(run_summary.render(summary))
    if export.summary_json:
        run_summary.write_json(summary, export.summary_json)
    return summary


def _compare_before_pipeline(plan: ExportPlan, destination, context: RunContext, options):
    """For a local ``--incremental`` run over plain files (no filter, no DICOMweb, no
    archive among them, no ``--prune-missing``): list the input here and compare it with
    the files table (:func:`pipeline.ledger.compare_listing`). Returns ``(counts,
    changed)``: the counters of the listing and of the unchanged files, and the files to
    read (none: the run ends without a pipeline; some: the pipeline reads just those,
    without listing or comparing again). :data:`pipeline.ledger.TOO_MANY_CHANGED` if more
    than MOST_HANDED_FILES changed, None for an input this check leaves to the pipeline
    (an archive among the files, even with ``--no-archives``: whether a recorded archive
    changed is the pipeline's rule); the pipeline then lists and compares itself.
    A scheduled run with nothing new then costs a listing, not Beam's start-up, and a
    small update only the pipeline's reading steps."""
    if plan.filter_uri or plan.uid_roots or plan.dicomweb_units or plan.prune_missing:
        return None
    records = destination.read_recorded_files(context)
    if records is None:
        return None
    files = no_archives(iter_units(plan.listing_units, options))
    identity = file_identity if units_may_overlap(plan.listing_units) else None
    try:
        return ledger.compare_listing(files, records, identity, MOST_HANDED_FILES)
    except ArchiveListed:
        return None


def _list_here(plan: ExportPlan, options):
    """For a local run over plain files (not ``--incremental``): list the input here, as
    :class:`transforms.match.MatchInputs` would (one input per file, its first path),
    and hand the files to the pipeline (:attr:`pipeline.graph.ExportPlan.listed_files`).
    Its graph then has neither listing nor archive steps, which every local run paid
    for even with nothing to expand (~0.3 s of Beam's start-up and stages), and the
    files can be read ahead while Beam starts (:func:`_read_ahead`). Cloud Storage is
    listed here too when the run is in one Beam process. Returns ``(counts, files)``;
    None where the pipeline lists: another remote input (or a listing that failed here:
    the pipeline lists again and reports it), a filter file's UID layout, an archive
    among the files (unless ``--no-archives``), or more than MOST_HANDED_FILES files
    (the list is held whole; MOST_HANDED_OBJECTS on Cloud Storage)."""
    if plan.uid_roots or plan.dicomweb_units or not plan.listing_units:
        return None
    remote = not _all_local(plan)
    if remote and not (_all_cloud_storage(plan) and options.view_as(DirectOptions).direct_running_mode == "in_memory"):
        return None
    try:
        listed = list_plain_files(plan.listing_units, MOST_HANDED_OBJECTS if remote else MOST_HANDED_FILES,
                                  plan.expand_archives, options)
    except Exception:  # noqa: BLE001 — a remote listing that failed: the pipeline's listing reports it
        if not remote:
            raise
        return None
    if listed is None:
        return None
    count, files = listed
    return {counters.FILES_LISTED: count}, files


def _usage(check, *args):
    """``check(*args)``, its ValueError reported as a UsageError."""
    try:
        return check(*args)
    except ValueError as error:
        raise UsageError(str(error)) from None


#: How often Beam's state sampler wakes in this process during a local run (Beam's default:
#: 200 ms). At the end of every bundle ``StateSampler.stop`` joins the sampler's thread,
#: which first sleeps out its period ("May have to wait up to sampling_period_ms"); a local
#: run's read step is one long bundle, so every run waited 0–200 ms there (0.04–0.20 s in
#: 7 of 8 runs of 2,000 files). With 20 ms, 10 alternating pairs of such runs took 2.79 s
#: on average against 2.89 s. Beam has no option for it; only the sampler's timing
#: counters see the difference (sampled ten times as often, for a negligible cost).
STATE_SAMPLING_PERIOD_MS = 20


def sample_state_often() -> bool:
    """Make Beam's state samplers created from now on in this process wake every
    :data:`STATE_SAMPLING_PERIOD_MS`; False (nothing changed) if Beam's sampler is not the
    one this was measured with."""
    from apache_beam.runners.worker import statesampler

    init = statesampler.StateSampler.__init__
    if init.__defaults__ == (STATE_SAMPLING_PERIOD_MS,):
        return True
    if init.__defaults__ != (statesampler.DEFAULT_SAMPLING_PERIOD_MS,):
        return False
    init.__defaults__ = (STATE_SAMPLING_PERIOD_MS,)
    return True


def _run_to_completion(pipeline: beam.Pipeline):
    """Run a local pipeline and wait; a user error raised by a worker is re-raised as
    itself, without Beam's wrapping (see :func:`_user_error`)."""
    sample_state_often()
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except Exception as error:
        user_error = _user_error(error)
        if user_error is None:
            raise
        raise user_error from None
    return result


#: Errors a worker may raise that the user must fix (a conflicting field, --max-failures,
#: a table that changed since preflight, a schema too wide), by class name: Beam reports
#: them as text inside its own exception.
_USER_ERRORS = {
    "TooManyFailures": TooManyFailures,
    "DestinationError": DestinationError,
    "SchemaConflictError": DestinationError,
    "SchemaTooWideError": DestinationError,
    "FilterFileError": FilterFileError,
    "DicomWebError": dicomweb.DicomWebError,  # a DICOMweb store that cannot be listed completely
}


def _user_error(error: Exception) -> Exception | None:
    """The user error inside a failed pipeline's exception, or None for anything else."""
    text = str(error)
    for name, error_type in _USER_ERRORS.items():
        match = re.search(rf"{name}: (.+?)(?:\n|\\n| \[while running|$)", text)
        if match:
            return error_type(match.group(1).strip())
    job = re.search(r"BigQuery job (\S+) failed", text)
    if job:  # Beam's message carries the job's errors, which can quote row values
        return DestinationError(
            f"BigQuery job {job.group(1)} failed; its errors are in BigQuery (bq show -j), not here, as they "
            "may quote row values. Nothing was written to the table."
        )
    return None


def print_help(stream=None) -> None:
    """This tool's options first, each explained; then that Beam's options pass through."""
    import textwrap

    stream = stream or sys.stdout
    parser = argparse.ArgumentParser(add_help=False)
    ExportOptions._add_argparse_args(parser)
    entries = []
    for action in parser._actions:
        name = action.option_strings[0]
        if action.nargs == "?":  # a boolean that also takes true/false (templates pass one)
            usage = name
        else:
            usage = f"{name} {action.metavar}" + ("..." if action.nargs == "+" else "")
        entries.append((usage, action.help))
    entries += list(COMMAND_FLAGS)
    width = shutil.get_terminal_size((100, 24)).columns
    lines = [
        "usage: dicom-bq-export --input PATTERN... [--bq-table URI] [--write-disposition D] [options]",
        "       dicom-bq-export inspect FILE...",
        "",
        "Export the headers of DICOM files (local or gs://) to BigQuery or a DuckDB file, one row per",
        "instance, in the Cloud Healthcare API's export schema.",
        "",
        "options:",
    ]
    for usage, text in entries:
        lines.append(f"  {usage}")
        lines += textwrap.wrap(text, width=max(width - 1, 40), initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines += [
        "",
        "Every option also has its underscore spelling (--bq_table). Apache Beam's own options pass",
        "through: --runner, --project, --region, --temp_location, --direct_num_workers, ... (see Beam's",
        "PipelineOptions). Without --runner the export runs locally.",
    ]
    print("\n".join(lines), file=stream)


class _CurrentStderr(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is when a record comes."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: str | None) -> None:
    """One line per record on stderr. Without ``--log-level``: WARNING and above from this
    tool, nothing from Beam and Google's clients: their INFO and WARNING records are their
    own chatter ("No semi_persistent_directory found", "Discarding unparseable args",
    workers' logs), and their ERROR records of a failed step carry a traceback (which may
    quote values) — the run reports that failure itself, in one line."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level or logging.WARNING)
    for name in ("apache_beam", "absl", "grpc", "google", "urllib3"):
        logging.getLogger(name).setLevel(level or logging.CRITICAL + 1)


@contextlib.contextmanager
def workers_output_hidden(hidden: bool = True):
    """File descriptor 2 goes to /dev/null for the duration, ``sys.stderr`` stays the
    terminal: Beam's worker processes inherit descriptor 2, and on Ctrl-C, or when gRPC
    has something to say, they write tracebacks there. This process's messages and the
    progress display still reach the user through ``sys.stderr``."""
    if not hidden:
        yield
        return
    original = sys.stderr
    with descriptor_2_to_devnull() as saved:
        sys.stderr = open(saved, "w", buffering=1, encoding=getattr(original, "encoding", None) or "utf-8",
                          errors="backslashreplace", closefd=False)
        excepthook = threading.excepthook
        threading.excepthook = _quiet_thread_exception
        try:
            yield
        finally:
            threading.excepthook = excepthook
            sys.stderr.flush()
            sys.stderr = original


def _quiet_thread_exception(args) -> None:
    """Beam's threads that watch worker processes raise when a worker is stopped (Ctrl-C):
    a DEBUG record, not a traceback on the terminal; the run itself reports the failure."""
    logging.getLogger(__name__).debug(
        "thread %s ended with %s", getattr(args.thread, "name", "?"), args.exc_type.__name__,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def stop_worker_processes() -> None:
    """Terminate Beam's worker processes among this process's descendants (``sh -c python
    -m …sdk_worker_main`` and the interpreter under it; nothing else). On Ctrl-C the
    terminal signals them too; when only this process is interrupted they would run on,
    and Beam's threads that wait for them would keep this process alive. Linux (/proc);
    elsewhere nothing."""
    import signal

    kill_read_processes()  # a local run's read processes (transforms.read) go at once too

    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        parent = int(stat[stat.rindex(b")") + 2:].split()[1])
        parents.setdefault(parent, []).append(int(entry))
    descendants, queue = [], [os.getpid()]
    while queue:
        for child in parents.get(queue.pop(), []):
            descendants.append(child)
            queue.append(child)
    for pid in reversed(descendants):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"sdk_worker_main" not in handle.read():
                    continue
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


INTERRUPTED_MESSAGE = "interrupted; nothing was written"

#: After Ctrl-C, how long the run may take to unwind before the process leaves anyway.
INTERRUPT_GRACE_SECONDS = 5.0


@contextlib.contextmanager
def interrupt_handling():
    """Ctrl-C stops the worker processes and raises KeyboardInterrupt as usual, so that the
    run unwinds (staging removed, no table touched); but Beam can swallow it in one of its
    threads, so a watchdog leaves the process (exit 130) if the run has not unwound within
    INTERRUPT_GRACE_SECONDS, and a second Ctrl-C leaves at once."""
    import signal

    done = threading.Event()
    interrupted = threading.Event()

    def leave_now():
        stop_worker_processes()
        _error(INTERRUPTED_MESSAGE)
        sys.stdout.flush()
        os._exit(130)

    def watchdog():
        if not done.wait(INTERRUPT_GRACE_SECONDS):
            leave_now()

    def on_interrupt(_signum, _frame):
        if interrupted.is_set():
            leave_now()
        interrupted.set()
        threading.Thread(target=watchdog, name="interrupt-watchdog", daemon=True).start()
        stop_worker_processes()  # Beam's clean-up waits for them
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_interrupt)
    except ValueError:  # not the main thread: Python's own handling
        yield interrupted
        return
    try:
        yield interrupted
    finally:
        done.set()
        signal.signal(signal.SIGINT, previous)


def _interrupted() -> int:
    stop_worker_processes()
    _error(INTERRUPTED_MESSAGE)
    return 130


def _error(message: str) -> None:
    print(f"dicom-bq-export: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command line: exit 0 on success, 2 for a usage error, 1 for any other error
    (one line, never a traceback unless ``--debug``), 130 when interrupted (Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        from pipeline import inspect

        return inspect.run(argv[1:])
    if argv and argv[0] == "report":
        from pipeline import report

        return report.run(argv[1:])
    if argv and argv[0] == "export":
        argv = argv[1:]
    debug = "--debug" in argv
    try:
        flags, argv = split_command_flags(argv)
        if flags.help or (not argv and not flags.version):
            print_help(sys.stdout if flags.help else sys.stderr)
            return 0 if flags.help else 2
        if flags.version:
            print(f"dicom-bq-export {tool_version()}")
            return 0
        configure_logging(flags.log_level)
        argv = strict_argv(argv)
        with workers_output_hidden(not flags.debug), interrupt_handling() as interrupted:
            try:
                run(argv)
            except KeyboardInterrupt:
                return _interrupted()
            except Exception:
                if interrupted.is_set():  # Beam wraps the KeyboardInterrupt of a step it was running
                    return _interrupted()
                raise
    except KeyboardInterrupt:  # before or after the run
        return _interrupted()
    except UsageError as error:
        _error(str(error))
        return 2
    except (FilterFileError, DestinationError, TooManyFailures, dicomweb.DicomWebError) as error:
        _error(str(error))
        return 1
    except Exception as error:  # noqa: BLE001 — the last line of defence: one line, not a traceback
        if debug:
            traceback.print_exc()
        _error(f"unexpected {type(error).__name__}; run again with --debug to see the traceback")
        return 1
    finally:
        early.discard()  # the run ended (or never started) without them
    return 0


if __name__ == "__main__":
    from pipeline.cli import _exit

    _exit(main())
