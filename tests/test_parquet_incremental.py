"""The Parquet destination's files table and --incremental (SPEC §7), through the real
run(): Beam's in-process runner, real DICOM files built with pydicom, a local folder and
the Cloud Storage emulator, read back as a reader that follows ``_manifest.json`` would."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from pipeline.destinations import DestinationError
from pipeline.destinations.parquet import MANIFEST_FILE, SCHEMA_FILE, ParquetTable, rows_to_keep
from pipeline.ledger import FILES_SCHEMA
from pipeline.main import UsageError
from tests.test_incremental import export, write_instance

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def archive(tmp_path):
    """A folder of five instances, ``f0``…``f4`` with SOPInstanceUIDs ``1.2.3.4.5.0``…"""
    folder = tmp_path / "archive"
    for index in range(5):
        write_instance(folder / f"f{index}", f"1.2.3.4.5.{index}", 1)
    return folder


@pytest.fixture(params=["local", "gcs"])
def table(request, tmp_path):
    if request.param == "local":
        return ParquetTable.parse(f"parquet://{tmp_path}/table")
    _client, bucket = request.getfixturevalue("gcs_bucket")
    return ParquetTable.parse(f"parquet+gs://{bucket.name}/exports/table")


def incremental(archive, table, *args):
    return export("--input", str(archive), f"--bq-table={table}", "--incremental", *args)


def _read(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read()


def _rows(paths) -> list[dict]:
    return [row for path in paths for row in pq.read_table(io.BytesIO(_read(path))).to_pylist()]


def current_rows(table: ParquetTable) -> dict:
    """``{SOPInstanceUID: InstanceNumber}`` from the shards the manifest lists; fails if an
    instance has two rows."""
    rows = _rows(table.files())
    sops = [row["SOPInstanceUID"] for row in rows]
    assert len(sops) == len(set(sops)), "more than one row for an instance"
    return {row["SOPInstanceUID"]: int(row["InstanceNumber"]) for row in rows}


def files_table(table: ParquetTable) -> dict:
    """``{path: record}`` of the files table the table's manifest lists."""
    records = _rows(table.file_record_files())
    assert len({r["path"] for r in records}) == len(records), "more than one record for a path"
    return {record["path"]: record for record in records}


def folder(path: str) -> dict:
    """``{name: bytes}`` of every file in a folder (local or gs://)."""
    prefix = path + "/"
    return {m.path[len(prefix):]: _read(m.path) for m in FileSystems.match([prefix + "**"])[0].metadata_list}


def snapshot(table: ParquetTable) -> tuple:
    return folder(table.path), folder(table.files_path)


def assert_whole(table: ParquetTable) -> None:
    """Each folder holds exactly what the table's manifest lists (a reader that globs
    ``*.parquet`` sees the same tables), and the files table's own manifest agrees."""
    manifest = json.loads(_read(f"{table.path}/{MANIFEST_FILE}"))
    shards = sorted(n for n in folder(table.path) if n.endswith(".parquet"))
    assert shards == sorted(entry["name"] for entry in manifest["files"])
    files = folder(table.files_path)
    assert sorted(n for n in files if n.endswith(".parquet")) == sorted(e["name"] for e in manifest["files_table"])
    assert json.loads(files[SCHEMA_FILE]) == FILES_SCHEMA
    assert json.loads(files[MANIFEST_FILE])["files"] == manifest["files_table"]


def assert_consistent(table: ParquetTable) -> None:
    """Every row is recorded by an exported file, and every exported file's instance has a row."""
    exported = {r["SOPInstanceUID"] for r in files_table(table).values() if r["outcome"] in ("row", "duplicate")}
    assert set(current_rows(table)) == exported
    assert_whole(table)


# -- the files table, on every run ------------------------------------------------------


def test_every_run_writes_the_files_table_beside_the_table(archive, table):
    (archive / "notes.txt").write_text("not DICOM")
    export("--input", str(archive), f"--bq-table={table}")
    records = files_table(table)
    assert set(records) == {str(p) for p in archive.iterdir()}
    st = os.stat(archive / "f2")
    f2 = records[str(archive / "f2")]
    assert (f2["version"], f2["size"], f2["outcome"]) == (f"{st.st_mtime_ns}:{st.st_size}", st.st_size, "row")
    assert (f2["StudyInstanceUID"], f2["SeriesInstanceUID"], f2["SOPInstanceUID"]) == ("1.2.3", "1.2.3.4", "1.2.3.4.5.2")
    assert records[str(archive / "notes.txt")]["outcome"] == "failed"
    assert table.files_uri() == str(table) + "_files"
    assert_whole(table)


def test_append_updates_the_files_table_by_path_and_truncate_replaces_it(archive, table, tmp_path):
    other = tmp_path / "other"
    write_instance(other / "g", "1.2.3.4.6", 1)
    export("--input", str(archive), f"--bq-table={table}")
    write_instance(archive / "f0", "1.2.3.4.5.0", 2)
    appended = export("--input", str(archive), str(other), f"--bq-table={table}", "--write-disposition=WRITE_APPEND")
    assert appended["instances_already_in_table"] == 5  # the summary says the append repeats them
    assert len(_rows(table.files())) == 11 and len(files_table(table)) == 6
    assert files_table(table)[str(archive / "f0")]["version"].endswith(str(os.stat(archive / "f0").st_size))
    export("--input", str(other), f"--bq-table={table}", "--write-disposition=WRITE_TRUNCATE")
    assert set(files_table(table)) == {str(other / "g")}
    assert_whole(table)


# -- --incremental --------------------------------------------------------------------------


def test_an_unchanged_incremental_run_reads_nothing_and_writes_nothing(archive, table):
    first = incremental(archive, table)
    assert first["succeeded"] == 5 and first["rows_added"] == 5
    assert len(current_rows(table)) == 5 and len(files_table(table)) == 5
    before = snapshot(table)
    second = incremental(archive, table, "--write-disposition=WRITE_APPEND")
    assert second["bytes_read"] == 0 and second["unchanged_files"] == 5 and second["succeeded"] == 0
    assert (second["rows_added"], second["rows_replaced"]) == (0, 0)
    assert snapshot(table) == before  # byte for byte, manifests included


def test_changes_rewrite_only_the_shards_that_hold_replaced_rows(archive, table, tmp_path):
    incremental(archive, table)
    [first_shard] = table.files()
    more = tmp_path / "archive" / "more"
    for index in range(3):
        write_instance(more / f"g{index}", f"1.2.3.4.7.{index}", 1)
    added = incremental(archive, table, "--write-disposition=WRITE_APPEND")
    assert (added["rows_added"], added["rows_replaced"], added["unchanged_files"]) == (3, 0, 5)
    assert first_shard in table.files()  # kept as it was
    [second_shard] = set(table.files()) - {first_shard}
    second_bytes = _read(second_shard)

    write_instance(archive / "f1", "1.2.3.4.5.1", 2)  # rewritten: same instance, new content
    write_instance(archive / "new", "1.2.3.4.5.9", 1)  # new
    write_instance(archive / "zz", "1.2.3.4.5.3", 4)  # f3's instance again, under another path
    changed = incremental(archive, table, "--write-disposition=WRITE_APPEND")
    assert (changed["rows_added"], changed["rows_replaced"], changed["unchanged_files"]) == (1, 2, 7)
    assert second_shard in table.files() and _read(second_shard) == second_bytes
    assert first_shard not in table.files()
    assert current_rows(table) == {"1.2.3.4.5.0": 1, "1.2.3.4.5.1": 2, "1.2.3.4.5.2": 1, "1.2.3.4.5.3": 4,
                                   "1.2.3.4.5.4": 1, "1.2.3.4.5.9": 1, "1.2.3.4.7.0": 1, "1.2.3.4.7.1": 1,
                                   "1.2.3.4.7.2": 1}
    assert files_table(table)[str(archive / "zz")]["outcome"] == "row"
    assert_consistent(table)


def test_deleted_files_keep_their_rows_unless_prune_missing(archive, table):
    incremental(archive, table)
    (archive / "f0").unlink()
    kept = incremental(archive, table, "--write-disposition=WRITE_APPEND")
    assert "1.2.3.4.5.0" in current_rows(table) and kept.get("rows_pruned") is None
    assert str(archive / "f0") in files_table(table)
    pruned = incremental(archive, table, "--write-disposition=WRITE_APPEND", "--prune-missing")
    assert pruned["rows_pruned"] == 1 and pruned["bytes_read"] == 0
    assert set(current_rows(table)) == {f"1.2.3.4.5.{i}" for i in (1, 2, 3, 4)}
    assert str(archive / "f0") not in files_table(table)
    assert_consistent(table)
    before = snapshot(table)
    again = incremental(archive, table, "--write-disposition=WRITE_APPEND", "--prune-missing")
    assert again["rows_pruned"] == 0 and snapshot(table) == before


def test_prune_keeps_an_instance_while_one_of_its_files_remains(archive, tmp_path):
    table = ParquetTable.parse(f"parquet://{tmp_path}/t")
    write_instance(archive / "copy", "1.2.3.4.5.4", 1)
    incremental(archive, table)
    (archive / "f4").unlink()
    summary = incremental(archive, table, "--write-disposition=WRITE_APPEND", "--prune-missing")
    assert summary["rows_pruned"] == 0 and "1.2.3.4.5.4" in current_rows(table)
    assert str(archive / "f4") not in files_table(table)
    assert_consistent(table)


def test_duplicates_in_one_run_give_one_row_from_the_greatest_path(archive, tmp_path):
    table = ParquetTable.parse(f"parquet://{tmp_path}/t")
    write_instance(archive / "zz", "1.2.3.4.5.2", 8)
    write_instance(archive / "aa", "1.2.3.4.5.2", 9)
    summary = incremental(archive, table)
    assert summary["duplicate_instances"] == 2 and summary["rows_added"] == 5
    assert current_rows(table)["1.2.3.4.5.2"] == 8  # from "zz", the greatest path
    outcomes = {pathlib.Path(p).name: r["outcome"] for p, r in files_table(table).items()}
    assert (outcomes["zz"], outcomes["aa"], outcomes["f2"]) == ("row", "duplicate", "duplicate")
    assert incremental(archive, table, "--write-disposition=WRITE_APPEND")["bytes_read"] == 0
    assert_consistent(table)


def test_failed_files_are_tried_again(archive, tmp_path):
    table = ParquetTable.parse(f"parquet://{tmp_path}/t")
    bad = archive / "bad"
    bad.write_bytes(b"not DICOM at all")
    incremental(archive, table)
    again = incremental(archive, table, "--write-disposition=WRITE_APPEND")
    assert again["failed"] == 1 and again["bytes_read"] > 0 and again["unchanged_files"] == 5
    write_instance(bad, "1.2.3.4.5.8", 1)  # fixed
    fixed = incremental(archive, table, "--write-disposition=WRITE_APPEND")
    assert fixed["failed"] == 0 and fixed["rows_added"] == 1
    assert files_table(table)[str(bad)]["outcome"] == "row"
    assert len(_rows(table.files(errors=True))) == 2
    assert_consistent(table)


def test_write_truncate_with_incremental_rebuilds_one_row_per_instance(archive, tmp_path):
    table = ParquetTable.parse(f"parquet://{tmp_path}/t")
    export("--input", str(archive), f"--bq-table={table}")
    export("--input", str(archive), f"--bq-table={table}", "--write-disposition=WRITE_APPEND")
    assert len(_rows(table.files())) == 10
    summary = incremental(archive, table, "--write-disposition=WRITE_TRUNCATE")
    assert summary["succeeded"] == 5 and len(current_rows(table)) == 5
    assert_consistent(table)


def test_a_table_without_a_files_table_must_be_rebuilt_once(archive, tmp_path):
    table = ParquetTable.parse(f"parquet://{tmp_path}/t")
    export("--input", str(archive), f"--bq-table={table}")
    manifest_path = tmp_path / "t" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    del manifest["files_table"]  # as an older version wrote it
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DestinationError, match="no files table .* WRITE_TRUNCATE"):
        incremental(archive, table, "--write-disposition=WRITE_APPEND")
    assert not (tmp_path / "t_files").exists()  # what no manifest lists is not a files table
    incremental(archive, table, "--write-disposition=WRITE_TRUNCATE")
    assert incremental(archive, table, "--write-disposition=WRITE_APPEND")["unchanged_files"] == 5
    assert_consistent(table)


@pytest.mark.parametrize("flags, error, message", [
    (["--write-disposition=WRITE_EMPTY"], UsageError, "not WRITE_EMPTY"),
    ([], DestinationError, "already exists"),
])
def test_an_existing_table_needs_write_append(archive, tmp_path, flags, error, message):
    table = ParquetTable.parse(f"parquet://{tmp_path}/t")
    incremental(archive, table)
    before = snapshot(table)
    with pytest.raises(error, match=message):
        incremental(archive, table, *flags)
    assert snapshot(table) == before


# -- the rule, as a pure function -------------------------------------------------------------


def test_rows_are_removed_when_replaced_or_when_no_exported_file_records_them():
    import pyarrow as pa

    sops = pa.array(["a", "b", None, "c", "d"])
    keep, replaced, pruned = rows_to_keep(sops, pa.array(["b"]), None)
    assert keep.to_pylist() == [True, False, True, True, True] and (replaced, pruned) == (1, 0)
    keep, replaced, pruned = rows_to_keep(sops, pa.array(["b"]), pa.array(["a", "b", "d"]))
    assert keep.to_pylist() == [True, False, False, False, True] and (replaced, pruned) == (1, 2)


# -- a run killed in the middle of its commit ----------------------------------------------

_KILLED_AT = textwrap.dedent("""
    import os, signal, sys
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    google.auth.default = lambda *a, **k: (AnonymousCredentials(), "test-project")
    from pipeline.destinations import parquet

    moment = sys.argv[1]
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "before_the_manifest":  # the files table's new shards are in place, the table's are not
        original_write = parquet._write_bytes
        def write_bytes(path, data):
            if path.endswith("/table/" + parquet.MANIFEST_FILE) or "/.table.staging-" in path:
                die()
            original_write(path, data)
        parquet._write_bytes = write_bytes
    else:  # "after_the_manifest": the table committed, its files table's folder not yet tidied
        original_recover = parquet.recover_files_folder
        calls = []
        def recover_files_folder(path):
            calls.append(path)
            if len(calls) == 2:  # the first is preflight's
                die()
            original_recover(path)
        parquet.recover_files_folder = recover_files_folder
    from pipeline.main import main
    sys.exit(main(sys.argv[2:]))
""")


def _state(table) -> tuple:
    return (tuple(sorted(current_rows(table).items())),
            tuple(sorted((p, r["version"]) for p, r in files_table(table).items())))


@pytest.mark.parametrize("moment", ["before_the_manifest", "after_the_manifest"])
def test_a_run_killed_in_its_commit_leaves_the_old_or_the_new_pair(archive, table, moment):
    incremental(archive, table)
    old = _state(table)
    write_instance(archive / "f2", "1.2.3.4.5.2", 3)
    write_instance(archive / "new", "1.2.3.4.5.7", 1)
    (archive / "f1").unlink()
    args = ["--runner=FnApiRunner", "--progress-seconds=0", "--input", str(archive), f"--bq-table={table}",
            "--incremental", "--prune-missing", "--write-disposition=WRITE_APPEND"]
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT, moment, *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert killed.returncode == -9
    state = _state(table)  # as a reader that follows the table's manifest sees it
    if moment == "before_the_manifest":
        assert state == old
    incremental(archive, table, "--write-disposition=WRITE_APPEND", "--prune-missing")
    new = _state(table)
    assert state in (old, new) and old != new
    if moment == "after_the_manifest":
        assert state == new
    assert dict(new[0]) == {"1.2.3.4.5.0": 1, "1.2.3.4.5.2": 3, "1.2.3.4.5.3": 1, "1.2.3.4.5.4": 1,
                            "1.2.3.4.5.7": 1}
    assert_consistent(table)  # the next run removed the killed run's leftovers
    parent = table.path.rsplit("/", 1)[0]
    leftovers = [m.path for m in FileSystems.match([parent + "/.table**"])[0].metadata_list]
    assert not leftovers and not [p for p in os.listdir(archive.parent) if p.startswith(".table")]
