"""One progress display for a whole local run: files read of files listed, rate, ETA.

Beam's local runner executes DoFns in worker processes (``direct_running_mode=
multi_processing``) or in this one, and its metrics are only known at the end. So each
DoFn holds a :class:`ProgressReporter` (small and picklable, created in the launcher and
passed to the DoFn's constructor) that writes its process's cumulative counts to a file of
its own in a run folder — an atomic replace, at most every REPORT_SECONDS — and the
launcher's :class:`ProgressDisplay` sums those files and draws: a live bar redrawn with
``\\r`` when stderr is a terminal, a plain line every ``interval`` seconds when it is not.

On Dataflow there is no run folder (``ProgressReporter(None)`` does nothing): the job's
Beam metrics are its progress. Counts never include a file name or a tag value.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

#: A reporter writes its counts at most this often (and when a bundle finishes).
REPORT_SECONDS = 0.5
#: A terminal's bar is redrawn this often.
REDRAW_SECONDS = 0.25
#: The rate (and so the ETA) is measured over this last stretch of the run.
RATE_WINDOW_SECONDS = 10.0

_SUFFIX = ".progress"


class ProgressReporter:
    """Counts of one DoFn instance in one process: ``listed(n)``, ``read(n)``, ``flush()``.

    Picklable: only the folder travels; the counts and the file name are made afresh in
    whichever process the DoFn is deserialized. ``ProgressReporter(None)`` does nothing.
    """

    def __init__(self, directory: str | None):
        self.directory = directory
        self._reset()

    def _reset(self) -> None:
        self._counts = {"listed": 0, "read": 0}
        self._path = None
        self._written_at = 0.0
        self._dirty = False

    def __getstate__(self):
        return {"directory": self.directory}

    def __setstate__(self, state):
        self.directory = state["directory"]
        self._reset()

    def listed(self, count: int = 1) -> None:
        """``count`` more files found by listing."""
        self._add("listed", count)

    def read(self, count: int = 1) -> None:
        """``count`` more files read (exported, failed or not selected by the filter)."""
        self._add("read", count)

    def _add(self, name: str, count: int) -> None:
        if self.directory is None:
            return
        self._counts[name] += count
        self._dirty = True
        if time.monotonic() - self._written_at >= REPORT_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the counts now (a DoFn calls it when a bundle finishes)."""
        if self.directory is None or not self._dirty:
            return
        if self._path is None:
            self._path = os.path.join(self.directory, f"{os.getpid()}-{uuid.uuid4().hex}{_SUFFIX}")
        temporary = self._path + ".tmp"
        try:
            with open(temporary, "w", encoding="ascii") as handle:
                json.dump(self._counts, handle)
            os.replace(temporary, self._path)
        except OSError:  # the run folder is gone: the launcher has finished with it
            self.directory = None
            return
        self._written_at = time.monotonic()
        self._dirty = False


def read_counts(directory: str) -> dict[str, int]:
    """The sum of every reporter's last counts in a run folder."""
    total = {"listed": 0, "read": 0}
    try:
        names = os.listdir(directory)
    except OSError:
        return total
    for name in names:
        if not name.endswith(_SUFFIX):
            continue
        try:
            with open(os.path.join(directory, name), encoding="ascii") as handle:
                counts = json.load(handle)
        except (OSError, ValueError):
            continue
        for key in total:
            total[key] += int(counts.get(key, 0))
    return total


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


def render_line(listed: int, read: int, rate: float | None, elapsed: float, *, bar_width: int = 0,
                done: bool = False) -> str:
    """One display line (pure). ``bar_width`` > 0 draws a bar of that many cells.

    Before the first file is read only the listing is shown (reading starts once listing
    is complete); the ETA needs a rate; once every file is read the run is finishing
    (schema, destination). ``done``: the run succeeded, so every listed file was read.
    """
    if read == 0 and not done:
        if listed == 0:
            return f"dicom-bq-export: starting ({_duration(elapsed)})"
        return f"dicom-bq-export: listing, {listed:,} files found ({_duration(elapsed)})"
    total = read if done else max(listed, read)
    fraction = read / total if total else 1.0
    if done:
        tail = f"in {_duration(elapsed)}"
    elif read >= total:
        tail = "finishing"
    elif rate:
        tail = f"{rate:,.0f}/s, ETA {_duration((total - read) / rate)}"
    else:
        tail = ""
    if bar_width:
        filled = int(fraction * bar_width)
        bar = "[" + "#" * filled + "-" * (bar_width - filled) + "]"
        return f"dicom-bq-export: {bar} {fraction:4.0%} {read:,}/{total:,} files" + (f", {tail}" if tail else "")
    return f"dicom-bq-export: {read:,} of {total:,} files read ({fraction:.0%})" + (f", {tail}" if tail else "")


class ProgressDisplay:
    """The launcher's side: sums the reporters' files in ``directory`` and draws.

    ``is_tty``: a bar redrawn in place every REDRAW_SECONDS, ended by a last line at
    100% when the run succeeds (cleared if it fails, so the error starts the line).
    Otherwise a plain line every ``interval`` seconds, and a last one if any was
    printed. ``interval`` 0: nothing at all. Use as a context manager around the run.
    """

    def __init__(self, directory: str, stream=None, interval: float = 10.0, is_tty: bool | None = None):
        self.directory = directory
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.is_tty = _isatty(self.stream) if is_tty is None else is_tty
        self._stop = threading.Event()
        self._thread = None
        self._samples: collections.deque = collections.deque()
        self._lines = 0
        self._width = 0

    def __enter__(self):
        self.started = time.monotonic()
        if self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name="progress-display", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.interval <= 0:
            return False
        counts = read_counts(self.directory)
        elapsed = time.monotonic() - self.started
        if exc_type is None:
            if self.is_tty or self._lines:
                self._draw(self._line(counts["listed"], counts["read"], None, elapsed, done=True), final=True)
        elif self.is_tty and self._width:
            self._write("\r" + " " * self._width + "\r")
        return False

    def _line(self, listed: int, read: int, rate: float | None, elapsed: float, done: bool = False) -> str:
        """On a terminal, the bar takes the room the figures leave on one line (10–30 cells)."""
        if not self.is_tty:
            return render_line(listed, read, rate, elapsed, done=done)
        room = _columns(self.stream) - 1 - len(render_line(listed, read, rate, elapsed, bar_width=1, done=done))
        return render_line(listed, read, rate, elapsed, bar_width=max(0, min(30, room)) if room >= 10 else 0, done=done)

    def _loop(self) -> None:
        period = REDRAW_SECONDS if self.is_tty else self.interval
        while not self._stop.wait(period):
            counts = read_counts(self.directory)
            now = time.monotonic()
            rate = self._rate(now, counts["read"])
            if counts["listed"] == 0 and counts["read"] == 0 and not self.is_tty:
                continue
            self._draw(self._line(counts["listed"], counts["read"], rate, now - self.started))

    def _rate(self, now: float, read: int) -> float | None:
        """Files per second over the last RATE_WINDOW_SECONDS of reading."""
        if read == 0:
            return None
        self._samples.append((now, read))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_SECONDS:
            self._samples.popleft()
        (first_time, first_read), (last_time, last_read) = self._samples[0], self._samples[-1]
        if last_time - first_time < 0.5 or last_read == first_read:
            return None
        return (last_read - first_read) / (last_time - first_time)

    def _draw(self, line: str, final: bool = False) -> None:
        if self.is_tty:
            line = line[: _columns(self.stream) - 1]
            padding = " " * max(0, self._width - len(line))
            self._width = len(line)
            self._write("\r" + line + padding + ("\n" if final else ""))
        else:
            self._write(line + "\n")
        self._lines += 1

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class LocalProgress:
    """The progress of one local run: a run folder whose ``reporter`` the DoFns hold (it
    travels with them to worker processes), and a ``display()`` around the pipeline's
    run. ``interval`` 0 (or a remote runner): nothing at all.

        with LocalProgress(interval) as progress:    # before the graph is built
            ... build the graph with progress.reporter ...
            with progress.display():
                pipeline.run().wait_until_finish()
    """

    def __init__(self, interval: float, stream=None):
        self.interval = interval
        self.stream = stream
        self.directory = tempfile.mkdtemp(prefix="dicom-bq-export-progress-") if interval > 0 else None
        self.reporter = ProgressReporter(self.directory)

    def __enter__(self) -> "LocalProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def display(self):
        if self.directory is None:
            return contextlib.nullcontext()
        return ProgressDisplay(self.directory, self.stream if self.stream is not None else sys.stderr, self.interval)

    def close(self) -> None:
        if self.directory is None:
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None
