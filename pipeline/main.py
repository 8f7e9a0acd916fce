"""Entry point: ``dicom-bq-export`` (also ``python -m pipeline.main``).

    dicom-bq-export --input PATTERN... [--bq-table URI] [--write-disposition D] ...
    dicom-bq-export inspect FILE...

``run(argv)``: parse → preflight (usage, filter file, destination; before any file is
read) → build the graph → attach the destination's writing → run → finish the
destination's write (local runs) → print the summary.

Locally, without ``--runner``, it runs on Beam's portable runner (FnApiRunner) with one
worker process per core, or in this process for a small local input. Examples:

    dicom-bq-export --input samples/ --bq-table duckdb://dicom.duckdb#instances
    dicom-bq-export --input 'gs://bucket/dicom/**' --bq-table bq://proj.ds.instances \\
        --write-disposition WRITE_APPEND --temp_location gs://bucket/tmp \\
        --runner DataflowRunner --project proj --region europe-west4
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import glob
import logging
import os
import re
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipeline import summary as run_summary
from pipeline.destinations import DestinationError, TooManyFailures, resolve_disposition
from pipeline.destinations.base import DEFAULT_URI, RunContext, parse_destination
from pipeline.graph import ExportPlan, build_pipeline
from pipeline.ledger import check_incremental_options
from pipeline.options import ExportOptions
from pipeline.staging import read_staged, stage_summary, staging_folder
from transforms.filter_file import FilterFileError, read_filter_file
from transforms.header import silence_pydicom
from transforms.match import input_root, listing_units, looks_laid_out_by_uid, shard_listing_units

#: Runners that execute in (or next to) this process, so the launcher waits and loads.
LOCAL_RUNNERS = {"DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "PrismRunner", "SwitchingDirectRunner"}


class UsageError(ValueError):
    """Bad flags: reported before anything is read."""


def _runner_name(options: PipelineOptions) -> str:
    runner = options.view_as(StandardOptions).runner
    if runner is None:
        return "FnApiRunner"
    return runner if isinstance(runner, str) else type(runner).__name__


#: Below this many local input files one process is faster: starting worker processes
#: costs Beam about 3 s, more than a second core saves on a small export.
MULTI_PROCESS_MIN_FILES = 2000


def _local_defaults(options: PipelineOptions, plan: ExportPlan) -> bool:
    """Without ``--runner``: Beam's portable runner in this process, or, for an input of
    at least MULTI_PROCESS_MIN_FILES files (or any remote input), one worker process
    per core. (DirectRunner would first try to download the Prism runner from GitHub.)
    True if it chose worker processes.
    """
    standard = options.view_as(StandardOptions)
    if standard.runner is not None:
        return False
    standard.runner = "FnApiRunner"
    direct = options.view_as(DirectOptions)
    cores = os.cpu_count() or 1
    if cores > 1 and direct.direct_running_mode == "in_memory" and not _small_local_input(plan):
        direct.direct_running_mode = "multi_processing"
        direct.direct_num_workers = cores
        return True
    return False


def _small_local_input(plan: ExportPlan) -> bool:
    """True if the input is local and has fewer than MULTI_PROCESS_MIN_FILES files."""
    if plan.uid_roots or any("://" in unit for unit in plan.listing_units):
        return False
    count = 0
    for unit in plan.listing_units:
        if unit.endswith("/*") and os.path.isdir(unit[:-2]):
            count += sum(1 for entry in os.scandir(unit[:-2]) if entry.is_file())
        elif unit.endswith("/**") and os.path.isdir(unit[:-3]):
            for _root, _dirs, files in os.walk(unit[:-3]):
                count += len(files)
                if count >= MULTI_PROCESS_MIN_FILES:
                    return False
        else:
            count += len(glob.glob(unit, recursive=True))
        if count >= MULTI_PROCESS_MIN_FILES:
            return False
    return True


def input_patterns(values: list[str]) -> list[str]:
    """``--input`` values; one value may hold several gs:// patterns separated by commas
    (a template parameter is one string)."""
    return [pattern for value in values for pattern in re.split(r",(?=gs://)", value) if pattern]


def plan_export(export: ExportOptions, pipeline_options: PipelineOptions | None = None) -> tuple[ExportPlan, object]:
    """Check everything that can be checked before reading a file; return the plan.

    Returns ``(plan, filter_file)``. Raises UsageError, FilterFileError or
    DestinationError, each with a message saying what to fix.
    """
    if not export.input:
        raise UsageError("give at least one --input (a folder, file, glob or gs:// pattern)")
    patterns = input_patterns(export.input)
    units = tuple(unit for pattern in patterns for unit in listing_units(pattern))
    units = tuple(shard_listing_units(units, pipeline_options))
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
        progress_seconds=export.progress_seconds,
    )
    return plan, filter_file


def run(argv: list[str] | None = None) -> dict:
    """Run an export; return the summary (also printed)."""
    silence_pydicom()
    options = PipelineOptions(argv)
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
        plan, run_started=context.run_started, incremental=context.incremental, prune_missing=context.prune_missing
    )
    read_ledger = destination.recorded_files(context) if context.incremental else None
    if read_ledger is not None and defaulted:  # an update reads few files: worker processes cost more than they save
        options.view_as(DirectOptions).direct_running_mode = "in_memory"
    pipeline = beam.Pipeline(options=options)
    recorded = pipeline | "ReadFilesTable" >> read_ledger if read_ledger is not None else None
    outputs = build_pipeline(pipeline, plan, options, recorded)
    if not local:
        destination.attach(outputs, context)
        pipeline.run()
        print(f"dicom-bq-export: submitted the job to {runner}; it writes {destination}", file=sys.stderr)
        return {"submitted": True, "destination": str(destination)}
    with staging_folder(destination.staging_prefix(), context.run_id) as context.staging:
        destination.attach(outputs, context)
        stage_summary(outputs, context.staging)
        context.counts = run_summary.counters(_run_to_completion(pipeline))
        destination.finish(context)
        lines_used = read_staged(context.staging).filter_lines_used

    summary = run_summary.build(
        context.counts,
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


def _usage(check, *args):
    """``check(*args)``, its ValueError reported as a UsageError."""
    try:
        return check(*args)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _run_to_completion(pipeline: beam.Pipeline):
    """Run a local pipeline and wait; a user error raised by a worker is re-raised as
    itself, without Beam's wrapping (see :func:`_user_error`)."""
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


def print_help() -> None:
    parser = argparse.ArgumentParser(
        prog="dicom-bq-export",
        description="Export DICOM metadata to BigQuery or DuckDB. Also: dicom-bq-export inspect FILE... "
        "Standard Beam options (--runner, --project, --region, --temp_location, ...) pass through.",
    )
    ExportOptions._add_argparse_args(parser)
    parser.print_help()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        from pipeline import inspect

        return inspect.run(argv[1:])
    if argv and argv[0] == "report":
        from pipeline import report

        return report.run(argv[1:])
    if argv and argv[0] == "export":
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
        return 0 if argv else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(argv)
    except (UsageError, FilterFileError, DestinationError, TooManyFailures) as error:
        print(f"dicom-bq-export: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
