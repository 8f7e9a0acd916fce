"""The ``dicom-bq-export`` command's entry point (also ``python -m pipeline.cli``).

A thin shell around :func:`pipeline.main.main` for what only a process can decide: Ctrl-C
while Beam is still being imported (a second or more) is one line too, and an interrupted
run leaves at once, with exit status 130, without waiting for Beam's threads.
"""

from __future__ import annotations

import gc
import os
import sys

INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    try:
        from pipeline.main import main as command
    except KeyboardInterrupt:
        print("dicom-bq-export: error: interrupted; nothing was written", file=sys.stderr, flush=True)
        return INTERRUPTED
    return command(argv)


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
