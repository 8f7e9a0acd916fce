"""The two ways a header is parsed agree: in memory, from a buffered file's first bytes
(``transforms.header._read_header_in``, what the pipeline's buffered files take), and
element by element through the budget (``_GuardedReader``, what any other file object
takes, and what the in-memory parse hands over to when it cannot vouch for the result).

Each case is read both ways and must give the same outcome: the same row, schema
fragment and counts, or the same error type and message. The cases are the samples,
pydicom's test files, seeded mutants (``tests/test_fuzz.py``), every truncation near the
end of each small sample, junk after a file's last element, and files built for the
edges: a header longer than the buffer, a deflated dataset, sequences of undefined
length ending the file, big endian.
"""

from __future__ import annotations

import io
import pathlib

import pytest
from pydicom.data import get_testdata_files
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from schemas.convert import flatten_instance
from tests.builders import instance, item, sequence, to_bytes
from tests.test_fuzz import SAMPLES, mutants
from transforms import header
from transforms.header import HEAD_BYTES, describe_error, read_header
from transforms.storage import READ_BUFFER_BYTES


def outcome(fileobj) -> tuple:
    try:
        parsed = read_header(fileobj)
        flat = flatten_instance(parsed.dataset, pixel_data_tag=parsed.pixel_data_tag,
                                read_deferred=parsed.read_deferred)
    except Exception as error:
        return ("error", type(error).__name__, describe_error(error))
    return ("row", flat.row, flat.fragment, dict(flat.counts), parsed.uids, parsed.pixel_data_tag)


@pytest.fixture
def in_memory(monkeypatch) -> list:
    """Whether each in-memory parse gave the header (True) or handed over (False)."""
    taken: list[bool] = []
    original = header._read_header_in

    def spy(head, reader, budget):
        result = original(head, reader, budget)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(header, "_read_header_in", spy)
    return taken


def both_ways(data: bytes) -> tuple[tuple, tuple]:
    buffered = io.BufferedReader(io.BytesIO(data), buffer_size=READ_BUFFER_BYTES)
    return outcome(buffered), outcome(io.BytesIO(data))


def assert_agree(cases) -> int:
    """Every case read both ways gives one outcome; returns how many were rows."""
    rows = 0
    for name, data in cases:
        fast, guarded = both_ways(data)
        assert fast == guarded, name
        rows += fast[0] == "row"
    return rows


def test_samples_and_pydicoms_files_read_the_same_both_ways(in_memory):
    files = [path for path in map(pathlib.Path, get_testdata_files()) if path.is_file()]
    cases = [(str(path), path.read_bytes()) for path in SAMPLES + files]
    rows = assert_agree(cases)
    assert rows > 50
    assert sum(in_memory) > 0.7 * len(cases)  # most are parsed in memory


def test_mutants_read_the_same_both_ways(in_memory):
    cases = [(name, data) for name, _kind, data in mutants(400, seed=29)]
    rows = assert_agree(cases)
    assert 40 < rows < len(cases)
    assert any(in_memory) and not all(in_memory)


def test_every_truncation_near_the_end_and_junk_after_it_read_the_same_both_ways(in_memory):
    small = [path.read_bytes() for path in SAMPLES if path.stat().st_size < HEAD_BYTES]
    assert small
    cases = []
    for index, data in enumerate(small):
        cases += [(f"sample {index} cut {cut}", data[:-cut]) for cut in range(1, 41)]
        cases += [(f"sample {index} + {extra} bytes", data + b"\x08\x00\x20\x00\x44\x41\x08"[:extra])
                  for extra in range(1, 8)]
    assert_agree(cases)
    assert any(in_memory)


def test_built_edge_cases_read_the_same_both_ways(in_memory):
    def with_pixels(ds, size):
        ds.Rows, ds.Columns, ds.BitsAllocated = size // 512, 256, 16
        ds.PixelData = b"\0" * size
        ds["PixelData"].VR = "OW"
        return ds

    long_header = instance()
    for index in range(40):  # 40 × 4 KiB of private values before Pixel Data
        long_header.add_new(0x00091010 + index, "LO" if index % 2 else "OB", b"x" * 4096)
    long_header.add_new(0x00090010, "LO", "CREATOR")
    sequences_last = instance()
    sequences_last.ContentSequence = sequence(item(TextValue="a"), item(TextValue="b", ContentSequence=sequence()))
    sequences_last["ContentSequence"].is_undefined_length = True
    for each in sequences_last.ContentSequence:
        each.is_undefined_length_sequence_item = True
    cases = {
        "header longer than the buffer": to_bytes(with_pixels(long_header, 200_000)),
        "deflated": to_bytes(with_pixels(instance(), 1000), DeflatedExplicitVRLittleEndian),
        "big endian": to_bytes(with_pixels(instance(), 1000), ExplicitVRBigEndian),
        "implicit, no meta": to_bytes(with_pixels(instance(), 1000), ImplicitVRLittleEndian, file_meta=False),
        "undefined-length sequence last": to_bytes(sequences_last, ImplicitVRLittleEndian),
        "undefined-length sequence last, big endian": to_bytes(sequences_last, ExplicitVRBigEndian),
        "pixel data past the buffer": to_bytes(with_pixels(instance(), 4 * READ_BUFFER_BYTES)),
    }
    delimiter_like = instance()  # a last value ending like a delimiter, then 2 bytes of a cut header
    delimiter_like.add_new(0x00290010, "LO", "CREATOR")
    delimiter_like.add_new(0x00291010, "OB", b"xx\xfe\xff\xdd\xe0\x00\x00")
    cases["a value ending like a delimiter, then a cut header"] = to_bytes(delimiter_like) + b"\0\0"
    for name in ("undefined-length sequence last", "undefined-length sequence last, big endian"):
        data = cases[name]
        assert data.endswith(b"\xfe\xff\xdd\xe0\0\0\0\0") or data.endswith(b"\xff\xfe\xe0\xdd\0\0\0\0"), name
        cases[name + ", cut"] = data[:-3]
        cases[name + ", then 5 bytes"] = data + b"\x10\x00\x10\x00\x50"
    assert_agree(cases.items())
    fast = {name: outcome(io.BufferedReader(io.BytesIO(data), READ_BUFFER_BYTES))[0] for name, data in cases.items()}
    assert fast["header longer than the buffer"] == fast["deflated"] == "row"
    assert fast["undefined-length sequence last, cut"] == "error"
    assert fast["undefined-length sequence last, then 5 bytes"] == "error"
    assert fast["a value ending like a delimiter, then a cut header"] == "error"
    # In memory: the plain files, the sequences ending a whole file; handed over: the rest.
    assert in_memory.count(True) >= 6 and in_memory.count(False) >= 4


def test_a_head_over_the_byte_limit_is_not_parsed_in_memory(in_memory):
    data = to_bytes(instance())
    buffered = io.BufferedReader(io.BytesIO(data), READ_BUFFER_BYTES)
    with pytest.raises(header.HeaderTooLargeError):
        read_header(buffered, max_header_bytes=len(data) // 2)
    assert in_memory == []
