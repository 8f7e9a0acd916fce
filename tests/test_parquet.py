"""The Parquet destination: a folder (local or Cloud Storage emulator) written by a real Beam pipeline."""

from __future__ import annotations

import datetime as dt
import glob
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from typing import NamedTuple

import apache_beam as beam
import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.destinations import ERRORS_SCHEMA, DestinationError, Disposition
from pipeline.destinations.parquet import (
    MANIFEST_FILE,
    SCHEMA_FILE,
    ParquetTable,
    WriteParquetShards,
    load_parquet_into_duckdb,
)
from schemas.convert import flatten_instance
from schemas.merge import merge_fragments, to_bigquery_schema
from tests import builders
from transforms.header import read_header

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = sorted(glob.glob(os.path.join(REPO, "samples", "dicom", "**", "*.dcm"), recursive=True))
RUN_STARTED = "2026-01-02 03:04:05.000000+00:00"


class Outputs(NamedTuple):
    rows: beam.PCollection
    schema: beam.PCollection
    dead_letters: beam.PCollection


def converted(paths):
    """(rows, schema) of files, converted by schemas.convert as the pipeline does."""
    flattened = []
    for path in paths:
        with open(path, "rb") as handle:
            header = read_header(handle)
        flattened.append(flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag,
                                          read_deferred=header.read_deferred))
    schema = to_bigquery_schema(merge_fragments(f.fragment for f in flattened))
    return [f.row for f in flattened], schema


def dead_letter(path):
    return {"path": path, "stage": "read", "error_type": "NotDicomError", "message": "no DICM prefix",
            "run_started": RUN_STARTED}


def export(table: ParquetTable, rows, schema, disposition=Disposition.DEFAULT, dead_letters=(), max_failures=None,
           run_id="run", preflight=True):
    """preflight, then a real FnApiRunner pipeline that writes ``rows`` with ``attach``."""
    if preflight:
        table.preflight(disposition)
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        outputs = Outputs(
            rows=p | "Rows" >> beam.Create(rows, reshuffle=False),
            schema=p | "Schema" >> beam.Create([schema]),
            dead_letters=p | "DeadLetters" >> beam.Create(list(dead_letters), reshuffle=False),
        )
        table.attach_run(outputs, disposition, run_id, max_failures)
    table.finish()


def field(name, bq_type, mode="NULLABLE", fields=None):
    out = {"name": name, "type": bq_type, "mode": mode}
    if fields is not None:
        out["fields"] = fields
    return out


SCHEMA_A = [field("SOPInstanceUID", "STRING"), field("Tags", "STRING", "REPEATED")]
SCHEMA_B = [field("SOPInstanceUID", "STRING"), field("Tags", "STRING", "REPEATED"), field("N", "INTEGER"),
            field("Seq", "RECORD", "REPEATED", [field("V", "DATE")])]


def rows_a(*uids):
    return [{"SOPInstanceUID": uid, "Tags": [uid]} for uid in uids]


# -- reading a folder back -----------------------------------------------------------------

def _gs_to_bytes(path):
    with FileSystems.open(path) as handle:
        return handle.read()


def read_table(table: ParquetTable, errors=False):
    """The folder's rows, read as a user would: DuckDB's glob and pyarrow.dataset locally;
    on Cloud Storage, every *.parquet object (which must be exactly the manifest's files)."""
    path = table.errors_path if errors else table.path
    if table.local:
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        relation = con.sql(f"SELECT * FROM read_parquet('{path}/**/*.parquet', union_by_name = true)")
        duck = [dict(zip(relation.columns, values)) for values in relation.fetchall()]
        arrow = pads.dataset(path, format="parquet").to_table().to_pylist()
        assert sorted(map(repr, duck)) == sorted(map(repr, arrow))
        return arrow
    objects = sorted(m.path for m in FileSystems.match([path + "/**"])[0].metadata_list)
    shards = [p for p in objects if p.endswith(".parquet")]
    assert shards == table.files(errors=errors)
    assert sorted(objects) == sorted(shards + [f"{path}/{SCHEMA_FILE}", f"{path}/{MANIFEST_FILE}"])
    rows = []
    for shard in shards:
        rows += pq.read_table(io.BytesIO(_gs_to_bytes(shard))).to_pylist()
    return rows


def schema_json(table: ParquetTable):
    if table.local:
        with open(os.path.join(table.path, SCHEMA_FILE)) as handle:
            return json.load(handle)
    return json.loads(_gs_to_bytes(table.path + "/" + SCHEMA_FILE))


def uids(table):
    return sorted(row["SOPInstanceUID"] for row in read_table(table))


@pytest.fixture(params=["local", "gcs"])
def table(request, tmp_path):
    if request.param == "local":
        return ParquetTable.parse(f"parquet://{tmp_path}/table")
    _client, bucket = request.getfixturevalue("gcs_bucket")
    return ParquetTable.parse(f"parquet+gs://{bucket.name}/exports/table")


# -- URIs -------------------------------------------------------------------------------------

class TestParse:
    def test_local_folder_is_absolute(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        table = ParquetTable.parse("parquet://out")
        assert table.path == str(tmp_path / "out")
        assert str(table) == f"parquet://{tmp_path}/out"
        assert table.errors_uri() == f"parquet://{tmp_path}/out_errors"

    def test_cloud_storage_folder(self):
        table = ParquetTable.parse("parquet+gs://my-bucket/dicom/table/")
        assert table.path == "gs://my-bucket/dicom/table"
        assert table.errors_uri() == "parquet+gs://my-bucket/dicom/table_errors"

    @pytest.mark.parametrize("uri", ["parquet://", "parquet+gs://bucket", "parquet+gs://B/x", "parquet:/x",
                                     "parquet://no/such/parent/folder"])
    def test_bad_uri_says_what_it_looks_like(self, uri):
        with pytest.raises(DestinationError, match="parquet"):
            ParquetTable.parse(uri)

    def test_local_folder_needs_a_local_runner(self, tmp_path):
        ParquetTable.parse(f"parquet://{tmp_path}/t").check_runner(local=True)
        ParquetTable.parse("parquet+gs://bucket/t").check_runner(local=False)
        with pytest.raises(ValueError, match="parquet\\+gs://"):
            ParquetTable.parse(f"parquet://{tmp_path}/t").check_runner(local=False)


# -- the disposition table (SPEC §4), locally and on Cloud Storage -------------------------------

class TestDispositions:
    def test_absent_table_is_created(self, table):
        export(table, rows_a("1", "2"), SCHEMA_A, Disposition.WRITE_EMPTY)
        assert uids(table) == ["1", "2"]
        assert schema_json(table) == SCHEMA_A

    def test_overwrite_table_replaces(self, table):
        export(table, rows_a("1", "2"), SCHEMA_A)
        export(table, [{"SOPInstanceUID": "3", "N": 7}], SCHEMA_B, Disposition.OVERWRITE, run_id="two")
        assert uids(table) == ["3"]
        assert schema_json(table) == SCHEMA_B

    def test_existing_table_without_option_is_an_error(self, table):
        export(table, [], SCHEMA_A)  # an empty table still exists
        with pytest.raises(DestinationError, match="already exists"):
            table.preflight(Disposition.DEFAULT)

    def test_write_empty_on_an_empty_table_succeeds(self, table):
        export(table, [], SCHEMA_A)
        assert read_table(table) == []
        export(table, rows_a("1"), SCHEMA_A, Disposition.WRITE_EMPTY, run_id="two")
        assert uids(table) == ["1"]

    def test_write_empty_on_a_table_with_rows_is_an_error_and_leaves_it(self, table):
        export(table, rows_a("1"), SCHEMA_A)
        before = table.files()
        with pytest.raises(DestinationError, match="not empty"):
            export(table, rows_a("2"), SCHEMA_A, Disposition.WRITE_EMPTY, run_id="two")
        assert table.files() == before and uids(table) == ["1"]

    def test_the_state_is_checked_again_before_the_commit(self, table):
        table.preflight(Disposition.WRITE_EMPTY)  # absent now
        export(ParquetTable(table.path), rows_a("1"), SCHEMA_A)  # another run creates it meanwhile
        before = table.files()
        with pytest.raises(Exception, match="not empty"):
            export(table, rows_a("2"), SCHEMA_A, Disposition.WRITE_EMPTY, run_id="two", preflight=False)
        assert table.files() == before and uids(table) == ["1"]

    def test_write_append_adds_rows_and_widens_every_shard(self, table):
        export(table, rows_a("1", "2"), SCHEMA_A)
        export(table, [{"SOPInstanceUID": "3", "N": 7, "Seq": [{"V": "2001-02-03"}]}], SCHEMA_B,
               Disposition.WRITE_APPEND, run_id="two")
        assert schema_json(table) == SCHEMA_B
        rows = sorted(read_table(table), key=lambda r: r["SOPInstanceUID"])
        assert rows == [
            {"SOPInstanceUID": "1", "Tags": ["1"], "N": None, "Seq": []},
            {"SOPInstanceUID": "2", "Tags": ["2"], "N": None, "Seq": []},
            {"SOPInstanceUID": "3", "Tags": [], "N": 7, "Seq": [{"V": dt.date(2001, 2, 3)}]},
        ]
        for shard in table.files():  # every shard carries the whole schema
            with FileSystems.open(shard) as handle:
                assert pq.ParquetFile(io.BytesIO(handle.read())).schema_arrow.names == [f["name"] for f in SCHEMA_B]

    def test_write_append_without_new_fields_keeps_the_old_shards(self, table):
        export(table, rows_a("1"), SCHEMA_A)
        first = table.files()
        export(table, rows_a("2"), SCHEMA_A, Disposition.WRITE_APPEND, run_id="two")
        assert uids(table) == ["1", "2"]
        assert set(first) < set(table.files())

    def test_write_append_with_a_conflicting_field_writes_nothing(self, table):
        export(table, rows_a("1"), SCHEMA_A)
        before = table.files()
        conflicting = [field("SOPInstanceUID", "INTEGER")]
        with pytest.raises(Exception, match="SOPInstanceUID: the table has STRING NULLABLE"):
            export(table, [{"SOPInstanceUID": 5}], conflicting, Disposition.WRITE_APPEND, run_id="two")
        assert table.files() == before and uids(table) == ["1"]
        table.preflight(Disposition.WRITE_APPEND)  # the next run finds no leftovers
        assert uids(table) == ["1"]

    def test_write_truncate_replaces_rows_and_schema(self, table):
        export(table, [{"SOPInstanceUID": "1", "N": 1}], SCHEMA_B)
        export(table, rows_a("2"), SCHEMA_A, Disposition.WRITE_TRUNCATE, run_id="two")
        assert uids(table) == ["2"]
        assert schema_json(table) == SCHEMA_A

    def test_export_without_instances_creates_and_truncates(self, table):
        export(table, rows_a("1"), SCHEMA_A)
        export(table, [], SCHEMA_B, Disposition.WRITE_TRUNCATE, run_id="two")
        assert read_table(table) == []
        assert schema_json(table) == SCHEMA_B
        assert len(table.files()) == 1  # one empty shard carries the schema for readers


class TestDeadLetters:
    def test_dead_letters_go_to_the_errors_folder(self, table):
        export(table, rows_a("1"), SCHEMA_A, dead_letters=[dead_letter("a")])
        errors = read_table(table, errors=True)
        assert [e["path"] for e in errors] == ["a"]
        assert errors[0]["run_started"] == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
        assert schema_json(ParquetTable(table.errors_path)) == ERRORS_SCHEMA

    def test_append_appends_dead_letters_and_truncate_replaces_them(self, table):
        export(table, rows_a("1"), SCHEMA_A, dead_letters=[dead_letter("a")])
        export(table, rows_a("2"), SCHEMA_A, Disposition.WRITE_APPEND, dead_letters=[dead_letter("b")], run_id="2")
        assert sorted(e["path"] for e in read_table(table, errors=True)) == ["a", "b"]
        export(table, rows_a("3"), SCHEMA_A, Disposition.WRITE_TRUNCATE, dead_letters=[dead_letter("c")], run_id="3")
        assert [e["path"] for e in read_table(table, errors=True)] == ["c"]

    def test_more_failures_than_allowed_write_nothing(self, table):
        export(table, rows_a("1"), SCHEMA_A)
        with pytest.raises(Exception, match="more than --max-failures 0"):
            export(table, rows_a("2"), SCHEMA_A, Disposition.WRITE_APPEND, dead_letters=[dead_letter("a")],
                   max_failures=0, run_id="two")
        assert uids(table) == ["1"]


# -- what is in the files ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def samples():
    return converted(SAMPLES)


def canonical(value):
    """NULLs and empty lists dropped: schemas.convert leaves most of them out of a row."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items() if v is not None and v != []}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def json_form(value):
    """A value read back from Parquet in the BigQuery JSON form schemas.convert emits."""
    if isinstance(value, dict):
        return {k: json_form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_form(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat(sep=" ", timespec="microseconds")
    if isinstance(value, dt.time):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


class TestContent:
    def test_rows_read_back_equal_the_converted_rows(self, samples, tmp_path):
        rows, schema = samples
        table = ParquetTable.parse(f"parquet://{tmp_path}/t")
        export(table, rows, schema)
        back = sorted((canonical(json_form(r)) for r in read_table(table)), key=lambda r: r["SOPInstanceUID"])
        assert back == sorted(map(canonical, rows), key=lambda r: r["SOPInstanceUID"])
        assert schema_json(table) == schema

    def test_repeated_fields_are_empty_lists_never_null(self, samples, tmp_path):
        rows, schema = samples
        table = ParquetTable.parse(f"parquet://{tmp_path}/t")
        export(table, rows, schema)
        con = duckdb.connect()
        nulls = {
            f["name"]: con.execute(f"SELECT count(*) FROM read_parquet('{tmp_path}/t/*.parquet') "
                               f"WHERE \"{f['name']}\" IS NULL").fetchall()[0][0]
            for f in schema if f["mode"] == "REPEATED"
        }
        assert set(nulls.values()) == {0}, nulls
        assert "OtherElements" in nulls  # absent from most sample rows
        lengths = con.execute(
            f"SELECT avg(len(OtherElements)) FROM read_parquet('{tmp_path}/t/*.parquet')").fetchall()[0][0]
        assert lengths == sum(len(r.get("OtherElements", [])) for r in rows) / len(rows)

    def test_parquet_schema_maps_to_schema_json_by_bigquerys_conversion(self, samples, tmp_path):
        """BigQuery's documented Parquet conversion, with list inference: logical types,
        and a 3-level LIST (group (LIST) > repeated group list > element) is REPEATED."""
        rows, schema = samples
        table = ParquetTable.parse(f"parquet://{tmp_path}/t")
        export(table, rows, schema)
        for shard in table.files():
            root = pq.ParquetFile(shard).metadata.schema.to_arrow_schema()
            assert bigquery_from_parquet(pq.ParquetFile(shard).schema) == schema_json(table), shard
            assert root.names == [f["name"] for f in schema]

    def test_timestamps_are_adjusted_to_utc(self, tmp_path):
        ds = builders.instance()
        ds.AcquisitionDateTime = "20200131234500.5-0500"
        ds.StudyDate = "20200131"
        ds.StudyTime = "2345"
        flattened = builders.flatten(ds)
        schema = to_bigquery_schema(flattened.fragment)
        table = ParquetTable.parse(f"parquet://{tmp_path}/t")
        export(table, [flattened.row], schema)
        parquet = pq.ParquetFile(table.files()[0])
        columns = [parquet.schema.column(i) for i in range(len(parquet.schema))]
        [column] = [c for c in columns if c.path == "AcquisitionDateTime"]
        logical = json.loads(column.logical_type.to_json())
        assert (logical["Type"], logical["isAdjustedToUTC"], logical["timeUnit"]) == ("Timestamp", True, "microseconds")
        [row] = parquet.read().to_pylist()
        assert row["AcquisitionDateTime"] == dt.datetime(2020, 2, 1, 4, 45, 0, 500000, tzinfo=dt.timezone.utc)
        assert row["StudyDate"] == dt.date(2020, 1, 31) and row["StudyTime"] == dt.time(23, 45)
        con = duckdb.connect()
        con.execute("SET TimeZone = 'America/New_York'")
        instant = con.execute(
            f"SELECT epoch_us(AcquisitionDateTime) FROM read_parquet('{table.files()[0]}')").fetchall()[0][0]
        assert instant == 1580532300500000  # 2020-02-01 04:45:00.5 UTC, whatever the reader's zone


_LOGICAL = {  # (physical, logical) → BigQuery type, from BigQuery's "Parquet conversions" table
    ("BINARY", "String"): "STRING",
    ("INT64", ""): "INTEGER",
    ("DOUBLE", ""): "FLOAT",
    ("BOOLEAN", ""): "BOOLEAN",
    ("INT32", "Date"): "DATE",
    ("INT64", "Time"): "TIME",
    ("INT64", "Timestamp(isAdjustedToUTC=true)"): "TIMESTAMP",
    ("INT64", "Timestamp(isAdjustedToUTC=false)"): "DATETIME",
}
_NODE = re.compile(  # e.g. "optional int64 field_id=-1 T (Timestamp(isAdjustedToUTC=true, timeUnit=...));"
    r"(required|optional|repeated) (\w+) (?:field_id=-?\d+ )?(\S+?)"
    r"(?: \((\w+)(?:\((isAdjustedToUTC=\w+)[^)]*\))?\))?( \{|;)"
)


def bigquery_from_parquet(parquet_schema):
    """BigQuery's Parquet → BigQuery schema conversion (docs: loading-data-cloud-storage-parquet,
    "Parquet conversions" and list inference), over the Parquet schema tree pyarrow prints."""
    stack = [[]]
    for line in str(parquet_schema).splitlines()[2:-1]:
        text = line.strip()
        if text == "}":
            stack.pop()
            continue
        repetition, physical, name, logical, utc, opens = _NODE.fullmatch(text).groups()
        logical = (logical or "") + (f"({utc})" if logical == "Timestamp" else "")
        node = {"name": name, "repetition": repetition, "physical": physical.upper(), "logical": logical,
                "children": []}
        stack[-1].append(node)
        if opens == " {":
            stack.append(node["children"])
    return [_convert(node) for node in stack[0]]


def _convert(node):
    mode = "REQUIRED" if node["repetition"] == "required" else "NULLABLE"
    if node["logical"] == "List":  # the standard 3-level list
        [middle] = node["children"]
        assert (middle["repetition"], middle["name"]) == ("repeated", "list"), node
        [element] = middle["children"]
        assert element["name"] == "element" and element["repetition"] != "repeated"
        return {**_convert(element), "name": node["name"], "mode": "REPEATED"}
    assert node["repetition"] != "repeated", node  # only inside a LIST
    if node["physical"] == "GROUP":
        return {"name": node["name"], "type": "RECORD", "mode": mode,
                "fields": [_convert(child) for child in node["children"]]}
    return {"name": node["name"], "type": _LOGICAL[(node["physical"], node["logical"])], "mode": mode}


# -- the Beam writer on its own, and DuckDB staging ------------------------------------------

class TestWriteParquetShards:
    def test_row_groups_and_files_per_bundle(self, tmp_path):
        rows = [{"SOPInstanceUID": str(i), "Tags": ["x"] * (i % 3)} for i in range(25)]
        with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
            schema = p | "Schema" >> beam.Create([SCHEMA_B])
            shards = (p | beam.Create(rows, reshuffle=False)
                      | WriteParquetShards(str(tmp_path / "out"), schema, rows_per_row_group=10, rows_per_file=20))
            paths = shards | beam.combiners.ToList()
        files = sorted(glob.glob(str(tmp_path / "out" / "*.parquet")))
        assert [pq.ParquetFile(f).metadata.num_rows for f in files] in ([20, 5], [5, 20])
        assert sorted(pq.ParquetFile(f).metadata.num_row_groups for f in files) == [1, 2]
        back = [r for f in files for r in pq.read_table(f).to_pylist()]
        assert sorted(back, key=lambda r: int(r["SOPInstanceUID"])) == [
            {**row, "N": None, "Seq": []} for row in rows
        ]
        del paths

    def test_writes_to_cloud_storage(self, gcs_bucket):
        _client, bucket = gcs_bucket
        folder = f"gs://{bucket.name}/staging"
        with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
            p | beam.Create(rows_a("1", "2"), reshuffle=False) | WriteParquetShards(folder, SCHEMA_A)
        [shard] = [m.path for m in FileSystems.match([folder + "/*.parquet"])[0].metadata_list]
        assert pq.read_table(io.BytesIO(_gs_to_bytes(shard))).to_pylist() == rows_a("1", "2")

    def test_load_parquet_into_duckdb_keeps_types_and_utc(self, samples, tmp_path):
        """Staging rows as Parquet gives the same DuckDB rows as the NDJSON load, with [] for
        absent REPEATED fields, in any session time zone."""
        from pipeline.destinations.duckdb import DuckDBTable, duckdb_type, quote

        rows, schema = samples
        table = ParquetTable.parse(f"parquet://{tmp_path}/t")
        export(table, rows, schema)
        ndjson = tmp_path / "rows.json"
        ndjson.write_text("".join(json.dumps(r) + "\n" for r in rows))
        reference = DuckDBTable(str(tmp_path / "ref.duckdb"), "t")
        reference.write(schema, [str(ndjson)], Disposition.DEFAULT)

        con = duckdb.connect(str(tmp_path / "p.duckdb"))
        con.execute("SET TimeZone = 'Asia/Tokyo'")
        columns = ", ".join(f"{quote(f['name'])} {duckdb_type(f)}" for f in schema)
        con.execute(f"CREATE TABLE t ({columns})")
        load_parquet_into_duckdb(con, "t", schema, table.files())
        assert con.execute("SELECT current_setting('TimeZone')").fetchall()[0][0] == "Asia/Tokyo"
        relation = con.table("t")
        loaded = [dict(zip(relation.columns, values)) for values in relation.fetchall()]
        con.close()
        repeated = [f["name"] for f in schema if f["mode"] == "REPEATED"]
        assert all(row[name] is not None for row in loaded for name in repeated)

        def key(row):
            return row["SOPInstanceUID"]

        assert sorted(map(canonical, loaded), key=key) == sorted(map(canonical, reference.read_rows()), key=key)


# -- failed and killed runs ---------------------------------------------------------------------

_KILLED_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from pipeline.destinations import Disposition
    from pipeline.destinations.parquet import ParquetTable
    from tests.test_parquet import SCHEMA_A, Outputs

    table = ParquetTable.parse({uri!r})
    table.preflight(Disposition.WRITE_TRUNCATE)
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        rows = (p | beam.Create(range(40)) | beam.FlatMap(
            lambda i: ({{"SOPInstanceUID": f"new-{{i}}-{{j}}", "Tags": ["x"] * 20}} for j in range(100_000))))
        outputs = Outputs(rows, p | "Schema" >> beam.Create([SCHEMA_A]), p | "None" >> beam.Create([]))
        table.attach_run(outputs, Disposition.WRITE_TRUNCATE, "killed", None)
""")


class TestAtomicity:
    def test_a_killed_run_leaves_the_old_folder_whole(self, tmp_path):
        table = ParquetTable.parse(f"parquet://{tmp_path}/t")
        export(table, rows_a("1", "2"), SCHEMA_A)
        before = {f: open(f, "rb").read() for f in glob.glob(f"{tmp_path}/t/*")}
        script = _KILLED_RUN.format(repo=REPO, uri=str(table))
        process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while not glob.glob(f"{tmp_path}/.t.staging-killed/*.parquet"):
                assert process.poll() is None and time.monotonic() < deadline, "the run never started writing"
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert glob.glob(f"{tmp_path}/.t.staging-*")  # it was killed while writing
        assert {f: open(f, "rb").read() for f in glob.glob(f"{tmp_path}/t/*")} == before
        assert uids(table) == ["1", "2"]
        table.preflight(Disposition.WRITE_APPEND)  # the next run removes the leftovers
        assert sorted(os.listdir(tmp_path)) == ["t", "t_errors"]
        export(table, rows_a("3"), SCHEMA_A, Disposition.WRITE_APPEND, run_id="after")
        assert uids(table) == ["1", "2", "3"]

    def test_a_run_killed_between_two_renames_is_undone(self, tmp_path):
        """Where renameat2 cannot exchange: the old folder moved aside, the new one not yet in place."""
        table = ParquetTable.parse(f"parquet://{tmp_path}/t")
        export(table, rows_a("1"), SCHEMA_A)
        os.rename(tmp_path / "t", tmp_path / ".t.old-x")
        os.mkdir(tmp_path / ".t.staging-x")
        with pytest.raises(DestinationError, match="already exists"):
            table.preflight(Disposition.DEFAULT)
        assert sorted(os.listdir(tmp_path)) == ["t", "t_errors"] and uids(table) == ["1"]

    def test_a_commit_killed_on_cloud_storage_is_cleaned_up(self, gcs_bucket):
        """Killed after copying new shards but before the manifest: they are not the table."""
        _client, bucket = gcs_bucket
        table = ParquetTable.parse(f"parquet+gs://{bucket.name}/t")
        export(table, rows_a("1"), SCHEMA_A)
        stray = bucket.blob("t/part-stray.parquet")
        stray.upload_from_string(_gs_to_bytes(table.files()[0]))
        bucket.blob(".t.staging-x/part-y.parquet").upload_from_string(b"partial")
        table.preflight(Disposition.WRITE_APPEND)
        assert not stray.exists() and not bucket.blob(".t.staging-x/part-y.parquet").exists()
        assert uids(table) == ["1"]

    def test_a_folder_with_other_files_is_refused(self, tmp_path):
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "notes.txt").write_text("mine")
        with pytest.raises(DestinationError, match="notes.txt"):
            ParquetTable.parse(f"parquet://{tmp_path}/t").preflight(Disposition.WRITE_TRUNCATE)

    def test_parquet_files_without_schema_are_refused(self, tmp_path):
        (tmp_path / "t").mkdir()
        pq.write_table(pa.table({"a": [1]}),
                       tmp_path / "t" / "x.parquet")
        with pytest.raises(DestinationError, match="_schema.json"):
            ParquetTable.parse(f"parquet://{tmp_path}/t").preflight(Disposition.WRITE_TRUNCATE)

    def test_an_empty_folder_is_an_absent_table(self, tmp_path):
        (tmp_path / "t").mkdir()
        table = ParquetTable.parse(f"parquet://{tmp_path}/t")
        export(table, rows_a("1"), SCHEMA_A)
        assert uids(table) == ["1"]


# -- a real load into the BigQuery emulator ---------------------------------------------------

def test_bigquery_loads_the_folder_with_its_schema(samples, gcp_local, gcs_bucket):
    """``bq load --source_format=PARQUET --parquet_enable_list_inference`` of the shards,
    schema autodetected, yields ``_schema.json`` and every row (local-bigquery emulator)."""
    import uuid

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    rows, schema = samples
    _client, bucket = gcs_bucket
    table = ParquetTable.parse(f"parquet+gs://{bucket.name}/t")
    export(table, rows, schema)
    client = bigquery.Client(project=gcp_local["project"], credentials=AnonymousCredentials())
    dataset = f"ds_{uuid.uuid4().hex[:10]}"
    client.create_dataset(f"{gcp_local['project']}.{dataset}")
    config = bigquery.LoadJobConfig(source_format="PARQUET", autodetect=True)
    config.parquet_options = bigquery.ParquetOptions()
    config.parquet_options.enable_list_inference = True
    target = f"{gcp_local['project']}.{dataset}.t"
    client.load_table_from_uri(table.files(), target, job_config=config).result()
    loaded = client.get_table(target)
    assert [f.to_api_repr() for f in loaded.schema] == schema_json(table)
    assert loaded.num_rows == len(rows)


# -- end to end: the CLI's run() ------------------------------------------------------------------


def _comparable(value):
    """DuckDB and pyarrow give the same values, but DuckDB's TIMESTAMP is naive UTC."""
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def test_run_writes_the_same_rows_as_the_duckdb_destination(tmp_path):
    from pipeline.destinations.duckdb import DuckDBTable
    from pipeline.main import run

    common = ["--runner=FnApiRunner", "--progress-seconds=0", "--input", os.path.join(REPO, "samples", "dicom")]
    folder = tmp_path / "table"
    parquet = run([*common, f"--bq-table=parquet://{folder}"])
    duck = run([*common, f"--bq-table=duckdb://{tmp_path}/x.duckdb#instances"])
    assert parquet["succeeded"] == duck["succeeded"] == len(SAMPLES)
    assert parquet["errors_table"] == f"parquet://{folder}_errors"
    from_parquet = sorted((_comparable(r) for r in read_table(ParquetTable(str(folder)))),
                          key=lambda r: r["SOPInstanceUID"])
    from_duckdb = sorted((_comparable(r) for r in DuckDBTable(str(tmp_path / "x.duckdb"), "instances").read_rows()),
                         key=lambda r: r["SOPInstanceUID"])
    assert from_parquet == from_duckdb
    assert schema_json(ParquetTable(str(folder))) == DuckDBTable(str(tmp_path / "x.duckdb"), "instances").schema()


def test_run_refuses_a_local_folder_on_a_remote_runner(tmp_path):
    from pipeline.main import UsageError, run

    with pytest.raises(UsageError, match="parquet\\+gs://"):
        run(["--runner=DataflowRunner", "--input", os.path.join(REPO, "samples", "dicom"),
             f"--bq-table=parquet://{tmp_path}/t", "--project=my-project", "--region=europe-west4",
             "--temp_location=gs://b/tmp"])
