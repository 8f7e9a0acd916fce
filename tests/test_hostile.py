"""Issue 11, bounded cost per file: hostile inputs end as dead letters (or rows) within the
documented limits of transforms.limits, through the real command line where it is a run."""

from __future__ import annotations

import io
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import duckdb
import pytest
from pydicom.filereader import _read_file_meta_info, read_preamble

from schemas.convert import MAX_VALUE_BYTES
from tests.builders import DeflatedExplicitVRLittleEndian, flatten_bytes, instance, to_bytes
from transforms import limits
from transforms.header import read_header
from transforms.listing import match_files, shard_listing_units

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "dicom"

#: What a whole run over the hostile folder may take, and its peak memory: Beam's own
#: footprint (~250 MiB) plus one file's limits (MAX_INFLATED_BYTES, MAX_HEADER_BYTES).
RUN_SECONDS = 40
RUN_PEAK_BYTES = 300 * 2**20 + limits.MAX_INFLATED_BYTES + limits.MAX_HEADER_BYTES


def _element(tag: int, vr: bytes, value: bytes = b"", length: int | None = None) -> bytes:
    """An explicit VR little endian element (4-byte length for the VRs that have one)."""
    length = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, length) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, length) + value


def deep_nesting(levels: int) -> bytes:
    """A valid instance with ``levels`` nested undefined-length ContentSequences."""
    opening = (_element(0x0040A730, b"SQ", length=0xFFFFFFFF)
               + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + _element(0x00080100, b"SH", b"X "))
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return to_bytes(instance()) + opening * levels + closing * levels


def deflate_bomb(inflated: int = 2**30) -> bytes:
    """A deflated instance (~1 MB) whose dataset inflates to ``inflated`` bytes: its UIDs,
    then a private value of zeros before Pixel Data."""
    data = to_bytes(instance(), DeflatedExplicitVRLittleEndian)
    fileobj = io.BytesIO(data)
    read_preamble(fileobj, False)
    _read_file_meta_info(fileobj)
    meta_end = fileobj.tell()
    dataset = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS)
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(dataset + _element(0x00091010, b"UN", length=inflated - 12))]
    zeros = bytes(2**20)
    parts += [deflater.compress(zeros) for _ in range(inflated // len(zeros))]
    parts.append(deflater.flush())
    return data[:meta_end] + b"".join(parts)


def write_sparse(path: pathlib.Path, head: bytes, size: int) -> None:
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float, int]:
    """The real command line in a child; ``(result, seconds, peak RSS bytes of the child)``."""
    measure = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:])\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)\n"
        "sys.exit(r.returncode)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", measure, sys.executable, "-m", "pipeline.main", "--runner=FnApiRunner",
         "--progress-seconds=0", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    seconds = time.monotonic() - started
    peak = int(result.stderr.rsplit("PEAK ", 1)[1].split()[0])
    return result, seconds, peak


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("hostile")
    good = next(SAMPLES.rglob("*.dcm")).read_bytes()
    (folder / "good.dcm").write_bytes(good)
    (folder / "bomb.dcm").write_bytes(deflate_bomb())
    big = instance()
    big.PatientID = "P1"
    head = to_bytes(big) + _element(0x0040A160, b"UT", length=300 * 2**20)  # TextValue, 300 MiB
    write_sparse(folder / "huge-text.dcm", head, len(head) + 300 * 2**20)
    (folder / "deep.dcm").write_bytes(deep_nesting(200))
    write_sparse(folder / "zeros", b"", 200 * 10**6)
    os.mkfifo(folder / "fifo")
    os.symlink("/dev/zero", folder / "zero-link")
    os.symlink(folder / "loop-b", folder / "loop-a")
    os.symlink(folder / "loop-a", folder / "loop-b")
    os.symlink(folder / "gone", folder / "dangling")
    os.symlink(folder / "good.dcm", folder / "twice-link")
    (folder / "sub").mkdir()
    (folder / "sub" / "other.dcm").write_bytes(to_bytes(instance()))
    os.symlink(folder / "sub", folder / "sub" / "loop")  # a folder loop
    return folder


EXPECTED_DEAD_LETTERS = {
    "bomb.dcm": ("read", "InflatedTooLargeError"),
    "zeros": ("read", "NotDicomError"),
    "fifo": ("list", "NotARegularFileError"),
    "zero-link": ("list", "NotARegularFileError"),
    "loop-a": ("list", "SymlinkLoopError"),
    "loop-b": ("list", "SymlinkLoopError"),
    "dangling": ("list", "DanglingSymlinkError"),
}


def test_hostile_files_end_as_dead_letters_or_rows_within_the_limits(hostile_folder, tmp_path):
    database = tmp_path / "out.duckdb"
    summary_path = tmp_path / "summary.json"
    result, seconds, peak = run_cli("--input", str(hostile_folder), f"--bq-table=duckdb://{database}#t",
                                    f"--summary-json={summary_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    print(f"hostile run: {seconds:.1f} s, peak {peak / 2**20:.0f} MiB")
    assert seconds < RUN_SECONDS and peak < RUN_PEAK_BYTES, (seconds, peak / 2**20)

    con = duckdb.connect(str(database), read_only=True)
    errors = con.execute("SELECT path, stage, error_type, message FROM t_errors").fetchall()
    found = {pathlib.Path(path).name: (stage, kind) for path, stage, kind, _message in errors}
    assert found == EXPECTED_DEAD_LETTERS
    messages = {pathlib.Path(path).name: message for path, _s, _k, message in errors}
    assert "MAX_INFLATED_BYTES" in messages["bomb.dcm"]

    rows = con.execute(
        "SELECT PatientID, len(DroppedTags), list_transform(DroppedTags, lambda d: d.TagName) FROM t"
    ).fetchall()
    assert len(rows) == 4  # good (once, not again through twice-link), sub/other (once), huge-text, deep
    [huge] = [row for row in rows if row[0] == "P1"]
    assert "TextValue" in huge[2]
    deep_names = [name for row in rows for name in row[2] if name.startswith("ContentSequence.")]
    assert deep_names == [".".join(["ContentSequence"] * 16)]  # the first level past 15

    summary = json.loads(summary_path.read_text())
    assert summary["succeeded"] == 4 and summary["failed"] == len(EXPECTED_DEAD_LETTERS)
    assert summary["succeeded"] + summary["failed"] == summary["inputs"]
    assert summary["bytes_read"] < 20 * 2**20  # not the 200 MB of zeros, the 300 MiB value, the bomb


def test_a_run_failing_on_hostile_files_leaves_the_table_unchanged(hostile_folder, tmp_path):
    database = tmp_path / "out.duckdb"
    con = duckdb.connect(str(database))
    con.execute("CREATE TABLE t (SOPInstanceUID VARCHAR)")
    con.execute("INSERT INTO t VALUES ('1.2.3')")
    con.close()
    result, _seconds, _peak = run_cli("--input", str(hostile_folder), f"--bq-table=duckdb://{database}#t",
                                      "--write-disposition=WRITE_TRUNCATE", "--max-failures=0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "7 instances failed, more than --max-failures 0" in result.stderr
    con = duckdb.connect(str(database), read_only=True)
    assert con.execute("SELECT * FROM t").fetchall() == [("1.2.3",)]


# -- the limits, one by one (in this process) ------------------------------------------------


def test_the_deadline_per_file_is_checked_while_reading():
    with pytest.raises(limits.ReadTimeLimitError, match="MAX_SECONDS_PER_FILE"):
        read_header(io.BytesIO(to_bytes(instance())), max_seconds=0)


def test_a_header_over_the_byte_limit_is_not_read_past_it():
    ds = instance()
    data = to_bytes(ds)
    nested = (_element(0x0040A730, b"SQ", length=0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
              + _element(0x0040A160, b"UT", b"x" * 2**20)  # nested values are read, not skipped
              + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))

    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, size=-1):
            chunk = super().read(size)
            self.read_bytes += len(chunk)
            return chunk

    fileobj = Counting(data + nested)
    with pytest.raises(limits.HeaderTooLargeError, match="MAX_HEADER_BYTES"):
        read_header(fileobj, max_header_bytes=512 * 1024)
    assert fileobj.read_bytes < 512 * 1024
    assert read_header(io.BytesIO(data + nested)).uids.instance == ds.SOPInstanceUID  # under the real limit


def test_a_deflate_bomb_inflates_only_up_to_the_limit():
    bomb = deflate_bomb(256 * 2**20)
    with pytest.raises(limits.InflatedTooLargeError, match="MAX_INFLATED_BYTES"):
        read_header(io.BytesIO(bomb), max_inflated_bytes=8 * 2**20)


def test_a_deflated_file_is_inflated_only_as_far_as_its_header():
    ds = instance()
    ds.PatientID = "P1"
    flat = flatten_bytes(to_bytes(ds, DeflatedExplicitVRLittleEndian))
    assert flat.row["PatientID"] == "P1"


def test_200_levels_of_sequences_are_a_row_and_deeper_than_the_limit_a_dead_letter():
    flat = flatten_bytes(deep_nesting(200))
    assert flat.counts["too_deep"] == 1 and flat.counts["dropped_not_fit"] == 1
    with pytest.raises(limits.SequenceTooDeepError, match="MAX_SEQUENCE_DEPTH"):
        read_header(io.BytesIO(deep_nesting(limits.MAX_SEQUENCE_DEPTH + 500)))
    assert sys.getrecursionlimit() < 5000  # restored


def test_a_file_of_zeros_is_not_dicom_after_a_few_bytes(tmp_path):
    path = tmp_path / "zeros"
    write_sparse(path, b"", 200 * 10**6)
    started = time.monotonic()
    with open(path, "rb") as fileobj, pytest.raises(Exception) as error:
        read_header(fileobj)
    assert type(error.value).__name__ == "NotDicomError"
    write_sparse(path, bytes(128) + b"DICM", 200 * 10**6)
    with open(path, "rb") as fileobj, pytest.raises(Exception) as error:
        read_header(fileobj)
    assert type(error.value).__name__ == "MissingInstanceUIDError"
    assert time.monotonic() - started < 2


def test_a_value_too_large_for_a_row_is_named_not_read(tmp_path):
    path = tmp_path / "big"
    head = to_bytes(instance()) + _element(0x0040A160, b"UT", length=MAX_VALUE_BYTES + 1)
    write_sparse(path, head, len(head) + MAX_VALUE_BYTES + 1)
    from pipeline.inspect import inspect_file

    result = inspect_file(str(path))
    assert [d["TagName"] for d in result["row"]["DroppedTags"]] == ["FileMetaInformationVersion", "TextValue"]


def _returns_within(seconds: float, function):
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_catch(function)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, "blocked"
    return outcome[0]


def _catch(function):
    try:
        return function()
    except Exception as error:
        return error


def test_a_fifo_or_device_is_never_opened(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    error = _returns_within(5, lambda: limits.open_regular_file(str(fifo)))
    assert isinstance(error, limits.NotARegularFileError) and "FIFO" in str(error)
    error = _returns_within(5, lambda: limits.open_regular_file("/dev/zero"))
    assert isinstance(error, limits.NotARegularFileError) and "character device" in str(error)
    from pipeline.inspect import inspect_file

    result = _returns_within(5, lambda: inspect_file(str(fifo)))
    assert result["error"]["type"] == "NotARegularFileError"


def test_files_opened_ahead_are_regular_files_only_and_none_is_left_open(tmp_path, monkeypatch):
    from transforms import read
    from transforms.storage import InputFile, Opener

    good = tmp_path / "good.dcm"
    good.write_bytes(to_bytes(instance()))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    inputs = [InputFile(str(path), None) for path in (good, fifo, tmp_path / "folder", tmp_path / "gone", "/dev/zero")]
    opener = Opener()
    _returns_within(5, lambda: opener.open_ahead(inputs))  # a FIFO or device is never opened, even ahead
    assert list(opener._opened_ahead) == [str(good)]
    taken = opener._opened_ahead[str(good)]
    fileobj, _counting = opener.open(inputs[0])
    with fileobj:
        assert fileobj.raw._raw is taken and not opener._opened_ahead  # open() took the file opened ahead
        assert read_header(fileobj).uids.instance
    opener.open_ahead(inputs)
    left = opener._opened_ahead[str(good)]
    opener.close_ahead()
    assert left.closed and not opener._opened_ahead

    # A read process's chunk: every input an outcome, the errors as without opening ahead.
    monkeypatch.setattr(read, "_worker", (Opener(), None, read.PICKLE))  # as _start_worker sets it
    descriptors = len(os.listdir("/proc/self/fd"))
    outcomes = read._read_chunk(inputs)
    assert len(os.listdir("/proc/self/fd")) == descriptors
    assert outcomes[0].instance is not None
    alone = [read.read_input(input_file, Opener()) for input_file in inputs[1:]]  # each opened when read
    assert [outcome.failure for outcome in outcomes[1:]] == [outcome.failure for outcome in alone]
    assert {outcome.failure[1] for outcome in alone} == {"NotARegularFileError", "FileNotFoundError"}


def test_listing_classifies_links_sockets_and_reads_each_file_once(tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f.dcm").write_bytes(b"x")
    os.symlink(root / "a", root / "a" / "loop")
    os.symlink(root / "a", root / "b")  # the same folder again
    os.symlink(root / "nowhere", root / "dangling")
    server = socket.socket(socket.AF_UNIX)
    short = pathlib.Path("/tmp") / f"hostile-{os.getpid()}.sock"
    try:
        server.bind(str(short))
        os.symlink(short, root / "socket")
        found = {pathlib.Path(f.path).relative_to(root).as_posix(): f.error and f.error[0]
                 for f in match_files(str(root) + "/**")}
    finally:
        server.close()
        short.unlink()
    assert found == {"a/f.dcm": None, "dangling": "DanglingSymlinkError", "socket": "NotARegularFileError"}
    units = shard_listing_units([str(root) + "/**"])  # the launcher's split: no error, no loop
    assert len(units) == len(set(units)) and not any("loop" in unit for unit in units)
    assert match_files(str(root / "a" / "*.dcm")) == match_files(str(root / "a" / "f.dcm"))


def test_listing_a_large_folder_holds_its_names_not_an_object_per_entry(tmp_path):
    """A folder of 20,000 files is listed holding little more than their names while they
    are sorted (sorted DirEntry objects with their stats took ~800 bytes a file; the names ~70)."""
    import tracemalloc

    from transforms.listing import iter_files

    for index in range(20_000):
        (tmp_path / f"{index:06d}.dcm").touch()
    tracemalloc.start()
    try:
        first, count = [], 0
        for input_file in iter_files(str(tmp_path) + "/"):
            count += 1
            if count <= 2:
                first.append(input_file.path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 20_000 and first == [str(tmp_path / "000000.dcm"), str(tmp_path / "000001.dcm")]
    assert peak < 20_000 * 200, peak

    # The launcher's split of the same folder keeps only its sub-folders' names (the list of
    # every DirEntry it held took ~200 bytes a file).
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    tracemalloc.start()
    try:
        units = shard_listing_units([str(tmp_path) + "/**"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert units == [str(tmp_path) + "/*", str(tmp_path / "a") + "/*", str(tmp_path / "b") + "/*"]
    assert peak < 20_000 * 20, peak


def test_inspect_on_the_hostile_folder_answers_for_every_file(hostile_folder):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.main", "inspect", str(hostile_folder)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert time.monotonic() - started < RUN_SECONDS
    answers = {pathlib.Path(line["path"]).name: line.get("error", {}).get("type", "row")
               for line in map(json.loads, result.stdout.splitlines())}
    assert {name: answers[name] for name in EXPECTED_DEAD_LETTERS} == {
        name: kind for name, (_stage, kind) in EXPECTED_DEAD_LETTERS.items()}
    assert answers["deep.dcm"] == answers["huge-text.dcm"] == answers["good.dcm"] == "row"
