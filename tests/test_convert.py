"""SPEC §2: one row per instance. One test per rule, on built datasets and pydicom's files."""

from __future__ import annotations

import io
import logging
import warnings

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset

from schemas.convert import MAX_RECORD_DEPTH, flatten_instance
from schemas.vr_types import VR_TO_BIGQUERY
from tests.builders import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    enhanced_multiframe,
    flatten,
    flatten_bytes,
    instance,
    item,
    schema_fields,
    sequence,
    to_bytes,
    undefined_lengths,
)
from transforms.header import read_header


class CountingFile(io.BytesIO):
    """An in-memory file that counts the bytes read from it."""

    bytes_read = 0

    def read(self, size=-1):
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


def other(row: dict, tag: str) -> list[str] | None:
    for entry in row.get("OtherElements", []):
        if entry["Tag"] == tag:
            return entry["Data"]
    return None


def dropped(row: dict) -> list[str]:
    return [entry["TagName"] for entry in row.get("DroppedTags", [])]


# -- VR → BigQuery type -------------------------------------------------------------------

# One public keyword per VR, with a value, the expected column type and row value.
VR_EXAMPLES = [
    ("AE", "RetrieveAETitle", ["STORESCP"], "STRING", ["STORESCP"]),
    ("AS", "PatientAge", "042Y", "STRING", "042Y"),
    ("CS", "Modality", "MR", "STRING", "MR"),
    ("DS", "SliceThickness", " 2.50 ", "STRING", "2.50"),
    ("IS", "InstanceNumber", "007 ", "STRING", "007"),
    ("LO", "Manufacturer", "ACME", "STRING", "ACME"),
    ("LT", "AdditionalPatientHistory", " line1\\still one value", "STRING", " line1\\still one value"),
    ("SH", "StationName", "CT01", "STRING", "CT01"),
    ("ST", "InstitutionAddress", "1 Main St", "STRING", "1 Main St"),
    ("UC", "StrainDescription", "free text", "STRING", "free text"),
    ("UI", "FrameOfReferenceUID", "1.2.3.4", "STRING", "1.2.3.4"),
    ("UR", "PixelDataProviderURL", "https://example.org/x", "STRING", "https://example.org/x"),
    ("UT", "TextValue", "long text", "STRING", "long text"),
    ("DA", "StudyDate", "20240229", "DATE", "2024-02-29"),
    ("TM", "StudyTime", "0930", "TIME", "09:30:00.000000"),
    ("DT", "AcquisitionDateTime", "20240229093000.25+0100", "TIMESTAMP", "2024-02-29 08:30:00.250000+00:00"),
    ("FL", "RecommendedDisplayFrameRateInFloat", 29.5, "FLOAT", 29.5),
    ("FD", "RealWorldValueSlope", 1.75, "FLOAT", 1.75),
    ("AT", "FrameIncrementPointer", [0x00181063], "INTEGER", [0x0018 * 65536 + 0x1063]),
    ("SL", "ReferencePixelX0", -7, "INTEGER", -7),
    ("SS", "TagAngleSecondAxis", -3, "INTEGER", -3),
    ("UL", "SimpleFrameList", [1, 70000], "INTEGER", [1, 70000]),
    ("US", "Rows", 512, "INTEGER", 512),
    ("SV", "SelectorSVValue", [-(2**40)], "INTEGER", [-(2**40)]),
    ("UV", "SelectorUVValue", [2**40], "INTEGER", [2**40]),
]


@pytest.mark.parametrize("vr, keyword, value, bq_type, expected", VR_EXAMPLES, ids=[e[0] for e in VR_EXAMPLES])
def test_vr_maps_to_bigquery_type(vr, keyword, value, bq_type, expected):
    ds = instance()
    ds.add_new(pydicom.datadict.tag_for_keyword(keyword), vr, value)
    flat = flatten(ds)
    assert schema_fields(flat)[keyword][0] == bq_type
    assert flat.row[keyword] == expected


def test_every_vr_of_the_table_has_an_example_or_is_excluded():
    covered = {e[0] for e in VR_EXAMPLES} | {"PN", "SQ"}
    excluded = {vr for vr, bq_type in VR_TO_BIGQUERY.items() if bq_type is None}
    assert covered | excluded == set(VR_TO_BIGQUERY)


@pytest.mark.parametrize("vr", ["OB", "OD", "OF", "OL", "OV", "OW", "UN"])
def test_excluded_vrs_have_no_column_and_are_named_in_dropped_tags(vr):
    keywords = {
        "OB": "ICCProfile", "OD": "DoubleFloatPixelData", "OF": "FloatPixelData",
        "OL": "LongPrimitivePointIndexList", "OV": "ExtendedOffsetTable", "OW": "RedPaletteColorLookupTableData",
        "UN": "Tag_00111010",
    }
    ds = instance()
    if vr == "UN":
        ds.add_new(0x00110010, "LO", "CREATOR")
        ds.add_new(0x00111010, "UN", b"\x01\x02")
    else:
        ds.add_new(pydicom.datadict.tag_for_keyword(keywords[vr]), vr, b"\0" * 8)
    flat = flatten(ds)
    assert keywords[vr] not in flat.row
    assert keywords[vr] not in schema_fields(flat)
    assert keywords[vr] in dropped(flat.row)


def test_ds_and_is_keep_their_text_trimmed_of_padding():
    ds = instance()
    ds.add_new(0x00281050, "DS", [" 40 ", "+1.50E2"])  # WindowCenter
    ds.add_new(0x00200013, "IS", " +12")  # InstanceNumber
    row = flatten(ds).row
    assert row["WindowCenter"] == ["40", "+1.50E2"]
    assert row["InstanceNumber"] == "+12"


def test_da_becomes_an_iso_date():
    ds = instance()
    ds.StudyDate = "19991231"
    ds.add_new(0x00080021, "DA", "1999.12.30")  # SeriesDate, ACR-NEMA style
    row = flatten(ds).row
    assert (row["StudyDate"], row["SeriesDate"]) == ("1999-12-31", "1999-12-30")


@pytest.mark.parametrize(
    "tm, expected",
    [("07", "07:00:00.000000"), ("0705", "07:05:00.000000"), ("070509", "07:05:09.000000"),
     ("070509.1", "07:05:09.100000"), ("070509.123456", "07:05:09.123456"), ("07:05:09", "07:05:09.000000")],
)
def test_tm_partial_values_are_completed_with_zeros(tm, expected):
    ds = instance()
    ds.StudyTime = tm
    assert flatten(ds).row["StudyTime"] == expected


@pytest.mark.parametrize(
    "dt, expected",
    [("2024", "2024-01-01 00:00:00.000000+00:00"),
     ("20240615123000", "2024-06-15 12:30:00.000000+00:00"),
     ("20240615123000-0500", "2024-06-15 17:30:00.000000+00:00"),
     ("20240101003000.5+0100", "2023-12-31 23:30:00.500000+00:00")],
)
def test_dt_offset_is_applied_and_no_offset_means_utc(dt, expected):
    ds = instance()
    ds.AcquisitionDateTime = dt
    assert flatten(ds).row["AcquisitionDateTime"] == expected


def test_at_is_group_times_65536_plus_element():
    ds = instance()
    ds.add_new(0x00209165, "AT", [0x00209056, 0x00209057])  # DimensionIndexPointer (VM 1)
    flat = flatten(ds)
    # VM 1 in the dictionary but two values: does not fit, kept as text.
    assert other(flat.row, "Tag_00209165") == ["00209056", "00209057"]
    ds = instance()
    ds.add_new(0x00209165, "AT", 0x00209056)
    assert flatten(ds).row["DimensionIndexPointer"] == 0x0020 * 65536 + 0x9056


def test_binary_numbers_read_in_big_endian_files():
    ds = instance()
    ds.Rows, ds.Columns = 300, 2
    ds.RealWorldValueSlope = 1.5
    row = flatten(ds, ExplicitVRBigEndian).row
    assert (row["Rows"], row["Columns"], row["RealWorldValueSlope"]) == (300, 2, 1.5)


def test_column_name_is_the_keyword_and_file_meta_elements_are_columns():
    flat = flatten(instance())
    assert flat.row["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    assert flat.row["MediaStorageSOPClassUID"] == flat.row["SOPClassUID"]
    assert {"SOPInstanceUID", "StudyInstanceUID", "TransferSyntaxUID"} <= set(schema_fields(flat))


def test_mode_comes_from_the_dictionary_vm_not_the_instance():
    ds = instance()
    ds.ImageType = "ORIGINAL"  # VM 2-n, one value here
    ds.Modality = "CT"  # VM 1
    flat = flatten(ds)
    fields = schema_fields(flat)
    assert fields["ImageType"] == ("STRING", "REPEATED")
    assert flat.row["ImageType"] == ["ORIGINAL"]
    assert fields["Modality"] == ("STRING", "NULLABLE")


def test_type_comes_from_the_dictionary_vr_even_when_the_file_says_otherwise():
    ds = instance()
    ds.add_new(0x00180050, "FD", 2.5)  # SliceThickness is DS in the dictionary
    flat = flatten(ds)
    assert schema_fields(flat)["SliceThickness"] == ("STRING", "NULLABLE")
    assert flat.row["SliceThickness"] == "2.5"


@pytest.mark.parametrize("pixel_representation, expected", [(0, 65535), (1, -1)])
def test_ambiguous_us_or_ss_is_integer_with_the_sign_pydicom_resolves(pixel_representation, expected):
    ds = instance()
    ds.PixelRepresentation = pixel_representation
    ds.add_new(0x00280106, "US" if pixel_representation == 0 else "SS", expected)  # SmallestImagePixelValue
    flat = flatten(ds, ImplicitVRLittleEndian)  # implicit: the VR must be resolved
    assert schema_fields(flat)["SmallestImagePixelValue"] == ("INTEGER", "NULLABLE")
    assert flat.row["SmallestImagePixelValue"] == expected


def test_ambiguous_vr_with_a_binary_alternative_is_excluded():
    ds = instance()
    ds.add_new(0x00281201, "OW", b"\0\1" * 4)  # RedPaletteColorLookupTableData: OW
    ds.add_new(0x00283006, "US", [1, 2, 3])  # LUTData: "US or OW"
    flat = flatten(ds, ImplicitVRLittleEndian)
    assert "LUTData" not in schema_fields(flat)
    assert "LUTData" in dropped(flat.row)


def test_pn_is_a_record_of_three_groups_of_five_components():
    ds = instance()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou^^Dr^III=山田^太郎=やまだ^たろう"
    flat = flatten(ds)
    assert flat.row["PatientName"] == {
        "Alphabetic": {"FamilyName": "Yamada", "GivenName": "Tarou", "NamePrefix": "Dr", "NameSuffix": "III"},
        "Ideographic": {"FamilyName": "山田", "GivenName": "太郎"},
        "Phonetic": {"FamilyName": "やまだ", "GivenName": "たろう"},
    }


def test_pn_schema_always_has_the_full_structure():
    ds = instance()
    ds.PatientName = "Doe"
    ds.OperatorsName = ["A^B", "C^D"]  # VM 1-n
    fields = schema_fields(flatten(ds))
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        assert fields[f"PatientName.{group}"] == ("RECORD", "NULLABLE")
        for component in ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix"):
            assert fields[f"PatientName.{group}.{component}"] == ("STRING", "NULLABLE")
    assert fields["OperatorsName"] == ("RECORD", "REPEATED")


def test_sq_items_become_repeated_records_recursively():
    ds = instance()
    ds.ReferencedSeriesSequence = sequence(
        item(SeriesInstanceUID="1.2", ReferencedInstanceSequence=sequence(
            item(ReferencedSOPClassUID="1.2.3", ReferencedSOPInstanceUID="1.2.3.4"),
        )),
        item(SeriesInstanceUID="1.3"),
    )
    ds.ReferencedSeriesSequence[1].add_new(0x00290010, "LO", "ACME 1.0")
    flat = flatten(ds)
    assert flat.row["ReferencedSeriesSequence"] == [
        {"SeriesInstanceUID": "1.2", "ReferencedInstanceSequence": [
            {"ReferencedSOPClassUID": "1.2.3", "ReferencedSOPInstanceUID": "1.2.3.4"}]},
        {"SeriesInstanceUID": "1.3", "OtherElements": [{"Tag": "Tag_00290010", "Data": ["ACME 1.0"]}]},
    ]
    fields = schema_fields(flat)
    assert fields["ReferencedSeriesSequence"] == ("RECORD", "REPEATED")
    assert fields["ReferencedSeriesSequence.ReferencedInstanceSequence.ReferencedSOPInstanceUID"] == ("STRING", "NULLABLE")
    assert fields["ReferencedSeriesSequence.OtherElements.Data"] == ("STRING", "REPEATED")


def test_private_elements_go_to_other_elements_as_text():
    ds = instance()
    ds.add_new(0x00430010, "LO", "GEMS_PARM_01")
    ds.add_new(0x00431039, "IS", ["1", "2", "3"])
    ds.add_new(0x00431040, "FL", [1.5, 2.0])
    row = flatten(ds).row
    assert other(row, "Tag_00430010") == ["GEMS_PARM_01"]
    assert other(row, "Tag_00431039") == ["1", "2", "3"]
    assert other(row, "Tag_00431040") == ["1.5", "2.0"]


def test_private_elements_in_implicit_vr_files_use_the_private_dictionary():
    ds = instance()
    ds.add_new(0x00090010, "LO", "GEMS_IDEN_01")
    ds.add_new(0x00091001, "LO", "GE_GENESIS_FF")  # known to pydicom's private dictionary as LO
    ds.add_new(0x00091080, "UN", b"\x01\x02\x03\x04")  # unknown: UN, dropped
    row = flatten(ds, ImplicitVRLittleEndian).row
    assert other(row, "Tag_00091001") == ["GE_GENESIS_FF"]
    assert "Tag_00091080" in dropped(row)


def test_public_elements_without_keyword_go_to_other_elements():
    ds = instance()
    ds.add_new(0x0018EEEE, "LO", "FUTURE")  # a public tag not in the dictionary
    ds.add_new(0x00203101, "CS", "RETIRED")  # a retired repeater that is no curve or overlay
    row = flatten(ds).row
    assert other(row, "Tag_0018EEEE") == ["FUTURE"]
    assert other(row, "Tag_00203101") == ["RETIRED"]


def test_private_sequences_become_their_own_tag_column():
    ds = instance()
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291102, "SQ", sequence(item(Rows=10, Columns=20)))
    flat = flatten(ds)
    assert flat.row["Tag_00291102"] == [{"Rows": 10, "Columns": 20}]
    assert schema_fields(flat)["Tag_00291102"] == ("RECORD", "REPEATED")
    assert other(flat.row, "Tag_00291102") is None


def test_private_elements_of_excluded_vrs_go_to_dropped_tags():
    ds = instance()
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291010, "OB", b"CSA2" * 10)
    row = flatten(ds).row
    assert "Tag_00291010" in dropped(row)
    assert other(row, "Tag_00291010") is None


def test_repeating_groups_become_id_value_records():
    ds = instance()
    for group in (0x6000, 0x6002):
        ds.add_new(group << 16 | 0x0010, "US", 64 + group - 0x6000)  # OverlayRows
        ds.add_new(group << 16 | 0x0050, "SS", [1, 1])  # OverlayOrigin, VM 2
        ds.add_new(group << 16 | 0x3000, "OW", b"\0" * 8)  # OverlayData
    ds.add_new(0x50000005, "US", 2)  # CurveDimensions
    flat = flatten(ds)
    assert flat.row["OverlayRows"] == [{"Id": "6000", "Value": 64}, {"Id": "6002", "Value": 66}]
    assert flat.row["OverlayOrigin"] == [{"Id": "6000", "Value": [1, 1]}, {"Id": "6002", "Value": [1, 1]}]
    assert flat.row["CurveDimensions"] == [{"Id": "5000", "Value": 2}]
    fields = schema_fields(flat)
    assert fields["OverlayRows"] == ("RECORD", "REPEATED")
    assert fields["OverlayRows.Id"] == ("STRING", "NULLABLE")
    assert fields["OverlayRows.Value"] == ("INTEGER", "NULLABLE")
    assert fields["OverlayOrigin.Value"] == ("INTEGER", "REPEATED")
    assert "OverlayData" in dropped(flat.row)


def test_dropped_tags_are_path_prefixed_and_list_pixel_data_without_reading_it():
    ds = instance()
    ds.IconImageSequence = sequence(item(Rows=1, Columns=1, PixelData=b"\0\0"))
    ds.IconImageSequence[0]["PixelData"].VR = "OW"
    ds.Rows, ds.Columns, ds.BitsAllocated = 1024, 1024, 16
    ds.PixelData = b"\0" * (2 * 1024 * 1024)
    ds["PixelData"].VR = "OW"
    data = to_bytes(ds)

    fileobj = CountingFile(data)
    header = read_header(fileobj)
    flat = flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred)
    assert dropped(flat.row) == ["FileMetaInformationVersion", "IconImageSequence.PixelData", "PixelData"]
    assert fileobj.bytes_read < 4096 < len(data)
    assert schema_fields(flat)["DroppedTags.TagName"] == ("STRING", "NULLABLE")


def test_large_values_before_pixel_data_are_skipped_unless_exported():
    ds = instance()
    ds.ICCProfile = b"\0" * 500_000  # OB: dropped, never read
    ds.TextValue = "x" * 200_000  # UT: exported, read on demand
    flat = flatten(ds)
    assert flat.row["TextValue"] == "x" * 200_000
    assert "ICCProfile" in dropped(flat.row)


@pytest.mark.parametrize(
    "keyword, vr, value",
    [("StudyDate", "DA", "2024-13-45"), ("StudyDate", "DA", "20230229"), ("StudyTime", "TM", "256000"),
     ("AcquisitionDateTime", "DT", "yesterday"), ("Modality", "CS", ["CT", "MR"]),
     ("SelectorUVValue", "UV", [2**64 - 1])],
)
def test_values_that_do_not_fit_go_to_other_elements_and_are_counted(keyword, vr, value):
    ds = instance()
    tag = pydicom.datadict.tag_for_keyword(keyword)
    ds.add_new(tag, vr, value)
    flat = flatten(ds)
    assert keyword not in flat.row
    expected = [value] if isinstance(value, str) else [str(v) for v in value]
    assert other(flat.row, f"Tag_{tag:08X}") == expected
    assert flat.counts["moved_to_other_elements"] == 1
    assert keyword in schema_fields(flat)  # the column exists; this instance's value is elsewhere


def test_text_that_does_not_decode_goes_to_other_elements_with_replacement_characters():
    ds = instance()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.add_new(0x00080080, "LO", "Caf\xe9".encode("latin-1"))  # InstitutionName: not UTF-8
    flat = flatten(ds)
    assert "InstitutionName" not in flat.row
    assert other(flat.row, "Tag_00080080") == ["Caf\ufffd"]
    assert flat.counts["undecodable_values"] == 1
    assert flat.counts["moved_to_other_elements"] == 1


CHARSET_FILES = {
    "chrArab.dcm": "ISO_IR 127", "chrFren.dcm": "ISO_IR 100", "chrGerm.dcm": "ISO_IR 100",
    "chrGreek.dcm": "ISO_IR 126", "chrH31.dcm": "ISO 2022 IR 87", "chrH32.dcm": "ISO 2022 IR 13",
    "chrHbrw.dcm": "ISO_IR 138", "chrI2.dcm": "ISO 2022 IR 149", "chrJapMulti.dcm": "ISO 2022 IR 87",
    "chrKoreanMulti.dcm": "ISO 2022 IR 149", "chrRuss.dcm": "ISO_IR 144", "chrX1.dcm": "ISO_IR 192",
    "chrX2.dcm": "GB18030",
}


@pytest.mark.parametrize("name", sorted(CHARSET_FILES))
def test_character_sets_decode_as_pydicom_does(name):
    path = next(p for p in get_charset_files() if p.endswith("/" + name))
    with open(path, "rb") as fileobj:
        header = read_header(fileobj)
        flat = flatten_instance(header.dataset, read_deferred=header.read_deferred)
    reference = pydicom.dcmread(path)
    assert CHARSET_FILES[name] in list(reference.SpecificCharacterSet) or CHARSET_FILES[name] == reference.SpecificCharacterSet
    expected = str(reference.PatientName).split("=")
    row_name = flat.row["PatientName"]
    for group, text in zip(("Alphabetic", "Ideographic", "Phonetic"), expected):
        assert "^".join(row_name.get(group, {}).values()) == "^".join(c for c in text.split("^") if c)
    assert flat.counts["undecodable_values"] == 0
    assert flat.counts["charset_fallbacks"] == 0


def test_sequence_items_can_declare_their_own_character_set():
    ds = instance()
    ds.SpecificCharacterSet = "ISO_IR 100"
    inner = item(SpecificCharacterSet="ISO_IR 144")
    inner.add_new(0x00100010, "PN", "Люкceмбypг".encode("iso8859_5"))
    ds.add_new(0x00081120, "SQ", sequence(inner))  # ReferencedPatientSequence
    ds.add_new(0x00100010, "PN", "Müller".encode("latin-1"))
    row = flatten(ds).row
    assert row["PatientName"]["Alphabetic"]["FamilyName"] == "Müller"
    assert row["ReferencedPatientSequence"][0]["PatientName"]["Alphabetic"]["FamilyName"] == "Люкceмбypг"


def test_unknown_character_set_falls_back_and_is_counted_not_failed():
    ds = instance()
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.add_new(0x00080080, "LO", b"Clinic")
    flat = flatten(ds)
    assert flat.row["InstitutionName"] == "Clinic"
    assert flat.counts["charset_fallbacks"] == 1


def test_sequences_deeper_than_15_levels_are_dropped_and_named():
    leaf = item(CodeValue="X")
    for _ in range(16):
        leaf = item(CodeValue="X", ContentSequence=sequence(leaf))
    ds = instance()
    ds.ContentSequence = leaf.ContentSequence
    flat = flatten(ds)
    path = ".".join(["ContentSequence"] * 16)
    assert path in dropped(flat.row)
    assert flat.counts["too_deep"] == 1
    fields = schema_fields(flat)
    deepest = max((p for p in fields if p.startswith("ContentSequence")), key=lambda p: p.count("."))
    records = [f for f in deepest.split(".")]
    assert len(records) <= MAX_RECORD_DEPTH + 1
    assert all(
        sum(1 for i in range(len(p.split("."))) if fields[".".join(p.split(".")[: i + 1])][0] == "RECORD") <= MAX_RECORD_DEPTH
        for p in fields
    )


def test_person_names_that_would_exceed_the_depth_limit_are_dropped():
    leaf = item(PatientName="Deep^Name", CodeValue="X")
    for _ in range(14):
        leaf = item(ContentSequence=sequence(leaf))
    ds = instance()
    ds.ContentSequence = leaf.ContentSequence  # PN at depth 14 would need records 15 and 16
    flat = flatten(ds)
    assert ".".join(["ContentSequence"] * 14 + ["PatientName"]) in dropped(flat.row)


@pytest.mark.parametrize(
    "transfer_syntax",
    [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian],
    ids=["implicit", "big-endian", "deflated"],
)
def test_every_uncompressed_transfer_syntax_gives_the_same_row(transfer_syntax):
    ds = instance()
    ds.PatientName = "Doe^Jane"
    ds.Rows = 512
    ds.WindowCenter = ["40", "400"]
    ds.ReferencedImageSequence = sequence(item(ReferencedSOPInstanceUID="1.2.3"))
    expected = flatten(ds).row
    row = flatten(ds, transfer_syntax).row
    for key in ("TransferSyntaxUID", "FileMetaInformationGroupLength"):
        expected.pop(key), row.pop(key)
    assert row == expected


def test_files_without_preamble_or_file_meta_are_read():
    ds = instance()
    ds.PatientID = "P1"
    for transfer_syntax in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        row = flatten_bytes(to_bytes(ds, transfer_syntax, file_meta=False)).row
        assert row["PatientID"] == "P1"
        assert "TransferSyntaxUID" not in row


@pytest.mark.parametrize(
    "name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_compressed_transfer_syntaxes_give_rows_without_decoding_pixels(name):
    with open(get_testdata_file(name), "rb") as fileobj:
        header = read_header(fileobj)
        flat = flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred)
    reference = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    assert flat.row["SOPInstanceUID"] == reference.SOPInstanceUID
    assert flat.row["Rows"] == reference.Rows
    assert "PixelData" in dropped(flat.row)


def test_pydicom_messages_never_reach_logs_or_warnings(caplog):
    ds = instance()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.add_new(0x00100010, "PN", "Sm\xefth^J".encode("latin-1"))  # bad UTF-8
    ds.add_new(0x00080020, "DA", "SECRET20")
    ds.add_new(0x00280106, "US", 5)
    data = to_bytes(ds, ImplicitVRLittleEndian)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("default")
        from transforms.header import silence_pydicom

        silence_pydicom()
        flat = flatten_bytes(data)
    assert flat.counts["undecodable_values"] == 1
    leaked = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in leaked if "SECRET" in m or "Sm" in m], leaked


def test_the_same_bytes_always_give_the_same_row_and_fragment():
    ds = instance()
    ds.PatientName = "A^B"
    ds.add_new(0x00110010, "LO", "X")
    data = to_bytes(ds)
    first, second = flatten_bytes(data), flatten_bytes(data)
    assert first.row == second.row and first.fragment == second.fragment


def test_an_empty_dataset_item_keeps_its_place():
    ds = instance()
    ds.ReferencedImageSequence = sequence(Dataset(), item(ReferencedSOPInstanceUID="1.2"))
    assert flatten(ds).row["ReferencedImageSequence"] == [{}, {"ReferencedSOPInstanceUID": "1.2"}]


def test_japanese_names_are_decoded_before_splitting():
    # In JIS X 0208, 春 is encoded with the byte of "=", and 順 likewise: split after decoding.
    ds = instance()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = pydicom.valuerep.PersonName("Yamada^Haruko=山田^春子=やまだ^はるこ", encodings=["iso8859", "iso2022_jp"])
    name = flatten(ds).row["PatientName"]
    assert name["Ideographic"] == {"FamilyName": "山田", "GivenName": "春子"}
    assert name["Phonetic"] == {"FamilyName": "やまだ", "GivenName": "はるこ"}


def test_a_private_value_pydicom_cannot_convert_is_dropped_not_a_failed_instance():
    import struct

    ds = instance()
    ds.add_new(0x00090010, "LO", "GEMS_ACQU_01")
    assert pydicom.datadict.private_dictionary_VR(0x00091025, "GEMS_ACQU_01") == "US"
    data = to_bytes(ds, ImplicitVRLittleEndian) + struct.pack("<HHI", 0x0009, 0x1025, 3) + b"\x01\x02\x03"
    flat = flatten_bytes(data)
    assert "Tag_00091025" in dropped(flat.row)
    assert flat.row["SOPInstanceUID"] == ds.SOPInstanceUID


def test_private_sequences_of_defined_length_in_implicit_vr_become_columns():
    ds = instance()
    ds.add_new(0x20050010, "LO", "NO KNOWN CREATOR")
    ds.add_new(0x2005140F, "SQ", sequence(item(Modality="MR", SOPInstanceUID="1.2.3")))
    data = to_bytes(ds, ImplicitVRLittleEndian)
    flat = flatten_bytes(data)
    assert flat.row["Tag_2005140F"] == [{"Modality": "MR", "SOPInstanceUID": "1.2.3"}]
    assert schema_fields(flat)["Tag_2005140F"] == ("RECORD", "REPEATED")


def test_a_large_private_blob_of_a_binary_vr_is_dropped_without_being_read():
    ds = instance()
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291010, "OB", b"CSA2" * 50_000)  # 200 kB; implicit VR: its VR is in the private dictionary
    data = to_bytes(ds, ImplicitVRLittleEndian)

    fileobj = CountingFile(data)
    header = read_header(fileobj)
    flat = flatten_instance(header.dataset, read_deferred=header.read_deferred)
    assert "Tag_00291010" in dropped(flat.row)
    assert fileobj.bytes_read < 10_000 < len(data)


# -- dropped by rule, dropped because a value did not fit (issue 11) ------------------------


def _implicit_element(tag: int, value: bytes) -> bytes:
    import struct

    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def test_dropped_tags_are_counted_as_dropped_by_rule_or_dropped_not_fit():
    leaf = item(CodeValue="X")
    for _ in range(16):
        leaf = item(CodeValue="X", ContentSequence=sequence(leaf))
    ds = instance()
    ds.ContentSequence = leaf.ContentSequence  # too deep: not fit
    ds.ICCProfile = b"\0" * 10  # OB: by rule
    ds.add_new(0x00091010, "OB", b"\1\2")  # a private OB: by rule
    ds.add_new(0x00090010, "LO", "ACME")  # its creator keeps the block valid
    ds.Rows, ds.Columns, ds.BitsAllocated = 1, 1, 16
    ds.PixelData = b"\0\0"  # by rule
    ds["PixelData"].VR = "OW"
    data = to_bytes(ds, ImplicitVRLittleEndian)
    # (0028,0106) "US or SS" of 3 bytes: a length its VR forbids, pydicom cannot convert it
    at = data.index(b"\xe0\x7f\x10\x00")
    data = data[:at] + _implicit_element(0x00280106, b"\1\2\3") + data[at:]
    flat = flatten_bytes(data)
    names = dropped(flat.row)
    assert {"ICCProfile", "Tag_00091010", "PixelData", "FileMetaInformationVersion"} <= set(names)
    assert ".".join(["ContentSequence"] * 16) in names and "SmallestImagePixelValue" in names
    assert flat.counts["dropped_by_rule"] == 4
    assert flat.counts["dropped_not_fit"] == 2
    assert flat.counts["dropped_tags"] == len(names) == 6


def test_a_value_too_large_for_a_row_is_dropped_unread_and_the_rest_kept():
    from schemas.convert import MAX_VALUE_BYTES

    ds = instance()
    ds.PatientID = "P1"
    ds.TextValue = "x" * (MAX_VALUE_BYTES + 2)  # UT, over the limit
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091010, "UT", "y" * (MAX_VALUE_BYTES + 2))  # a private one too
    ds.StudyDescription = "kept"
    fileobj = CountingFile(to_bytes(ds))
    header = read_header(fileobj)
    flat = flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred)
    assert fileobj.bytes_read < 1_000_000  # neither value was read
    assert "TextValue" not in flat.row and "TextValue" in dropped(flat.row)
    assert "Tag_00091010" in dropped(flat.row)
    assert flat.row["PatientID"] == "P1" and flat.row["StudyDescription"] == "kept"
    assert flat.counts["dropped_not_fit"] == 2 and flat.counts["dropped_by_rule"] == 1  # + FileMetaInformationVersion


def test_a_value_just_under_the_limit_is_exported():
    from schemas.convert import MAX_VALUE_BYTES

    ds = instance()
    ds.TextValue = "x" * MAX_VALUE_BYTES
    flat = flatten(ds)
    assert len(flat.row["TextValue"]) == MAX_VALUE_BYTES
    assert flat.counts["dropped_not_fit"] == 0


def test_values_past_the_rows_budget_are_dropped_so_a_row_stays_loadable():
    from pydicom.datadict import dictionary_VR

    from schemas.convert import MAX_ROW_VALUE_BYTES

    assert dictionary_VR(0x00409212) == "FD"  # RealWorldValueLUTData, VM 1-n
    ds = instance()
    ds.PatientID = "P1"
    data = to_bytes(ds, ImplicitVRLittleEndian)
    count = MAX_ROW_VALUE_BYTES // 4 // 8 + 1024  # under MAX_VALUE_BYTES, but ~4 JSON bytes per byte
    data += _implicit_element(0x00409212, bytes(8 * count))
    flat = flatten_bytes(data)
    assert "RealWorldValueLUTData" in dropped(flat.row) and "RealWorldValueLUTData" not in flat.row
    assert flat.row["PatientID"] == "P1" and flat.counts["dropped_not_fit"] == 1


# -- public elements stored as UN (issue 13) --------------------------------------------------


def _un_element(tag: int, value: bytes, order: str = "<") -> bytes:
    """An explicit VR element stored as UN (pydicom's writer would give it its dictionary VR)."""
    import struct

    return struct.pack(order + "HH2sHL", tag >> 16, tag & 0xFFFF, b"UN", 0, len(value)) + value


def test_a_public_un_value_is_little_endian_even_in_a_big_endian_file():
    import struct

    data = (to_bytes(instance(), ExplicitVRBigEndian)
            + _un_element(0x00181310, struct.pack("<4H", 0, 256, 256, 0), ">")  # AcquisitionMatrix
            + _un_element(0x00280010, struct.pack("<H", 512), ">"))  # Rows: PS3.5 §6.2.2
    flat = flatten_bytes(data)
    assert flat.row["Rows"] == 512
    assert flat.row["AcquisitionMatrix"] == [0, 256, 256, 0]


def test_a_public_sequence_stored_as_un_over_64_kib_is_read_and_parsed_as_items():
    uids = [f"1.2.826.0.1.3680043.10.1137.{i}" for i in range(2000)]
    items = b""
    for uid in uids:
        value = _implicit_element(0x0020000E, uid.encode() + b"\0" * (len(uid) % 2))
        items += _implicit_element(0xFFFEE000, value)
    assert len(items) > 64 * 1024  # skipped while parsing, read because it is exported
    flat = flatten_bytes(to_bytes(instance()) + _un_element(0x00081115, items))  # ReferencedSeriesSequence
    assert flat.row["ReferencedSeriesSequence"] == [{"SeriesInstanceUID": uid} for uid in uids]
    assert dropped(flat.row) == ["FileMetaInformationVersion"]


def test_a_public_un_value_that_does_not_parse_as_its_dictionary_vr_is_not_fit():
    data = (to_bytes(instance())
            + _un_element(0x00081115, b"\x01\x02\x03\x04")  # ReferencedSeriesSequence, but not items
            + _un_element(0x00280010, b"\x01\x02\x03"))  # Rows, three bytes
    flat = flatten_bytes(data)
    assert "ReferencedSeriesSequence" in dropped(flat.row)
    assert flat.row["OtherElements"] == [{"Tag": "Tag_00280010", "Data": ["010203"]}]
    assert flat.counts["dropped_not_fit"] == 1


def test_a_header_of_nested_sequence_items_gives_one_row_whatever_its_encoding():
    """An enhanced multi-frame header (bench/convert.py --multiframe): sequences and items
    of defined or undefined length, in each transfer syntax, are the same row."""

    def enhanced(undefined: bool) -> Dataset:
        ds = enhanced_multiframe(40, study="1.2.3", series="1.2.3.4", sop="1.2.3.4.5")
        return undefined_lengths(ds) if undefined else ds

    delimiter = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD) Sequence Delimitation Item, little endian
    assert to_bytes(enhanced(False)).count(delimiter) == 0
    assert to_bytes(enhanced(True)).count(delimiter) == 3 + 40 * 5  # every sequence, at every level
    meta = {"FileMetaInformationGroupLength", "TransferSyntaxUID"}  # they name the encoding
    rows = {
        (undefined, syntax): {name: value for name, value in flatten(enhanced(undefined), syntax).row.items()
                              if name not in meta}
        for undefined in (False, True)
        for syntax in (pydicom.uid.ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
    }
    first = rows[(False, pydicom.uid.ExplicitVRLittleEndian)]
    frames = first["PerFrameFunctionalGroupsSequence"]
    assert len(frames) == 40
    assert frames[39]["FrameContentSequence"] == [
        {"DimensionIndexValues": [1, 40], "StackID": "1", "InStackPositionNumber": 40,
         "FrameAcquisitionDateTime": "2020-01-01 12:00:00.000000+00:00"}]
    assert frames[39]["PlanePositionSequence"] == [{"ImagePositionPatient": ["0.0", "0.0", "20.0"]}]  # DS: text
    assert first["SharedFunctionalGroupsSequence"] == [
        {"PixelMeasuresSequence": [{"PixelSpacing": ["0.5", "0.5"], "SliceThickness": "1.0"}]}]
    for key, row in rows.items():
        assert row == first, key
