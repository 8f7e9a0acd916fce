"""The BigQuery destination against a real local BigQuery (local-bigquery) and a real GCS
emulator, both started by the test session (SPEC §4)."""

from __future__ import annotations

import pathlib
import shutil
import uuid

import pytest
from pydicom.data import get_testdata_file

from pipeline.destinations import DestinationError
from pipeline.destinations.bigquery import BigQueryTable, parse_cluster_by
from pipeline.main import UsageError, run
from transforms.header import read_header

SAMPLES = pathlib.Path(__file__).resolve().parents[1] / "samples" / "dicom"
PROJECT = "test-project"


def sample_files() -> list[pathlib.Path]:
    return sorted(SAMPLES.rglob("*.dcm"))


def sop(path) -> str:
    with open(path, "rb") as fileobj:
        return read_header(fileobj).uids.instance


def folder_of(files, folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(files):
        shutil.copyfile(path, folder / f"f{index}")
    return folder


@pytest.fixture
def client(gcp_local):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials())


@pytest.fixture
def dataset(client):
    name = f"ds_{uuid.uuid4().hex[:10]}"
    client.create_dataset(f"{PROJECT}.{name}")
    return name


@pytest.fixture
def temp_location(gcs_bucket):
    _, bucket = gcs_bucket
    return f"gs://{bucket.name}/tmp"


@pytest.fixture
def export(gcp_local, temp_location):
    def export(*args: str) -> dict:
        return run(["--runner=FnApiRunner", "--progress-seconds=0", f"--project={PROJECT}",
                    f"--temp_location={temp_location}", *args])

    return export


def table_rows(client, table_id: str) -> list[dict]:
    return [dict(row) for row in client.list_rows(table_id)]


def field_names(client, table_id: str) -> list[str]:
    return [field.name for field in client.get_table(table_id).schema]


def create_table(client, table_id: str, fields: list[tuple[str, str]], rows: list[dict] = ()):
    from google.cloud import bigquery

    table = client.create_table(bigquery.Table(table_id, schema=[bigquery.SchemaField(n, t) for n, t in fields]))
    if rows:
        job = client.load_table_from_json(list(rows), table_id,
                                          job_config=bigquery.LoadJobConfig(write_disposition="WRITE_APPEND"))
        job.result()
    return table


# -- SPEC §4: one test per row of the disposition table ---------------------------------------


@pytest.mark.parametrize(
    "options", [[], ["--write-disposition=WRITE_EMPTY"], ["--write-disposition=WRITE_APPEND"],
                ["--write-disposition=WRITE_TRUNCATE"], ["--overwrite-table"]],
    ids=["neither", "empty", "append", "truncate", "overwrite"],
)
def test_absent_table_is_created_whatever_the_options(client, dataset, export, options):
    table_id = f"{PROJECT}.{dataset}.instances"
    summary = export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}", *options)
    assert summary["succeeded"] == len(sample_files())
    assert {row["SOPInstanceUID"] for row in table_rows(client, table_id)} == {sop(p) for p in sample_files()}
    assert {"PatientName", "DroppedTags", "OtherElements"} <= set(field_names(client, table_id))
    assert table_rows(client, table_id + "_errors") == []
    leftovers = [t.table_id for t in client.list_tables(f"{PROJECT}.{dataset}") if "__staging_" in t.table_id]
    assert leftovers == []


def test_existing_table_with_overwrite_table_is_overwritten(client, dataset, export, tmp_path):
    table_id = f"{PROJECT}.{dataset}.instances"
    files = sample_files()
    export("--input", str(folder_of(files[:3], tmp_path / "a")), f"--bq-table=bq://{table_id}")
    export("--input", str(folder_of(files[3:5], tmp_path / "b")), f"--bq-table=bq://{table_id}", "--overwrite-table")
    assert {row["SOPInstanceUID"] for row in table_rows(client, table_id)} == {sop(p) for p in files[3:5]}


def test_existing_table_without_an_option_is_an_error_even_if_empty(client, dataset, export):
    table_id = f"{PROJECT}.{dataset}.instances"
    create_table(client, table_id, [("SOPInstanceUID", "STRING")])
    with pytest.raises(DestinationError, match="already exists"):
        export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}")
    assert field_names(client, table_id) == ["SOPInstanceUID"] and table_rows(client, table_id) == []


def test_existing_empty_table_with_write_empty_succeeds(client, dataset, export):
    table_id = f"{PROJECT}.{dataset}.instances"
    create_table(client, table_id, [("SOPInstanceUID", "STRING")])
    export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}", "--write-disposition=WRITE_EMPTY")
    assert {row["SOPInstanceUID"] for row in table_rows(client, table_id)} == {sop(p) for p in sample_files()}
    assert field_names(client, table_id)[0] == "SOPInstanceUID"  # the existing schema, extended


def test_existing_table_with_rows_and_write_empty_is_an_error_and_untouched(client, dataset, export):
    table_id = f"{PROJECT}.{dataset}.instances"
    create_table(client, table_id, [("SOPInstanceUID", "STRING")], [{"SOPInstanceUID": "1.2.3"}])
    with pytest.raises(DestinationError, match="not empty"):
        export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}", "--write-disposition=write-empty")
    assert table_rows(client, table_id) == [{"SOPInstanceUID": "1.2.3"}]


def test_write_append_adds_rows_and_extends_the_schema(client, dataset, export, tmp_path):
    table_id = f"{PROJECT}.{dataset}.instances"
    files = sample_files()
    ct = next(p for p in files if "20040119072730" in str(p))
    others = [p for p in files if p != ct]
    export("--input", str(folder_of(others, tmp_path / "a")), f"--bq-table=bq://{table_id}")
    before = field_names(client, table_id)
    assert "FilterType" not in before
    export("--input", str(folder_of([ct], tmp_path / "b")), f"--bq-table=bq://{table_id}",
           "--write-disposition=WRITE_APPEND")
    after = field_names(client, table_id)
    assert after[: len(before)] == before and "FilterType" in after
    rows = {row["SOPInstanceUID"]: row for row in table_rows(client, table_id)}
    assert len(rows) == len(files)
    assert rows[sop(ct)]["FilterType"] == "LARGE BOWTIE FIL"


def test_write_append_with_a_conflicting_field_fails_before_loading(client, dataset, export):
    table_id = f"{PROJECT}.{dataset}.instances"
    create_table(client, table_id, [("SOPInstanceUID", "INTEGER")], [{"SOPInstanceUID": 7}])
    with pytest.raises(DestinationError, match="SOPInstanceUID: the table has INTEGER NULLABLE, the export needs STRING"):
        export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}", "--write-disposition=WRITE_APPEND")
    assert table_rows(client, table_id) == [{"SOPInstanceUID": 7}]
    assert field_names(client, table_id) == ["SOPInstanceUID"]


def test_write_truncate_replaces_rows_and_schema(client, dataset, export):
    table_id = f"{PROJECT}.{dataset}.instances"
    create_table(client, table_id, [("Legacy", "STRING")], [{"Legacy": "old"}])
    export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}", "--write-disposition=WRITE_TRUNCATE")
    assert "Legacy" not in field_names(client, table_id)
    assert {row["SOPInstanceUID"] for row in table_rows(client, table_id)} == {sop(p) for p in sample_files()}


def test_a_run_failing_after_preflight_leaves_the_truncated_table_intact(client, dataset, export, tmp_path):
    table_id = f"{PROJECT}.{dataset}.instances"
    create_table(client, table_id, [("Legacy", "STRING")], [{"Legacy": "old"}])
    folder = folder_of(sample_files()[:2], tmp_path / "in")
    (folder / "broken").write_bytes(b"not dicom")
    with pytest.raises(DestinationError, match="more than --max-failures 0"):
        export("--input", str(folder), f"--bq-table=bq://{table_id}", "--write-disposition=WRITE_TRUNCATE",
               "--max-failures=0")
    assert field_names(client, table_id) == ["Legacy"]
    assert table_rows(client, table_id) == [{"Legacy": "old"}]


def test_an_export_selecting_no_instance_creates_the_table(client, dataset, export, tmp_path):
    table_id = f"{PROJECT}.{dataset}.instances"
    (tmp_path / "empty").mkdir()
    summary = export("--input", str(tmp_path / "empty"), f"--bq-table=bq://{table_id}")
    assert summary["inputs"] == 0
    assert table_rows(client, table_id) == []
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"} <= set(field_names(client, table_id))


def test_an_export_selecting_no_instance_truncates_the_table(client, dataset, export, tmp_path):
    table_id = f"{PROJECT}.{dataset}.instances"
    export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}")
    nothing = tmp_path / "filter.txt"
    nothing.write_text("/studies/1.2.3.4.5.6\n")
    export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}", "--write-disposition=WRITE_TRUNCATE",
           f"--filter-config-gcs-uri={nothing}")
    assert table_rows(client, table_id) == []


def test_dead_letters_go_to_the_errors_table_in_the_same_dataset(client, dataset, export, tmp_path):
    table_id = f"{PROJECT}.{dataset}.instances"
    folder = folder_of(sample_files()[:2], tmp_path / "in")
    (folder / "notes.txt").write_text("hello")
    (folder / "empty").write_bytes(b"")
    summary = export("--input", str(folder), f"--bq-table=bq://{table_id}")
    assert (summary["succeeded"], summary["failed"]) == (2, 2)
    errors = {pathlib.Path(row["path"]).name: row["error_type"] for row in table_rows(client, table_id + "_errors")}
    assert errors == {"notes.txt": "NotDicomError", "empty": "EmptyFileError"}
    assert summary["errors_table"] == f"bq://{table_id}_errors"


def test_repeated_fields_are_empty_lists_never_null(client, dataset, export):
    table_id = f"{PROJECT}.{dataset}.instances"
    export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}")
    rows = table_rows(client, table_id)
    assert len(rows) == len(sample_files())
    for row in rows:
        assert isinstance(row["OtherElements"], list) and isinstance(row["DroppedTags"], list)
    assert any(row["OtherElements"] == [] for row in rows)
    # Rows reach BigQuery as read, without the REPEATED fields other instances brought
    # into the schema: the load must make each of them [], never NULL.
    repeated = [field.name for field in client.get_table(table_id).schema if field.mode == "REPEATED"]
    assert len(repeated) > 2
    for row in rows:
        assert all(isinstance(row[name], list) for name in repeated)
    assert any(row[name] == [] for row in rows for name in repeated if name not in ("OtherElements", "DroppedTags"))


def test_the_load_files_in_the_temp_location_are_removed(client, dataset, export, gcs_bucket):
    storage_client, bucket = gcs_bucket
    export("--input", str(SAMPLES), f"--bq-table=bq://{PROJECT}.{dataset}.instances")
    assert [blob.name for blob in storage_client.list_blobs(bucket, prefix="tmp/dicom-bq-export/")] == []


def test_a_local_run_of_the_command_loads_with_beam_imported_as_the_command_imports_it(
        client, dataset, gcp_local, temp_location):
    """The command imports Beam without the clients only a remote runner uses (BigQuery
    Storage's read client, the Dataflow API's, Pub/Sub's: ``pipeline.cli.not_for_beam``)
    when it names no runner, but with BigQuery IO and Cloud Storage when it names a
    BigQuery table: a local export to BigQuery still loads every row. In a process
    of its own, as the command's, since this one imported Beam whole."""
    import json
    import os
    import subprocess
    import sys

    table_id = f"{PROJECT}.{dataset}.instances"
    script = (
        "import json, sys\n"
        "import google.auth\n"
        "from google.auth.credentials import AnonymousCredentials\n"
        f"google.auth.default = lambda *a, **k: (AnonymousCredentials(), {PROJECT!r})\n"
        "from pipeline import cli\n"
        f"argv = ['--input', {str(SAMPLES)!r}, '--bq-table=bq://{table_id}', '--progress-seconds=0',\n"
        f"        '--project={PROJECT}', '--temp_location={temp_location}']\n"
        "assert not set(cli.NOT_FOR_LOCAL_TABLES + cli.NOT_FOR_LOCAL_FILES) & set(cli.not_for_beam(argv))\n"
        "with cli.beam_imported_without(cli.not_for_beam(argv)):\n"
        "    import pipeline.main\n"
        "hidden = [name for name in cli.NOT_FOR_LOCAL_RUNS if sys.modules.get(name) is not None]\n"
        "from apache_beam.io.gcp.internal.clients import bigquery as bq_apitools\n"
        f"bq_apitools.BigqueryV2.BASE_URL = {gcp_local['bq'] + '/bigquery/v2/'!r}\n"
        "code = pipeline.main.main(argv)\n"
        "print(json.dumps({'code': code, 'imported': hidden}))\n"
    )
    env = dict(os.environ, BIGQUERY_EMULATOR_HOST=gcp_local["bq"], STORAGE_EMULATOR_HOST=gcp_local["gcs"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"code": 0, "imported": []}
    assert len(table_rows(client, table_id)) == len(sample_files())


def test_cluster_by_clusters_a_new_table(client, dataset, export):
    table_id = f"{PROJECT}.{dataset}.instances"
    export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}", "--cluster-by=StudyInstanceUID,SeriesInstanceUID")
    assert client.get_table(table_id).clustering_fields == ["StudyInstanceUID", "SeriesInstanceUID"]


def test_the_export_pages_example_queries_return_the_expected_rows(client, dataset, export):
    table_id = f"{PROJECT}.{dataset}.instances"
    export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}")
    paths = client.query(f"""
        SELECT CONCAT('/dicomWeb/studies/', StudyInstanceUID, '/series/', SeriesInstanceUID,
                      '/instances/', SOPInstanceUID) AS DICOMwebPath
        FROM `{table_id}`
        WHERE PatientID = '1CT1'""").result()
    ct = get_testdata_file("CT_small.dcm")
    with open(ct, "rb") as fileobj:
        uids = read_header(fileobj).uids
    assert [row["DICOMwebPath"] for row in paths] == [
        f"/dicomWeb/studies/{uids.study}/series/{uids.series}/instances/{uids.instance}"]
    recent = client.query(f"""
        SELECT StudyInstanceUID, MAX(StudyDate) AS StudyDate, MAX(StudyTime) AS StudyTime
        FROM `{table_id}`
        GROUP BY StudyInstanceUID
        ORDER BY StudyDate DESC, StudyTime DESC
        LIMIT 10""").result()
    dated = [row["StudyDate"].isoformat() for row in recent if row["StudyDate"] is not None]
    assert dated == ["2005-11-30", "2004-08-26", "2004-08-26", "2004-01-19", "2003-08-05", "2003-07-16", "2003-04-17"]


# -- preflight, without the emulators' help where none is needed -------------------------------


@pytest.mark.parametrize(
    "uri, message",
    [("bq://Project.ds.t", "project ID"), ("bq://abc.ds.t", "project ID"), ("bq://my-project-.ds.t", "project ID"), ("bq://my-project.d-s.t", "dataset ID"),
     ("bq://my-project.ds.t$20240101", "table name"), ("bq://my-project.ds", "expected bq://PROJECT.DATASET.TABLE")],
)
def test_bigquery_uris_follow_bigquerys_naming_rules(uri, message):
    with pytest.raises(DestinationError, match=message):
        BigQueryTable.parse(uri)


def test_valid_bigquery_uris_parse():
    table = BigQueryTable.parse("bq://example.com:my-project.dicom_2024.instances all-2024")
    assert (table.project, table.dataset, table.table) == ("example.com:my-project", "dicom_2024", "instances all-2024")
    assert str(BigQueryTable.parse("bq://my-project.ds.t")) == "bq://my-project.ds.t"


def test_cluster_by_takes_single_valued_keywords():
    assert parse_cluster_by("StudyInstanceUID, SeriesInstanceUID") == ["StudyInstanceUID", "SeriesInstanceUID"]
    for bad, message in [("PatientName", "RECORD"), ("ImageType", "REPEATED"), ("NoSuchTag", "not a DICOM keyword"),
                         ("A,B,C,D,E", "at most 4")]:
        with pytest.raises(DestinationError, match=message):
            parse_cluster_by(bad)


def test_a_missing_dataset_is_reported_before_any_file_is_read(export, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken").write_bytes(b"x")
    with pytest.raises(DestinationError, match="dataset test-project.no_such_dataset does not exist"):
        export("--input", str(folder), f"--bq-table=bq://{PROJECT}.no_such_dataset.t")


def test_bigquery_needs_a_gs_temp_location(gcp_local, dataset):
    with pytest.raises(DestinationError, match="--temp_location gs://"):
        run(["--runner=FnApiRunner", "--input", str(SAMPLES), f"--bq-table=bq://{PROJECT}.{dataset}.t"])


def test_cluster_by_is_for_bigquery_only(tmp_path):
    with pytest.raises(UsageError, match="BigQuery"):
        run(["--runner=FnApiRunner", "--input", str(SAMPLES), f"--bq-table=duckdb://{tmp_path}/x.duckdb#t",
             "--cluster-by=StudyInstanceUID"])


def test_write_truncate_changing_a_column_type_replaces_schema_rows_and_files_table(client, dataset, export):
    table_id = f"{PROJECT}.{dataset}.instances"
    create_table(client, table_id, [("SOPInstanceUID", "INTEGER"), ("Legacy", "STRING")],
                 [{"SOPInstanceUID": 7, "Legacy": "old"}])
    export("--input", str(SAMPLES), f"--bq-table=bq://{table_id}", "--write-disposition=WRITE_TRUNCATE")
    schema = {field.name: field.field_type for field in client.get_table(table_id).schema}
    assert schema["SOPInstanceUID"] == "STRING" and "Legacy" not in schema
    assert {row["SOPInstanceUID"] for row in table_rows(client, table_id)} == {sop(p) for p in sample_files()}
    files = table_rows(client, table_id + "_files")
    assert {row["SOPInstanceUID"] for row in files} == {sop(p) for p in sample_files()}
    leftovers = [t.table_id for t in client.list_tables(f"{PROJECT}.{dataset}") if "__staging_" in t.table_id]
    assert leftovers == []


def test_the_files_table_records_archives_and_what_the_read_step_read(client, dataset, export, tmp_path):
    """An archive among the files: the read step's own records and those of the inputs
    other steps read (the archive read whole) both reach the files table."""
    import zipfile

    table_id = f"{PROJECT}.{dataset}.instances"
    files = sample_files()[:3]
    folder = folder_of(files[:1], tmp_path / "in")
    (folder / "notes.txt").write_text("hello")
    with zipfile.ZipFile(folder / "more.zip", "w") as archive:
        for path in files[1:]:
            archive.write(path, path.name)
    summary = export("--input", str(folder), f"--bq-table=bq://{table_id}")
    assert (summary["succeeded"], summary["failed"]) == (3, 1)
    outcomes = {row["path"][len(str(folder)) + 1:]: row["outcome"] for row in table_rows(client, table_id + "_files")}
    assert outcomes == {"f0": "row", "notes.txt": "failed", "more.zip": "archive",
                        **{f"more.zip#{path.name}": "row" for path in files[1:]}}
