"""Reading while Beam is imported: the launcher's first second, on the idle core.

Importing Beam takes the command a second or more of one core while the other idles. For
the common run, ``--input`` naming local folders or files, or Cloud Storage folders or
objects (no glob), into a local DuckDB file or Parquet folder, with no flag that changes
what is listed or how it is read, :func:`start` lists the input and starts the read
processes on its first files (``transforms.read.ReadProcesses.read_ahead``) on a thread,
before Beam is imported (``pipeline.cli``). On Cloud Storage the requests then wait
while Beam is imported, not after: the client is the one Beam would make for such a run
(``transforms.storage.default_client_settings``), and the run takes what it read only if
its own client has the same settings. The run (``pipeline.main``) lists for itself, then takes them
(:func:`claim`) if it listed the same files in the same order and wants read processes
with the same settings; otherwise it ends them (:func:`discard`) and starts its own. Either way the run
is what it would have been: this module only guesses, with the run's own listing
functions (:mod:`transforms.listing`, which import no Beam), and reading writes nothing.
It never reports anything: a command line it does not recognise, or anything that goes
wrong here, only means the run starts reading when Beam is ready.
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

from transforms.listing import has_glob, input_units, list_plain_files
from transforms.read import JSON, PICKLE, ReadProcesses, processes_available, read_settings, usable_cores
from transforms.storage import ClientSettings, InputFile, Opener, default_client_settings, same_client

#: A local run over at least this many local files reads them on one process per core
#: (``transforms.read.ReadProcesses``): the processes start in ~0.3 s from a fork
#: server that imports no Beam, then each file costs about half the wall time.
READ_PROCESSES_MIN_FILES = 200

#: The launcher hands the pipeline at most this many files it listed (a local run's, or a
#: local --incremental update's changed files); with more, the pipeline lists (and compares) itself
#: (the list is held whole: in the launcher's memory, ``pipeline.graph._HANDED_FILES``, for
#: a pipeline run in this process, else in the pipeline's graph).
MOST_HANDED_FILES = 10_000

#: The launcher hands the pipeline at most this many Cloud Storage objects it listed (two
#: listing pages): for more, the pipeline's own listing, which reads as it lists, is not
#: held up by a listing the launcher would throw away.
MOST_HANDED_OBJECTS = 2_000

#: Flags that change neither what is listed nor how it is read (either spelling), with
#: whether each takes a value: ``--overwrite-table`` may (``--overwrite-table true``).
_NEUTRAL_FLAGS = {
    "write-disposition": True,
    "overwrite-table": None,
    "summary-json": True,
    "progress-seconds": True,
    "max-failures": True,
    "log-level": True,
    "debug": False,
}


class Guess(NamedTuple):
    """What :func:`recognise` makes of a command line."""

    inputs: tuple[str, ...]  # the --input values: local folders and files, or Cloud Storage ones
    row_form: str  # how the read processes hand rows over for its destination
    stderr_hidden: bool  # the read processes' descriptor 2 goes to /dev/null (as without --debug)
    cloud_storage: bool = False  # the inputs are gs:// ones



def recognise(argv: list[str]) -> Guess | None:
    """The run a command line asks for, if it is one this module reads ahead for: an
    export of existing local folders and files, or of Cloud Storage ones (``--input``,
    all ``gs://BUCKET/...`` or none with ``://``; no glob) into DuckDB (the default
    destination) or a local Parquet folder, with only :data:`_NEUTRAL_FLAGS` besides (none
    of Google Cloud's options, which change the client). None for anything else (the run
    decides for itself)."""
    argv = list(argv)
    if argv and argv[0] == "export":
        argv = argv[1:]
    inputs: list[str] = []
    row_form, debug = JSON, False
    index = 0
    while index < len(argv):
        name, equals, value = argv[index].partition("=")
        if not name.startswith("--"):
            return None
        key = name[2:].replace("_", "-")
        index += 1
        if key == "input":
            values = [value] if equals else []
            while not equals and index < len(argv) and not argv[index].startswith("-"):
                values.append(argv[index])
                index += 1
            if not values:
                return None
            inputs += values
            continue
        if key == "bq-table":
            if not equals:
                if index == len(argv):
                    return None
                value, index = argv[index], index + 1
            if value.startswith("duckdb://"):
                row_form = JSON
            elif value.startswith("parquet://"):
                row_form = PICKLE
            else:
                return None
            continue
        if key not in _NEUTRAL_FLAGS:
            return None
        takes_value = _NEUTRAL_FLAGS[key]
        if takes_value and not equals:
            if index == len(argv):
                return None
            index += 1
        elif takes_value is None and not equals and index < len(argv) and not argv[index].startswith("-"):
            index += 1  # an optional value
        debug = debug or key == "debug"
    if not inputs or any(has_glob(value) for value in inputs):
        return None
    cloud_storage = all(_is_bucket_path(value) for value in inputs)
    if not cloud_storage and any("://" in value or not os.path.exists(value) for value in inputs):
        return None
    return Guess(tuple(inputs), row_form, not debug, cloud_storage)


def _is_bucket_path(value: str) -> bool:
    """``gs://BUCKET`` or ``gs://BUCKET/...`` with a bucket name."""
    return value.startswith("gs://") and bool(value[len("gs://"):].partition("/")[0])


class _Started(NamedTuple):
    processes: ReadProcesses
    files: tuple[InputFile, ...]
    client: ClientSettings | None  # the Cloud Storage client's, for gs:// inputs


_thread: threading.Thread | None = None
_started: _Started | None = None
_abandoned = False  # the run went on without what the thread was still starting
_lock = threading.Lock()

#: How long the run waits for the thread's listing and start (credentials, a listing's
#: requests); past that it lists and reads for itself, and what the thread starts is ended.
WAIT_SECONDS = 10.0


def start(argv: list[str]) -> bool:
    """If :func:`recognise` knows the command line and this machine has read processes,
    list the input and start reading it on a thread; True if the thread started."""
    global _thread, _abandoned
    guess = recognise(argv)
    if guess is None or usable_cores() < 2 or not processes_available():
        return False
    _abandoned = False
    _thread = threading.Thread(target=_start, args=(guess,), name="read-early", daemon=True)
    _thread.start()
    return True


def _start(guess: Guess) -> None:
    global _started
    try:
        client = None
        if guess.cloud_storage:
            client = default_client_settings()
            if client is None:
                return
        most = MOST_HANDED_OBJECTS if guess.cloud_storage else MOST_HANDED_FILES
        listed = list_plain_files(input_units(guess.inputs, client), most, pipeline_options=client)
        if listed is None or len(listed[1]) < READ_PROCESSES_MIN_FILES:
            return
        files = tuple(listed[1])
        processes = ReadProcesses(usable_cores(), Opener(None), None, guess.row_form, client,
                                  stderr_hidden=guess.stderr_hidden)
        try:
            processes.read_ahead(files)
        except BaseException:
            processes.shutdown()
            raise
        with _lock:
            if not _abandoned:
                _started = _Started(processes, files, client)
                return
        processes.shutdown()
    except Exception:  # noqa: BLE001 — whatever it is, the run lists and reads for itself
        return


def claim(processes: int, opener: Opener, row_form: str, files, client: ClientSettings | None = None
          ) -> ReadProcesses | None:
    """The read processes :func:`start` started, if they read ``files`` (the run's own
    listing, in its order) with these settings (and no filter file) and, for Cloud
    Storage, a client with the settings of the run's (``client``,
    ``transforms.storage.same_client``); they are then the caller's. Otherwise None, and
    they are ended. Waits for the listing thread (a listing and a process start: well
    under a second locally; on Cloud Storage, a listing's requests)."""
    started = _taken()
    if started is None:
        return None
    wanted = read_settings(processes, opener, row_form, cloud_storage=client is not None)
    if (started.processes.settings == wanted and started.files == tuple(files)
            and same_client(started.client, client)):
        return started.processes
    _end(started)
    return None


def discard() -> None:
    """End the read processes :func:`start` started if no run claimed them (a run that
    failed before reading, or one whose listing was not the guess)."""
    started = _taken()
    if started is not None:
        _end(started)


def _taken() -> _Started | None:
    """What the listing thread started (once it is done), no longer this module's."""
    global _started, _abandoned
    if _thread is not None:
        _thread.join(WAIT_SECONDS)
    with _lock:
        started, _started = _started, None
        _abandoned = True
    return started


def _end(started: _Started) -> None:
    # Not killed: a process killed while it sends its outcomes leaves half a message in the
    # pipe, and the executor's thread, which this process joins when it exits, waits for
    # the rest forever. Each finishes the chunk it is reading (16 files) and stops.
    started.processes.shutdown()
