"""The progress display (issue 11): one display for the whole run, summed over worker
processes; a live bar on a terminal (tested under a real pseudo-terminal), periodic
lines otherwise."""

from __future__ import annotations

import io
import multiprocessing
import os
import pathlib
import pickle
import pty
import re
import select
import shutil
import subprocess
import sys
import time

import duckdb
import pytest

from pipeline.progress import (
    ProgressDisplay,
    ProgressReporter,
    read_counts,
    render_line,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "dicom"


def copies_of_the_samples(folder: pathlib.Path, count: int) -> pathlib.Path:
    """``count`` files, the samples round-robin (copies: hard links are one file, read once)."""
    samples = sorted(p for p in SAMPLES.rglob("*") if p.is_file())
    for index in range(count):
        sub = folder / f"{index // 500:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        target = sub / f"{index:05d}.dcm"
        shutil.copyfile(samples[index % len(samples)], target)
    return folder


class TestReporter:
    def test_a_reporter_travels_without_its_counts(self, tmp_path):
        reporter = ProgressReporter(str(tmp_path))
        reporter.read(5)
        clone = pickle.loads(pickle.dumps(reporter))
        assert clone.directory == str(tmp_path)
        clone.read(2)
        clone.flush()
        reporter.flush()
        assert read_counts(str(tmp_path)) == {"listed": 0, "read": 7}

    def test_a_silent_reporter_writes_nothing(self, tmp_path):
        reporter = ProgressReporter(None)
        reporter.listed(3)
        reporter.flush()
        assert pickle.loads(pickle.dumps(reporter)).directory is None

    def test_counts_are_written_at_most_every_half_second_and_on_flush(self, tmp_path):
        reporter = ProgressReporter(str(tmp_path))
        reporter.listed(10)  # first call writes
        reporter.read(1)
        reporter.read(1)
        assert read_counts(str(tmp_path)) == {"listed": 10, "read": 0}
        reporter.flush()
        assert read_counts(str(tmp_path)) == {"listed": 10, "read": 2}
        assert [p.suffix for p in tmp_path.iterdir()] == [".progress"]  # no temporary left

    def test_counts_from_several_processes_add_up(self, tmp_path):
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=_report, args=(str(tmp_path), n)) for n in (100, 250, 7)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
            assert process.exitcode == 0
        assert read_counts(str(tmp_path)) == {"listed": 357, "read": 357}
        assert len(list(tmp_path.iterdir())) == 3

    def test_a_vanished_run_folder_silences_the_reporter(self, tmp_path):
        reporter = ProgressReporter(str(tmp_path / "gone"))
        reporter.read(1)
        reporter.flush()
        assert reporter.directory is None


def _report(directory: str, count: int) -> None:
    reporter = pickle.loads(pickle.dumps(ProgressReporter(directory)))
    reporter.listed(count)
    for _ in range(count):
        reporter.read(1)
    reporter.flush()


class TestLine:
    def test_while_listing(self):
        assert render_line(0, 0, None, 1) == "dicom-bq-export: starting (0:01)"
        assert render_line(1200, 0, None, 3) == "dicom-bq-export: listing, 1,200 files found (0:03)"

    def test_reading_with_rate_and_eta(self):
        assert render_line(3000, 1000, 100.0, 20) == "dicom-bq-export: 1,000 of 3,000 files read (33%), 100/s, ETA 0:20"
        assert render_line(3000, 1000, 100.0, 20, bar_width=12) == (
            "dicom-bq-export: [####--------]  33% 1,000/3,000 files, 100/s, ETA 0:20"
        )

    def test_every_file_read_then_done(self):
        assert render_line(3000, 3000, 50.0, 60).endswith("3,000 of 3,000 files read (100%), finishing")
        assert render_line(3000, 2990, None, 3725, bar_width=4, done=True) == (
            "dicom-bq-export: [####] 100% 2,990/2,990 files, in 1:02:05"
        )


class TestDisplay:
    def test_without_a_terminal_periodic_lines_then_a_last_one(self, tmp_path):
        stream = io.StringIO()
        reporter = ProgressReporter(str(tmp_path))
        with ProgressDisplay(str(tmp_path), stream, interval=0.2, is_tty=False):
            reporter.listed(400)
            reporter.flush()
            for _ in range(4):
                time.sleep(0.3)
                reporter.read(100)
                reporter.flush()
            time.sleep(0.3)
        lines = stream.getvalue().splitlines()
        assert len(lines) >= 4 and "\r" not in stream.getvalue()
        assert any(re.search(r"\d+ of 400 files read \(\d+%\)", line) for line in lines[:-1])
        assert re.fullmatch(r"dicom-bq-export: 400 of 400 files read \(100%\), in 0:0\d", lines[-1])

    def test_a_short_run_without_a_terminal_prints_nothing(self, tmp_path):
        stream = io.StringIO()
        with ProgressDisplay(str(tmp_path), stream, interval=10, is_tty=False):
            ProgressReporter(str(tmp_path)).read(3)
        assert stream.getvalue() == ""

    def test_on_a_terminal_a_failed_run_clears_the_bar(self, tmp_path):
        stream = io.StringIO()
        reporter = ProgressReporter(str(tmp_path))
        with pytest.raises(KeyboardInterrupt):
            with ProgressDisplay(str(tmp_path), stream, interval=1, is_tty=True):
                reporter.listed(10)
                reporter.read(3)
                reporter.flush()
                time.sleep(0.6)
                raise KeyboardInterrupt
        text = stream.getvalue()
        assert "3/10 files" in text and "100%" not in text
        assert text.endswith("\r") and not text.endswith("\n")

    def test_interval_zero_is_no_display(self, tmp_path):
        stream = io.StringIO()
        reporter = ProgressReporter(str(tmp_path))
        with ProgressDisplay(str(tmp_path), stream, interval=0, is_tty=True):
            reporter.read(3)
            time.sleep(0.3)
        assert stream.getvalue() == ""


# -- as a user sees it: the real command ------------------------------------------------------


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def test_on_a_terminal_the_bar_is_redrawn_and_ends_at_100_percent(tmp_path):
    """~3,000 files: Beam's multi-process local run, under a real pseudo-terminal."""
    inputs = copies_of_the_samples(tmp_path / "in", 3000)
    db = tmp_path / "out.duckdb"
    controller, terminal = pty.openpty()
    os.set_blocking(controller, False)
    process = subprocess.Popen(
        _command("--input", str(inputs), "--bq-table", f"duckdb://{db}#t"),
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=REPO, close_fds=True,
    )
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(controller)
    assert process.wait(60) == 0, output.decode(errors="replace")[-2000:]
    text = output.decode()
    redraws = re.findall(r"\r(dicom-bq-export: \[[#-]{10,30}\][^\r\n]*)", text)
    assert len(redraws) >= 3, text[-2000:]
    assert all(len(line.rstrip()) < 80 for line in redraws)  # one line of an 80-column terminal
    assert any(re.search(r" \d\d?% [\d,]+/3,000 files", line) for line in redraws)  # seen midway
    assert re.search(r"\[#{10,30}\] 100% 3,000/3,000 files, in \d+:\d\d\s*\r?\n", text), text[-1000:]
    assert "Traceback" not in text and "WARNING" not in text and "semi_persistent" not in text
    assert duckdb.connect(str(db)).execute("SELECT count(*) FROM t").fetchone()[0] == 3000


def test_without_a_terminal_progress_comes_as_periodic_lines(tmp_path):
    """One process (a small input): the launcher's own DoFns report too. (More files than
    are read ahead, the first of them while Beam is imported: the pipeline still reads.)"""
    inputs = copies_of_the_samples(tmp_path / "in", 1500)
    db = tmp_path / "out.duckdb"
    done = subprocess.run(
        _command("--input", str(inputs), "--bq-table", f"duckdb://{db}#t", "--progress-seconds", "0.1"),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr
    assert all(line.startswith("dicom-bq-export: ") for line in lines), lines
    assert len(lines) >= 3
    assert re.fullmatch(r"dicom-bq-export: 1,500 of 1,500 files read \(100%\), in \d+:\d\d", lines[-1]), lines
    assert re.search(r"instances succeeded +1,500\n", done.stdout)
