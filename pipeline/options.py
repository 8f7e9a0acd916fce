"""The export's flags: a Beam ``PipelineOptions`` subclass.

The names mirror ``gcloud healthcare dicom-stores export bq`` (``--bq-table``,
``--write-disposition``, ``--overwrite-table``, ``--filter-config-gcs-uri``); every flag
also has its underscore spelling, which is what Dataflow templates pass. Standard Beam
options (``--runner``, ``--project``, ``--region``, ``--temp_location``…) pass through.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

INPUT_LAYOUTS = ("auto", "by-uid", "any")
DICOMWEB_MODES = ("instance", "metadata")


class UsageError(ValueError):
    """Bad flags or inputs: reported in one line before anything is read or written."""


def _boolean(text: str) -> bool:
    """A flag's value given as text (templates pass ``--overwrite_table=true``)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise ValueError(f"expected true or false, not {text!r}")


def _whole_number(text: str) -> int:
    """A count given as text: a whole number, zero or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more, not {text!r}")
    return value


def _seconds(text: str) -> float:
    """A duration in seconds, zero or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds of 0 or more, not {text!r}")
    return value


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
            metavar="PATTERN",
            dest="input",
            action="extend",
            nargs="+",
            default=None,
            help="DICOM files to export: one or more local paths, folders or globs, or gs:// "
            "patterns (gs://bucket/prefix/**). Folders are read recursively; file names do not matter; "
            ".zip, .tar, .tar.gz and .tgz archives are read member by member. A DICOM store or PACS: "
            "dicomweb+https://HOST/DICOMWEB/ROOT (credentials from the environment: see the README).",
        )
        parser.add_argument(
            *_flag("bq-table"),
            metavar="URI",
            dest="bq_table",
            default=None,
            help="Destination: bq://PROJECT.DATASET.TABLE for BigQuery, duckdb://PATH#TABLE for a "
            "local DuckDB file, parquet://DIR for a local folder of Parquet files, or "
            "parquet+gs://BUCKET/PREFIX for one on Cloud Storage. "
            "Default: duckdb://dicom_metadata.duckdb#dicom_metadata.",
        )
        parser.add_argument(
            *_flag("write-disposition"),
            metavar="D",
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
            metavar="URI",
            dest="filter_config_gcs_uri",
            default=None,
            help="A filter file (gs:// or local) of /studies/UID[/series/UID[/instances/UID]] lines: "
            "only the instances they select are exported.",
        )
        parser.add_argument(
            *_flag("input-layout"),
            metavar="LAYOUT",
            dest="input_layout",
            default="auto",
            choices=INPUT_LAYOUTS,
            help="With a filter file: 'by-uid' lists only the filter's paths under each input folder "
            "(ROOT/STUDY/SERIES/INSTANCE or ROOT/studies/STUDY/series/SERIES/instances/INSTANCE); "
            "'any' reads every file and selects by the UIDs in its header; 'auto' (default) "
            "probes the folders to choose.",
        )
        parser.add_argument(
            *_flag("dicomweb-mode"),
            metavar="MODE",
            dest="dicomweb_mode",
            default="instance",
            choices=DICOMWEB_MODES,
            help="DICOMweb inputs: 'instance' (default) retrieves each instance as stored and reads "
            "its header (the same row as from its file); 'metadata' reads the DICOM JSON of each "
            "series in one request (cheaper, lossy as the README documents).",
        )
        parser.add_argument(
            *_flag("no-archives"),
            dest="no_archives",
            nargs="?",
            const=True,
            type=_boolean,
            default=False,
            help="Read .zip, .tar, .tar.gz and .tgz inputs as plain files instead of member by member.",
        )
        parser.add_argument(
            *_flag("nested-archives"),
            dest="nested_archives",
            nargs="?",
            const=True,
            type=_boolean,
            default=False,
            help="Also expand archives found inside archives (up to 3 levels); otherwise each is a "
            "NestedArchiveError dead letter.",
        )
        parser.add_argument(
            *_flag("summary-json"),
            metavar="PATH",
            dest="summary_json",
            default=None,
            help="Also write the run's summary (the printed figures) to this JSON file.",
        )
        parser.add_argument(
            *_flag("max-failures"),
            metavar="N",
            dest="max_failures",
            type=_whole_number,
            default=None,
            help="Fail the run, writing nothing, if more than this many instances fail. "
            "Default: failed instances only go to the TABLE_errors table.",
        )
        parser.add_argument(
            *_flag("cluster-by"),
            metavar="COLUMNS",
            dest="cluster_by",
            default=None,
            help="BigQuery only: comma-separated columns to cluster a new table by "
            "(e.g. StudyInstanceUID,SeriesInstanceUID).",
        )
        parser.add_argument(
            *_flag("progress-seconds"),
            metavar="S",
            dest="progress_seconds",
            type=_seconds,
            default=10.0,
            help="Progress: a live bar when stderr is a terminal; otherwise one line every S seconds "
            "(0: no progress display). Default 10.",
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


class _StrictParser(_BeamArgumentParser):
    """Beam's parser, whose errors (an invalid value) are UsageErrors instead of an exit."""

    def error(self, message):
        raise UsageError(_one_line(message))


def _one_line(message: str) -> str:
    """argparse's ``argument --a/--b: invalid …`` as ``--a: invalid …``."""
    message = re.sub(r"^argument (--[\w-]+)(?:/--[\w-]+)*: ", r"\1: ", message)
    return message.replace("\n", " ")


def _all_options_parser() -> _StrictParser:
    """Every option Beam knows when the pipeline runs, ours included.

    Built exactly as ``PipelineOptions.get_all_options`` builds its parser (the
    direct subclasses of PipelineOptions registered so far, last one of a name
    winning), so that what is accepted here is what Beam will parse.
    """
    parser = _StrictParser(allow_abbrev=False, add_help=False)
    subset = {}
    for cls in PipelineOptions.__subclasses__():
        subset.setdefault(str(cls), cls)
    for cls in subset.values():
        cls._add_argparse_args(parser)
    return parser


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _suggestion(name: str, known: list[str]) -> str:
    """``; did you mean --bq-table?`` (our dashed spelling preferred), or nothing."""
    candidates = sorted(set(known), key=lambda s: ("_" in s, s))
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.7)
    if not match:
        match = difflib.get_close_matches(name.replace("-", "_"), candidates, n=1, cutoff=0.7)
    return f"; did you mean {match[0]}?" if match else ""


def strict_argv(argv: list[str]) -> list[str]:
    """Check the command line against every known option; return it as Beam will read it.

    Raises UsageError, in one line, for an unknown or misspelled option (with the
    closest known one), a stray argument, or an invalid value (``--max-failures abc``,
    ``--input-layout x``). Beam's own options pass, in ``--flag value`` and
    ``--flag=value`` forms; a dashed spelling of a Beam option (``--temp-location``)
    is rewritten to the underscore one Beam reads, rather than silently ignored.
    """
    argv = list(argv)
    parser = _all_options_parser()
    known = _option_strings(parser)
    known_set = set(known)
    for index, token in enumerate(argv):
        if token == "--":
            break
        name, equals, value = token.partition("=")
        if name.startswith("--") and name not in known_set:
            underscored = "--" + name[2:].replace("-", "_")
            if underscored in known_set:
                argv[index] = underscored + equals + value
    try:
        _namespace, unknown = parser.parse_known_args(argv)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 — a Beam action checking its value itself
        raise UsageError(f"an option has an invalid value ({type(error).__name__}: {_one_line(str(error))})") from None
    for token in unknown:
        if token.startswith("-"):
            name = token.partition("=")[0]
            raise UsageError(f"{name}: unknown option{_suggestion(name, known) or ' (see --help)'}")
        raise UsageError(
            f"unexpected argument {token!r}: give the files with --input (see --help)"
        )
    return argv


def parse_pipeline_options(argv: list[str]) -> PipelineOptions:
    """The pipeline's options from a command line checked by :func:`strict_argv`."""
    return PipelineOptions(strict_argv(argv))


def tool_version() -> str:
    """This package's version: installed metadata, else ``setup.py`` beside the code."""
    from importlib import metadata

    try:
        return metadata.version("dicom-bq-export")
    except metadata.PackageNotFoundError:
        pass
    import pathlib

    setup = pathlib.Path(__file__).resolve().parents[1] / "setup.py"
    try:
        found = re.search(r"""version\s*=\s*["']([^"']+)["']""", setup.read_text(encoding="utf-8"))
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


#: ``--log-level`` values (Python's logging levels).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclasses.dataclass
class CommandFlags:
    """The command's own flags, which are not pipeline options (Beam never sees them)."""

    help: bool = False
    version: bool = False
    debug: bool = False
    log_level: str | None = None


#: The command's own flags and what they do, for --help.
COMMAND_FLAGS = (
    ("--log-level LEVEL", "Show log records of this level and above (DEBUG, INFO, WARNING, ERROR), Beam's "
     "included. Default: this tool's warnings only; Beam's and Google's clients' records are hidden."),
    ("--debug", "Show the traceback of an unexpected error, and the workers' own output."),
    ("--version", "Print the version and exit."),
    ("-h, --help", "Print this help and exit."),
)


def split_command_flags(argv: list[str]) -> tuple[CommandFlags, list[str]]:
    """``(flags, the rest)``: the command's own flags taken out of a command line, in
    either spelling and form (``--log-level INFO``, ``--log_level=info``)."""
    flags = CommandFlags()
    rest: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        name, equals, value = token.partition("=")
        if token in ("-h", "--help"):
            flags.help = True
        elif token == "--version":
            flags.version = True
        elif token == "--debug":
            flags.debug = True
        elif name in ("--log-level", "--log_level"):
            if not equals:
                value = next(tokens, "")
            if value.upper() not in LOG_LEVELS:
                raise UsageError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, not {value!r}")
            flags.log_level = value.upper()
        else:
            rest.append(token)
    return flags, rest
