"""Rows completed against the table's schema: a REPEATED field is [] where absent, never NULL (SPEC §4)."""

from __future__ import annotations

from schemas.rows import with_empty_lists

SCHEMA = [
    {"name": "SOPInstanceUID", "type": "STRING", "mode": "NULLABLE"},
    {"name": "ImageType", "type": "STRING", "mode": "REPEATED"},
    {"name": "PatientName", "type": "RECORD", "mode": "NULLABLE", "fields": [
        {"name": "Alphabetic", "type": "RECORD", "mode": "NULLABLE", "fields": [
            {"name": "FamilyName", "type": "STRING", "mode": "NULLABLE"}]}]},
    {"name": "ReferencedImageSequence", "type": "RECORD", "mode": "REPEATED", "fields": [
        {"name": "ReferencedSOPInstanceUID", "type": "STRING", "mode": "NULLABLE"},
        {"name": "ReferencedFrameNumber", "type": "STRING", "mode": "REPEATED"},
        {"name": "OtherElements", "type": "RECORD", "mode": "REPEATED", "fields": [
            {"name": "Tag", "type": "STRING", "mode": "NULLABLE"},
            {"name": "Data", "type": "STRING", "mode": "REPEATED"}]}]},
    {"name": "OtherElements", "type": "RECORD", "mode": "REPEATED", "fields": [
        {"name": "Tag", "type": "STRING", "mode": "NULLABLE"},
        {"name": "Data", "type": "STRING", "mode": "REPEATED"}]},
]


def test_absent_repeated_fields_become_empty_lists_and_nullable_ones_stay_absent():
    assert with_empty_lists({"SOPInstanceUID": "1.2"}, SCHEMA) == {
        "SOPInstanceUID": "1.2", "ImageType": [], "ReferencedImageSequence": [], "OtherElements": []}


def test_a_repeated_field_held_as_none_becomes_an_empty_list():
    assert with_empty_lists({"ImageType": None}, SCHEMA)["ImageType"] == []


def test_repeated_fields_inside_records_and_items_are_filled_too():
    row = {
        "ReferencedImageSequence": [{"ReferencedSOPInstanceUID": "1.2.1"},
                                    {"ReferencedFrameNumber": ["3"], "OtherElements": [{"Tag": "Tag_00091001"}]}],
        "OtherElements": [{"Tag": "Tag_00191001", "Data": ["x"]}],
    }
    completed = with_empty_lists(row, SCHEMA)
    assert completed["ReferencedImageSequence"] == [
        {"ReferencedSOPInstanceUID": "1.2.1", "ReferencedFrameNumber": [], "OtherElements": []},
        {"ReferencedFrameNumber": ["3"], "OtherElements": [{"Tag": "Tag_00091001", "Data": []}]},
    ]
    assert completed["OtherElements"] == [{"Tag": "Tag_00191001", "Data": ["x"]}]


def test_values_present_are_kept_and_the_input_row_is_not_modified():
    row = {"ImageType": ["ORIGINAL", "PRIMARY"], "PatientName": {"Alphabetic": {"FamilyName": "Doe"}}}
    completed = with_empty_lists(row, SCHEMA)
    assert completed["ImageType"] == ["ORIGINAL", "PRIMARY"]
    assert completed["PatientName"] == {"Alphabetic": {"FamilyName": "Doe"}}
    assert "OtherElements" not in row
