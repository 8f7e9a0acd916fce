"""Archives as inputs (issue 14): every member of a .zip, .tar or .tar.gz is an input of its own,
read header-only, giving the row of the same file read from disk, or a dead letter naming why."""

from __future__ import annotations

import collections
import gzip
import io
import os
import pathlib
import shutil
import struct
import subprocess
import tarfile
import tracemalloc
import zipfile

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from pydicom.data import get_testdata_file

from schemas.convert import flatten_instance
from tests.builders import instance, to_bytes
from transforms.header import read_header
from transforms.storage import InputFile, Opener
from transforms.sources import archives
from transforms.sources.archives import (
    STREAMED,
    ExpandArchives,
    expand_archive,
    is_archive,
    iter_streamed_members,
    list_members,
    open_input,
    split_member_path,
)

SAMPLES = pathlib.Path(__file__).resolve().parents[1] / "samples" / "dicom"
BUNDLED = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "image_dfl.dcm", "SC_rgb_small_odd.dcm")


def instance_files() -> dict[str, pathlib.Path]:
    """Member name → file: the samples under their folders, and some of pydicom's files."""
    files = {str(p.relative_to(SAMPLES.parent)): p for p in sorted(SAMPLES.rglob("*.dcm"))}
    files.update({f"bundled/{name}": pathlib.Path(get_testdata_file(name)) for name in BUNDLED})
    return files


def row_of(fileobj) -> dict:
    header = read_header(fileobj)
    return flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag,
                            read_deferred=header.read_deferred).row


def rows_from_disk(files: dict[str, pathlib.Path]) -> dict[str, dict]:
    rows = {}
    for name, path in files.items():
        with open(path, "rb") as fileobj:
            rows[name] = row_of(fileobj)
    return rows


@pytest.fixture(autouse=True)
def fresh_index():
    archives._INDEX.clear()  # each test lists its own archives
    yield
    archives._INDEX.clear()


def open_local(path: str):
    return open(path, "rb")


def read_members(archive: pathlib.Path, **options) -> tuple[dict[str, dict], dict[str, str]]:
    """List a ZIP or tar and read every member: ``({member: row}, {member: error type})``."""
    with open(archive, "rb") as fileobj:
        members = list_members(fileobj, str(archive), **options)
    rows, errors = {}, {}
    for member in members:
        name = split_member_path(member.path)[1]
        if member.error:
            errors[name] = member.error[0]
            continue
        try:
            with open_input(member.path, open_local, **options) as fileobj:
                rows[name] = row_of(fileobj)
        except Exception as error:
            errors[name] = type(error).__name__
    return rows, errors


def stream_members(archive: pathlib.Path, **options) -> tuple[dict[str, dict], dict[str, str]]:
    rows, errors = {}, {}
    with open(archive, "rb") as fileobj:
        for member, outcome in iter_streamed_members(fileobj, str(archive), **options):
            name = split_member_path(member.path)[1] if member.path != str(archive) else ""
            if isinstance(outcome, Exception):
                errors[name] = type(outcome).__name__
            else:
                rows[name] = flatten_instance(outcome.dataset, pixel_data_tag=outcome.pixel_data_tag,
                                              read_deferred=outcome.read_deferred).row
    return rows, errors


def build_zip(path: pathlib.Path, files: dict[str, pathlib.Path | bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, content in files.items():
            if isinstance(content, bytes):
                archive.writestr(name, content)
            else:
                archive.write(content, name)
    return path


def build_tar(path: pathlib.Path, files: dict[str, pathlib.Path | bytes], mode="w"):
    with tarfile.open(path, mode) as archive:
        for name, content in files.items():
            if isinstance(content, bytes):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
            else:
                archive.add(content, name)
    return path


def zip_command() -> str:
    found = shutil.which("zip")
    assert found, "Debian's zip is needed: apt-get install -y zip"
    return found


class CountingReader(io.RawIOBase):
    """A local file that counts the bytes read from it (as the storage reader does)."""

    def __init__(self, path):
        self._file = open(path, "rb")
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        count = self._file.readinto(buffer)
        self.bytes_read += count
        return count

    def seek(self, offset, whence=0):
        return self._file.seek(offset, whence)

    def tell(self):
        return self._file.tell()

    def close(self):
        self._file.close()
        super().close()


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("a.zip", True), ("A.ZIP", True), ("a.tar", True), ("a.tar.gz", True), ("a.TGZ", True),
    ("gs://b/x.Tar.Gz", True), ("a.gz", False), ("a.dcm", False), ("zip", False), ("a.zip.dcm", False),
])
def test_archives_are_named_by_suffix_in_any_case(name, expected):
    assert is_archive(name) is expected


def test_a_member_is_named_archive_hash_full_member_path():
    assert split_member_path("gs://b/p/x.zip#dir/sub/m.dcm") == ("gs://b/p/x.zip", "dir/sub/m.dcm")
    assert split_member_path("/d/a.ZIP#inner.tar#m") == ("/d/a.ZIP", "inner.tar#m")
    assert split_member_path("/d/a.dcm") is None
    assert split_member_path("/d/a#b") is None


# -- members give the rows of the files -------------------------------------------------------


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_members_give_the_rows_of_the_same_files_on_disk(tmp_path, compression):
    files = instance_files()
    archive = build_zip(tmp_path / "studies.zip", files, compression)
    rows, errors = read_members(archive)
    assert errors == {}
    assert rows == rows_from_disk(files)


@pytest.mark.parametrize("level", ["-0", "-9"])
def test_zip_made_by_debian_zip_is_read(tmp_path, level):
    files = instance_files()
    source = tmp_path / "src"
    for name, path in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, source / name)
    archive = tmp_path / "made-by-zip.zip"
    subprocess.run([zip_command(), "-q", "-r", level, str(archive), "."], cwd=source, check=True)
    rows, errors = read_members(archive)
    assert errors == {}
    assert rows == rows_from_disk(files)  # folders (zip -r stores them) are skipped


def test_tar_members_give_the_rows_of_the_same_files_on_disk(tmp_path):
    files = instance_files()
    rows, errors = read_members(build_tar(tmp_path / "studies.tar", files))
    assert errors == {}
    assert rows == rows_from_disk(files)


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_tar_gz_members_are_streamed_and_give_the_rows_of_the_files(tmp_path, suffix):
    files = instance_files()
    archive = build_tar(tmp_path / f"studies{suffix}", files, "w:gz")
    assert [type(o).__name__ for o in expand_archive(InputFile(str(archive), 1), open_local)] == ["StreamArchive"]
    rows, errors = stream_members(archive)
    assert errors == {}
    assert rows == rows_from_disk(files)


def test_a_streamed_member_is_gone_once_the_stream_moves_on(tmp_path):
    archive = build_tar(tmp_path / "two.tar.gz", dict(list(instance_files().items())[:2]), "w:gz")
    with open(archive, "rb") as fileobj:
        headers = [outcome for _member, outcome in iter_streamed_members(fileobj, str(archive))]
    with pytest.raises(ValueError, match="no longer available"):
        headers[0].dataset.buffer.read(1)


def test_folders_are_skipped_and_non_dicom_members_fail_like_files(tmp_path):
    files = dict(list(instance_files().items())[:2])
    content = {**files, "notes/readme.txt": b"not an image", "empty": b""}
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo("notes/"), b"")
        zf.writestr(zipfile.ZipInfo("deep/er/"), b"")
        for name, value in content.items():
            zf.writestr(name, value) if isinstance(value, bytes) else zf.write(value, name)
    rows, errors = read_members(archive)
    assert set(rows) == set(files)
    assert errors == {"notes/readme.txt": "NotDicomError", "empty": "EmptyFileError"}

    tar = tmp_path / "mixed.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        folder = tarfile.TarInfo("notes")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        for name, value in content.items():
            data = value if isinstance(value, bytes) else value.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rows, errors = stream_members(tar)
    assert set(rows) == set(files)
    assert errors == {"notes/readme.txt": "NotDicomError", "empty": "EmptyFileError"}


# -- what is read -----------------------------------------------------------------------------


def big_instance() -> bytes:
    """A small header before 40 MiB of pixel data."""
    big = instance()
    big.Rows, big.Columns, big.BitsAllocated, big.SamplesPerPixel = 4096, 5120, 16, 1
    big.PixelData = b"\x00\x01" * (4096 * 5120)
    big["PixelData"].VR = "OW"
    return to_bytes(big)


def incompressible_instance(size: int) -> bytes:
    noisy = instance()
    noisy.Rows, noisy.Columns, noisy.BitsAllocated, noisy.SamplesPerPixel = size // 4096, 2048, 16, 1
    noisy.PixelData = os.urandom(size)
    noisy["PixelData"].VR = "OW"
    return to_bytes(noisy)


def counted_members(archive: pathlib.Path) -> tuple[int, int, dict]:
    """(bytes read listing, bytes read opening every member, rows), through 64 KiB buffers."""
    listing = CountingReader(archive)
    with io.BufferedReader(listing, 64 * 1024) as fileobj:
        members = list_members(fileobj, str(archive))
    readers = []

    def open_counted(path):
        readers.append(CountingReader(path))
        return io.BufferedReader(readers[-1], 64 * 1024)

    rows = {}
    for member in members:
        with open_input(member.path, open_counted) as fileobj:
            rows[split_member_path(member.path)[1]] = row_of(fileobj)
    return listing.bytes_read, sum(r.bytes_read for r in readers), rows


def test_tar_listing_reads_headers_and_seeks_past_member_data(tmp_path):
    ct = instance_files()["bundled/CT_small.dcm"]
    archive = build_tar(tmp_path / "big.tar", {"a/big.dcm": big_instance(), "b/ct.dcm": ct})
    assert archive.stat().st_size > 40 * 2**20
    listed, opened, rows = counted_members(archive)
    assert listed <= 3 * archives.TAR_HEADER_BUFFER  # one small read per member header
    assert opened <= 2 * 64 * 1024
    assert set(rows) == {"a/big.dcm", "b/ct.dcm"}


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_reads_its_central_directory_and_each_members_header_only(tmp_path, compression):
    noise = incompressible_instance(8 * 2**20)  # deflated, still 8 MiB: inflating it whole would show
    archive = build_zip(tmp_path / "big.zip", {"x/big.dcm": big_instance(), "x/noise.dcm": noise}, compression)
    listed, opened, rows = counted_members(archive)
    assert listed < 4 * 1024
    assert opened <= 3 * 64 * 1024
    assert len(rows) == 2


# -- guards -----------------------------------------------------------------------------------


def test_a_corrupt_archive_is_one_dead_letter_not_a_crash(tmp_path):
    good = build_zip(tmp_path / "good.zip", dict(list(instance_files().items())[:2])).read_bytes()
    cases = {
        "cut.zip": good[: len(good) // 2],
        "noise.zip": os.urandom(5000),
        "empty.tar": b"",
        "noise.tar": os.urandom(5000),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        [dead] = list(expand_archive(InputFile(str(tmp_path / name), len(data)), open_local))
        assert dead.path == str(tmp_path / name)
        assert dead.error[0] == "CorruptArchiveError", name
        assert "not a readable" in dead.error[1]

    gz = build_tar(tmp_path / "s.tar.gz", dict(list(instance_files().items())[:3]), "w:gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(gz[: len(gz) * 2 // 3])
    rows, errors = stream_members(tmp_path / "cut.tar.gz")
    assert errors == {"": "CorruptArchiveError"}  # the rest of the archive: one dead letter
    (tmp_path / "noise.tgz").write_bytes(os.urandom(3000))
    assert stream_members(tmp_path / "noise.tgz") == ({}, {"": "CorruptArchiveError"})


def test_a_tar_damaged_after_its_first_members_lists_them_and_dead_letters_the_rest(tmp_path):
    files = dict(list(instance_files().items())[:3])
    archive = build_tar(tmp_path / "damaged.tar", files)
    with tarfile.open(archive) as tf:
        second = tf.getmembers()[1].offset
    data = bytearray(archive.read_bytes())
    data[second: second + tarfile.BLOCKSIZE] = b"x" * tarfile.BLOCKSIZE
    archive.write_bytes(bytes(data))
    outputs = list(expand_archive(InputFile(str(archive), len(data)), open_local))
    assert [o.path for o in outputs] == [f"{archive}#{next(iter(files))}", str(archive)]
    assert outputs[0].error is None
    assert outputs[1].error[0] == "CorruptArchiveError" and "rest of the archive" in outputs[1].error[1]


def bomb_member(zf: zipfile.ZipFile, name: str, zeros: int) -> None:
    """A real DICOM header, then a private value of ``zeros`` zero bytes the reader skips
    (so it must inflate through them), then one more element; written in chunks."""
    with zf.open(name, "w", force_zip64=True) as out:
        out.write(to_bytes(instance()) + struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, zeros))
        chunk = b"\0" * (1 << 20)
        for _ in range(zeros >> 20):
            out.write(chunk)
        out.write(struct.pack("<HH2sH", 0x0009, 0x1011, b"LO", 2) + b"x ")


def test_a_zip_bomb_is_a_dead_letter_naming_the_ratio_limit(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        bomb_member(zf, "bomb.dcm", 60 << 20)
    assert archive.stat().st_size < 200_000
    [member] = list(expand_archive(InputFile(str(archive), archive.stat().st_size), open_local))
    tracemalloc.start()
    try:
        with pytest.raises(archives.CompressionRatioError) as raised:
            with open_input(member.path, open_local) as fileobj:
                read_header(fileobj)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "compression ratio limit" in str(raised.value) and "200" in str(raised.value)
    assert peak < 8 << 20  # stopped after about a MiB, not 60


def overstate_compressed_size(archive: pathlib.Path, name: str, compressed: int) -> None:
    """Rewrite a member's compressed size in its central directory entry (a lying header)."""
    data = bytearray(archive.read_bytes())
    encoded = name.encode()
    at = data.index(b"PK\x01\x02")
    while data[at + 46: at + 46 + len(encoded)] != encoded:
        at = data.index(b"PK\x01\x02", at + 4)
    struct.pack_into("<L", data, at + 20, compressed)
    archive.write_bytes(bytes(data))


def test_a_zip_bomb_with_lying_sizes_is_stopped_while_inflating(tmp_path):
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        bomb_member(zf, "liar.dcm", 48 << 20)
    info = zipfile.ZipFile(archive).getinfo("liar.dcm")
    # the central directory claims a modest 100:1; the data really is ~1000:1
    overstate_compressed_size(archive, "liar.dcm", info.file_size // 100)
    [member] = list(expand_archive(InputFile(str(archive), archive.stat().st_size), open_local))
    assert member.error is None
    tracemalloc.start()
    try:
        with pytest.raises(archives.CompressionRatioError, match="compression ratio limit"):
            with open_input(member.path, open_local) as fileobj:
                read_header(fileobj)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_highly_compressible_pixel_data_is_not_a_bomb(tmp_path):
    blank = instance()
    blank.Rows, blank.Columns, blank.BitsAllocated, blank.SamplesPerPixel = 4096, 4096, 16, 1
    blank.PixelData = bytes(4096 * 4096 * 2)  # 32 MiB of zeros: deflates ~1000:1, never inflated
    blank["PixelData"].VR = "OW"
    archive = build_zip(tmp_path / "blank.zip", {"blank.dcm": to_bytes(blank)}, zipfile.ZIP_DEFLATED)
    rows, errors = read_members(archive)
    assert errors == {} and rows["blank.dcm"]["SOPInstanceUID"] == blank.SOPInstanceUID


def test_a_gzip_bomb_ends_the_stream_with_a_dead_letter_naming_the_ratio_limit(tmp_path):
    archive = tmp_path / "bomb.tar.gz"
    first = instance_files()["bundled/CT_small.dcm"].read_bytes()

    def record(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size
        return info.tobuf(tarfile.GNU_FORMAT)

    padding = b"\0" * (-len(first) % tarfile.BLOCKSIZE)
    with gzip.GzipFile(archive, "wb", compresslevel=6) as out:  # a tar, written as a stream
        out.write(record("ok.dcm", len(first)) + first + padding)
        start = to_bytes(instance()) + struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, 48 << 20)
        out.write(record("zeros.dcm", len(start) + (48 << 20)) + start)  # a header, then a value to skip
        chunk = b"\0" * (1 << 20)
        for _ in range(48):
            out.write(chunk)
        out.write(b"\0" * (-len(start) % tarfile.BLOCKSIZE))
        out.write(record("after.dcm", len(first)) + first + padding + b"\0" * 1024)
    tracemalloc.start()
    try:
        with open(archive, "rb") as fileobj:
            outcomes = [(m.path.rsplit("#", 1)[-1], type(o).__name__, str(o)) for m, o in
                        iter_streamed_members(fileobj, str(archive))]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [o[:2] for o in outcomes] == [("ok.dcm", "InstanceHeader"), (str(archive), "CompressionRatioError")]
    assert "compression ratio limit" in outcomes[-1][2] and "200" in outcomes[-1][2]
    assert peak < 32 << 20  # the skipped value held only until the guard tripped


def test_an_encrypted_member_is_a_dead_letter(tmp_path):
    files = dict(list(instance_files().items())[:1])
    source = tmp_path / "src"
    source.mkdir()
    shutil.copyfile(next(iter(files.values())), source / "secret.dcm")
    shutil.copyfile(next(iter(files.values())), source / "open.dcm")
    archive = tmp_path / "locked.zip"
    subprocess.run([zip_command(), "-q", "-P", "pw", str(archive), "secret.dcm"], cwd=source, check=True)
    subprocess.run([zip_command(), "-q", str(archive), "open.dcm"], cwd=source, check=True)
    rows, errors = read_members(archive)
    assert set(rows) == {"open.dcm"}
    assert errors == {"secret.dcm": "EncryptedMemberError"}
    with open(archive, "rb") as fileobj:
        [message] = [m.error[1] for m in list_members(fileobj, str(archive)) if m.error]
    assert "encrypted" in message


def test_an_unsupported_compression_method_is_a_dead_letter_naming_it(tmp_path):
    archive = tmp_path / "bz.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(instance_files()["bundled/CT_small.dcm"], "bz.dcm", compress_type=zipfile.ZIP_BZIP2)
        zf.write(instance_files()["bundled/CT_small.dcm"], "ok.dcm")
    with open(archive, "rb") as fileobj:
        members = {m.path.rsplit("#", 1)[1]: m.error for m in list_members(fileobj, str(archive))}
    assert members["ok.dcm"] is None
    assert members["bz.dcm"][0] == "UnsupportedCompressionError" and "method 12" in members["bz.dcm"][1]


def test_member_names_with_dotdot_or_absolute_paths_are_dead_letters(tmp_path):
    data = instance_files()["bundled/CT_small.dcm"].read_bytes()
    names = ["../escape.dcm", "a/../../b.dcm", "/etc/abs.dcm", "ok/fine..dcm"]
    for archive in (build_zip(tmp_path / "names.zip", dict.fromkeys(names, data)),
                    build_tar(tmp_path / "names.tar", dict.fromkeys(names, data))):
        rows, errors = read_members(archive)
        assert set(rows) == {"ok/fine..dcm"}
        assert set(errors.values()) == {"UnsafeMemberNameError"} and len(errors) == 3
    rows, errors = stream_members(build_tar(tmp_path / "names.tgz", dict.fromkeys(names, data), "w:gz"))
    assert set(rows) == {"ok/fine..dcm"} and len(errors) == 3
    assert not (tmp_path.parent / "escape.dcm").exists() and not pathlib.Path("/etc/abs.dcm").exists()


def test_links_and_special_tar_members_are_dead_letters(tmp_path):
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(instance_files()["bundled/CT_small.dcm"], "real.dcm")
        for name, kind in (("sym.dcm", tarfile.SYMTYPE), ("hard.dcm", tarfile.LNKTYPE), ("fifo", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "real.dcm"
            tf.addfile(info)
    rows, errors = read_members(archive)
    assert set(rows) == {"real.dcm"}
    assert errors == dict.fromkeys(["sym.dcm", "hard.dcm", "fifo"], "UnsupportedMemberTypeError")


def test_too_many_members_is_one_dead_letter_naming_the_limit(tmp_path):
    files = instance_files()
    for archive in (build_zip(tmp_path / "many.zip", files), build_tar(tmp_path / "many.tar", files)):
        [dead] = list(expand_archive(InputFile(str(archive), 1), open_local, max_members=3))
        assert dead.error[0] == "TooManyMembersError" and "limit of 3" in dead.error[1]
    rows, errors = stream_members(build_tar(tmp_path / "many.tgz", files, "w:gz"), max_members=3)
    assert len(rows) == 3 and errors == {"": "TooManyMembersError"}


def test_duplicate_member_names_read_the_first_and_dead_letter_the_rest(tmp_path):
    files = instance_files()
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(files["bundled/CT_small.dcm"], "same.dcm")
        with pytest.warns(UserWarning):
            zf.write(files["bundled/MR_small.dcm"], "same.dcm")
    members = list(expand_archive(InputFile(str(archive), 1), open_local))
    assert [m.error and m.error[0] for m in members] == [None, "DuplicateMemberError"]
    with open_input(members[0].path, open_local) as fileobj:
        assert row_of(fileobj) == rows_from_disk({"ct": files["bundled/CT_small.dcm"]})["ct"]


def nested(tmp_path: pathlib.Path, compression) -> tuple[pathlib.Path, dict]:
    files = dict(list(instance_files().items())[:3])
    inner_zip = build_zip(tmp_path / "inner.zip", {"z/" + k: v for k, v in files.items()}, zipfile.ZIP_DEFLATED)
    inner_tar = build_tar(tmp_path / "inner.tar", {"t/" + k: v for k, v in files.items()})
    inner_tgz = build_tar(tmp_path / "inner.tgz", {"g/" + k: v for k, v in files.items()}, "w:gz")
    outer = build_zip(tmp_path / "outer.zip", {"in/inner.zip": inner_zip, "in/inner.tar": inner_tar,
                                               "in/inner.tgz": inner_tgz, "top.dcm": files[next(iter(files))]},
                      compression)
    return outer, files


def test_a_nested_archive_is_a_dead_letter_saying_it_is_not_expanded(tmp_path):
    outer, _files = nested(tmp_path, zipfile.ZIP_STORED)
    members = list(expand_archive(InputFile(str(outer), 1), open_local))
    errors = {m.path.rsplit("#", 1)[1]: m.error for m in members if m.error}
    assert set(errors) == {"in/inner.zip", "in/inner.tar", "in/inner.tgz"}
    assert all(e[0] == "NestedArchiveError" and "not expanded" in e[1] and "--nested-archives" in e[1]
               for e in errors.values())


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_nested_archives_are_expanded_when_asked(tmp_path, compression):
    outer, files = nested(tmp_path, compression)
    expected = rows_from_disk(files)
    outputs = list(expand_archive(InputFile(str(outer), 1), open_local, nested_archives=True))
    streamed = [o.input_file.path for o in outputs if isinstance(o, archives.StreamArchive)]
    assert streamed == [f"{outer}#in/inner.tgz"]
    rows = {}
    for member in outputs:
        if isinstance(member, archives.StreamArchive):
            continue
        assert member.error is None
        with open_input(member.path, open_local, nested_archives=True) as fileobj:
            rows[member.path] = row_of(fileobj)
    for prefix in ("in/inner.zip#z/", "in/inner.tar#t/"):
        assert {k: rows[f"{outer}#{prefix}{k}"] for k in files} == expected
    with open_input(streamed[0], open_local, nested_archives=True) as fileobj:
        streamed_rows = {m.path: flatten_instance(h.dataset, pixel_data_tag=h.pixel_data_tag,
                                                  read_deferred=h.read_deferred).row
                         for m, h in iter_streamed_members(fileobj, streamed[0])}
    assert {k: streamed_rows[f"{streamed[0]}#g/{k}"] for k in files} == expected


def test_a_zip_quine_stops_at_the_nesting_limit(tmp_path):
    inner = build_zip(tmp_path / "1.zip", {"a.dcm": instance_files()["bundled/CT_small.dcm"]})
    for level in range(2, 6):
        inner = build_zip(tmp_path / f"{level}.zip", {f"{level - 1}.zip": inner})
    outputs = list(expand_archive(InputFile(str(inner), 1), open_local, nested_archives=True))
    [dead] = outputs
    assert dead.error[0] == "NestedArchiveError" and f"more than {archives.MAX_NESTING} deep" in dead.error[1]


def test_no_archives_treats_archives_as_plain_inputs(tmp_path):
    archive = build_zip(tmp_path / "a.zip", dict(list(instance_files().items())[:1]))
    plain = InputFile(str(archive), archive.stat().st_size)
    assert list(expand_archive(plain, open_local, expand_archives=False)) == [plain]
    odd = tmp_path / "x.zip#y"
    odd.write_bytes(b"plain")
    with open_input(str(odd), open_local, expand_archives=False) as fileobj:
        assert fileobj.read() == b"plain"


# -- Cloud Storage ----------------------------------------------------------------------------


def test_a_40_mb_zip_on_cloud_storage_costs_under_1_mb_for_its_headers(gcs_bucket, tmp_path):
    _client, bucket = gcs_bucket
    files = dict(list(instance_files().items())[:6])
    archive = build_zip(tmp_path / "big.zip", {**files, "big/one.dcm": big_instance()})
    assert archive.stat().st_size > 40 * 2**20
    bucket.blob("in/big.zip").upload_from_filename(str(archive))
    path = f"gs://{bucket.name}/in/big.zip"
    size = bucket.get_blob("in/big.zip").size

    opener = Opener()
    counters = []

    def open_gcs(p):
        fileobj, counting = opener.open(InputFile(p, size))
        counters.append(counting)
        return fileobj

    members = list(expand_archive(InputFile(path, size), open_gcs))
    listed = sum(c.bytes_read for c in counters)
    rows = {}
    for member in members:
        with open_input(member.path, open_gcs) as fileobj:
            rows[member.path.rsplit("#", 1)[1]] = row_of(fileobj)
    total = sum(c.bytes_read for c in counters)
    assert listed < 8 * 1024
    assert total < 1 << 20
    assert {k: rows[k] for k in files} == rows_from_disk(files)
    assert rows["big/one.dcm"]["SOPInstanceUID"]


# -- in a Beam pipeline -----------------------------------------------------------------------


class ReadInputs(beam.DoFn):
    """What the read step does with the seams: plain files, members, or streamed archives."""

    def __init__(self, streamed: bool):
        self.streamed = streamed

    def process(self, input_file: InputFile):
        if input_file.error:
            yield beam.pvalue.TaggedOutput("dead", (input_file.path, input_file.error[0]))
            return
        if self.streamed:
            with open_input(input_file.path, open_local) as fileobj:
                for member, outcome in iter_streamed_members(fileobj, input_file.path):
                    if isinstance(outcome, Exception):
                        yield beam.pvalue.TaggedOutput("dead", (member.path, type(outcome).__name__))
                    else:
                        yield member.path, outcome.uids.instance
            return
        try:
            with open_input(input_file.path, open_local) as fileobj:
                yield input_file.path, read_header(fileobj).uids.instance
        except Exception as error:
            yield beam.pvalue.TaggedOutput("dead", (input_file.path, type(error).__name__))


def test_a_beam_pipeline_accounts_for_every_member(tmp_path):
    files = dict(list(instance_files().items())[:4])
    junk = {"notes.txt": b"text", "../up.dcm": b"x"}
    zip_path = build_zip(tmp_path / "a.zip", {**files, **junk}, zipfile.ZIP_DEFLATED)
    tar_path = build_tar(tmp_path / "b.tar", {**files, **junk})
    tgz_path = build_tar(tmp_path / "c.tar.gz", {**files, **junk}, "w:gz")
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    plain = tmp_path / "plain.dcm"
    shutil.copyfile(files[next(iter(files))], plain)
    paths = (zip_path, tar_path, tgz_path, tmp_path / "broken.zip", plain)
    inputs = [InputFile(str(p), p.stat().st_size) for p in paths]

    sop = {name: read_header(io.BytesIO(path.read_bytes())).uids.instance for name, path in files.items()}
    expected_rows = [(f"{a}#{name}", sop[name]) for a in (zip_path, tar_path, tgz_path) for name in files]
    expected_rows.append((str(plain), sop[next(iter(files))]))
    expected_dead = [(f"{a}#notes.txt", "NotDicomError") for a in (zip_path, tar_path, tgz_path)]
    expected_dead += [(f"{a}#../up.dcm", "UnsafeMemberNameError") for a in (zip_path, tar_path, tgz_path)]
    expected_dead.append((str(tmp_path / "broken.zip"), "CorruptArchiveError"))

    pipeline = beam.Pipeline(runner=FnApiRunner())
    expanded = (
        pipeline
        | beam.Create(inputs)
        | beam.ParDo(ExpandArchives()).with_outputs(STREAMED, main="inputs")
    )
    read = expanded.inputs | "Read" >> beam.ParDo(ReadInputs(False)).with_outputs("dead", main="rows")
    streamed = expanded[STREAMED] | "Stream" >> beam.ParDo(ReadInputs(True)).with_outputs("dead", main="rows")
    rows = (read.rows, streamed.rows) | "AllRows" >> beam.Flatten()
    dead = (read.dead, streamed.dead) | "AllDead" >> beam.Flatten()
    assert_that(rows, equal_to(expected_rows), label="rows")
    assert_that(dead, equal_to(expected_dead), label="dead")
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    assert counters["archives_expanded"] == 2  # the ZIP and the tar; the tar.gz is streamed
    assert counters["archive_members"] == 2 * (len(files) + len(junk))
    assert 0 < counters["bytes_read"] < 16 * 1024  # listing: central directory, tar headers


# -- the export: pipeline.main.run (FnApiRunner) into DuckDB ----------------------------------


def export(*args: str) -> dict:
    from pipeline.main import run

    return run(["--runner=FnApiRunner", "--progress-seconds=0", *args])


def table_rows(database: pathlib.Path, table: str) -> list[dict]:
    from pipeline.destinations.duckdb import DuckDBTable

    return DuckDBTable(str(database), table).read_rows()


def dead_letters(database: pathlib.Path, table: str) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(database), read_only=True) as connection:
        return sorted(connection.sql(f"SELECT path, stage, error_type FROM {table}_errors").fetchall())


@pytest.fixture
def archive_folder(tmp_path):
    """A folder of a stored ZIP, a deflated ZIP, a tar, a tar.gz (each holding the instances in
    folders and a text file) and two plain files; and the same instances unpacked."""
    files = instance_files()
    members = {**files, "docs/notes.txt": b"not DICOM"}
    folder = tmp_path / "in"
    folder.mkdir()
    build_zip(folder / "stored.zip", members)
    build_zip(folder / "deflated.ZIP", members, zipfile.ZIP_DEFLATED)
    build_tar(folder / "plain.tar", members)
    build_tar(folder / "streamed.tar.gz", members, "w:gz")
    plain = list(files.values())[:2]
    for index, path in enumerate(plain):
        shutil.copyfile(path, folder / f"plain{index}.dcm")
    unpacked = tmp_path / "unpacked"
    for name, path in files.items():
        (unpacked / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, unpacked / name)
    archives_ = ("stored.zip", "deflated.ZIP", "plain.tar", "streamed.tar.gz")
    return folder, unpacked, files, archives_, plain


def test_an_export_reads_every_member_of_every_kind_as_the_unpacked_files(archive_folder, tmp_path):
    folder, unpacked, files, kinds, plain = archive_folder
    database = tmp_path / "out.duckdb"
    summary = export("--input", str(folder), f"--bq-table=duckdb://{database}#archived")
    export("--input", str(unpacked), f"--bq-table=duckdb://{database}#unpacked")

    instances = len(kinds) * len(files) + len(plain)
    assert summary["files_matched"] == instances + len(kinds)  # every member counted, each text file too
    assert (summary["succeeded"], summary["failed"]) == (instances, len(kinds))
    assert summary["failures_by_type"] == {"NotDicomError": len(kinds)}
    assert (summary["archives_expanded"], summary["archives_streamed"]) == (3, 1)
    assert dead_letters(database, "archived") == sorted(
        (f"{folder / kind}#docs/notes.txt", "read", "NotDicomError") for kind in kinds
    )
    expected = collections.defaultdict(list)  # two of the files share a SOPInstanceUID
    for row in table_rows(database, "unpacked"):
        expected[row["SOPInstanceUID"]].append(row)
    rows = table_rows(database, "archived")
    for row in rows:  # the same schema (the same instances), so the same complete rows
        assert row in expected[row["SOPInstanceUID"]]
    plain_uids = collections.Counter(read_header(io.BytesIO(p.read_bytes())).uids.instance for p in plain)
    assert collections.Counter(row["SOPInstanceUID"] for row in rows) == {
        uid: len(kinds) * len(same) + plain_uids[uid] for uid, same in expected.items()}


def test_a_filter_file_selects_members_by_their_headers_in_every_kind(archive_folder, tmp_path):
    folder, _unpacked, files, kinds, plain = archive_folder
    chosen = read_header(io.BytesIO(next(iter(files.values())).read_bytes())).uids
    filter_path = tmp_path / "filter.txt"
    filter_path.write_text(f"/studies/{chosen.study}\n")
    selected = [name for name, path in files.items()
                if read_header(io.BytesIO(path.read_bytes())).uids.study == chosen.study]
    plain_selected = sum(read_header(io.BytesIO(p.read_bytes())).uids.study == chosen.study for p in plain)
    database = tmp_path / "out.duckdb"
    summary = export("--input", str(folder), f"--bq-table=duckdb://{database}#t",
                     f"--filter-config-gcs-uri={filter_path}", "--input-layout=any")
    assert summary["succeeded"] == len(kinds) * len(selected) + plain_selected
    assert summary["failed"] == len(kinds)  # the text files: not DICOM, whatever the filter
    assert summary["not_selected_by_filter"] == summary["files_matched"] - summary["succeeded"] - summary["failed"] > 0
    assert {row["StudyInstanceUID"] for row in table_rows(database, "t")} == {chosen.study}


def test_no_archives_reads_archives_as_plain_files(archive_folder, tmp_path):
    folder, _unpacked, _files, kinds, plain = archive_folder
    database = tmp_path / "out.duckdb"
    summary = export("--input", str(folder), f"--bq-table=duckdb://{database}#t", "--no-archives")
    assert (summary["files_matched"], summary["succeeded"], summary["failed"]) == (
        len(kinds) + len(plain), len(plain), len(kinds))
    assert dead_letters(database, "t") == sorted((str(folder / kind), "read", "NotDicomError") for kind in kinds)
    assert "archives_expanded" not in summary


def test_a_zip_on_cloud_storage_is_exported_end_to_end(gcs_bucket, tmp_path):
    _client, bucket = gcs_bucket
    files = dict(list(instance_files().items())[:6])
    archive = build_zip(tmp_path / "big.zip", {**files, "big/one.dcm": big_instance()})
    assert archive.stat().st_size > 40 * 2**20
    bucket.blob("in/big.zip").upload_from_filename(str(archive))
    database = tmp_path / "out.duckdb"
    summary = export("--input", f"gs://{bucket.name}/in/", f"--bq-table=duckdb://{database}#t")
    assert (summary["files_matched"], summary["succeeded"], summary["failed"]) == (len(files) + 1, len(files) + 1, 0)
    assert summary["bytes_read"] < 1 << 20  # the central directory and the members' headers, not 40 MB
    rows = {row["SOPInstanceUID"] for row in table_rows(database, "t")}
    disk = {read_header(io.BytesIO(p.read_bytes())).uids.instance for p in files.values()}
    assert disk < rows and len(rows) == len(files) + 1

    # a member opened on a worker that has not listed the archive: its size is fetched for the listing
    archives._INDEX.clear()
    name = next(iter(files))
    fileobj, counter = Opener().open(InputFile(f"gs://{bucket.name}/in/big.zip#{name}", 0))
    with fileobj:
        assert row_of(fileobj) == rows_from_disk({name: files[name]})[name]
    assert counter.bytes_read < 256 * 1024


def test_nested_archives_in_an_export_are_dead_letters_unless_asked_for(tmp_path):
    files = dict(list(instance_files().items())[:3])
    inner = build_zip(tmp_path / "inner.zip", files, zipfile.ZIP_DEFLATED)
    folder = tmp_path / "in"
    folder.mkdir()
    build_tar(folder / "outer.tar", {"inner.zip": inner, **dict(list(files.items())[:1])})
    database = tmp_path / "out.duckdb"
    summary = export("--input", str(folder), f"--bq-table=duckdb://{database}#flat")
    assert (summary["succeeded"], summary["failed"]) == (1, 1)
    assert dead_letters(database, "flat") == [(f"{folder}/outer.tar#inner.zip", "list", "NestedArchiveError")]
    summary = export("--input", str(folder), f"--bq-table=duckdb://{database}#nested", "--nested-archives")
    assert (summary["files_matched"], summary["succeeded"], summary["failed"]) == (1 + len(files), 1 + len(files), 0)
    paths_read = {row["SOPInstanceUID"] for row in table_rows(database, "nested")}
    assert paths_read == {read_header(io.BytesIO(p.read_bytes())).uids.instance for p in files.values()}
