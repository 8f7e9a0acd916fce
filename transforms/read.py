"""Reading one input: its header read, selected by the filter file and flattened, as a value.

Pure Python, no Beam: :class:`transforms.flatten.ReadInstances` wires these into the
pipeline, and a local run's worker processes (:class:`ReadProcesses`) import this module
alone, so that they start in a fraction of a second.

:func:`read_input` is the rule for one input. A failure is part of its outcome, never an
exception, and its message never quotes a tag value.

:class:`ReadProcesses` reads local files on processes of this machine. Parsing a header
is CPU-bound Python, so threads cannot use a second core; Beam's own local worker
processes can, but each imports Beam again and every element then crosses processes
encoded, which costs more than it gains below a few thousand files. A local run
(``in_memory``) instead keeps Beam in its one process and hands the read step's files, in
chunks, to a pool of processes started from a fork server (``forkserver``: they are
forked from a process that has imported only this module, never from a process running
Beam's threads).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import weakref
from typing import NamedTuple

import orjson

from schemas.convert import flatten_instance
from transforms.filter_file import FilterFile
from transforms.fork_server import (  # noqa: F401 (processes_available, usable_cores: this module's API too)
    processes_available,
    start_fork_server,
    stop_fork_server,
    usable_cores,
)
from transforms.header import describe_error, read_header, silence_pydicom
from transforms.storage import ClientSettings, InputFile, Opener, is_remote, use_client_settings

#: The stages a dead letter names: listing (set on the InputFile), reading, converting.
LIST, READ, CONVERT = "list", "read", "convert"


#: The columns that identify an instance: the files table keeps them, and --incremental
#: keeps one row per SOPInstanceUID (pipeline/ledger.py).
UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class PickledRow(bytes):
    """A row as a read process hands it over: its pickle. The spool writes it as it is
    (``pipeline/spool.py``), so the launcher neither unpickles it nor pickles it again;
    :func:`as_row` gives the row."""

    __slots__ = ()


class JsonRow(bytes):
    """A row as a read process hands it over for a destination that takes rows as read,
    as JSON lines (DuckDB: :attr:`pipeline.graph.ExportPlan.rows_as_read`): its JSON text,
    UTF-8 on one line, encoded where it was read (:func:`json_row`). The staging step
    writes it as it is."""

    __slots__ = ()


#: How a read process hands rows over: pickled, or as JSON text (:class:`JsonRow`).
PICKLE, JSON = "pickle", "json"


def as_row(row) -> dict:
    """The row of an :attr:`Instance.row`: a dict, a :class:`PickledRow` or a :class:`JsonRow`."""
    if isinstance(row, PickledRow):
        return pickle.loads(row)
    if isinstance(row, JsonRow):
        return json.loads(row)
    return row


class Instance(NamedTuple):
    """What one input file became."""

    row: dict  # or a PickledRow or JsonRow (from a read process; then ``uids`` is set)
    fragment: frozenset  # from a read process: only the paths its chunk had not had before it
    filter_lines: tuple
    path: str = ""  # the input file's path (the files table, pipeline/ledger.py)
    uids: dict | None = None  # the row's UID_COLUMNS, when the row is encoded


def instance_uids(instance: Instance) -> dict:
    """``{column: value}`` of the instance's UID_COLUMNS (None where the row has none)."""
    if instance.uids is not None:
        return instance.uids
    return {name: instance.row.get(name) for name in UID_COLUMNS}


class Outcome(NamedTuple):
    """What reading one input came to: an :class:`Instance`, a ``failure``
    ``(stage, error_type, message)``, or neither (not selected by the filter file)."""

    instance: Instance | None = None
    failure: tuple[str, str, str] | None = None
    bytes_read: int = 0
    counts: dict | None = None
    source_counts: dict | None = None  # a source's own counters (DICOMweb requests, retries)


def read_input(input_file: InputFile, opener: Opener, filter_file: FilterFile | None = None) -> Outcome:
    """Read, select and flatten one input; never raises for a bad input (its failure is
    in the outcome). Safe to call from several threads with one ``opener``."""
    if input_file.error is not None:
        return Outcome(failure=(LIST, *input_file.error))
    stage = READ
    counting = None
    try:
        fileobj, counting = opener.open(input_file)
        with fileobj:
            header = read_header(fileobj)
            lines: tuple = ()
            if filter_file is not None:
                lines = tuple(filter_file.selecting_lines(*header.uids))
                if not lines:
                    return Outcome(bytes_read=counting.bytes_read, source_counts=_source_counts(counting))
            stage = CONVERT
            flattened = flatten_instance(
                header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred
            )
    except Exception as error:  # any failure of one input is that input's dead letter
        bytes_read = counting.bytes_read if counting is not None else 0
        return Outcome(failure=(stage, type(error).__name__, describe_error(error)), bytes_read=bytes_read,
                       source_counts=_source_counts(counting))
    instance = Instance(flattened.row, flattened.fragment, lines, input_file.path)
    return Outcome(instance, None, counting.bytes_read, flattened.counts, _source_counts(counting))


def _source_counts(counting) -> dict | None:
    """The counters an opened input's source kept (a DICOMweb retrieve: requests, retries)."""
    return getattr(counting, "counts", None) if counting is not None else None


def dead_letter(path: str, stage: str, error_type: str, message: str, run_started: str | None = None) -> dict:
    """The dead-letter record of one failed input (the ``TABLE_errors`` row)."""
    return {"path": path, "stage": stage, "error_type": error_type, "message": message, "run_started": run_started}


#: Files handed to a read process at once: enough that the hand-over (two pickled
#: messages) is small beside reading them, few enough that work stays spread evenly.
CHUNK_FILES = 16
#: Cloud Storage objects handed to a read process at once: it reads them all at once on
#: its threads (the requests wait on the network), so that each process has this many in
#: flight (bench/remote.py, 400 objects at 50 ms per request).
REMOTE_CHUNK_FILES = 32
#: Files the launcher starts reading before the pipeline's read step runs (ReadProcesses.read_ahead):
#: more than two cores read in the half second Beam takes to start; their rows wait in memory.
READ_AHEAD_FILES = 1024


class ReadProcesses:
    """``processes`` worker processes reading local inputs in chunks with
    :func:`read_input`, each with its own opener (``expand_archives``,
    ``nested_archives``) and the run's filter file, given once per process. Rows come
    back in ``row_form``: :data:`PICKLE` (:class:`PickledRow`) or :data:`JSON`
    (:class:`JsonRow`).

    Given the launcher's Cloud Storage ``client`` settings
    (:func:`transforms.storage.client_settings`), they read Cloud Storage objects too,
    :data:`REMOTE_CHUNK_FILES` at a time on each process's threads and its own client:
    the launcher then only hands out names and takes rows, and neither the requests
    nor the parsing wait for its interpreter (which is building and running Beam's
    pipeline meanwhile).

    The processes' descriptor 2 goes to /dev/null if ``stderr_hidden`` (by default: if
    this process's is, :func:`pipeline.main.workers_output_hidden`)."""

    def __init__(self, processes: int, opener: Opener, filter_file: FilterFile | None, row_form: str = PICKLE,
                 client: ClientSettings | None = None, stderr_hidden: bool | None = None):
        start_fork_server(cloud_storage=client is not None)
        self.filter_file = filter_file
        self.row_form = row_form
        self.client = client
        self.settings = read_settings(processes, opener, row_form, client is not None)
        self._opener = opener
        self._ahead: dict[tuple, concurrent.futures.Future] = {}  # chunk -> its outcomes, read ahead
        self._executor = concurrent.futures.ProcessPoolExecutor(
            processes,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=_start_worker,
            initargs=(opener.expand_archives, opener.nested_archives, filter_file, row_form,
                      _stderr_hidden() if stderr_hidden is None else stderr_hidden, client),
        )
        _running.add(self)

    def submit(self, inputs: list[InputFile]) -> concurrent.futures.Future:
        """A future of the inputs' outcomes, in order (the one :meth:`read_ahead` started
        for this very chunk, if any). If a process dies (it never should: every failure
        of an input is its outcome), the future raises ``BrokenProcessPool``."""
        if self._ahead:
            ahead = self._ahead.pop(tuple(inputs), None)
            if ahead is not None:
                return ahead
        with _main_module_hidden():  # a submit may start a process
            return self._executor.submit(_read_chunk, inputs)

    def on_processes(self, input_file: InputFile) -> bool:
        """True for an input these processes read: a whole local file, or a Cloud Storage
        object if they were given the client settings."""
        return on_processes(self._opener, input_file, self.client is not None)

    def read_ahead(self, inputs, most: int | None = None) -> int:
        """Start reading the first ``most`` (:data:`READ_AHEAD_FILES`, rounded up to whole
        chunks) of ``inputs`` now, in chunks of :func:`chunk_files`, before the read step
        asks for them: the launcher does so for the files it listed while Beam builds and
        starts the pipeline (about half a second on one core). The read step hands over
        its inputs in the same chunks, in the same order (:meth:`on_processes` is its
        rule too: the others end a chunk early, and are not read ahead), and
        :meth:`submit` gives it the futures already started; a chunk it never asks for
        is cancelled or dropped at :meth:`shutdown`. Returns the number of inputs started."""
        most = READ_AHEAD_FILES if most is None else most
        count, chunk = 0, []
        for input_file in inputs:
            if not self.on_processes(input_file):
                count += self._ahead_chunk(chunk)  # the read step ends its chunk here too
                chunk = []
            else:
                chunk.append(input_file)
                if len(chunk) == chunk_files(chunk[0]):
                    count += self._ahead_chunk(chunk)
                    chunk = []
            if count >= most:
                return count
        return count + self._ahead_chunk(chunk)  # the last chunk, which ends with the inputs

    def _ahead_chunk(self, chunk: list) -> int:
        if chunk:
            with _main_module_hidden():
                self._ahead[tuple(chunk)] = self._executor.submit(_read_chunk, chunk)
        return len(chunk)

    def unclaimed(self) -> int:
        """Chunks read ahead that the read step has not asked for (yet)."""
        return len(self._ahead)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._ahead.clear()
        _running.discard(self)
        with contextlib.suppress(ValueError):
            _offered.remove(self)

    def kill(self) -> None:
        """End the processes now, whatever they are reading (an interrupted run). Safe in
        a signal handler: it takes no lock (the executor's own are not reentrant), so the
        executor is shut down when the step is torn down, or with this process. Only for
        a process about to leave at once (``os._exit``): one killed while it sends its
        outcomes leaves half a message in the pipe, and the executor's thread, which an
        interpreter joins on a normal exit, would wait for the rest forever."""
        try:
            pids = [process.pid for process in (getattr(self._executor, "_processes", None) or {}).values()]
        except RuntimeError:  # the executor's thread changed its table meanwhile
            pids = []
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


_running: "weakref.WeakSet[ReadProcesses]" = weakref.WeakSet()
_offered: list[ReadProcesses] = []  # started by the launcher, for the read step to take


def offer(processes: ReadProcesses) -> None:
    """Leave started read processes (reading ahead) for the read step of this process's
    pipeline to :func:`take`. The launcher shuts them down after the run either way."""
    _offered.append(processes)


def take(processes: int, opener: Opener, filter_file: FilterFile | None, row_form: str,
         cloud_storage: bool = False) -> ReadProcesses | None:
    """The offered read processes with these settings (``cloud_storage``: they read Cloud
    Storage objects) and the same filter file, now the caller's; None if there are none
    (the caller starts its own)."""
    for offered in _offered:
        if (offered.settings == read_settings(processes, opener, row_form, cloud_storage)
                and same_filter(offered.filter_file, filter_file)):
            _offered.remove(offered)
            return offered
    return None


def read_settings(processes: int, opener: Opener, row_form: str, cloud_storage: bool) -> tuple:
    """What read processes must share to be taken for another's (besides the filter file)."""
    return (processes, opener.expand_archives, opener.nested_archives, row_form, cloud_storage)


def on_processes(opener: Opener, input_file: InputFile, cloud_storage: bool) -> bool:
    """True for an input read processes read: a whole local file (an archive member stays
    with the launcher, which has its archive's index), or, with ``cloud_storage`` (they
    have the launcher's client settings), a Cloud Storage object."""
    return opener.is_local_file(input_file) or (cloud_storage and opener.is_cloud_storage_object(input_file))


def chunk_files(input_file: InputFile) -> int:
    """How many inputs like this one a chunk holds (:data:`CHUNK_FILES`, :data:`REMOTE_CHUNK_FILES`)."""
    return REMOTE_CHUNK_FILES if is_remote(input_file.path) else CHUNK_FILES


def same_filter(first: FilterFile | None, second: FilterFile | None) -> bool:
    """The same filter file (a side input may be decoded again for another bundle)."""
    if first is None or second is None:
        return first is second
    return first is second or first.lines == second.lines


def stop_read_processes() -> None:
    """Shut down every read process of this process and stop their fork server. A local
    run does so once its pipeline is done, before the destination's load: the fork
    server (~50 MiB resident, with the reading code imported) was part of the run's
    peak memory, which is that load's. A later run starts it again
    (:func:`transforms.fork_server.start_fork_server`)."""
    for processes in list(_running):
        processes.shutdown()
    stop_fork_server()


def kill_read_processes() -> None:
    """End every read process of this process now (Ctrl-C, ``pipeline.main``: the read
    processes ignore SIGINT, so that none prints a traceback, and are ended by the
    launcher)."""
    for processes in list(_running):
        processes.kill()


@contextlib.contextmanager
def _main_module_hidden():
    """While a read process starts: multiprocessing would have it run the launcher's
    ``__main__`` again (a script that imports Beam, a test runner) before it reads
    anything. The processes only run this module's functions, so they are told of no
    main module (multiprocessing's ``spawn.get_preparation_data`` reads these two
    attributes)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _main_module_lock:
        saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
        for name in saved:
            if name == "__spec__":
                main.__spec__ = None
            else:
                del main.__dict__[name]
        try:
            yield
        finally:
            main.__dict__.update(saved)


_main_module_lock = threading.Lock()


_worker: tuple | None = None  # (opener, filter file, row form) of this read process
_worker_threads: concurrent.futures.ThreadPoolExecutor | None = None  # its remote reads


def _stderr_hidden() -> bool:
    """True if this process's descriptor 2 is /dev/null (``pipeline.main.workers_output_hidden``)."""
    try:
        ours, devnull = os.fstat(2), os.stat(os.devnull)
    except OSError:
        return False
    return (ours.st_dev, ours.st_ino) == (devnull.st_dev, devnull.st_ino)


def _start_worker(expand_archives: bool, nested_archives: bool, filter_file: FilterFile | None,
                  row_form: str, stderr_hidden: bool, client: ClientSettings | None = None) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    if stderr_hidden:  # as the launcher's: the fork server may have started before it was hidden
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    silence_pydicom()
    if client is not None:
        use_client_settings(client)  # the client is built on the first object read
    _worker = (Opener(None, expand_archives=expand_archives, nested_archives=nested_archives), filter_file, row_form)


def _read_chunk(inputs: list[InputFile]) -> list[Outcome]:
    global _worker_threads
    opener, filter_file, row_form = _worker

    def read(input_file: InputFile) -> Outcome:
        return _handed_over(read_input(input_file, opener, filter_file), row_form)

    if not any(is_remote(input_file.path) for input_file in inputs):
        opener.open_ahead(inputs)
        try:
            return _fragments_once(read(input_file) for input_file in inputs)
        finally:
            opener.close_ahead()
    if _worker_threads is None:  # remote inputs wait on the network: all of the chunk at once
        _worker_threads = concurrent.futures.ThreadPoolExecutor(REMOTE_CHUNK_FILES, thread_name_prefix="read")
    return _fragments_once(_worker_threads.map(read, inputs))


_NO_PATHS: frozenset = frozenset()


def _fragments_once(outcomes) -> list[Outcome]:
    """The chunk's outcomes, each instance's fragment less the paths an instance before it
    in the chunk has (an empty one shared by all that add none).

    The read step emits a chunk's outcomes whole and in order, and the table's schema is
    the union of all fragments (``MergeFragments``), so it is the same; the launcher then
    unpickles and merges each path about once per chunk rather than once per instance."""
    seen: set = set()
    chunk = []
    for outcome in outcomes:
        instance = outcome.instance
        if instance is not None:
            new = instance.fragment - seen if seen else instance.fragment
            if new:
                seen |= new
            outcome = outcome._replace(instance=instance._replace(fragment=new or _NO_PATHS))
        chunk.append(outcome)
    return chunk


def json_row(row: dict) -> JsonRow:
    """The row's JSON text (one line, UTF-8), by orjson: about 15 times as fast as
    ``json`` on these rows. A value orjson refuses (an integer past 64 bits, a lone
    surrogate: no converted row holds one) is left to ``json``, which writes it."""
    try:
        return JsonRow(orjson.dumps(row))
    except TypeError:  # orjson.JSONEncodeError is one
        return JsonRow(json.dumps(row).encode("ascii"))


def _handed_over(outcome: Outcome, row_form: str = PICKLE) -> Outcome:
    """The outcome with its row encoded here, once (:class:`PickledRow`, :class:`JsonRow`)."""
    instance = outcome.instance
    if instance is None:
        return outcome
    row = instance.row
    if row_form == JSON:
        encoded = json_row(row)
    else:
        encoded = PickledRow(pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL))
    return outcome._replace(instance=instance._replace(row=encoded, uids=instance_uids(instance)))
