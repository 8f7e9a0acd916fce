"""The Destination interface, and every problem with a DuckDB destination found by preflight
(SPEC §4, issue 11): one line, before any file is read; staging beside the database."""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import duckdb
import pytest

from pipeline.destinations import DestinationError, Disposition
from pipeline.destinations.base import Destination, RunContext, parse_destination
from pipeline.destinations.bigquery import BigQueryTable
from pipeline.destinations.duckdb import DuckDBTable
from pipeline.main import UsageError, run
from pipeline.staging import remove_leftovers, staging_folder

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "dicom"


def export(*args: str) -> dict:
    return run(["--runner=FnApiRunner", "--progress-seconds=0", *args])


def cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """``dicom-bq-export ARGS`` as a user runs it, in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.main", "--runner=FnApiRunner", "--progress-seconds=0", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("dicom-bq-export: error:")]
    assert words in line, line


@pytest.fixture
def fifo_input(tmp_path):
    """An input folder holding only a named pipe: reading any file of it would block forever,
    so a run that returns at all has read nothing."""
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "pipe")
    return folder


# -- the interface -------------------------------------------------------------------------


def test_every_destination_is_parsed_from_its_uri(tmp_path):
    assert isinstance(parse_destination(f"duckdb://{tmp_path}/x.duckdb#t"), DuckDBTable)
    for uri in ("bq://my-project.ds.t", "my-project.ds.t", "my-project:ds.t"):
        destination = parse_destination(uri)
        assert isinstance(destination, BigQueryTable) and isinstance(destination, Destination)
        assert str(destination) == "bq://my-project.ds.t"
    with pytest.raises(ValueError, match="--bq-table must be"):
        parse_destination("postgres://x")


def test_a_duckdb_destination_needs_a_local_runner_and_takes_no_cluster_by(tmp_path):
    table = parse_destination(f"duckdb://{tmp_path}/x.duckdb#t")
    table.check_runner(local=True)
    with pytest.raises(ValueError, match="needs a local runner"):
        table.check_runner(local=False)
    with pytest.raises(UsageError, match="--cluster-by applies to BigQuery"):
        export("--input", str(SAMPLES), f"--bq-table={table}", "--cluster-by=StudyInstanceUID")
    assert not (tmp_path / "x.duckdb").exists()


def test_errors_uri_names_the_dead_letter_table(tmp_path):
    assert parse_destination(f"duckdb://{tmp_path}/x.duckdb#t").errors_uri() == f"duckdb://{tmp_path}/x.duckdb#t_errors"
    assert parse_destination("bq://my-project.ds.t").errors_uri() == "bq://my-project.ds.t_errors"


# -- issue 11: every problem with a DuckDB file, found in preflight ------------------------------


def test_a_text_file_is_not_a_duckdb_database(tmp_path, fifo_input):
    path = tmp_path / "notes.duckdb"
    path.write_text("my notes\n")
    with pytest.raises(DestinationError, match="is not a DuckDB database file"):
        DuckDBTable(str(path), "t").preflight(Disposition.DEFAULT)
    assert_one_line_error(cli("--input", str(fifo_input), f"--bq-table=duckdb://{path}#t"), "not a DuckDB database")
    assert path.read_text() == "my notes\n"


def test_a_folder_is_not_a_database_file(tmp_path, fifo_input):
    with pytest.raises(DestinationError, match="is a folder"):
        DuckDBTable(str(tmp_path), "t").preflight(Disposition.WRITE_TRUNCATE)
    assert_one_line_error(cli("--input", str(fifo_input), f"--bq-table=duckdb://{tmp_path}#t"), "is a folder")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root's override of permissions")
def test_an_unwritable_folder_is_reported_before_reading(tmp_path, fifo_input):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    uri = f"--bq-table=duckdb://{folder}/x.duckdb#t"
    # As root every folder is writable; without CAP_DAC_OVERRIDE the folder's mode counts.
    drop = ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"]
    result = subprocess.run(
        [*drop, sys.executable, "-m", "pipeline.main", "--runner=FnApiRunner", "--input", str(fifo_input), uri],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    ) if os.geteuid() == 0 else cli("--input", str(fifo_input), uri)
    assert_one_line_error(result, "is not writable")
    assert os.listdir(folder) == []


def test_a_database_held_open_by_another_process_is_reported_before_reading(tmp_path, fifo_input):
    path = tmp_path / "busy.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time\n"
         "con = duckdb.connect(sys.argv[1])\n"
         "con.execute('CREATE TABLE t (x INTEGER)')\n"
         "print('ready', flush=True)\n"
         "time.sleep(120)\n", str(path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(DestinationError, match=rf"is open in another process \(process {holder.pid}\)"):
            DuckDBTable(str(path), "t").preflight(Disposition.WRITE_APPEND)
        result = cli("--input", str(fifo_input), f"--bq-table=duckdb://{path}#t", "--write-disposition=WRITE_APPEND")
        assert_one_line_error(result, "is open in another process")
    finally:
        holder.kill()
        holder.wait()
    assert duckdb.connect(str(path)).execute("SELECT count(*) FROM t").fetchone() == (0,)


# -- issue 11: staged rows live beside the database, and a killed run's are removed ------------


def test_staging_folders_of_runs_whose_process_is_gone_are_removed(tmp_path):
    prefix = str(tmp_path / ".x.duckdb")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = pathlib.Path(f"{prefix}.staging-20260101T000000-{gone.stdout.strip()}")
    alive = pathlib.Path(f"{prefix}.staging-20260101T000000-{os.getpid()}")
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "rows-1.json").write_text("{}\n")
    assert remove_leftovers(prefix) == [str(dead)]
    assert not dead.exists() and alive.exists()
    with staging_folder(prefix, "20260101T000001-%d" % os.getpid()) as folder:
        assert os.path.dirname(folder) == str(tmp_path)
    assert not os.path.exists(folder)


def test_a_killed_runs_staged_rows_are_beside_the_database_and_removed_by_the_next_run(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    samples = sorted(SAMPLES.rglob("*.dcm"))
    for copy in range(40):  # enough files that the run is still reading when it is killed
        for index, path in enumerate(samples):
            shutil.copyfile(path, inputs / f"{copy:03d}-{index:02d}")
    database = tmp_path / "export.duckdb"
    uri = f"--bq-table=duckdb://{database}#instances"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.main", "--runner=FnApiRunner", "--progress-seconds=0",
         "--input", str(inputs), uri],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    staged: list[pathlib.Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        staged = [f for folder in tmp_path.glob(".export.duckdb.staging-*") for f in folder.iterdir()]
        if staged:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    [leftover] = tmp_path.glob(".export.duckdb.staging-*")
    assert leftover.name.endswith(f"-{process.pid}")
    assert not list(pathlib.Path(tempfile.gettempdir()).glob(f"*staging-*-{process.pid}"))
    assert not database.exists()  # nothing was written

    summary = export("--input", str(SAMPLES), uri)
    assert not leftover.exists()
    assert summary["succeeded"] == len(samples)
    assert list(tmp_path.glob(".export.duckdb.staging-*")) == []


def test_finish_with_too_many_failures_writes_nothing(tmp_path):
    table = DuckDBTable(str(tmp_path / "x.duckdb"), "t")
    context = RunContext(Disposition.DEFAULT, dt.datetime.now(dt.timezone.utc), max_failures=0,
                         staging=str(tmp_path), counts={"failed": 1})
    with pytest.raises(DestinationError, match="1 instances failed, more than --max-failures 0"):
        table.finish(context)
    assert not (tmp_path / "x.duckdb").exists()


def test_the_load_connection_writes_small_row_groups_with_one_thread_and_spills_beside_the_file(tmp_path):
    """What keeps DuckDB's load from holding every new row in memory (LOAD_ROW_GROUP_SIZE,
    LOAD_BUFFERED_ROW_GROUPS); a name with a quote and a space reaches ATTACH intact."""
    from pipeline.destinations import duckdb as destination

    path = tmp_path / "it's a db.duckdb"
    con = DuckDBTable(str(path), "t")._connect(load=True)
    try:
        settings = con.execute("SELECT current_setting('threads'), current_setting('temp_directory')").fetchone()
        assert settings == (1, str(path) + ".tmp")
        buffered = con.execute("SELECT value FROM duckdb_settings() WHERE name = 'write_buffer_row_group_count'"
                               ).fetchall()
        assert buffered in ([], [(str(destination.LOAD_BUFFERED_ROW_GROUPS),)])  # where this DuckDB has it
        con.execute("CREATE TABLE t AS SELECT range AS n FROM range(20000)")
    finally:
        con.close()
    with duckdb.connect(str(path), read_only=True) as check:
        groups = check.execute("SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('t')").fetchone()[0]
    assert groups == 3  # 20,000 rows in row groups of 8,192


def test_a_loads_commit_writes_its_rows_into_the_file_not_into_the_write_ahead_log(tmp_path):
    """LOAD_CHECKPOINT_THRESHOLD: the commit checkpoints, so closing the connection has no
    log to read back and write again, and the rows are in the file once COMMIT returns."""
    path = tmp_path / "load.duckdb"
    wal = pathlib.Path(str(path) + ".wal")
    con = DuckDBTable(str(path), "t")._connect(load=True)
    try:
        con.execute("BEGIN TRANSACTION")
        con.execute("CREATE TABLE t AS SELECT range AS n, repeat('x', 200) AS s FROM range(2000)")
        con.execute("COMMIT")
        assert not wal.exists() or wal.stat().st_size == 0  # (with DuckDB's 16 MiB default: ~420 kB of log)
        with duckdb.connect(":memory:") as reader:  # the file alone, as another process would see it
            copy = tmp_path / "copy.duckdb"
            shutil.copyfile(path, copy)
            reader.execute(f"ATTACH '{copy}' AS c (READ_ONLY)")
            assert reader.execute("SELECT count(*), sum(n) FROM c.t").fetchone() == (2000, 1999 * 2000 // 2)
    finally:
        con.close()


def test_a_load_that_needs_more_than_the_memory_limit_is_done_again_without_it(tmp_path, monkeypatch):
    """The load connection's memory limit (LOAD_MEMORY_LIMIT) keeps a large load's cache
    small; a load DuckDB cannot fit in it is rolled back and loaded whole without it."""
    from pipeline.destinations import duckdb as destination

    limits = []
    write = DuckDBTable._write
    monkeypatch.setattr(DuckDBTable, "_write", lambda self, *a, **k: limits.append(k["memory_limit"]) or write(
        self, *a, **k))
    normal = tmp_path / "normal.duckdb"
    run(["--input", str(SAMPLES), "--bq-table", f"duckdb://{normal}#t"])
    assert limits == [destination.LOAD_MEMORY_LIMIT]
    con = DuckDBTable(str(normal), "t")._connect(load=True, memory_limit=destination.LOAD_MEMORY_LIMIT)
    try:
        limit = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
        assert limit.endswith(" MiB") and float(limit.split()[0]) < 1024  # not DuckDB's 80% of the machine
    finally:
        con.close()
    monkeypatch.setattr(destination, "LOAD_MEMORY_LIMIT", "1MB")
    limits.clear()
    small = tmp_path / "small.duckdb"
    run(["--input", str(SAMPLES), "--bq-table", f"duckdb://{small}#t"])
    assert limits == ["1MB", None]
    assert DuckDBTable(str(small), "t").read_rows() == DuckDBTable(str(normal), "t").read_rows()
    assert DuckDBTable(str(small), "t").read_rows("t_files") != []
    # an append that extends nothing, and one that must copy the table: each rolled back whole, then done
    limits.clear()
    run(["--input", str(SAMPLES), "--bq-table", f"duckdb://{small}#t", "--write-disposition=WRITE_APPEND"])
    assert limits == ["1MB", None]
    rows = DuckDBTable(str(small), "t").read_rows()
    assert sorted(map(repr, rows)) == sorted(map(repr, DuckDBTable(str(normal), "t").read_rows() * 2))
    with duckdb.connect(str(small), read_only=True) as con:
        tables = {name for (name,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert tables == {"t", "t_errors", "t_files"}  # no staging table left by the rolled-back attempt


def test_a_row_larger_than_the_loads_json_buffer_is_loaded_again_with_bigquerys_limit(tmp_path, monkeypatch):
    """The load reads staged rows with a small JSON buffer (LOAD_OBJECT_SIZE: DuckDB's
    buffer is twice it, whole files are read through it); a row it cannot hold makes the
    load roll back and run again with BigQuery's row limit. A row beyond that limit is
    rejected, the table untouched."""
    from pipeline.destinations import duckdb as destination

    schema = [{"name": "SOPInstanceUID", "type": "STRING"}, {"name": "Big", "type": "STRING"},
              {"name": "Numbers", "type": "INTEGER", "mode": "REPEATED"}]
    big = "x" * (3 * destination.LOAD_OBJECT_SIZE)  # beyond what DuckDB reads with the small buffer
    staged = tmp_path / "rows.json"
    staged.write_text(json.dumps({"SOPInstanceUID": "1.2", "Big": "small", "Numbers": [1]}) + "\n"
                      + json.dumps({"SOPInstanceUID": "1.3", "Big": big}) + "\n")
    sizes = []
    write = DuckDBTable._write
    monkeypatch.setattr(DuckDBTable, "_write", lambda self, *a, **k: sizes.append(k["object_size"]) or write(
        self, *a, **k))
    table = DuckDBTable(str(tmp_path / "out.duckdb"), "t")
    table.write(schema, [str(staged)], Disposition.WRITE_EMPTY)
    assert sizes == [destination.LOAD_OBJECT_SIZE, destination._MAX_ROW_BYTES]
    rows = sorted(table.read_rows(), key=lambda row: row["SOPInstanceUID"])
    assert [(r["SOPInstanceUID"], len(r["Big"]), r["Numbers"]) for r in rows] == [("1.2", 5, [1]), ("1.3", len(big), [])]

    sizes.clear()
    monkeypatch.setattr(destination, "_MAX_ROW_BYTES", destination.LOAD_OBJECT_SIZE)  # the row is beyond the limit
    with pytest.raises(DestinationError, match="rejected a row"):
        table.write(schema, [str(staged)], Disposition.WRITE_TRUNCATE)
    assert sizes == [destination.LOAD_OBJECT_SIZE]
    assert len(table.read_rows()) == 2  # as it was


def test_two_runs_of_one_process_started_in_the_same_second_are_two_runs(tmp_path, monkeypatch):
    """A destination takes a run with its own id for a retried step of itself (and then
    writes nothing): two runs that start within one second must not share an id."""
    import types

    import pipeline.main

    started = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    first, second = RunContext(Disposition.DEFAULT, started), RunContext(Disposition.DEFAULT, started)
    assert first.run_id != second.run_id and first.run_id.endswith(f"-{os.getpid()}")  # staging cleanup reads the pid

    class SameSecond(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return started

    monkeypatch.setattr(pipeline.main, "dt", types.SimpleNamespace(datetime=SameSecond, timezone=dt.timezone))
    table = f"parquet://{tmp_path / 'table'}"
    count = export("--input", str(SAMPLES), f"--bq-table={table}")["succeeded"]
    appended = export("--input", str(SAMPLES), f"--bq-table={table}", "--write-disposition=WRITE_APPEND")
    with duckdb.connect() as con:
        rows = con.execute(f"SELECT count(*) FROM read_parquet('{tmp_path / 'table'}/*.parquet')").fetchone()[0]
    assert appended["instances_already_in_table"] == count and rows == 2 * count


# -- SPEC §4: a REPEATED field is an empty list, never NULL -------------------------------------


def test_repeated_fields_are_empty_lists_so_averages_count_every_row(tmp_path):
    database = tmp_path / "export.duckdb"
    export("--input", str(SAMPLES), f"--bq-table=duckdb://{database}#instances")
    con = duckdb.connect(str(database), read_only=True)
    total, with_list, average = con.execute(
        "SELECT count(*), count(OtherElements), avg(len(OtherElements)) FROM instances").fetchone()
    lengths = [n for (n,) in con.execute("SELECT len(OtherElements) FROM instances").fetchall()]
    assert total == len(list(SAMPLES.rglob("*.dcm"))) == with_list == len(lengths)
    assert 0 in lengths  # some instance has no private element: [] counted as 0, not skipped
    assert average == pytest.approx(sum(lengths) / total)
    table = DuckDBTable(str(database), "instances")
    schema = table.schema()
    for row in table.read_rows():
        assert_no_null_lists(row, schema)


@pytest.mark.parametrize("in_sql", [True, False])
def test_duckdb_fills_in_the_lists_of_rows_as_read_as_python_completes_rows(tmp_path, monkeypatch, in_sql):
    """Rows reach DuckDB as read (pipeline.graph.ExportPlan.rows_as_read): the load fills
    in absent and null REPEATED fields at every level exactly as schemas.rows does, in
    SQL, or, for a schema nested deeper than MOST_SQL_FILL_DEPTH, in Python first."""
    import json

    from pipeline.destinations import duckdb as destination

    from schemas.rows import with_empty_lists

    schema = [
        {"name": "SOPInstanceUID", "type": "STRING", "mode": "NULLABLE"},
        {"name": "L", "type": "STRING", "mode": "REPEATED"},
        {"name": "R", "type": "RECORD", "mode": "NULLABLE", "fields": [
            {"name": "X", "type": "STRING", "mode": "REPEATED"}, {"name": "Y", "type": "STRING", "mode": "NULLABLE"}]},
        {"name": "S", "type": "RECORD", "mode": "REPEATED", "fields": [
            {"name": "Z", "type": "INTEGER", "mode": "REPEATED"},
            {"name": "T", "type": "RECORD", "mode": "REPEATED", "fields": [
                {"name": "W", "type": "STRING", "mode": "REPEATED"}, {"name": "V", "type": "STRING", "mode": "NULLABLE"}]}]},
    ]
    rows = [
        {"SOPInstanceUID": "1"},
        {"SOPInstanceUID": "2", "L": None, "R": {"Y": "a"}, "S": [{"T": [{"V": "b"}, {"W": ["c"]}]}, {"Z": [1, 2]}]},
        {"SOPInstanceUID": "3", "L": ["d"], "R": None, "S": []},
        {"SOPInstanceUID": "4", "R": {"X": None}, "S": None},
    ]
    staged = tmp_path / "rows.json"
    staged.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert destination._fill_depth(schema) == 2  # S, then S.T
    if not in_sql:
        monkeypatch.setattr(destination, "MOST_SQL_FILL_DEPTH", 0)
    filled_in_sql = []
    insert = DuckDBTable._insert
    monkeypatch.setattr(DuckDBTable, "_insert", staticmethod(
        lambda con, table, fields, files, fill_lists=False, **k: (
            filled_in_sql.append(fill_lists) if table == "t" else None) or insert(con, table, fields, files, fill_lists,
                                                                                 **k)))
    table = DuckDBTable(str(tmp_path / "t.duckdb"), "t")
    table.write(schema, [str(staged)], Disposition.DEFAULT)
    assert filled_in_sql == [in_sql]

    def with_nulls(record, fields):  # what DuckDB gives for an absent NULLABLE field
        out = {}
        for field in fields:
            value = record.get(field["name"])
            if field["type"] == "RECORD" and value is not None:
                value = ([with_nulls(item, field["fields"]) for item in value] if field["mode"] == "REPEATED"
                         else with_nulls(value, field["fields"]))
            out[field["name"]] = value
        return out

    expected = [with_nulls(with_empty_lists(row, schema), schema) for row in rows]
    assert sorted(table.read_rows(), key=lambda r: r["SOPInstanceUID"]) == expected
    assert expected[1]["S"][0] == {"Z": [], "T": [{"W": [], "V": "b"}, {"W": ["c"], "V": None}]}  # the test's own premise

    # An append of rows whose own schema lacks fields the table has (L, S.Z, S.T.W): the
    # table's REPEATED fields are filled in too.
    narrower = [schema[0], schema[2], {**schema[3], "fields": [
        {**schema[3]["fields"][1], "fields": [schema[3]["fields"][1]["fields"][1]]}]}]
    more = tmp_path / "more.json"
    more.write_text(json.dumps({"SOPInstanceUID": "5", "S": [{"T": [{"V": "e"}]}]}) + "\n")
    table.write(narrower, [str(more)], Disposition.WRITE_APPEND)
    [appended] = [row for row in table.read_rows() if row["SOPInstanceUID"] == "5"]
    assert appended == {"SOPInstanceUID": "5", "L": [], "R": None, "S": [{"Z": [], "T": [{"W": [], "V": "e"}]}]}
    assert filled_in_sql == [in_sql, in_sql]


def assert_no_null_lists(record: dict, fields: list[dict], where: str = "") -> None:
    for field in fields:
        value = record.get(field["name"])
        path = where + field["name"]
        if field["mode"] == "REPEATED":
            assert isinstance(value, list), path
        if field["type"] == "RECORD" and value is not None:
            for member in value if field["mode"] == "REPEATED" else [value]:
                assert_no_null_lists(member, field["fields"], path + ".")
