"""pipeline/spool.py: rows spooled to files while read, completed with the merged schema."""

import apache_beam as beam
from apache_beam.testing import test_pipeline as beam_testing
from apache_beam.testing.util import assert_that, equal_to

from pipeline.spool import CompleteRows
from schemas.rows import with_empty_lists

SCHEMA = [
    {"name": "SOPInstanceUID", "type": "STRING", "mode": "NULLABLE"},
    {"name": "Tags", "type": "STRING", "mode": "REPEATED"},
    {"name": "Seq", "type": "RECORD", "mode": "REPEATED", "fields": [
        {"name": "V", "type": "STRING", "mode": "REPEATED"},
        {"name": "W", "type": "STRING", "mode": "NULLABLE"},
    ]},
]


def rows(count: int) -> list[dict]:
    """Rows sharing equal strings and lists (what a pickle memo would share), some
    lacking the REPEATED fields."""
    shared = ["same", "same"]
    made = []
    for index in range(count):
        row = {"SOPInstanceUID": f"1.2.{index}"}
        if index % 3:
            row["Tags"] = shared if index % 2 else [f"t{index}", "same"]
        if index % 5 == 0:
            row["Seq"] = [{"W": "same"}, {"V": [f"v{index}"], "W": None}]
        made.append(row)
    return made


def test_every_row_comes_back_exactly_once_completed(tmp_path):
    spool = tmp_path / "spool"
    given = rows(250)
    with beam_testing.TestPipeline(runner="FnApiRunner") as p:
        schema = p | "Schema" >> beam.Create([SCHEMA])
        completed = p | beam.Create(given) | CompleteRows(schema, str(spool), rows_per_file=40)
        assert_that(completed, equal_to([with_empty_lists(row, SCHEMA) for row in given]))
    assert len(list(spool.iterdir())) >= 250 // 40  # spooled in files of at most 40 rows


def test_a_completed_row_never_lacks_a_repeated_field(tmp_path):
    with beam_testing.TestPipeline(runner="FnApiRunner") as p:
        schema = p | "Schema" >> beam.Create([SCHEMA])
        completed = p | beam.Create(rows(30)) | CompleteRows(schema, str(tmp_path / "spool"))
        lacking = completed | beam.FlatMap(
            lambda row: [row["SOPInstanceUID"]] if row["Tags"] is None or row["Seq"] is None
            or any(item["V"] is None for item in row["Seq"]) else []
        )
        assert_that(lacking, equal_to([]))
