"""Issue 13, fidelity at the edges, on files written by a second toolkit (DCMTK).

Every file here is written by DCMTK from dump text in the test — ``dump2dcm`` (which itself
writes a value too long for its VR's 16-bit length as UN, DICOM CP-1066), ``dcmcrle`` (RLE
encapsulated Pixel Data), ``dcmsign`` (a real Digital Signatures Sequence after Pixel Data,
with a key and certificate made here) and ``dcmconv +p`` (Data Set Trailing Padding). Only
bytes DCMTK takes as given are made in Python: text in ISO 2022 / GB18030 (as PS3.5 Annexes
H–K spell it), a sequence stored as UN (implicit VR little endian item bytes, PS3.5 §6.2.2),
and the key and certificate (``cryptography``). Nothing is written with pydicom.

DCMTK is Debian's ``dcmtk`` package: CI installs it (``.ci/run``); without it these tests fail.
"""

from __future__ import annotations

import datetime
import io
import shutil
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest

from schemas import convert
from schemas.convert import flatten_instance
from transforms import storage
from transforms.header import read_header
from transforms.limits import AFTER_PIXEL_DATA_WINDOW

UID = "1.2.826.0.1.3680043.10.1137."
SIGNED_IN_ITEM = ["MACIDNumber", "DigitalSignatureUID", "DigitalSignatureDateTime", "CertificateType"]
AFTER_PIXELS_DROPPED = [
    "PixelData",
    "DigitalSignaturesSequence.CertificateOfSigner",
    "DigitalSignaturesSequence.Signature",
    "DataSetTrailingPadding",
]


def dcmtk(*args) -> None:
    if shutil.which(args[0]) is None:
        pytest.fail(f"DCMTK's {args[0]} is missing: add `dcmtk` to the apt-get line in .ci/run")
    result = subprocess.run([str(a) for a in args], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def dump_to_dicom(path: Path, dump: bytes, *options: str) -> Path:
    dump_path = path.with_suffix(".dump")
    dump_path.write_bytes(dump)
    dcmtk("dump2dcm", "+l", "1000000", *options, dump_path, path)
    return path


def image_dump(rows: int, columns: int, seed: int = 1, extra: bytes = b"") -> bytes:
    """An MR image of noise (so RLE does not shrink it), explicit VR little endian."""
    words, state = [], seed
    for _ in range(rows * columns):
        state = (state * 1103515245 + 12345) % 2**31
        words.append(f"{state >> 19 & 0xFFF:04x}")
    return b"\n".join([
        b"(0002,0010) UI =LittleEndianExplicit",
        b"(0008,0016) UI =MRImageStorage",
        f"(0008,0018) UI [{UID}{seed}.3]".encode(),
        b"(0008,0060) CS [MR]",
        b"(0010,0010) PN [Doe^Jane]",
        f"(0020,000d) UI [{UID}{seed}.1]".encode(),
        f"(0020,000e) UI [{UID}{seed}.2]".encode(),
        b"(0028,0002) US 1",
        b"(0028,0004) CS [MONOCHROME2]",
        f"(0028,0010) US {rows}".encode(),
        f"(0028,0011) US {columns}".encode(),
        b"(0028,0100) US 16",
        b"(0028,0101) US 12",
        b"(0028,0102) US 11",
        b"(0028,0103) US 0",
        extra,
        b"(7fe0,0010) OW " + "\\".join(words).encode(),
        b"",
    ])


@pytest.fixture(scope="module")
def signer(tmp_path_factory) -> tuple[Path, Path]:
    """A private key and a self-signed X.509 certificate for dcmsign (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("signer")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicom-bq-export test signer")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_path, certificate_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, certificate_path


def image_files(folder: Path, signer, rows: int, columns: int, padding_block: int = 1024) -> dict[str, Path]:
    """The same image four ways: native or RLE, ending with Pixel Data or followed by a
    digital signature and trailing padding (the file padded to ``padding_block`` bytes)."""
    key, certificate = signer
    files = {"native": dump_to_dicom(folder / "native.dcm", image_dump(rows, columns))}
    dcmtk("dcmcrle", files["native"], folder / "rle.dcm")
    files["rle"] = folder / "rle.dcm"
    for kind in ("native", "rle"):
        signed = folder / f"{kind}-signed.dcm"
        dcmtk("dcmsign", "-pw", "+s", key, certificate, files[kind], signed)
        files[f"{kind}+trailing"] = folder / f"{kind}+trailing.dcm"
        dcmtk("dcmconv", "+p", str(padding_block), "0", signed, files[f"{kind}+trailing"])
    return files


def flatten_file(fileobj):
    header = read_header(fileobj)
    return flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred)


def flatten_path(path: Path):
    with open(path, "rb") as fileobj:
        return flatten_file(fileobj)


def expected_timestamp(dt: str) -> str:
    """What BigQuery's JSON load takes for a DT with an offset, computed independently."""
    moment = datetime.datetime.strptime(dt, "%Y%m%d%H%M%S.%f%z" if "." in dt else "%Y%m%d%H%M%S%z")
    return moment.astimezone(datetime.timezone.utc).isoformat(sep=" ", timespec="microseconds")


def expected_signature(path: Path) -> list[dict]:
    """The Digital Signatures Sequence's exported fields, as pydicom reads the whole file."""
    item = pydicom.dcmread(path).DigitalSignaturesSequence[0]
    return [{
        "MACIDNumber": item.MACIDNumber,
        "DigitalSignatureUID": item.DigitalSignatureUID,
        "DigitalSignatureDateTime": expected_timestamp(item.DigitalSignatureDateTime),
        "CertificateType": "X509_1993_SIG",
    }]


def dropped(flattened) -> list[str]:
    return [entry["TagName"] for entry in flattened.row.get("DroppedTags", [])]


# -- after Pixel Data ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [8, 64], ids=["value-inside-the-window", "value-larger-than-the-window"])
def test_a_signature_and_trailing_padding_after_pixel_data_follow_every_rule(tmp_path, signer, rows):
    files = image_files(tmp_path, signer, rows, rows)
    for kind in ("native", "rle"):
        flattened = flatten_path(files[f"{kind}+trailing"])
        assert flattened.row["DigitalSignaturesSequence"] == expected_signature(files[f"{kind}+trailing"]), kind
        assert dropped(flattened)[-4:] == AFTER_PIXELS_DROPPED, kind
        assert flattened.counts["unread_after_pixel_data"] == 0
        assert flattened.row["MACParametersSequence"][0]["MACAlgorithm"] == "RIPEMD160"
        paths = {tuple(field[2] for field in path) for path in flattened.fragment}
        assert ("DigitalSignaturesSequence", "DigitalSignatureDateTime") in paths

        plain = flatten_path(files[kind])
        assert "DigitalSignaturesSequence" not in plain.row
        assert dropped(plain)[-1] == "PixelData" and "DataSetTrailingPadding" not in dropped(plain)
        assert plain.counts["unread_after_pixel_data"] == 0


@pytest.mark.parametrize("transfer_syntax", ["+ti", "+tb"], ids=["implicit-vr", "big-endian"])
def test_elements_after_native_pixel_data_are_read_in_every_uncompressed_syntax(tmp_path, signer, transfer_syntax):
    files = image_files(tmp_path, signer, 8, 8)
    converted = tmp_path / "converted.dcm"
    dcmtk("dcmconv", transfer_syntax, "+p", "1024", "0", files["native+trailing"], converted)
    flattened = flatten_path(converted)
    assert flattened.row["DigitalSignaturesSequence"] == expected_signature(converted)
    assert dropped(flattened)[-4:] == AFTER_PIXELS_DROPPED
    assert flattened.counts["unread_after_pixel_data"] == 0


def test_a_deflated_dataset_keeps_its_row_and_is_counted_for_what_follows_pixel_data(tmp_path, signer):
    files = image_files(tmp_path, signer, 8, 8)
    deflated = tmp_path / "deflated.dcm"
    dcmtk("dcmconv", "+td", files["native+trailing"], deflated)
    assert pydicom.dcmread(deflated).file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    flattened = flatten_path(deflated)
    assert flattened.row["SOPInstanceUID"] == UID + "1.3" and "DigitalSignaturesSequence" not in flattened.row
    assert flattened.counts["unread_after_pixel_data"] == 1


def test_the_dt_of_a_signature_is_the_utc_timestamp_bigquery_takes(tmp_path, signer):
    files = image_files(tmp_path, signer, 8, 8)
    signed_at = pydicom.dcmread(files["rle+trailing"]).DigitalSignaturesSequence[0].DigitalSignatureDateTime
    assert signed_at[-5] in "+-"  # dcmsign writes the offset
    value = flatten_path(files["rle+trailing"]).row["DigitalSignaturesSequence"][0]["DigitalSignatureDateTime"]
    assert value == expected_timestamp(signed_at) and value.endswith("+00:00")


def test_what_cannot_be_read_unambiguously_after_encapsulated_pixel_data_is_counted_not_guessed(tmp_path, signer):
    files = image_files(tmp_path, signer, 64, 64, padding_block=16384)
    padded = pydicom.dcmread(files["rle+trailing"])
    assert len(padded.DataSetTrailingPadding) > AFTER_PIXEL_DATA_WINDOW  # more than the tail read holds
    flattened = flatten_path(files["rle+trailing"])
    assert "DigitalSignaturesSequence" not in flattened.row
    assert dropped(flattened)[-1] == "PixelData"
    assert flattened.counts["unread_after_pixel_data"] == 1
    # after a defined length the same elements are read, however long: one seek
    native = flatten_path(files["native+trailing"])
    assert native.row["DigitalSignaturesSequence"] == expected_signature(files["native+trailing"])
    assert native.counts["unread_after_pixel_data"] == 0

    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(files["rle"].read_bytes() + b"\x01\x02\x03")  # not elements
    flattened = flatten_path(garbage)
    assert flattened.counts["unread_after_pixel_data"] == 1 and dropped(flattened)[-1] == "PixelData"


def test_bytes_after_native_pixel_data_that_never_end_cost_at_most_the_limit_and_keep_the_row(tmp_path, signer):
    import os

    from transforms.limits import MAX_BYTES_AFTER_PIXEL_DATA

    files = image_files(tmp_path, signer, 8, 8)
    endless = tmp_path / "endless.dcm"  # a private OB of undefined length, never delimited
    endless.write_bytes(files["native"].read_bytes() + struct.pack("<HH2sHL", 0x7FE1, 0x1010, b"OB", 0, 0xFFFFFFFF)
                        + os.urandom(3 * MAX_BYTES_AFTER_PIXEL_DATA))
    raw = storage.CountingRaw(open(endless, "rb", buffering=0))
    with io.BufferedReader(raw, storage.READ_BUFFER_BYTES) as fileobj:
        flattened = flatten_file(fileobj)
    assert flattened.row["SOPInstanceUID"] == UID + "1.3"
    assert flattened.counts["unread_after_pixel_data"] == 1 and dropped(flattened)[-1] == "PixelData"
    assert raw.bytes_read <= MAX_BYTES_AFTER_PIXEL_DATA + 2 * storage.READ_BUFFER_BYTES


def test_after_pixel_data_on_cloud_storage_costs_one_small_request_at_most(tmp_path, signer, gcs_bucket, monkeypatch):
    files = image_files(tmp_path, signer, 256, 256)  # ~128 KiB of pixel data
    _, bucket = gcs_bucket
    requests: list[int] = []
    download = storage.ranged_get  # every ranged GET of an object

    def counted(*args, **kwargs):
        data = download(*args, **kwargs)
        requests.append(len(data))
        return data

    monkeypatch.setattr(storage, "ranged_get", counted)
    opener = storage.Opener()
    measured = {}
    for kind, path in files.items():
        blob = bucket.blob(f"x/{kind}")
        blob.upload_from_filename(str(path))
        requests.clear()
        fileobj, counting = opener.open(storage.InputFile(f"gs://{bucket.name}/x/{kind}", path.stat().st_size))
        with fileobj:
            flattened = flatten_file(fileobj)
        assert flattened.row == flatten_path(path).row, kind
        measured[kind] = (len(requests), counting.bytes_read)
        assert counting.bytes_read == sum(requests)
    header = storage.READ_BUFFER_BYTES
    data = files["native+trailing"].read_bytes()
    trailing = len(data) - data.rindex(b"\xfa\xff\xfa\xffSQ")  # from the Digital Signatures Sequence on
    assert measured["native"] == (1, header)  # ends with Pixel Data: nothing more
    assert measured["native+trailing"] == (2, header + trailing)  # one seek, then what follows
    assert measured["rle"] == (2, header + AFTER_PIXEL_DATA_WINDOW)  # one small ranged read of the tail
    assert measured["rle+trailing"] == (2, header + AFTER_PIXEL_DATA_WINDOW)


# -- public elements stored as UN (CP-1066) -----------------------------------------------------


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _hex(data: bytes) -> bytes:
    return "\\".join(f"{byte:02x}" for byte in data).encode()


CONTOUR = [f"{x / 8:.3f}" for point in range(3329) for x in (point, -point, 2 * point % 977)]
GRID = [f"{-i * 2.5:.1f}" for i in range(12000)]
LUT = [i * 0.25 - 1000.0 for i in range(8200)]
COMMENT = "Contrôle qualité: " + "é" * 40000


def un_dump() -> bytes:
    """An RT structure set-like instance whose long values DCMTK itself writes as UN."""
    referenced = _implicit(0x0020000E, (UID + "9.2").encode() + b"\0")
    referenced_item = struct.pack("<HHL", 0xFFFE, 0xE000, len(referenced)) + referenced
    return b"\n".join([
        b"(0002,0010) UI =LittleEndianExplicit",
        b"(0008,0005) CS [ISO_IR 192]",
        b"(0008,0016) UI =RTStructureSetStorage",
        f"(0008,0018) UI [{UID}5.3]".encode(),
        b"(0008,1115) UN " + _hex(referenced_item),  # ReferencedSeriesSequence relayed as UN
        f"(0020,000d) UI [{UID}5.1]".encode(),
        f"(0020,000e) UI [{UID}5.2]".encode(),
        b"(0020,4000) LT [" + COMMENT.encode() + b"]",  # ImageComments, > 64 KiB
        b"(0040,9096) SQ (Sequence with explicit length #=1)",  # RealWorldValueMappingSequence
        b"  (fffe,e000) na (Item with explicit length #=2)",
        b"    (0040,9210) SH [LUT]",
        b"    (0040,9212) FD " + "\\".join(map(repr, LUT)).encode(),  # RealWorldValueLUTData
        b"  (fffe,e00d) na (ItemDelimitationItem)",
        b"(fffe,e0dd) na (SequenceDelimitationItem)",
        b"(3004,000c) DS [" + "\\".join(GRID).encode() + b"]",  # GridFrameOffsetVector
        b"(3006,0039) SQ (Sequence with explicit length #=1)",  # ROIContourSequence
        b"  (fffe,e000) na (Item with explicit length #=2)",
        b"    (3006,0040) SQ (Sequence with explicit length #=1)",  # ContourSequence
        b"      (fffe,e000) na (Item with explicit length #=2)",
        b"        (3006,0046) IS [3329]",
        b"        (3006,0050) DS [" + "\\".join(CONTOUR).encode() + b"]",  # ContourData
        b"      (fffe,e00d) na (ItemDelimitationItem)",
        b"    (fffe,e0dd) na (SequenceDelimitationItem)",
        b"    (3006,0084) IS [1]",
        b"  (fffe,e00d) na (ItemDelimitationItem)",
        b"(fffe,e0dd) na (SequenceDelimitationItem)",
        b"",
    ])


@pytest.fixture(scope="module")
def un_file(tmp_path_factory) -> Path:
    path = dump_to_dicom(tmp_path_factory.mktemp("un") / "rtss.dcm", un_dump())
    with open(path, "rb") as fileobj:
        stored = {tag: raw.VR for tag, raw in read_header(fileobj).dataset._dict.items()}
    # DCMTK wrote them as UN (CP-1066), not as their dictionary VRs
    assert stored[0x00204000] == stored[0x3004000C] == stored[0x00081115] == "UN"
    return path


def test_public_elements_stored_as_un_are_typed_and_converted_by_the_dictionary(un_file):
    flattened = flatten_path(un_file)
    row = flattened.row
    assert row["ImageComments"] == COMMENT  # text (LT, ISO_IR 192), top level, > 64 KiB: read when exported
    assert row["GridFrameOffsetVector"] == GRID  # DS text, top level
    contour = row["ROIContourSequence"][0]["ContourSequence"][0]
    assert contour["NumberOfContourPoints"] == "3329" and contour["ContourData"] == CONTOUR
    assert row["RealWorldValueMappingSequence"][0]["RealWorldValueLUTData"] == LUT  # FD, nested
    assert row["ReferencedSeriesSequence"] == [{"SeriesInstanceUID": UID + "9.2"}]  # UN sequence → items
    assert dropped(flattened) == ["FileMetaInformationVersion"]
    assert flattened.counts["moved_to_other_elements"] == 0


def test_a_un_value_too_large_to_read_is_dropped_as_not_fit_not_as_un(un_file, monkeypatch):
    monkeypatch.setattr(convert, "MAX_VALUE_BYTES", 79_000)  # under ImageComments and the grid, over the rest
    flattened = flatten_path(un_file)
    assert dropped(flattened) == ["FileMetaInformationVersion", "ImageComments", "GridFrameOffsetVector"]
    assert flattened.counts["dropped_not_fit"] == 2  # too large to read, not excluded as UN
    assert flattened.counts["dropped_by_rule"] == 1  # FileMetaInformationVersion
    assert "ImageComments" not in flattened.row
    assert flattened.row["ROIContourSequence"][0]["ContourSequence"][0]["ContourData"] == CONTOUR  # 78,385 bytes


# -- DT offsets and character sets in nested items ----------------------------------------------

JAPANESE = (b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B")
KOREAN = (b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf")
CHINESE = "Wang^XiaoDong=王^小东=".encode("gb18030")
CHINESE_TEXT = "患者主诉：头痛三天。".encode("gb18030")


def sr_dump(charset: bytes) -> bytes:
    """A structured report: nested content items with dates, times and names."""
    return b"\n".join([
        b"(0002,0010) UI =LittleEndianExplicit",
        b"(0008,0005) CS [" + charset + b"]",
        b"(0008,0016) UI =ComprehensiveSRStorage",
        f"(0008,0018) UI [{UID}7.3]".encode(),
        b"(0010,0010) PN [" + JAPANESE + b"]",
        f"(0020,000d) UI [{UID}7.1]".encode(),
        f"(0020,000e) UI [{UID}7.2]".encode(),
        b"(0040,a730) SQ (Sequence with undefined length #=3)",  # ContentSequence
        b"  (fffe,e000) na (Item with undefined length #=4)",
        b"    (0040,a040) CS [DATETIME]",
        b"    (0040,a120) DT [20240229233000.5+0530]",
        b"    (0040,a123) PN [" + JAPANESE + b"]",
        b"    (0040,a730) SQ (Sequence with undefined length #=1)",
        b"      (fffe,e000) na (Item with undefined length #=2)",
        b"        (0040,a040) CS [DATETIME]",
        b"        (0040,a120) DT [20231231200000-0800]",
        b"      (fffe,e00d) na (ItemDelimitationItem)",
        b"    (fffe,e0dd) na (SequenceDelimitationItem)",
        b"  (fffe,e00d) na (ItemDelimitationItem)",
        b"  (fffe,e000) na (Item with undefined length #=3)",
        b"    (0008,0005) CS [\\ISO 2022 IR 149]",  # this item declares its own character set
        b"    (0040,a123) PN [" + KOREAN + b"]",
        b"    (0040,a730) SQ (Sequence with undefined length #=1)",
        b"      (fffe,e000) na (Item with undefined length #=1)",
        b"        (0040,a123) PN [" + KOREAN + b"]",  # inherits the item's
        b"      (fffe,e00d) na (ItemDelimitationItem)",
        b"    (fffe,e0dd) na (SequenceDelimitationItem)",
        b"  (fffe,e00d) na (ItemDelimitationItem)",
        b"  (fffe,e000) na (Item with undefined length #=3)",
        b"    (0008,0005) CS [GB18030]",
        b"    (0040,a123) PN [" + CHINESE + b"]",
        b"    (0040,a160) UT [" + CHINESE_TEXT + b"]",
        b"  (fffe,e00d) na (ItemDelimitationItem)",
        b"(fffe,e0dd) na (SequenceDelimitationItem)",
        b"",
    ])


YAMADA = {
    "Alphabetic": {"FamilyName": "Yamada", "GivenName": "Tarou"},
    "Ideographic": {"FamilyName": "山田", "GivenName": "太郎"},
    "Phonetic": {"FamilyName": "やまだ", "GivenName": "たろう"},
}
HONG = {
    "Alphabetic": {"FamilyName": "Hong", "GivenName": "Gildong"},
    "Ideographic": {"FamilyName": "洪", "GivenName": "吉洞"},
    "Phonetic": {"FamilyName": "홍", "GivenName": "길동"},
}
WANG = {"Alphabetic": {"FamilyName": "Wang", "GivenName": "XiaoDong"}, "Ideographic": {"FamilyName": "王", "GivenName": "小东"}}


@pytest.mark.parametrize("transfer_syntax", ["+te", "+ti", "+tb"])
def test_nested_offsets_and_character_sets_decode_exactly(tmp_path, transfer_syntax):
    path = dump_to_dicom(tmp_path / "sr.dcm", sr_dump(b"\\ISO 2022 IR 87"), transfer_syntax, "-e")
    flattened = flatten_path(path)
    row = flattened.row
    assert row["PatientName"] == YAMADA
    first, korean, chinese = row["ContentSequence"]
    assert first["DateTime"] == "2024-02-29 18:00:00.500000+00:00"  # +0530 applied
    assert first["ContentSequence"][0]["DateTime"] == "2024-01-01 04:00:00.000000+00:00"  # -0800, across a year
    assert first["PersonName"] == YAMADA
    assert korean["SpecificCharacterSet"] == ["", "ISO 2022 IR 149"]
    assert korean["PersonName"] == HONG and korean["ContentSequence"][0]["PersonName"] == HONG
    assert chinese["PersonName"] == WANG
    assert chinese["TextValue"] == "患者主诉：头痛三天。"
    assert flattened.counts["undecodable_values"] == flattened.counts["charset_fallbacks"] == 0
    assert flattened.counts["moved_to_other_elements"] == 0
