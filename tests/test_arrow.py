"""schemas.arrow: BigQuery JSON schema and rows → Arrow, as BigQuery's Parquet conversion reads them back."""

from __future__ import annotations

import datetime as dt
import math

import pyarrow as pa
import pytest

from schemas.arrow import arrow_schema, to_arrow_table

UTC = dt.timezone.utc


def field(name, bq_type, mode="NULLABLE", fields=None):
    out = {"name": name, "type": bq_type, "mode": mode}
    if fields is not None:
        out["fields"] = fields
    return out


class TestTypes:
    @pytest.mark.parametrize(
        "bq_type, arrow",
        [
            ("STRING", pa.string()),
            ("INTEGER", pa.int64()),
            ("FLOAT", pa.float64()),
            ("DATE", pa.date32()),
            ("TIME", pa.time64("us")),
            ("TIMESTAMP", pa.timestamp("us", tz="UTC")),
        ],
    )
    def test_scalar(self, bq_type, arrow):
        schema = arrow_schema([field("X", bq_type)])
        assert schema.field("X").type == arrow
        assert schema.field("X").nullable

    def test_repeated_is_a_list_that_is_never_null(self):
        x = arrow_schema([field("X", "STRING", "REPEATED")]).field("X")
        assert x.type == pa.list_(pa.field("element", pa.string(), nullable=False))
        assert not x.nullable

    def test_record_is_a_struct_in_field_order(self):
        schema = arrow_schema([field("R", "RECORD", fields=[field("B", "STRING"), field("A", "INTEGER")])])
        assert schema.field("R").type == pa.struct([pa.field("B", pa.string()), pa.field("A", pa.int64())])

    def test_repeated_record(self):
        x = arrow_schema([field("S", "RECORD", "REPEATED", [field("V", "FLOAT", "REPEATED")])]).field("S")
        inner = pa.list_(pa.field("element", pa.float64(), nullable=False))
        assert x.type == pa.list_(pa.field("element", pa.struct([pa.field("V", inner, nullable=False)]),
                                           nullable=False))


class TestValues:
    @pytest.mark.parametrize(
        "bq_type, json_value, expected",
        [
            ("STRING", "CT", "CT"),
            ("INTEGER", 65536, 65536),
            ("FLOAT", 1.5, 1.5),
            ("FLOAT", "Infinity", math.inf),
            ("FLOAT", "-Infinity", -math.inf),
            ("DATE", "2004-01-19", dt.date(2004, 1, 19)),
            ("TIME", "07:27:30.000000", dt.time(7, 27, 30)),
            ("TIME", "23:59:59.999999", dt.time(23, 59, 59, 999999)),
            ("TIMESTAMP", "2020-01-31 13:45:00.000000+00:00", dt.datetime(2020, 1, 31, 13, 45, tzinfo=UTC)),
            ("TIMESTAMP", "2020-01-31 13:45:00.500000+02:00", dt.datetime(2020, 1, 31, 11, 45, 0, 500000, tzinfo=UTC)),
            ("TIMESTAMP", "2020-01-31 13:45:00", dt.datetime(2020, 1, 31, 13, 45, tzinfo=UTC)),
            ("TIMESTAMP", "0001-01-01 00:00:00.000000+00:00", dt.datetime(1, 1, 1, tzinfo=UTC)),
        ],
    )
    def test_value(self, bq_type, json_value, expected):
        table = to_arrow_table([{"X": json_value}], [field("X", bq_type)])
        assert table.to_pylist() == [{"X": expected}]

    def test_nan(self):
        table = to_arrow_table([{"X": "NaN"}], [field("X", "FLOAT")])
        assert math.isnan(table.column("X")[0].as_py())

    def test_timestamps_are_stored_in_utc(self):
        table = to_arrow_table([{"T": "2020-01-01 00:30:00.000000-05:00"}], [field("T", "TIMESTAMP")])
        assert table.column("T").cast(pa.int64())[0].as_py() == int(
            dt.datetime(2020, 1, 1, 5, 30, tzinfo=UTC).timestamp() * 1_000_000
        )

    def test_absent_nullable_is_null(self):
        assert to_arrow_table([{}], [field("X", "STRING")]).to_pylist() == [{"X": None}]

    def test_absent_repeated_is_an_empty_list(self):
        table = to_arrow_table([{}, {"X": None}], [field("X", "DATE", "REPEATED")])
        assert table.to_pylist() == [{"X": []}, {"X": []}]
        assert table.column("X").null_count == 0

    def test_repeated_inside_records_is_an_empty_list(self):
        schema = [
            field("S", "RECORD", "REPEATED", [field("Tag", "STRING"), field("Data", "STRING", "REPEATED")]),
            field("P", "RECORD", fields=[field("Q", "INTEGER", "REPEATED")]),
        ]
        rows = [{"S": [{"Tag": "Tag_00091001"}, {"Data": ["a", "b"]}], "P": {}}]
        assert to_arrow_table(rows, schema).to_pylist() == [
            {"S": [{"Tag": "Tag_00091001", "Data": []}, {"Tag": None, "Data": ["a", "b"]}], "P": {"Q": []}}
        ]

    def test_values_inside_repeated_records_are_converted(self):
        schema = [field("S", "RECORD", "REPEATED", [field("D", "DATE", "REPEATED"), field("F", "FLOAT")])]
        rows = [{"S": [{"D": ["2001-02-03"], "F": "-Infinity"}]}]
        assert to_arrow_table(rows, schema).to_pylist() == [{"S": [{"D": [dt.date(2001, 2, 3)], "F": -math.inf}]}]

    def test_keys_outside_the_schema_are_ignored(self):
        assert to_arrow_table([{"X": "a", "Y": 1}], [field("X", "STRING")]).to_pylist() == [{"X": "a"}]

    def test_typed_values_pass_unchanged(self):
        """Rows read back from Parquet (dates, aware datetimes) convert again: rewriting a shard."""
        schema = [field("D", "DATE"), field("T", "TIMESTAMP"), field("S", "STRING", "REPEATED")]
        row = {"D": dt.date(2000, 1, 1), "T": dt.datetime(2000, 1, 1, tzinfo=UTC), "S": ["x"]}
        assert to_arrow_table([row], schema).to_pylist() == [row]

    def test_no_rows_keeps_the_schema(self):
        table = to_arrow_table([], [field("X", "STRING", "REPEATED")])
        assert table.num_rows == 0 and table.schema.names == ["X"]
