"""Reading while Beam is imported: the launcher's first second, on the idle core.

Importing Beam takes the command a second or more of one core while the other idles. For
the common local run, ``--input`` naming local folders or files (no glob) into a local
DuckDB file or Parquet folder, with no flag that changes what is listed or how it is
read, :func:`start` lists the input and starts the read processes on its first files
(``transforms.read.ReadProcesses.read_ahead``) on a thread, before Beam is imported
(``pipeline.cli``). The run (``pipeline.main``) lists for itself, then takes them
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
from transforms.storage import InputFile, Opener

#: A local run over at least this many local files reads them on one process per core
#: (``transforms.read.ReadProcesses``): the processes start in ~0.3 s from a fork
#: server that imports no Beam, then each file costs about half the wall time.
READ_PROCESSES_MIN_FILES = 200

#: The launcher hands the pipeline at most this many files it listed (a local run's, or a
#: local --incremental update's changed files); with more, the pipeline lists (and compares) itself
#: (the list is part of the pipeline's graph).
MOST_HANDED_FILES = 10_000

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

    inputs: tuple[str, ...]  # the --input values: local folders and files
    row_form: str  # how the read processes hand rows over for its destination
    stderr_hidden: bool  # the read processes' descriptor 2 goes to /dev/null (as without --debug)


def recognise(argv: list[str]) -> Guess | None:
    """The run a command line asks for, if it is one this module reads ahead for: an
    export of local folders and files (``--input``, no glob, no ``://``) into DuckDB (the
    default destination) or a local Parquet folder, with only :data:`_NEUTRAL_FLAGS`
    besides. None for anything else (the run decides for itself)."""
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
    if not inputs or any("://" in value or has_glob(value) or not os.path.exists(value) for value in inputs):
        return None
    return Guess(tuple(inputs), row_form, not debug)


class _Started(NamedTuple):
    processes: ReadProcesses
    files: tuple[InputFile, ...]


_thread: threading.Thread | None = None
_started: _Started | None = None
_lock = threading.Lock()


def start(argv: list[str]) -> bool:
    """If :func:`recognise` knows the command line and this machine has read processes,
    list the input and start reading it on a thread; True if the thread started."""
    global _thread
    guess = recognise(argv)
    if guess is None or usable_cores() < 2 or not processes_available():
        return False
    _thread = threading.Thread(target=_start, args=(guess,), name="read-early", daemon=True)
    _thread.start()
    return True


def _start(guess: Guess) -> None:
    global _started
    try:
        listed = list_plain_files(input_units(guess.inputs), MOST_HANDED_FILES)
        if listed is None or len(listed[1]) < READ_PROCESSES_MIN_FILES:
            return
        files = tuple(listed[1])
        processes = ReadProcesses(usable_cores(), Opener(None), None, guess.row_form,
                                  stderr_hidden=guess.stderr_hidden)
        try:
            processes.read_ahead(files)
        except BaseException:
            processes.shutdown()
            raise
        with _lock:
            _started = _Started(processes, files)
    except Exception:  # noqa: BLE001 — whatever it is, the run lists and reads for itself
        return


def claim(processes: int, opener: Opener, row_form: str, files) -> ReadProcesses | None:
    """The read processes :func:`start` started, if they read ``files`` (the run's own
    listing, in its order) with these settings (and no filter file, no Cloud Storage);
    they are then the caller's. Otherwise None, and they are ended. Waits for the
    listing thread (a listing and a process start: well under a second)."""
    started = _taken()
    if started is None:
        return None
    wanted = read_settings(processes, opener, row_form, cloud_storage=False)
    if started.processes.settings == wanted and started.files == tuple(files):
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
    global _started
    if _thread is not None:
        _thread.join()
    with _lock:
        started, _started = _started, None
    return started


def _end(started: _Started) -> None:
    # Not killed: a process killed while it sends its outcomes leaves half a message in the
    # pipe, and the executor's thread, which this process joins when it exits, waits for
    # the rest forever. Each finishes the chunk it is reading (16 files) and stops.
    started.processes.shutdown()
