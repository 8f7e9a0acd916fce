"""The files table and --incremental (SPEC §7), through the real run(): Beam's in-process
runner, real DICOM files built with pydicom, a real DuckDB file, the Cloud Storage
emulator and the BigQuery emulator."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import pytest

from pipeline.destinations import DestinationError
from pipeline.destinations.duckdb import DuckDBTable
from pipeline.main import UsageError, run
from tests.builders import instance, to_bytes

REPO = pathlib.Path(__file__).resolve().parents[1]
FILES_COLUMNS = ["path", "version", "size", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                 "outcome", "run_started"]


def export(*args: str) -> dict:
    return run(["--runner=FnApiRunner", "--progress-seconds=0", *args])


def write_instance(path: pathlib.Path, sop: str, number: int, study: str = "1.2.3", series: str = "1.2.3.4") -> None:
    """A real DICOM file for instance ``sop``; ``number`` (InstanceNumber) marks its content."""
    ds = instance(study=study, series=series, sop=sop)
    ds.InstanceNumber = number
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes(ds))


@pytest.fixture
def archive(tmp_path):
    """A folder of five instances, ``f0``…``f4`` with SOPInstanceUIDs ``1.2.3.4.5.0``…"""
    folder = tmp_path / "archive"
    for index in range(5):
        write_instance(folder / f"f{index}", f"1.2.3.4.5.{index}", 1)
    return folder


@pytest.fixture
def db(tmp_path):
    return DuckDBTable(str(tmp_path / "export.duckdb"), "instances")


def incremental(archive, db, *args):
    return export("--input", str(archive), f"--bq-table={db}", "--incremental", *args)


def current_rows(db) -> dict:
    """``{SOPInstanceUID: InstanceNumber}``; fails if an instance has two rows."""
    rows = db.read_rows()
    sops = [row["SOPInstanceUID"] for row in rows]
    assert len(sops) == len(set(sops)), "more than one row for an instance"
    return {row["SOPInstanceUID"]: int(row["InstanceNumber"]) for row in rows}


def files_table(db) -> dict:
    """``{path: record}`` of the files table."""
    records = db.read_rows("instances_files")
    assert len({r["path"] for r in records}) == len(records), "more than one record for a path"
    return {record["path"]: record for record in records}


def assert_consistent(db) -> None:
    """Every row is recorded by an exported file, and every exported file's instance has a row."""
    rows = current_rows(db)
    exported = {r["SOPInstanceUID"] for r in files_table(db).values() if r["outcome"] in ("row", "duplicate")}
    assert set(rows) == exported


# -- the files table, on every run ------------------------------------------------------


def test_every_run_records_its_files_with_version_uids_and_outcome(archive, db, tmp_path):
    (archive / "notes.txt").write_text("not DICOM")
    summary = export("--input", str(archive), f"--bq-table={db}")
    assert summary["succeeded"] == 5 and summary["failed"] == 1
    records = files_table(db)
    assert [field["name"] for field in db.schema()] and set(records) == {str(p) for p in archive.iterdir()}
    st = os.stat(archive / "f2")
    f2 = records[str(archive / "f2")]
    assert f2["version"] == f"{st.st_mtime_ns}:{st.st_size}" and f2["size"] == st.st_size
    assert (f2["StudyInstanceUID"], f2["SeriesInstanceUID"], f2["SOPInstanceUID"]) == ("1.2.3", "1.2.3.4", "1.2.3.4.5.2")
    assert f2["outcome"] == "row" and f2["run_started"] is not None
    notes = records[str(archive / "notes.txt")]
    assert notes["outcome"] == "failed" and notes["SOPInstanceUID"] is None


def test_files_not_selected_by_the_filter_file_are_recorded_as_such(archive, db, tmp_path):
    filter_file = tmp_path / "filter.txt"
    filter_file.write_text("/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5.1\n")
    export("--input", str(archive), f"--bq-table={db}", f"--filter-config-gcs-uri={filter_file}",
           "--input-layout=any")
    outcomes = {pathlib.Path(p).name: r["outcome"] for p, r in files_table(db).items()}
    assert outcomes == {"f0": "not_selected", "f1": "row", "f2": "not_selected", "f3": "not_selected",
                        "f4": "not_selected"}


def test_truncate_replaces_the_files_table_and_append_updates_it_by_path(archive, db, tmp_path):
    other = tmp_path / "other"
    write_instance(other / "g", "1.2.3.4.6", 1)
    export("--input", str(archive), f"--bq-table={db}")
    export("--input", str(other), f"--bq-table={db}", "--write-disposition=WRITE_APPEND")
    assert len(files_table(db)) == 6
    export("--input", str(other), f"--bq-table={db}", "--write-disposition=WRITE_TRUNCATE")
    assert set(files_table(db)) == {str(other / "g")}


def test_a_plain_append_says_how_many_instances_were_already_in_the_table(archive, db, capsys):
    export("--input", str(archive), f"--bq-table={db}")
    write_instance(archive / "f9", "1.2.3.4.5.9", 1)
    summary = export("--input", str(archive), f"--bq-table={db}", "--write-disposition=WRITE_APPEND")
    assert summary["instances_already_in_table"] == 5
    assert len(db.read_rows()) == 11
    assert "already in the table" in capsys.readouterr().out


# -- --incremental on DuckDB ----------------------------------------------------------------


def test_a_second_incremental_run_with_no_change_reads_nothing_and_changes_nothing(archive, db):
    first = incremental(archive, db)
    assert first["succeeded"] == 5 and first["rows_added"] == 5
    rows, files = db.read_rows(), files_table(db)
    second = incremental(archive, db, "--write-disposition=WRITE_APPEND")
    assert second["bytes_read"] == 0 and second["unchanged_files"] == 5 and second["succeeded"] == 0
    assert (second["rows_added"], second["rows_replaced"]) == (0, 0)
    assert db.read_rows() == rows and files_table(db) == files


def incremental_without_runner(archive, db, *args):
    """As a user runs it: without ``--runner`` the export chooses how to run locally."""
    return run(["--progress-seconds=0", "--input", str(archive), f"--bq-table={db}", "--incremental", *args])


def record_builds(monkeypatch) -> list:
    """``(plan, Beam's running mode)`` of each pipeline ``pipeline.main`` builds from now on."""
    import pipeline.main
    from apache_beam.options.pipeline_options import DirectOptions

    built = []
    build = pipeline.main.build_pipeline

    def recording(beam_pipeline, plan, options, *args, **kwargs):
        built.append((plan, options.view_as(DirectOptions).direct_running_mode))
        return build(beam_pipeline, plan, options, *args, **kwargs)

    monkeypatch.setattr(pipeline.main, "build_pipeline", recording)
    return built


def test_a_run_with_no_change_starts_no_pipeline_and_a_small_update_reads_only_the_changed_files(
    archive, db, monkeypatch
):
    import pipeline.main

    incremental(archive, db)
    built = record_builds(monkeypatch)
    monkeypatch.setattr(pipeline.main, "READ_PROCESSES_MIN_FILES", 3)  # the input alone would take read processes
    unchanged = incremental_without_runner(archive, db, "--write-disposition=WRITE_APPEND")
    assert built == [] and unchanged["unchanged_files"] == 5 and unchanged["files_matched"] == 5
    write_instance(archive / "f1", "1.2.3.4.5.1", 2)
    (archive / "f3").unlink()
    write_instance(archive / "f5", "1.2.3.4.5.5", 1)
    changed = incremental_without_runner(archive, db, "--write-disposition=WRITE_APPEND")
    # the launcher listed and compared: the pipeline is handed the two files to read, in one process
    [(plan, mode)] = built
    assert sorted(f.path for f in plan.listed_files) == [str(archive / "f1"), str(archive / "f5")]
    assert mode == "in_memory" and plan.read_processes == 0  # two files: read in Beam's thread
    assert (changed["files_matched"], changed["unchanged_files"], changed["succeeded"]) == (5, 3, 2)
    assert (changed["rows_added"], changed["rows_replaced"]) == (1, 1)
    assert current_rows(db) == {f"1.2.3.4.5.{i}": 2 if i == 1 else 1 for i in range(6)}  # f3 kept: no --prune-missing
    assert files_table(db)[str(archive / "f1")]["outcome"] == "row"
    assert_consistent(db)


def test_an_update_larger_than_the_launcher_hands_over_is_listed_by_the_pipeline(archive, db, monkeypatch):
    import pipeline.main

    incremental(archive, db)
    monkeypatch.setattr(pipeline.main, "MOST_HANDED_FILES", 2)
    monkeypatch.setattr(pipeline.main, "READ_PROCESSES_MIN_FILES", 3)  # the input alone would take read processes
    built = record_builds(monkeypatch)
    for index in (0, 1, 2):
        write_instance(archive / f"f{index}", f"1.2.3.4.5.{index}", 3)
    changed = incremental_without_runner(archive, db, "--write-disposition=WRITE_APPEND")
    [(plan, mode)] = built
    assert plan.listed_files is None
    cores = pipeline.main.usable_cores()
    assert mode == "in_memory" and plan.read_processes == (cores if cores > 1 else 0)  # a large update keeps them
    assert (changed["files_matched"], changed["unchanged_files"], changed["rows_replaced"]) == (5, 2, 3)
    assert current_rows(db) == {f"1.2.3.4.5.{i}": 3 if i < 3 else 1 for i in range(5)}


def test_an_archive_among_unchanged_files_is_left_to_the_pipeline(archive, db, monkeypatch):
    import zipfile

    import pipeline.main

    with zipfile.ZipFile(archive / "more.zip", "w") as bundle:
        write_instance(archive / "inner", "1.2.3.4.5.9", 1)
        bundle.write(archive / "inner", "inner.dcm")
    (archive / "inner").unlink()
    incremental(archive, db)
    built = []
    build = pipeline.main.build_pipeline
    monkeypatch.setattr(pipeline.main, "build_pipeline", lambda *a, **k: built.append(1) or build(*a, **k))
    second = incremental(archive, db, "--write-disposition=WRITE_APPEND")
    assert built == [1] and second["bytes_read"] == 0 and second["succeeded"] == 0


def test_new_and_rewritten_files_add_and_replace_rows(archive, db):
    incremental(archive, db)
    write_instance(archive / "f1", "1.2.3.4.5.1", 2)  # the same instance, new content
    write_instance(archive / "new", "1.2.3.4.5.7", 1)
    summary = incremental(archive, db, "--write-disposition=WRITE_APPEND")
    assert summary["succeeded"] == 2 and summary["unchanged_files"] == 4
    assert (summary["rows_added"], summary["rows_replaced"]) == (1, 1)
    rows = current_rows(db)
    assert len(rows) == 6 and rows["1.2.3.4.5.1"] == 2 and rows["1.2.3.4.5.7"] == 1
    assert_consistent(db)


def test_a_resent_instance_under_another_path_replaces_its_row(archive, db):
    incremental(archive, db)
    write_instance(archive / "resent" / "x", "1.2.3.4.5.3", 5)
    summary = incremental(archive, db, "--write-disposition=WRITE_APPEND")
    assert (summary["rows_added"], summary["rows_replaced"]) == (0, 1)
    assert current_rows(db)["1.2.3.4.5.3"] == 5 and len(current_rows(db)) == 5


def test_deleted_files_keep_their_rows_unless_prune_missing(archive, db):
    incremental(archive, db)
    (archive / "f0").unlink()
    summary = incremental(archive, db, "--write-disposition=WRITE_APPEND")
    assert "1.2.3.4.5.0" in current_rows(db) and summary.get("rows_pruned") is None
    assert str(archive / "f0") in files_table(db)
    summary = incremental(archive, db, "--write-disposition=WRITE_APPEND", "--prune-missing")
    assert summary["rows_pruned"] == 1 and summary["bytes_read"] == 0
    assert set(current_rows(db)) == {f"1.2.3.4.5.{i}" for i in (1, 2, 3, 4)}
    assert str(archive / "f0") not in files_table(db)
    assert_consistent(db)


def test_prune_keeps_an_instance_while_one_of_its_files_remains(archive, db):
    write_instance(archive / "copy", "1.2.3.4.5.4", 1)
    incremental(archive, db)
    (archive / "f4").unlink()
    summary = incremental(archive, db, "--write-disposition=WRITE_APPEND", "--prune-missing")
    assert summary["rows_pruned"] == 0 and "1.2.3.4.5.4" in current_rows(db)
    assert_consistent(db)


def test_duplicates_in_one_run_give_one_row_from_the_greatest_path(archive, db):
    write_instance(archive / "zz", "1.2.3.4.5.2", 8)
    write_instance(archive / "aa", "1.2.3.4.5.2", 9)
    summary = incremental(archive, db)
    assert summary["duplicate_instances"] == 2 and summary["rows_added"] == 5
    assert current_rows(db)["1.2.3.4.5.2"] == 8  # from "zz", the greatest path
    outcomes = {pathlib.Path(p).name: r["outcome"] for p, r in files_table(db).items()}
    assert (outcomes["zz"], outcomes["aa"], outcomes["f2"]) == ("row", "duplicate", "duplicate")
    assert incremental(archive, db, "--write-disposition=WRITE_APPEND")["bytes_read"] == 0
    assert_consistent(db)


def test_failed_files_are_tried_again(archive, db):
    bad = archive / "bad"
    bad.write_bytes(b"not DICOM at all")
    incremental(archive, db)
    again = incremental(archive, db, "--write-disposition=WRITE_APPEND")
    assert again["failed"] == 1 and again["bytes_read"] > 0 and again["unchanged_files"] == 5
    write_instance(bad, "1.2.3.4.5.8", 1)  # fixed
    fixed = incremental(archive, db, "--write-disposition=WRITE_APPEND")
    assert fixed["failed"] == 0 and fixed["rows_added"] == 1
    assert files_table(db)[str(bad)]["outcome"] == "row"
    assert len(db.read_rows("instances_errors")) == 2


def test_write_truncate_with_incremental_rebuilds_from_every_file(archive, db):
    export("--input", str(archive), f"--bq-table={db}")
    export("--input", str(archive), f"--bq-table={db}", "--write-disposition=WRITE_APPEND")
    assert len(db.read_rows()) == 10
    summary = incremental(archive, db, "--write-disposition=WRITE_TRUNCATE")
    assert summary["succeeded"] == 5 and len(current_rows(db)) == 5
    assert_consistent(db)


def test_a_table_dropped_without_its_files_table_is_rebuilt_from_every_file(archive, db):
    import duckdb

    incremental(archive, db)
    with duckdb.connect(db.path) as con:
        con.execute("DROP TABLE instances")
    summary = incremental(archive, db, "--write-disposition=WRITE_APPEND")
    assert summary["succeeded"] == 5 and len(current_rows(db)) == 5
    assert_consistent(db)


# -- the rules, as pure functions -----------------------------------------------------------


def test_a_file_is_unchanged_only_if_recorded_as_exported_with_the_same_version():
    from pipeline.ledger import is_unchanged
    from transforms.storage import InputFile

    listed = InputFile("/a", 10, None, "5:10")
    assert is_unchanged(listed, {"version": "5:10", "outcome": "row"})
    assert is_unchanged(listed, {"version": "5:10", "outcome": "duplicate"})
    assert not is_unchanged(listed, {"version": "6:10", "outcome": "row"})
    assert not is_unchanged(listed, {"version": "5:10", "outcome": "failed"})
    assert not is_unchanged(listed, {"version": "5:10", "outcome": "not_selected"})
    assert not is_unchanged(listed, None)
    assert not is_unchanged(InputFile("/a", 10), {"version": None, "outcome": "row"})  # no version: always read


def test_the_launchers_comparison_finds_the_files_to_read_as_the_pipeline_would():
    from pipeline.ledger import TOO_MANY_CHANGED, compare_listing
    from transforms.storage import InputFile

    records = [{"path": "/a", "version": "1", "outcome": "row"}, {"path": "/b", "version": "2", "outcome": "row"},
               {"path": "/f", "version": "1", "outcome": "failed"}]
    a, b, link_to_a = InputFile("/a", 1, None, "1"), InputFile("/b", 1, None, "2"), InputFile("/c", 1, None, "1")
    same_file = {"/a": "inode:1", "/b": "inode:2", "/c": "inode:1", "/0": "inode:1"}
    counts = {"files_listed": 3, "files_matched": 2, "unchanged_files": 2}
    assert compare_listing([a, b, link_to_a], records, lambda f: same_file[f.path]) == (counts, [])  # one file
    # of a file's paths the first in path order is the input, as the pipeline deduplicates
    link_first = InputFile("/0", 1, None, "1")
    assert compare_listing([a, link_first], records, lambda f: same_file[f.path])[1] == [link_first]
    changed_b, new, failed = InputFile("/b", 1, None, "3"), InputFile("/new", 1, None, "1"), InputFile("/f", 1, None, "1")
    counts, changed = compare_listing([a, changed_b, new, failed], records)
    assert changed == [changed_b, new, failed]  # changed, new, failed before: read again
    assert counts == {"files_listed": 4, "files_matched": 1, "unchanged_files": 1}
    assert compare_listing([a, changed_b, new, failed], records, most_changed=2) == TOO_MANY_CHANGED  # pipeline lists
    assert compare_listing([], records) == ({"files_listed": 0, "files_matched": 0, "unchanged_files": 0}, [])


def test_of_several_files_of_one_instance_the_greatest_path_gives_the_row():
    from pipeline.ledger import choose_instance

    assert choose_instance(["gs://b/a/2", "gs://b/a/10", "gs://b/a/1"]) == "gs://b/a/2"


# -- how --incremental combines with the other flags ----------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prune-missing"], "--prune-missing needs --incremental"),
        (["--incremental", "--write-disposition=WRITE_EMPTY"], "not WRITE_EMPTY"),
        (["--incremental", "--prune-missing", f"--filter-config-gcs-uri={REPO / 'samples' / 'filter.txt'}"], "filter"),
    ],
)
def test_flags_that_do_not_combine_are_usage_errors(archive, db, flags, message):
    with pytest.raises(UsageError, match=message):
        export("--input", str(archive), f"--bq-table={db}", *flags)
    assert not os.path.exists(db.path)


def test_an_existing_table_needs_write_append(archive, db):
    incremental(archive, db)
    with pytest.raises(DestinationError, match="WRITE_APPEND"):
        incremental(archive, db)


def test_a_table_without_a_files_table_must_be_rebuilt_once(archive, db):
    import duckdb

    export("--input", str(archive), f"--bq-table={db}")
    with duckdb.connect(db.path) as con:
        con.execute("DROP TABLE instances_files")
    with pytest.raises(DestinationError, match="WRITE_TRUNCATE"):
        incremental(archive, db, "--write-disposition=WRITE_APPEND")


# -- a run killed in the middle ------------------------------------------------------------


def _state(db) -> tuple:
    return tuple(sorted(current_rows(db).items())), tuple(sorted((p, r["version"]) for p, r in files_table(db).items()))


@pytest.mark.parametrize("moment", ["reading", "staged", "committing"])
def test_a_killed_run_leaves_the_old_or_the_new_state(archive, db, tmp_path, moment):
    for index in range(5, 60):
        write_instance(archive / f"f{index}", f"1.2.3.4.5.{index}", 1)
    incremental(archive, db)
    old = _state(db)
    for index in range(0, 60, 2):
        write_instance(archive / f"f{index}", f"1.2.3.4.5.{index}", 3)
    (archive / "f1").unlink()
    command = [sys.executable, "-m", "pipeline.main", "--runner=FnApiRunner", "--progress-seconds=0",
               "--input", str(archive), f"--bq-table={db}", "--incremental", "--prune-missing",
               "--write-disposition=WRITE_APPEND"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = pathlib.Path(db.path).parent
    deadline = time.monotonic() + 60
    pattern = {
        "reading": ".export.duckdb.staging-*",
        "staged": ".export.duckdb.staging-*/files-*.json",
        "committing": "export.duckdb.wal",  # the transaction is being committed
    }[moment]
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if any(folder.glob(pattern)):
                break
        except FileNotFoundError:  # the staging folder was removed while glob listed it
            pass
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = _state(db)
    incremental(archive, db, "--write-disposition=WRITE_APPEND", "--prune-missing")
    new = _state(db)
    assert state in (old, new) and old != new
    assert_consistent(db)
    assert len(new[0]) == 59 and dict(new[0])["1.2.3.4.5.2"] == 3


# -- --incremental on BigQuery (the local emulator) ------------------------------------------

PROJECT = "test-project"


@pytest.fixture
def bq(gcp_local, gcs_bucket):
    """``(client, export, table_id)``: a fresh dataset, and run() with a gs:// temp location."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    client = bigquery.Client(project=PROJECT, credentials=AnonymousCredentials())
    dataset = f"ds_{uuid.uuid4().hex[:10]}"
    client.create_dataset(f"{PROJECT}.{dataset}")
    _, bucket = gcs_bucket

    def bq_export(*args: str) -> dict:
        return export(f"--project={PROJECT}", f"--temp_location=gs://{bucket.name}/tmp", *args)

    return client, bq_export, f"{PROJECT}.{dataset}.instances"


def bq_rows(client, table_id) -> dict:
    rows = [dict(row) for row in client.list_rows(table_id)]
    sops = [row["SOPInstanceUID"] for row in rows]
    assert len(sops) == len(set(sops)), "more than one row for an instance"
    return {row["SOPInstanceUID"]: int(row["InstanceNumber"]) for row in rows}


def bq_files(client, table_id) -> dict:
    records = [dict(row) for row in client.list_rows(table_id + "_files")]
    assert len({r["path"] for r in records}) == len(records)
    return {record["path"]: record for record in records}


def test_bigquery_incremental_runs_keep_one_current_row_per_instance(bq, archive):
    client, bq_export, table_id = bq
    first = bq_export("--input", str(archive), f"--bq-table=bq://{table_id}", "--incremental")
    assert first["rows_added"] == 5 and len(bq_rows(client, table_id)) == 5
    rows, files = bq_rows(client, table_id), bq_files(client, table_id)
    scripts = {job.job_id for job in client.list_jobs() if job.job_id.endswith("_update")}
    again = bq_export("--input", str(archive), f"--bq-table=bq://{table_id}", "--incremental",
                      "--write-disposition=WRITE_APPEND")
    assert again["bytes_read"] == 0 and again["unchanged_files"] == 5
    assert {job.job_id for job in client.list_jobs() if job.job_id.endswith("_update")} == scripts  # no DML
    assert (again["rows_added"], again["rows_replaced"]) == (0, 0)
    assert bq_rows(client, table_id) == rows and bq_files(client, table_id) == files

    write_instance(archive / "f1", "1.2.3.4.5.1", 2)  # rewritten
    write_instance(archive / "new", "1.2.3.4.5.7", 1)  # new
    write_instance(archive / "zz", "1.2.3.4.5.3", 4)  # a duplicate of f3, with the greater path
    (archive / "f0").unlink()
    changed = bq_export("--input", str(archive), f"--bq-table=bq://{table_id}", "--incremental",
                        "--write-disposition=WRITE_APPEND")
    assert (changed["rows_added"], changed["rows_replaced"]) == (1, 2) and changed["unchanged_files"] == 3
    assert len({job.job_id for job in client.list_jobs() if job.job_id.endswith("_update")} - scripts) == 1
    rows = bq_rows(client, table_id)
    assert rows == {"1.2.3.4.5.0": 1, "1.2.3.4.5.1": 2, "1.2.3.4.5.2": 1, "1.2.3.4.5.3": 4, "1.2.3.4.5.4": 1,
                    "1.2.3.4.5.7": 1}
    assert bq_files(client, table_id)[str(archive / "f0")]["outcome"] == "row"  # kept without --prune-missing

    pruned = bq_export("--input", str(archive), f"--bq-table=bq://{table_id}", "--incremental",
                       "--write-disposition=WRITE_APPEND", "--prune-missing")
    assert pruned["rows_pruned"] == 1 and pruned["bytes_read"] == 0
    assert "1.2.3.4.5.0" not in bq_rows(client, table_id)
    files = bq_files(client, table_id)
    assert str(archive / "f0") not in files
    exported = {r["SOPInstanceUID"] for r in files.values() if r["outcome"] in ("row", "duplicate")}
    assert exported == set(bq_rows(client, table_id))
    datasets_tables = {t.table_id for t in client.list_tables(table_id.rsplit(".", 1)[0])}
    assert datasets_tables == {"instances", "instances_errors", "instances_files"}  # no staging left


def test_bigquery_plain_append_counts_instances_already_in_the_table(bq, archive):
    client, bq_export, table_id = bq
    bq_export("--input", str(archive), f"--bq-table=bq://{table_id}")
    summary = bq_export("--input", str(archive), f"--bq-table=bq://{table_id}", "--write-disposition=WRITE_APPEND")
    assert summary["instances_already_in_table"] == 5
    assert len(list(client.list_rows(table_id))) == 10 and len(bq_files(client, table_id)) == 5


def test_bigquery_incremental_needs_a_files_table(bq, archive):
    client, bq_export, table_id = bq
    bq_export("--input", str(archive), f"--bq-table=bq://{table_id}")
    client.delete_table(table_id + "_files")
    with pytest.raises(DestinationError, match="WRITE_TRUNCATE"):
        bq_export("--input", str(archive), f"--bq-table=bq://{table_id}", "--incremental",
                  "--write-disposition=WRITE_APPEND")


def test_a_gs_input_is_versioned_by_object_generation_from_the_listing(gcs_bucket, db):
    _, bucket = gcs_bucket
    for index in range(3):
        ds = instance(study="1.2.3", series="1.2.3.4", sop=f"1.2.3.4.5.{index}")
        ds.InstanceNumber = 1
        bucket.blob(f"dicom/f{index}").upload_from_string(to_bytes(ds))
    source = f"gs://{bucket.name}/dicom/"
    first = export("--input", source, f"--bq-table={db}", "--incremental")
    assert first["rows_added"] == 3
    generations = {f"gs://{bucket.name}/{blob.name}": str(blob.generation) for blob in bucket.list_blobs()}
    assert {path: record["version"] for path, record in files_table(db).items()} == generations
    assert export("--input", source, f"--bq-table={db}", "--incremental",
                  "--write-disposition=WRITE_APPEND")["bytes_read"] == 0
    ds = instance(study="1.2.3", series="1.2.3.4", sop="1.2.3.4.5.1")
    ds.InstanceNumber = 2
    bucket.blob("dicom/f1").upload_from_string(to_bytes(ds))  # same name and size, new generation
    again = export("--input", source, f"--bq-table={db}", "--incremental", "--write-disposition=WRITE_APPEND")
    assert again["unchanged_files"] == 2 and again["rows_replaced"] == 1
    assert current_rows(db) == {"1.2.3.4.5.0": 1, "1.2.3.4.5.1": 2, "1.2.3.4.5.2": 1}


_RUN_ON_EMULATORS = """
import sys
import google.auth
from google.auth.credentials import AnonymousCredentials
google.auth.default = lambda *a, **k: (AnonymousCredentials(), "test-project")
from apache_beam.io.gcp.internal.clients import bigquery as apitools
apitools.BigqueryV2.BASE_URL = sys.argv[1] + "/bigquery/v2/"
from pipeline.main import main
sys.exit(main(sys.argv[2:]))
"""


def _bq_state(client, table_id) -> tuple:
    rows = tuple(sorted(bq_rows(client, table_id).items()))
    return rows, tuple(sorted((p, r["version"]) for p, r in bq_files(client, table_id).items()))


@pytest.mark.parametrize("moment", ["loading", "updating"])
def test_a_killed_bigquery_run_leaves_the_old_or_the_new_state(bq, gcp_local, gcs_bucket, archive, moment):
    client, bq_export, table_id = bq
    _, bucket = gcs_bucket
    dataset = table_id.rsplit(".", 1)[0]
    bq_export("--input", str(archive), f"--bq-table=bq://{table_id}", "--incremental")
    old = _bq_state(client, table_id)
    write_instance(archive / "f1", "1.2.3.4.5.1", 2)
    write_instance(archive / "new", "1.2.3.4.5.7", 1)
    (archive / "f0").unlink()
    args = ["--runner=FnApiRunner", "--progress-seconds=0", f"--project={PROJECT}",
            f"--temp_location=gs://{bucket.name}/tmp", "--input", str(archive), f"--bq-table=bq://{table_id}",
            "--incremental", "--prune-missing", "--write-disposition=WRITE_APPEND"]
    env = dict(os.environ, BIGQUERY_EMULATOR_HOST=gcp_local["bq"], STORAGE_EMULATOR_HOST=gcp_local["gcs"])
    earlier = {job.job_id for job in client.list_jobs()}
    process = subprocess.Popen([sys.executable, "-c", _RUN_ON_EMULATORS, gcp_local["bq"], *args], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if moment == "loading" and any("__staging_" in t.table_id for t in client.list_tables(dataset)):
            break
        if moment == "updating" and any(job.job_id.endswith("_update") and job.job_id not in earlier
                                        for job in client.list_jobs(max_results=20)):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _settle(client, earlier)
    state = _bq_state(client, table_id)
    bq_export(*args[4:])
    new = _bq_state(client, table_id)
    assert state in (old, new) and old != new
    assert dict(new[0]) == {"1.2.3.4.5.1": 2, "1.2.3.4.5.2": 1, "1.2.3.4.5.3": 1, "1.2.3.4.5.4": 1, "1.2.3.4.5.7": 1}


def _settle(client, earlier: set) -> None:
    """Wait for the jobs a killed run had started: BigQuery finishes a submitted job (a
    commit included) whatever becomes of its client, and reading the two tables while it
    runs would read them at two moments."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(job.state == "DONE" for job in client.list_jobs() if job.job_id not in earlier):
            return
        time.sleep(0.05)
    raise AssertionError("the killed run's jobs did not finish")


def _pair_consistent(client, table_id) -> None:
    """The table's instances are exactly those its files table records as exported (an
    absent table counts as an empty pair)."""
    from google.api_core import exceptions

    try:
        rows = set(bq_rows(client, table_id))
    except exceptions.NotFound:
        rows = set()
    try:
        files = bq_files(client, table_id)
    except exceptions.NotFound:
        files = {}
    assert rows == {r["SOPInstanceUID"] for r in files.values() if r["outcome"] in ("row", "duplicate")}


@pytest.mark.parametrize("rebuild", [False, True], ids=["first-run", "write-truncate"])
@pytest.mark.parametrize("moment", ["created", "committing"])
def test_a_killed_bigquery_first_run_or_rebuild_leaves_a_consistent_pair(bq, gcp_local, gcs_bucket, archive,
                                                                           moment, rebuild):
    client, bq_export, table_id = bq
    _, bucket = gcs_bucket
    dataset = table_id.rsplit(".", 1)[0]
    if rebuild:
        bq_export("--input", str(archive), f"--bq-table=bq://{table_id}")
        write_instance(archive / "f1", "1.2.3.4.5.1", 2)
    old = _bq_state(client, table_id) if rebuild else ((), ())
    args = ["--runner=FnApiRunner", "--progress-seconds=0", f"--project={PROJECT}",
            f"--temp_location=gs://{bucket.name}/tmp", "--input", str(archive), f"--bq-table=bq://{table_id}",
            "--write-disposition=WRITE_TRUNCATE"]
    env = dict(os.environ, BIGQUERY_EMULATOR_HOST=gcp_local["bq"], STORAGE_EMULATOR_HOST=gcp_local["gcs"])
    earlier = {job.job_id for job in client.list_jobs()}  # the project's jobs, other tests' included
    process = subprocess.Popen([sys.executable, "-c", _RUN_ON_EMULATORS, gcp_local["bq"], *args], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    seen = False
    while process.poll() is None and time.monotonic() < deadline:
        if moment == "created":
            tables = {t.table_id for t in client.list_tables(dataset)}  # a rebuild: its records are staged
            seen = any("instances_files__staging_" in name for name in tables) if rebuild else "instances" in tables
        else:
            seen = any(job.job_id.endswith("_commit") and job.job_id not in earlier
                       for job in client.list_jobs(max_results=20))
        if seen:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _settle(client, earlier)
    _pair_consistent(client, table_id)
    state = _bq_state(client, table_id) if any(t.table_id == "instances" for t in client.list_tables(dataset)) \
        else ((), ())
    bq_export(*args[4:])
    new = _bq_state(client, table_id)
    assert state in (old, new, ((), ())) and old != new
    assert dict(new[0])["1.2.3.4.5.1"] == (2 if rebuild else 1) and len(new[0]) == 5
    _pair_consistent(client, table_id)


def test_bigquery_commit_is_one_transaction_over_the_table_and_its_files_table():
    from pipeline.destinations.bigquery import commit_script

    script = commit_script(table="p.d.t", rows_staging="p.d.s", columns=["a"], files_table="p.d.t_files",
                           files_staging="p.d.fs")
    statements = [s.strip() for s in script.split(";") if s.strip()]
    begin, commit = statements.index("BEGIN TRANSACTION"), statements.index("COMMIT TRANSACTION")
    inside = statements[begin + 1:commit]
    assert [s.split("`")[0].strip() for s in inside if not s.startswith("SET")] == [
        "TRUNCATE TABLE", "INSERT INTO", "TRUNCATE TABLE", "INSERT INTO"]
    assert {s.split("`")[1] for s in inside if not s.startswith("SET")} == {"p.d.t", "p.d.t_files"}


# -- archives: versioned by the archive, members recorded -----------------------------------


def _write_archives(folder: pathlib.Path, numbers: dict, only=("a.zip", "b.tar", "c.tar.gz")) -> None:
    """``a.zip`` (members a0, a1, a2), ``b.tar`` (b0, b1), ``c.tar.gz`` (c0, c1); the
    member named ``x`` holds SOPInstanceUID ``1.2.9.x`` and InstanceNumber ``numbers[x]``."""
    import io
    import tarfile
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)

    def data(name):
        ds = instance(study="1.2.3", series="1.2.3.9", sop=f"1.2.9.{ord(name[0])}.{name[1:]}")
        ds.InstanceNumber = numbers.get(name, 1)
        return to_bytes(ds)

    if "a.zip" in only:
        with zipfile.ZipFile(folder / "a.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for name in ("a0", "a1", "a2"):
                if name in numbers or numbers.get("keep_all", True):
                    archive.writestr(f"dir/{name}.dcm", data(name))
    for path, mode, names in ((folder / "b.tar", "w", ("b0", "b1")), (folder / "c.tar.gz", "w:gz", ("c0", "c1"))):
        if path.name not in only:
            continue
        with tarfile.open(path, mode) as archive:
            for name in names:
                payload = data(name)
                info = tarfile.TarInfo(f"{name}.dcm")
                info.size, info.mtime = len(payload), 1_700_000_000
                archive.addfile(info, io.BytesIO(payload))


def test_archive_members_are_versioned_by_their_archive_and_an_unchanged_archive_is_not_opened(tmp_path, db):
    folder = tmp_path / "in"
    _write_archives(folder, {})
    write_instance(folder / "plain.dcm", "1.2.9.0", 1)
    first = incremental(folder, db)
    assert first["rows_added"] == 8
    records = files_table(db)
    assert set(records) == {str(folder / "plain.dcm"), *(f"{folder}/a.zip#dir/a{i}.dcm" for i in range(3)),
                            f"{folder}/b.tar#b0.dcm", f"{folder}/b.tar#b1.dcm",
                            f"{folder}/c.tar.gz#c0.dcm", f"{folder}/c.tar.gz#c1.dcm",
                            *(str(folder / name) for name in ("a.zip", "b.tar", "c.tar.gz"))}
    zipped = os.stat(folder / "a.zip")
    archive_version = f"{zipped.st_mtime_ns}:{zipped.st_size}"
    assert (records[str(folder / "a.zip")]["version"], records[str(folder / "a.zip")]["outcome"]) == (
        archive_version, "archive")
    member = records[f"{folder}/a.zip#dir/a1.dcm"]
    assert member["version"].startswith(archive_version + "|zip:") and member["outcome"] == "row"
    assert records[f"{folder}/c.tar.gz#c1.dcm"]["version"].startswith(
        f"{os.stat(folder / 'c.tar.gz').st_mtime_ns}:{os.stat(folder / 'c.tar.gz').st_size}|tar:")
    rows = current_rows(db)

    again = incremental(folder, db, "--write-disposition=WRITE_APPEND")
    assert again["bytes_read"] == 0 and again["unchanged_files"] == 8
    assert (again["rows_added"], again["rows_replaced"]) == (0, 0)
    assert current_rows(db) == rows and files_table(db) == records

    time.sleep(0.01)
    _write_archives(folder, {"c1": 5})  # every archive rewritten; only c.tar.gz's content differs
    os.utime(folder / "a.zip", ns=(zipped.st_atime_ns, zipped.st_mtime_ns))  # a.zip: same bytes, same mtime
    changed = incremental(folder, db, "--write-disposition=WRITE_APPEND")
    assert changed["unchanged_files"] == 4  # plain.dcm and a.zip's three members
    assert current_rows(db)["1.2.9.99.1"] == 5
    assert_consistent(db)


def test_a_member_gone_from_a_changed_archive_is_pruned(tmp_path, db):
    folder = tmp_path / "in"
    _write_archives(folder, {})
    incremental(folder, db)
    time.sleep(0.01)
    _write_archives(folder, {"a0": 1, "a1": 1, "keep_all": False}, only=("a.zip",))  # a.zip loses a2
    kept = incremental(folder, db, "--write-disposition=WRITE_APPEND")
    assert kept["unchanged_files"] == 4 and kept["rows_replaced"] == 2  # b.tar, c.tar.gz unchanged
    assert "1.2.9.97.2" in current_rows(db)  # without --prune-missing
    pruned = incremental(folder, db, "--write-disposition=WRITE_APPEND", "--prune-missing")
    assert pruned["rows_pruned"] == 1 and pruned["bytes_read"] == 0
    assert "1.2.9.97.2" not in current_rows(db) and f"{folder}/a.zip#dir/a2.dcm" not in files_table(db)
    assert_consistent(db)


def test_an_archive_that_failed_once_is_skipped_once_read_whole(tmp_path, db):
    folder = tmp_path / "in"
    _write_archives(folder, {}, only=("b.tar",))
    good = (folder / "b.tar").read_bytes()
    (folder / "b.tar").write_bytes(b"not a tar archive at all" * 40)
    failed = incremental(folder, db)
    assert failed["failed"] == 1 and files_table(db)[str(folder / "b.tar")]["outcome"] == "failed"
    (folder / "b.tar").write_bytes(good)
    assert incremental(folder, db, "--write-disposition=WRITE_APPEND")["rows_added"] == 2
    assert files_table(db)[str(folder / "b.tar")]["outcome"] == "archive"
    again = incremental(folder, db, "--write-disposition=WRITE_APPEND")
    assert again["bytes_read"] == 0 and again["unchanged_files"] == 2


def test_a_plain_run_records_every_input_as_an_incremental_run_does(tmp_path):
    """Without --incremental the read step records its own inputs as it reads them and
    only the inputs other steps read (archives read whole, the members of a streamed
    .tar.gz) are joined with their outcomes: the files table is the one an incremental
    run's join of every input makes, for plain files, archive members, a broken file, a
    broken archive and a file the filter file does not select."""
    folder = tmp_path / "in"
    _write_archives(folder, {})
    write_instance(folder / "plain.dcm", "1.2.9.0", 1)
    write_instance(folder / "unselected.dcm", "1.2.9.1", 1, series="1.2.3.5")
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "broken.tar").write_bytes(b"not a tar archive at all" * 40)
    filter_file = tmp_path / "filter.txt"
    filter_file.write_text("/studies/1.2.3/series/1.2.3.9\n/studies/1.2.3/series/1.2.3.4\n")
    common = ("--input", str(folder), f"--filter-config-gcs-uri={filter_file}", "--input-layout=any")
    plain = DuckDBTable(str(tmp_path / "plain.duckdb"), "instances")
    joined = DuckDBTable(str(tmp_path / "joined.duckdb"), "instances")
    export(*common, f"--bq-table={plain}")
    export(*common, f"--bq-table={joined}", "--incremental")

    def records(db):
        return {path: {k: v for k, v in record.items() if k != "run_started"}
                for path, record in files_table(db).items()}

    assert records(plain) == records(joined)
    outcomes = {path[len(str(folder)) + 1:]: record["outcome"] for path, record in records(plain).items()}
    assert outcomes == {
        "plain.dcm": "row", "unselected.dcm": "not_selected", "notes.txt": "failed", "broken.tar": "failed",
        "a.zip": "archive", "b.tar": "archive", "c.tar.gz": "archive",
        **{f"a.zip#dir/a{i}.dcm": "row" for i in range(3)}, "b.tar#b0.dcm": "row", "b.tar#b1.dcm": "row",
        "c.tar.gz#c0.dcm": "row", "c.tar.gz#c1.dcm": "row",
    }
