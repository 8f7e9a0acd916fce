"""The ``dicom-bq-export`` command's entry point (also ``python -m pipeline.cli``).

A thin shell around :func:`pipeline.main.main` for what only a process can decide: Ctrl-C
while Beam is still being imported (a second or more) is one line too, an interrupted
run leaves at once, with exit status 130, without waiting for Beam's threads, and the
read processes' fork server starts while Beam is imported, as does reading a plain local
run's first files (:mod:`pipeline.early`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys

INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if _start_read_server(args):
            _start_early_reads(args)
        with beam_imported_without(not_for_beam(args)):
            from pipeline.main import main as command
    except KeyboardInterrupt:
        _end_read_processes()
        print("dicom-bq-export: error: interrupted; nothing was written", file=sys.stderr, flush=True)
        return INTERRUPTED
    return command(argv)


#: Installed modules Beam imports, if they are there, only for what the export never uses:
#: pandas for its typehints' pandas batches (~0.2 s of the import), pymongo and its bson for
#: its MongoDB IO (~0.1 s).
NOT_FOR_BEAM = ("pandas", "pymongo", "bson")
#: Installed modules Beam imports, if they are there, only for a remote runner or for what a
#: local export never uses: the Dataflow API's client (Beam's Dataflow runner), Pub/Sub's
#: (streaming IO), BigQuery Storage's read client (``ReadFromBigQuery`` by ``DIRECT_READ``)
#: and pyarrow's Parquet module (Beam's Parquet IO: this project's Parquet destination
#: imports it for itself when it is used); together ~0.25 s of one core at the start of
#: every local run.
NOT_FOR_LOCAL_RUNS = ("google.cloud.dataflow", "google.cloud.pubsub", "google.cloud.pubsub_v1",
                      "google.cloud.bigquery_storage_v1", "pyarrow.parquet")
#: Beam's BigQuery IO: its API client and messages, and with them BigQuery's client
#: library (~0.1 s of one core, ~8 MiB), which a run that names no BigQuery table never
#: uses. Without them, Beam's ``beam.io`` has no BigQuery or Pub/Sub transforms for the
#: rest of the process.
NOT_FOR_LOCAL_TABLES = ("apache_beam.io.gcp.internal.clients.bigquery",)
#: What a run that names no Cloud Storage path and no BigQuery table never uses: Beam's
#: Cloud Storage client, which Beam's filesystems import to know ``gs://`` (with it, Cloud
#: Storage's client library and Beam's Google auth: ~0.2 s, ~2 MiB), and apitools, the
#: client library of Google's older APIs, which Beam imports for the errors of those APIs
#: (its retry filters, its metrics of Google API calls) and for the Dataflow API's values
#: (~0.3 s, ~6 MiB). Without them, for the rest of the process, Beam's filesystems have no
#: ``gs://`` and its retry filters do not tell Google APIs' errors apart.
NOT_FOR_LOCAL_FILES = ("apache_beam.io.gcp.gcsio", "apitools")


def not_for_beam(argv: list[str]) -> tuple[str, ...]:
    """The modules Beam is imported without for this command line: also
    :data:`NOT_FOR_LOCAL_RUNS` when it names no runner (the export runs locally; a
    ``--runner``, even ``DirectRunner``, imports Beam whole, as Beam would); then
    :data:`NOT_FOR_LOCAL_TABLES` when it names no BigQuery table, and
    :data:`NOT_FOR_LOCAL_FILES` when it names no Cloud Storage path either."""
    if any(arg == "--runner" or arg.startswith("--runner=") for arg in argv):
        return NOT_FOR_BEAM
    if _names_bigquery(argv):
        return NOT_FOR_BEAM + NOT_FOR_LOCAL_RUNS
    if any("gs://" in arg for arg in argv):
        return NOT_FOR_BEAM + NOT_FOR_LOCAL_RUNS + NOT_FOR_LOCAL_TABLES
    return NOT_FOR_BEAM + NOT_FOR_LOCAL_RUNS + NOT_FOR_LOCAL_TABLES + NOT_FOR_LOCAL_FILES


def _names_bigquery(argv: list[str]) -> bool:
    """True unless the command line surely names no BigQuery table: no argument mentions
    bq://, and every ``--bq-table`` starts with the URI scheme of another destination
    (``pipeline.destinations.base.SCHEMES``; a scheme-less value is a BigQuery table).
    Without ``--bq-table`` the destination is a DuckDB file."""
    from pipeline.destinations.base import SCHEMES  # no Beam: the destinations' modules load when used

    if any("bq://" in arg for arg in argv):
        return True
    not_bigquery = tuple(scheme for scheme in SCHEMES if scheme != "bq://")
    for at, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name in ("--bq-table", "--bq_table"):
            if not equals:
                value = argv[at + 1] if at + 1 < len(argv) else ""
            if not value.startswith(not_bigquery):
                return True
    return False


#: Beam's loggers that tell, as Beam is imported, of an optional module it did not find.
_SAYS_WHAT_IS_MISSING = ("apache_beam.io.mongodbio", "apache_beam.io.gcp.bigquery")


@contextlib.contextmanager
def beam_imported_without(names):
    """While Beam is imported, the modules ``names`` that are not imported yet cannot be
    (an ImportError, which Beam expects of optional modules); afterwards they import as
    usual. Beam's modules that log what they did not find (MongoDB IO, BigQuery IO) do
    not this time."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    logs = [logging.getLogger(name) for name in _SAYS_WHAT_IS_MISSING]
    were_disabled = [log.disabled for log in logs]
    for log in logs:
        log.disabled = True
    try:
        yield
    finally:
        for log, was_disabled in zip(logs, were_disabled):
            log.disabled = was_disabled
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _start_read_server(argv: list[str]) -> bool:
    """For an export, start the fork server of a local run's read processes
    (``transforms.read``) now, so that it imports its reading code on another core while
    this process imports Beam (a second or more): the processes are then ready as soon
    as the launcher has listed the files. An argument naming ``gs://`` has the server
    preload Cloud Storage's client library too (the processes read such inputs). Where
    the run reads nothing on processes (DICOMweb, few files) the server only costs its
    own start, on a core this process leaves idle. Nothing here is an error: the run
    decides and reports for itself. True if the server started."""
    if not argv or argv[0] in ("inspect", "report") or {"-h", "--help", "--version"} & set(argv):
        return False
    try:
        from transforms.fork_server import processes_available, start_fork_server, usable_cores

        if usable_cores() > 1 and processes_available():
            # Its descriptor 2 (and multiprocessing's resource tracker's, which it starts)
            # is /dev/null unless --debug, as Beam's workers' and the read processes' are
            # (pipeline.main.workers_output_hidden): the tracker would otherwise tell the
            # terminal about the read processes' semaphores when Ctrl-C ends the command at once.
            with descriptor_2_to_devnull() if "--debug" not in argv else contextlib.nullcontext():
                start_fork_server(cloud_storage=any("gs://" in arg for arg in argv))
            return True
    except Exception:  # noqa: BLE001 — the run starts it again, or reads in one process, and says so
        pass
    return False


@contextlib.contextmanager
def descriptor_2_to_devnull():
    """Descriptor 2 on /dev/null for the duration (what processes started meanwhile
    inherit); yields a descriptor of what it was, open until the end."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield saved
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _start_early_reads(argv: list[str]) -> None:
    """List a plain local run's input and start reading it while Beam is imported
    (:func:`pipeline.early.start`: on a thread; the run takes what it started only if it
    lists the same files). Nothing here is an error either."""
    try:
        from pipeline import early

        early.start(argv)
    except Exception:  # noqa: BLE001 — the run lists and reads for itself
        pass


def _end_read_processes() -> None:
    """End read processes started before the run (Ctrl-C while Beam was imported)."""
    read = sys.modules.get("transforms.read")
    if read is not None:
        read.kill_read_processes()


def _exit(code: int) -> None:
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # Beam's non-daemon threads would otherwise hold the process
    # The interpreter's last garbage collection walks every object of Beam, pydicom and the
    # Google clients (~0.5 s) only to free memory the process is about to give back: freeze
    # them out of it. Exit handlers still run (logging, executors, temporary files).
    gc.freeze()
    sys.exit(code)


def console() -> None:
    """``dicom-bq-export``: run :func:`main` and exit with its status."""
    try:
        code = main()
    except KeyboardInterrupt:  # between two of main's own handlers
        print("dicom-bq-export: error: interrupted; nothing was written", file=sys.stderr, flush=True)
        code = INTERRUPTED
    _exit(code)


if __name__ == "__main__":
    console()
