"""Fuzzing (issue 11): seeded mutations of the sample files — byte flips, truncations,
inserted and deleted bytes, corrupted length fields — each ends as a row or a classified
failure, within the per-file limits, and no failure message quotes a tag value.
``bench/fuzz.py`` runs thousands of the same mutations."""

from __future__ import annotations

import io
import pathlib
import random
import re
import struct
import time

import duckdb
import pytest

from schemas.convert import flatten_instance
from transforms.header import describe_error, read_header

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "samples" / "dicom").rglob("*.dcm"))

#: The two-letter VRs after which an explicit VR element's length follows.
_VR = re.compile(rb"(?<=[\x00-\xff]{4})(AE|AS|AT|CS|DA|DS|DT|FL|FD|IS|LO|LT|OB|OD|OF|OL|OV|OW|PN|SH|SL|SQ|SS|ST|SV|"
                 rb"TM|UC|UI|UL|UN|UR|US|UT|UV)")
_LENGTHS = (0, 1, 3, 0x7F, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF)


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One seeded mutation of a file: ``(kind, mutated bytes)``."""
    kind = rng.choice(("flip", "truncate", "insert", "delete", "length"))
    size = len(data)
    header_end = min(size, 4096)  # most mutations hit the header, where parsing happens
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "truncate":
        return kind, data[: rng.randrange(header_end)]
    if kind == "insert":
        at = rng.randrange(header_end)
        return kind, data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]
    if kind == "delete":
        at = rng.randrange(header_end)
        return kind, data[:at] + data[at + rng.randint(1, 16):]
    positions = [m.end() for m in _VR.finditer(data, 132, header_end)]
    if not positions:
        return "flip", mutate(data, rng)[1]
    at = rng.choice(positions)
    out = bytearray(data)
    length = rng.choice(_LENGTHS)
    if data[at - 2:at] in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV", b"SV", b"UV"):
        out[at + 2:at + 6] = struct.pack("<L", length)
    else:
        out[at:at + 2] = struct.pack("<H", length & 0xFFFF)
    return kind, bytes(out)


def mutants(count: int, seed: int = 11):
    """``(name, kind, bytes)`` for ``count`` seeded mutants of the samples."""
    rng = random.Random(seed)
    originals = [path.read_bytes() for path in SAMPLES]
    for index in range(count):
        source = rng.randrange(len(originals))
        kind, data = mutate(originals[source], rng)
        yield f"mutant{index:05d}-{kind}-of-{source}", kind, data


def outcome(data: bytes) -> tuple[str, str | None]:
    """``("row", None)`` or ``(error type, dead-letter message)``, as the read step decides.

    Only Exception subclasses are caught, as in the pipeline: anything else (a crash,
    SystemExit, KeyboardInterrupt) fails the caller.
    """
    try:
        header = read_header(io.BytesIO(data))
        flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred)
    except Exception as error:
        return type(error).__name__, describe_error(error)
    return "row", None


def tag_values(data: bytes) -> set[bytes]:
    """Text values of a sample's top-level elements worth looking for in messages."""
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    values = set()
    for element in dataset:
        if element.VR in ("PN", "LO", "SH", "UI", "DA", "TM", "CS", "DS", "IS", "ST", "LT") and element.VM:
            text = str(element.value).strip()
            if len(text) >= 6:
                values.add(text.encode())
    return values


def test_every_mutant_is_a_row_or_a_classified_failure_quoting_no_value():
    values = set().union(*(tag_values(path.read_bytes()) for path in SAMPLES))
    counts: dict[str, int] = {}
    slowest = 0.0
    for name, _kind, data in mutants(300):
        started = time.monotonic()
        kind, message = outcome(data)
        slowest = max(slowest, time.monotonic() - started)
        counts[kind] = counts.get(kind, 0) + 1
        if message is not None:
            assert not any(value.decode() in message for value in values), name
    assert sum(counts.values()) == 300
    assert counts["row"] > 30 and len(counts) > 3  # the mutations reach both outcomes
    assert slowest < 5


def test_a_pipeline_run_over_mutants_accounts_for_every_file(tmp_path):
    from pipeline.main import run

    folder = tmp_path / "mutants"
    folder.mkdir()
    expected = {}
    for name, _kind, data in mutants(100, seed=1111):
        (folder / name).write_bytes(data)
        expected[name] = outcome(data)[0]
    database = tmp_path / "out.duckdb"
    summary = run(["--runner=FnApiRunner", "--progress-seconds=0", "--input", str(folder),
                   f"--bq-table=duckdb://{database}#t"])
    assert summary["files_matched"] == 100
    assert summary["succeeded"] + summary["failed"] == 100
    con = duckdb.connect(str(database), read_only=True)
    dead_letters = con.execute("SELECT path, error_type FROM t_errors").fetchall()
    errors = {pathlib.Path(path).name: kind for path, kind in dead_letters}
    assert len(errors) == summary["failed"]
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == summary["succeeded"]
    assert errors == {name: kind for name, kind in expected.items() if kind != "row"}


@pytest.mark.parametrize("seed", [3])
def test_mutations_are_deterministic(seed):
    assert [data for _n, _k, data in mutants(20, seed)] == [data for _n, _k, data in mutants(20, seed)]
