"""The fork server a local run's read processes come from (:mod:`transforms.read`).

This module imports nothing but the standard library, so that the command can start the
server first thing (``pipeline.cli``): the server then imports the reading code (pydicom,
~0.5 s) on the other core while the launcher imports it, and Beam, on its own.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal

#: What the fork server imports before it forks a read process: the reading code, and
#: Cloud Storage's client library for a run that reads ``gs://``.
PRELOAD = ["transforms.read"]
CLOUD_STORAGE_PRELOAD = ["google.cloud.storage"]


def processes_available() -> bool:
    """True where read processes can start: a fork server (Linux, macOS; not Windows),
    and this process is not a daemonic one (which may have no child processes)."""
    return "forkserver" in multiprocessing.get_all_start_methods() and not multiprocessing.current_process().daemon


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a
    scheduler's share, not the whole host), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def start_fork_server(cloud_storage: bool = False) -> None:
    """Start the fork server the read processes come from, with the reading code imported
    (and Cloud Storage's client library, for a run that reads ``gs://``), so that it
    starts while the launcher builds the pipeline. Idempotent: the first call decides."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD + (CLOUD_STORAGE_PRELOAD if cloud_storage else []))
    from multiprocessing import forkserver

    forkserver.ensure_running()


def stop_fork_server() -> None:
    """Stop the fork server, through the standard library's own ``ForkServer._stop``
    (there is no public call); where a Python lacks it, the server stays until the
    process ends. A later :func:`start_fork_server` starts a new one.

    The server is sent SIGTERM first: it holds nothing to write or release (its read
    processes are its children, not its state), and asked to stop the standard library's
    way it would take down its interpreter, pydicom and the rest imported, while
    ``_stop`` waits for it (~0.05 s at the end of every local run)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    stop = getattr(server, "_stop", None)
    if stop is None:
        return
    pid = getattr(server, "_forkserver_pid", None)
    if pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(OSError):
        stop()
