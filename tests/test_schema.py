"""SPEC §3: the table's schema: union of fragments, order, limits, agreement with Google's export."""

from __future__ import annotations

import json
import math
import pathlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.destinations import Disposition
from pipeline.destinations.duckdb import DuckDBTable
from schemas.merge import (
    MAX_LEAF_FIELDS,
    SchemaConflictError,
    SchemaTooWideError,
    count_leaves,
    extend_schema,
    merge_fragments,
    schema_conflicts,
    to_bigquery_schema,
)
from tests.builders import field_map, flatten, instance, item, sequence

REFERENCE = pathlib.Path(__file__).resolve().parent / "reference" / "idc_dicom_metadata_schema.json"

# Fields whose type or mode differs from the reference table, each with its reason.
REFERENCE_EXCEPTIONS = {
    "SegmentSequence.SegmentAlgorithmName": (
        "VM changed from 1 to 1-n in a later DICOM edition (pydicom 3's dictionary); "
        "the reference table was made with the older VM"
    ),
}


def test_schema_agrees_with_the_healthcare_api_export_reference(bundled_instances):
    ours = field_map(to_bigquery_schema(merge_fragments(f.fragment for f in bundled_instances.values())))
    reference = field_map(json.loads(REFERENCE.read_text()))
    common = set(ours) & set(reference)
    assert len(common) > 500  # the comparison covers a real share of the schema
    differing = {path for path in common if ours[path] != reference[path]}
    assert differing == set(REFERENCE_EXCEPTIONS), {p: (ours[p], reference[p]) for p in differing}


def test_merge_is_a_union_of_fields(bundled_instances):
    fragments = [f.fragment for f in bundled_instances.values()]
    merged = merge_fragments(fragments)
    assert all(fragment <= merged for fragment in fragments)
    assert merged == frozenset().union(*fragments)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), chunks=st.integers(1, 8))
def test_merge_is_order_and_grouping_independent(bundled_instances, seed, chunks):
    fragments = [f.fragment for f in bundled_instances.values()]
    expected = to_bigquery_schema(merge_fragments(fragments))
    shuffled = fragments[:]
    random.Random(seed).shuffle(shuffled)
    # Merge in arbitrary groups, then merge the partial results: like workers and combiners.
    size = math.ceil(len(shuffled) / chunks)
    partials = [merge_fragments(shuffled[i : i + size]) for i in range(0, len(shuffled), size)]
    random.Random(seed + 1).shuffle(partials)
    assert to_bigquery_schema(merge_fragments(partials)) == expected


def test_field_order_is_standard_then_groups_then_private_sequences_then_other_then_dropped():
    ds = instance()
    ds.add_new(0x60000010, "US", 1)  # OverlayRows (repeating group)
    ds.add_new(0x00090010, "LO", "CREATOR")
    ds.add_new(0x00091010, "SQ", sequence(item(Modality="CT")))  # private sequence
    ds.add_new(0x00291010, "OB", b"\0\0")  # dropped
    ds.PatientID = "X"
    ds.Modality = "MR"
    names = [f["name"] for f in to_bigquery_schema(flatten(ds).fragment)]
    assert names[-4:] == ["OverlayRows", "Tag_00091010", "OtherElements", "DroppedTags"]
    standard = names[:-4]
    from pydicom.datadict import tag_for_keyword

    assert standard == sorted(standard, key=tag_for_keyword)
    assert standard[0] == "FileMetaInformationGroupLength"


def test_schema_json_is_what_bq_takes():
    schema = to_bigquery_schema(flatten(instance()).fragment)
    text = json.dumps(schema)
    for field in json.loads(text):
        assert set(field) <= {"name", "type", "mode", "fields"}
        assert field["mode"] in ("NULLABLE", "REPEATED")


def test_too_many_leaf_fields_stop_with_the_widest_columns_named():
    fragment = set()
    wide = (3, 0x00091010, "Tag_00091010", "RECORD", "REPEATED")
    for i in range(MAX_LEAF_FIELDS + 1):
        fragment.add((wide, (0, i, f"Tag_0009{i:04X}", "STRING", "NULLABLE")))
    with pytest.raises(SchemaTooWideError, match=r"10,001 leaf fields.*Tag_00091010 \(10,001\)"):
        to_bigquery_schema(fragment)


def test_a_field_defined_twice_differently_is_a_conflict():
    a = frozenset({((0, 1, "X", "STRING", "NULLABLE"),)})
    b = frozenset({((0, 1, "X", "INTEGER", "NULLABLE"),)})
    with pytest.raises(SchemaConflictError, match="field X is"):
        to_bigquery_schema(merge_fragments([a, b]))


def test_conflicts_with_an_existing_table_list_type_and_mode_differences():
    ours = to_bigquery_schema(flatten(instance()).fragment)
    existing = [
        {"name": "SOPInstanceUID", "type": "INT64", "mode": "NULLABLE"},
        {"name": "StudyInstanceUID", "type": "STRING", "mode": "REPEATED"},
        {"name": "SeriesInstanceUID", "type": "STRING"},
        {"name": "Unrelated", "type": "STRING"},
    ]
    conflicts = schema_conflicts(ours, existing)
    assert conflicts == [
        "SOPInstanceUID: the table has INTEGER NULLABLE, the export needs STRING NULLABLE",
        "StudyInstanceUID: the table has STRING REPEATED, the export needs STRING NULLABLE",
    ]
    nested_new = [{"name": "S", "type": "RECORD", "mode": "REPEATED", "fields": [{"name": "A", "type": "DATE", "mode": "NULLABLE"}]}]
    nested_old = [{"name": "S", "type": "RECORD", "mode": "REPEATED", "fields": [{"name": "A", "type": "STRING", "mode": "NULLABLE"}]}]
    assert schema_conflicts(nested_new, nested_old) == ["S.A: the table has STRING NULLABLE, the export needs DATE NULLABLE"]


def test_extending_a_schema_keeps_old_fields_in_place_and_appends_new_ones():
    old = [{"name": "A", "type": "STRING", "mode": "NULLABLE"},
           {"name": "S", "type": "RECORD", "mode": "REPEATED", "fields": [{"name": "X", "type": "STRING", "mode": "NULLABLE"}]}]
    new = [{"name": "B", "type": "STRING", "mode": "NULLABLE"},
           {"name": "S", "type": "RECORD", "mode": "REPEATED", "fields": [{"name": "Y", "type": "STRING", "mode": "NULLABLE"}]},
           {"name": "A", "type": "STRING", "mode": "NULLABLE"}]
    assert extend_schema(old, new) == [
        old[0],
        {"name": "S", "type": "RECORD", "mode": "REPEATED", "fields": [
            {"name": "X", "type": "STRING", "mode": "NULLABLE"}, {"name": "Y", "type": "STRING", "mode": "NULLABLE"}]},
        new[0],
    ]
    assert count_leaves(extend_schema(old, new)) == 4


def _normalise(value):
    """A value read back from DuckDB, in the row's JSON form; NULLs and empty lists dropped."""
    import datetime as dt

    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items() if v is not None and v != []}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.timezone.utc).isoformat(sep=" ", timespec="microseconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dt.time):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def test_rows_of_all_bundled_files_load_into_duckdb_with_the_merged_schema_and_read_back_equal(
    bundled_instances, tmp_path
):
    schema = to_bigquery_schema(merge_fragments(f.fragment for f in bundled_instances.values()))
    rows_file = tmp_path / "rows.json"
    with rows_file.open("w") as out:
        for flattened in bundled_instances.values():
            out.write(json.dumps(flattened.row) + "\n")
    table = DuckDBTable(str(tmp_path / "db.duckdb"), "instances")
    table.write(schema, [str(rows_file)], Disposition.DEFAULT)
    assert field_map(table.schema()) == field_map(schema)
    got = sorted((json.dumps(_normalise(r), sort_keys=True) for r in table.read_rows()))
    want = sorted(json.dumps(_normalise(f.row), sort_keys=True) for f in bundled_instances.values())
    assert len(got) == len(bundled_instances)
    assert got == want
