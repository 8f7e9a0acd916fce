"""The export's flags: a Beam ``PipelineOptions`` subclass.

The names mirror ``gcloud healthcare dicom-stores export bq`` (``--bq-table``,
``--write-disposition``, ``--overwrite-table``, ``--filter-config-gcs-uri``); every flag
also has its underscore spelling, which is what Dataflow templates pass. Standard Beam
options (``--runner``, ``--project``, ``--region``, ``--temp_location``…) pass through.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

INPUT_LAYOUTS = ("auto", "by-uid", "any")


def _boolean(text: str) -> bool:
    """A flag's value given as text (templates pass ``--overwrite_table=true``)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise ValueError(f"expected true or false, not {text!r}")


def _flag(name: str) -> list[str]:
    """``--bq-table`` and ``--bq_table``."""
    spellings = [f"--{name}"]
    if "-" in name:
        spellings.append("--" + name.replace("-", "_"))
    return spellings


class ExportOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            *_flag("input"),
            dest="input",
            action="extend",
            nargs="+",
            default=None,
            help="DICOM files to export: one or more local paths, folders or globs, or gs:// "
            "patterns (gs://bucket/prefix/**). Folders are read recursively; file names do not matter.",
        )
        parser.add_argument(
            *_flag("bq-table"),
            dest="bq_table",
            default=None,
            help="Destination: bq://PROJECT.DATASET.TABLE for BigQuery, or duckdb://PATH#TABLE for a "
            "local DuckDB file. Default: duckdb://dicom_metadata.duckdb#dicom_metadata.",
        )
        parser.add_argument(
            *_flag("write-disposition"),
            dest="write_disposition",
            default=None,
            help="What to do if the table exists: WRITE_EMPTY (write only if it is empty), "
            "WRITE_APPEND (add rows, extend the schema), WRITE_TRUNCATE (replace rows and schema). "
            "Lower-case and dashed spellings (write-append) work too. Without this flag or "
            "--overwrite-table, an existing table is an error.",
        )
        parser.add_argument(
            *_flag("overwrite-table"),
            dest="overwrite_table",
            nargs="?",
            const=True,
            type=_boolean,
            default=False,
            help="Legacy: replace an existing table (like WRITE_TRUNCATE). Not with --write-disposition.",
        )
        parser.add_argument(
            *_flag("filter-config-gcs-uri"),
            dest="filter_config_gcs_uri",
            default=None,
            help="A filter file (gs:// or local) of /studies/UID[/series/UID[/instances/UID]] lines: "
            "only the instances they select are exported.",
        )
        parser.add_argument(
            *_flag("input-layout"),
            dest="input_layout",
            default="auto",
            choices=INPUT_LAYOUTS,
            help="With a filter file: 'by-uid' lists only the filter's paths under each input folder "
            "(ROOT/STUDY/SERIES/INSTANCE or ROOT/studies/STUDY/series/SERIES/instances/INSTANCE); "
            "'any' reads every file and selects by the UIDs in its header; 'auto' (default) "
            "probes the folders to choose.",
        )
        parser.add_argument(
            *_flag("summary-json"),
            dest="summary_json",
            default=None,
            help="Also write the run's summary (the printed figures) to this JSON file.",
        )
        parser.add_argument(
            *_flag("max-failures"),
            dest="max_failures",
            type=int,
            default=None,
            help="Fail the run, writing nothing, if more than this many instances fail. "
            "Default: failed instances only go to the TABLE_errors table.",
        )
        parser.add_argument(
            *_flag("cluster-by"),
            dest="cluster_by",
            default=None,
            help="BigQuery only: comma-separated columns to cluster a new table by "
            "(e.g. StudyInstanceUID,SeriesInstanceUID).",
        )
        parser.add_argument(
            *_flag("progress-seconds"),
            dest="progress_seconds",
            type=float,
            default=10.0,
            help="How often workers print how many files they have read (0: never). Default 10.",
        )
        parser.add_argument(
            *_flag("incremental"),
            dest="incremental",
            nargs="?",
            const=True,
            type=_boolean,
            default=False,
            help="Keep the table current: one row per SOPInstanceUID, and read only the files that the "
            "TABLE_files table does not record as exported with the same version (new, changed or "
            "failed files). A re-sent or rewritten instance replaces its row. An existing table needs "
            "--write-disposition WRITE_APPEND; WRITE_TRUNCATE rebuilds it from every file.",
        )
        parser.add_argument(
            *_flag("prune-missing"),
            dest="prune_missing",
            nargs="?",
            const=True,
            type=_boolean,
            default=False,
            help="With --incremental: the listed files are the whole archive; delete the rows of instances "
            "whose every file has disappeared, and forget those files in TABLE_files.",
        )
