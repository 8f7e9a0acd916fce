"""A local run reads its local files on processes of this machine (transforms.read).

Real files (pydicom's bundled test files: many vendors, broken and non-DICOM ones among
them), the real Beam runner, real worker processes and a real DuckDB file. The rows,
dead letters and counts must be exactly those of the same run read in one thread.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import zipfile
import zlib

import duckdb
import pytest

import pipeline.graph
import pipeline.main
import transforms.read
from pipeline.graph import ExportPlan
from pipeline.options import parse_pipeline_options
from schemas.merge import merge_fragments
from tests.conftest import bundled_files
from transforms.flatten import ReadInstances
from transforms.read import CHUNK_FILES, PickledRow, ReadProcesses, as_row, instance_uids, json_row
from transforms.storage import InputFile, Opener

COUNTS = ("files_matched", "succeeded", "failed", "not_selected_by_filter", "tags_dropped_by_rule", "tags_dropped_not_fit",
          "other_elements", "charset_fallbacks", "bytes_read")
FELL_BACK = "reading in the launcher's process instead"


@pytest.fixture
def folder(tmp_path):
    """pydicom's bundled files, flat, plus a ZIP of a few of them (members are read by the
    read processes too) and a file that is not DICOM."""
    folder = tmp_path / "input"
    folder.mkdir()
    files = bundled_files()
    for index, path in enumerate(files):
        shutil.copyfile(path, folder / f"{index:04d}_{os.path.basename(path)}")
    with zipfile.ZipFile(folder / "some.zip", "w") as bundle:
        for index, path in enumerate(files[:40:4]):
            bundle.write(path, f"member{index}.dcm")
    (folder / "notes.txt").write_text("not DICOM\n")
    return folder


def _export(folder, db, monkeypatch, *extra) -> tuple[dict, list, list, list]:
    """Run the export; return its summary, the plans it built, its rows and its dead letters."""
    plans = []
    build = pipeline.main.build_pipeline
    monkeypatch.setattr(pipeline.main, "build_pipeline", lambda p, plan, *a, **k: plans.append(plan) or build(p, plan, *a, **k))
    summary = pipeline.main.run(["--input", str(folder), "--bq-table", f"duckdb://{db}#t", *extra])
    with duckdb.connect(str(db)) as con:
        rows = sorted(json.dumps(row, sort_keys=True, default=str) for row in
                      [dict(zip([c[0] for c in con.description], r)) for r in con.execute("SELECT * FROM t").fetchall()])
        errors = sorted(con.execute("SELECT path, stage, error_type, message FROM t_errors").fetchall())
    return summary, plans, rows, errors


def test_a_local_run_reads_on_processes_with_exactly_the_rows_and_dead_letters_of_one_thread(
    folder, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(pipeline.main, "usable_cores", lambda: 2)  # one read process per core, whatever the machine
    started, pools = [], []
    init = ReadProcesses.__init__
    monkeypatch.setattr(ReadProcesses, "__init__",
                        lambda self, *a, **k: started.append(a[0]) or pools.append(self) or init(self, *a, **k))
    monkeypatch.setattr(pipeline.main, "READ_PROCESSES_MIN_FILES", 50)
    pooled, [plan], rows, errors = _export(folder, tmp_path / "pooled.duckdb", monkeypatch)
    assert plan.read_processes == 2 and started == [2]
    assert plan.listed_files is None  # an archive among the files: the pipeline lists the input
    assert pools[0]._executor._shutdown_thread and not transforms.read._running  # shut down with the step
    # the same input read in Beam's thread: the user chose the running mode
    threaded, [plan], same_rows, same_errors = _export(
        folder, tmp_path / "threaded.duckdb", monkeypatch, "--direct_running_mode=in_memory"
    )
    assert plan.read_processes == 0 and started == [2]
    assert pooled["succeeded"] > 150 and pooled["failed"] > 0  # the bundled files include broken ones
    assert {name: pooled.get(name) for name in COUNTS} == {name: threaded.get(name) for name in COUNTS}
    assert rows == same_rows
    assert errors == same_errors
    assert any(path.endswith("notes.txt") for path, *_ in errors)
    assert FELL_BACK not in caplog.text  # every chunk was read on the processes


def test_the_fork_server_is_stopped_before_the_load_and_started_again_by_the_next_run(
    folder, tmp_path, monkeypatch, caplog
):
    """The read processes' fork server (~50 MiB) was alive through the destination's
    load, the peak of a run's memory; it is stopped when the pipeline is done."""
    from multiprocessing import forkserver

    from pipeline.destinations.duckdb import DuckDBTable

    monkeypatch.setattr(pipeline.main, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline.main, "READ_PROCESSES_MIN_FILES", 50)
    servers, alive_at_load = [], []
    init = ReadProcesses.__init__

    def started(self, *a, **k):
        init(self, *a, **k)
        servers.append(forkserver._forkserver._forkserver_pid)

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    write = DuckDBTable.write
    monkeypatch.setattr(ReadProcesses, "__init__", started)
    monkeypatch.setattr(DuckDBTable, "write",
                        lambda self, *a, **k: alive_at_load.append([alive(pid) for pid in servers]) or write(self, *a, **k))
    first, *_ = _export(folder, tmp_path / "first.duckdb", monkeypatch)
    second, *_ = _export(folder, tmp_path / "second.duckdb", monkeypatch)
    assert len(servers) == 2 and servers[0] != servers[1]  # the second run started a fork server of its own
    assert alive_at_load == [[False], [False, False]]
    assert first["succeeded"] == second["succeeded"] > 150
    assert FELL_BACK not in caplog.text  # both runs read on processes


@pytest.mark.parametrize("archives", ["expanded", "--no-archives"])
def test_a_local_run_over_plain_files_is_listed_by_the_launcher_with_what_the_pipeline_would_list(
    folder, tmp_path, monkeypatch, archives
):
    """The launcher lists (pipeline.main._list_here) and the pipeline only reads: the same
    rows, dead letters and counts as the pipeline's own listing, overlapping inputs read
    once. An archive is a plain file under --no-archives; otherwise the pipeline lists."""
    monkeypatch.setattr(pipeline.main, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline.main, "READ_PROCESSES_MIN_FILES", 50)
    if archives == "expanded":
        (folder / "some.zip").unlink()
    extra = ["--input", str(folder / "000*"), *(["--no-archives"] if archives != "expanded" else [])]
    taken = []  # the files reach the pipeline from this process, not pickled in its graph

    class Handed(dict):
        def __getitem__(self, token):
            taken.append(token)
            return super().__getitem__(token)

    monkeypatch.setattr(pipeline.graph, "_HANDED_FILES", Handed())
    handed, [plan], rows, errors = _export(folder, tmp_path / "handed.duckdb", monkeypatch, *extra)
    files = sorted(os.listdir(folder))
    assert sorted(os.path.basename(f.path) for f in plan.listed_files) == files  # each file once
    assert len(taken) == 1 and not pipeline.graph._HANDED_FILES  # taken once, forgotten after the run
    assert plan.read_processes == 2  # the count the launcher listed, not a second walk
    monkeypatch.setattr(pipeline.main, "MOST_HANDED_FILES", len(files) - 1)  # too many to hand over
    listed, [plan], same_rows, same_errors = _export(folder, tmp_path / "listed.duckdb", monkeypatch, *extra)
    assert plan.listed_files is None
    assert {name: handed.get(name) for name in COUNTS} == {name: listed.get(name) for name in COUNTS}
    assert handed["files_matched"] == len(files)  # 0000…0009 were listed twice
    assert (rows, errors) == (same_rows, same_errors)
    zipped = [error for error in errors if error[0].endswith("some.zip")]
    assert len(zipped) == (archives != "expanded")  # under --no-archives a ZIP is a file that is not DICOM


def test_rows_handed_over_as_json_load_as_the_rows_python_completes(folder, tmp_path, monkeypatch):
    """A plain run into DuckDB takes the rows as read (JSON text from the read processes,
    lists filled in as DuckDB loads them); an --incremental run completes them in Python
    (pipeline/spool.py). Every instance's row is the same."""
    monkeypatch.setattr(pipeline.main, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline.main, "READ_PROCESSES_MIN_FILES", 50)
    forms = []
    init = ReadProcesses.__init__
    monkeypatch.setattr(ReadProcesses, "__init__", lambda self, *a, **k: forms.append(a[3]) or init(self, *a, **k))
    as_read, [plan], rows, errors = _export(folder, tmp_path / "as_read.duckdb", monkeypatch)
    assert plan.rows_as_read and plan.read_processes == 2
    completed, [plan], same_rows, same_errors = _export(folder, tmp_path / "completed.duckdb", monkeypatch,
                                                        "--incremental")
    assert plan.read_processes == 2 and forms == [transforms.read.JSON, transforms.read.PICKLE]
    by_sop = {}
    for row in map(json.loads, rows):
        by_sop.setdefault(row["SOPInstanceUID"], []).append(row)
    once = {sop: found[0] for sop, found in by_sop.items() if len(found) == 1}
    assert len(once) > 100
    kept = {row["SOPInstanceUID"]: row for row in map(json.loads, same_rows) if row["SOPInstanceUID"] in once}
    assert kept == once
    assert errors == same_errors and as_read["failed"] == completed["failed"] > 0


def test_json_rows_read_back_as_the_rows_even_where_orjson_refuses_a_value():
    row = {"A": "Ünïcode ✓ 山田", "B": [1.5, 1e16, -0.0, 5e-324], "C": {"D": None, "E": []}, "F": 2**63 - 1}
    assert json.loads(json_row(row)) == row
    assert b"\n" not in json_row({"A": "one\ntwo"})  # one line: a JSON lines file's
    for refused in ({"A": 2**70}, {"A": "\ud800"}):  # past 64 bits, a lone surrogate: json writes them
        assert json.loads(json_row(refused)) == refused


def test_read_processes_with_a_filter_file_select_what_one_thread_selects(folder, tmp_path, monkeypatch, caplog):
    import pydicom

    selected = []
    for path in sorted(folder.iterdir())[:60]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            selected.append(f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}")
        except Exception:  # not every bundled file is an instance
            continue
    assert len(selected) > 20
    filter_file = tmp_path / "filter.txt"
    filter_file.write_text("\n".join(selected[::3]) + "\n")
    monkeypatch.setattr(pipeline.main, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline.main, "READ_PROCESSES_MIN_FILES", 50)
    started = []
    init = ReadProcesses.__init__
    monkeypatch.setattr(ReadProcesses, "__init__", lambda self, *a, **k: started.append(a[2]) or init(self, *a, **k))
    args = ("--filter-config-gcs-uri", str(filter_file), "--input-layout", "any")
    pooled, [plan], rows, errors = _export(folder, tmp_path / "pooled.duckdb", monkeypatch, *args)
    assert plan.read_processes >= 2
    threaded, [plan], same_rows, same_errors = _export(
        folder, tmp_path / "threaded.duckdb", monkeypatch, *args, "--direct_running_mode=in_memory"
    )
    assert plan.read_processes == 0
    assert len(started) == 1 and len(started[0]) == len(selected[::3])  # started once, with the filter file
    assert FELL_BACK not in caplog.text
    assert pooled["not_selected_by_filter"] > 0 and pooled["succeeded"] > 0
    assert {name: pooled.get(name) for name in COUNTS} == {name: threaded.get(name) for name in COUNTS}
    assert (rows, errors) == (same_rows, same_errors)


def _drive(dofn: ReadInstances, inputs: list[InputFile], during=None) -> list:
    """Run the DoFn's methods as Beam does for one bundle; ``during(dofn)`` after the
    first chunks are handed over. Returns every output, in order."""
    dofn.setup()
    dofn.start_bundle()
    outputs = []
    for index, input_file in enumerate(inputs):
        outputs += list(dofn.process(input_file))
        if during is not None and index == 2 * CHUNK_FILES - 1:  # the second chunk was just handed over
            during(dofn)
    outputs += [value.value for value in dofn.finish_bundle()]
    dofn.teardown()
    return outputs


def _row(output) -> dict | None:
    return as_row(output.row) if hasattr(output, "row") else None


def _path(output) -> str:
    return output.path if hasattr(output, "path") else output.value["path"]


def test_no_input_is_lost_when_a_read_process_dies(folder):
    """Killing the read processes mid-run: their chunks are read again in this process."""
    inputs = [InputFile(str(path), path.stat().st_size) for path in sorted(folder.iterdir())]
    expected = _drive(ReadInstances(opener=Opener()), inputs)

    in_flight = []

    def kill(dofn):
        in_flight.append(sum(not future.done() for _inputs, future in dofn._pending))
        for process in list(dofn._read_processes._executor._processes.values()):
            os.kill(process.pid, signal.SIGKILL)

    dofn = ReadInstances(opener=Opener(), processes=2)
    outputs = _drive(dofn, inputs, during=kill)
    assert in_flight[0] >= 1  # a chunk was being read when its process died
    assert dofn._read_processes is None and not dofn._use_processes  # it noticed, and read on in this process
    assert [_path(output) for output in outputs] == [_path(output) for output in expected]
    assert [_row(output) for output in outputs] == [_row(output) for output in expected]


def test_outputs_keep_the_inputs_order_on_processes(folder):
    inputs = [InputFile(str(path), path.stat().st_size) for path in sorted(folder.iterdir())]
    outputs = _drive(ReadInstances(opener=Opener(), processes=2), inputs)
    expected = _drive(ReadInstances(opener=Opener()), inputs)
    assert [_path(output) for output in outputs] == [_path(output) for output in expected]
    assert [_row(output) for output in outputs] == [_row(output) for output in expected]
    assert len(outputs) == len(inputs)
    assert all(type(output.row) is PickledRow for output in outputs if hasattr(output, "row"))  # pickled once, there
    assert [instance_uids(output) for output in outputs if hasattr(output, "row")] == [
        instance_uids(output) for output in expected if hasattr(output, "row")]
    # Each path of the schema comes over about once per chunk, and the schema is the same.
    fragments = [output.fragment for output in outputs if hasattr(output, "row")]
    full = [output.fragment for output in expected if hasattr(output, "row")]
    assert merge_fragments(fragments) == merge_fragments(full)
    assert sum(map(len, fragments)) < sum(map(len, full)) / 2
    assert all(new <= whole for new, whole in zip(fragments, full))


class _SomeRemote(Opener):
    """The real opener, telling every third input to wait on threads as a remote one would:
    local and remote inputs interleaved in one bundle."""

    def concurrency(self, input_file):
        return 16 if zlib.crc32(input_file.path.encode()) % 3 == 0 else 1


def test_inputs_read_on_threads_and_on_processes_in_one_bundle_keep_their_order(folder):
    inputs = [InputFile(str(path), path.stat().st_size) for path in sorted(folder.iterdir())]
    assert 0 < sum(_SomeRemote().concurrency(i) > 1 for i in inputs) < len(inputs)
    outputs = _drive(ReadInstances(opener=_SomeRemote(), processes=2), inputs)
    expected = _drive(ReadInstances(opener=Opener()), inputs)
    assert [_path(output) for output in outputs] == [_path(output) for output in expected]
    assert [_row(output) for output in outputs] == [_row(output) for output in expected]


def test_without_read_processes_a_large_local_input_takes_beams_workers(tmp_path, monkeypatch):
    """Where no fork server exists (Windows), the rule before read processes holds."""
    monkeypatch.setattr(pipeline.main, "processes_available", lambda: False)
    for index in range(5):
        (tmp_path / f"f{index}").write_bytes(b"x")
    plan = ExportPlan(listing_units=(str(tmp_path) + "/**",))
    assert pipeline.main._one_beam_process(plan)
    monkeypatch.setattr(pipeline.main, "MULTI_PROCESS_MIN_FILES", 3)
    assert not pipeline.main._one_beam_process(plan)
    options = parse_pipeline_options(["--input", str(tmp_path)])
    assert pipeline.main._read_processes(options, plan, 5000) == 0
    monkeypatch.setattr(pipeline.main, "processes_available", lambda: True)
    assert pipeline.main._one_beam_process(plan)


@pytest.mark.parametrize("units, files, processes", [
    ((), 5000, 2),  # a large local input: one process per core
    ((), 10, 0),  # a few files: starting processes would cost more than it saves
    (("gs://b/d/**",), 5000, 2),  # Cloud Storage: fetched and parsed on the processes too
    (("gs://b/d/**",), 10, 0),  # a few objects: on the launcher's threads
    (("gs://b/d/**",), None, 2),  # more than the launcher lists: the pipeline's listing, on the processes
])
def test_which_runs_read_on_processes(tmp_path, monkeypatch, units, files, processes):
    monkeypatch.setattr(pipeline.main, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline.main, "_client_handed_over", lambda options: True)  # (tested below)
    plan = ExportPlan(listing_units=units or (str(tmp_path) + "/**",))
    options = parse_pipeline_options(["--input", str(tmp_path)])
    pipeline.main._local_defaults(options, plan)
    assert pipeline.main._read_processes(options, plan, files) == processes
    chosen = parse_pipeline_options(["--input", str(tmp_path), "--direct_running_mode=in_memory"])
    pipeline.main._local_defaults(chosen, plan)
    assert pipeline.main._read_processes(chosen, plan, files) == 0  # the user chose how the run is spread


@pytest.mark.parametrize("units, one_process", [(("gs://b/d/**",), True), (("gs://b/d/*", "gs://b/d/a/**"), False)])
def test_cloud_storage_whose_client_cannot_be_handed_over_reads_as_before(tmp_path, monkeypatch, units, one_process):
    """Credentials that cannot be pickled (transforms.storage.client_settings → None): no
    read processes for Cloud Storage; one listing unit on the launcher's threads, several
    on Beam's worker processes."""
    from apache_beam.options.pipeline_options import DirectOptions

    monkeypatch.setattr(pipeline.main, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline.main, "client_settings", lambda options: None)
    plan = ExportPlan(listing_units=units)
    options = parse_pipeline_options(["--input", "gs://b/d/"])
    assert pipeline.main._local_defaults(options, plan) is not one_process
    assert (options.view_as(DirectOptions).direct_running_mode == "in_memory") is one_process
    assert pipeline.main._read_processes(options, plan, 5000) == 0


def test_the_read_step_takes_the_chunks_the_launcher_read_ahead(folder, tmp_path, monkeypatch, caplog):
    """The launcher starts the read processes on the files it listed while Beam starts
    (pipeline.main._read_ahead); the read step takes those processes and every chunk
    read ahead, and reads the rest itself: the same rows as one thread."""
    (folder / "some.zip").unlink()  # plain files: the launcher lists them
    monkeypatch.setattr(pipeline.main, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline.main, "READ_PROCESSES_MIN_FILES", 50)
    monkeypatch.setattr(transforms.read, "READ_AHEAD_FILES", 5 * CHUNK_FILES + 3)  # rounded up to 6 chunks
    pools, ahead, left = [], [], []
    init, read_ahead, shutdown = ReadProcesses.__init__, ReadProcesses.read_ahead, ReadProcesses.shutdown
    monkeypatch.setattr(ReadProcesses, "__init__", lambda self, *a, **k: pools.append(self) or init(self, *a, **k))
    monkeypatch.setattr(ReadProcesses, "read_ahead",
                        lambda self, *a, **k: ahead.append(read_ahead(self, *a, **k)) or ahead[-1])
    monkeypatch.setattr(ReadProcesses, "shutdown", lambda self: left.append(self.unclaimed()) or shutdown(self))
    pooled, [plan], rows, errors = _export(folder, tmp_path / "pooled.duckdb", monkeypatch)
    assert plan.listed_files and plan.read_processes == 2
    assert len(pools) == 1 and ahead == [6 * CHUNK_FILES]  # one pool: the launcher's, taken by the read step
    assert left and set(left) == {0}  # every chunk read ahead was taken
    assert not transforms.read._offered and not transforms.read._running
    threaded, [plan], same_rows, same_errors = _export(
        folder, tmp_path / "threaded.duckdb", monkeypatch, "--direct_running_mode=in_memory"
    )
    assert plan.read_processes == 0 and len(pools) == 1
    assert {name: pooled.get(name) for name in COUNTS} == {name: threaded.get(name) for name in COUNTS}
    assert (rows, errors) == (same_rows, same_errors)
    assert FELL_BACK not in caplog.text


def test_read_processes_are_taken_only_with_the_same_settings_and_chunks_only_when_identical(folder):
    from transforms.filter_file import parse_filter_file

    inputs = [InputFile(str(path), path.stat().st_size) for path in sorted(folder.iterdir())][:3 * CHUNK_FILES]
    lines = parse_filter_file("/studies/1.2.3\n")
    pool = ReadProcesses(2, Opener(), lines, transforms.read.JSON)
    try:
        assert pool.read_ahead(inputs, most=2 * CHUNK_FILES - 1) == 2 * CHUNK_FILES and pool.unclaimed() == 2
        transforms.read.offer(pool)
        assert transforms.read.take(2, Opener(), lines, transforms.read.PICKLE) is None  # another row form
        assert transforms.read.take(2, Opener(expand_archives=False), lines, transforms.read.JSON) is None
        assert transforms.read.take(2, Opener(), None, transforms.read.JSON) is None  # no filter file
        assert transforms.read.take(2, Opener(), parse_filter_file("/studies/1.2.3\n"), transforms.read.JSON) is pool
        assert transforms.read.take(2, Opener(), lines, transforms.read.JSON) is None  # taken once
        first = pool._ahead[tuple(inputs[:CHUNK_FILES])]
        assert pool.submit(inputs[:CHUNK_FILES]) is first and pool.unclaimed() == 1
        shifted = pool.submit(inputs[1:CHUNK_FILES + 1])  # not a chunk read ahead: read now
        assert shifted is not pool._ahead.get(tuple(inputs[CHUNK_FILES:2 * CHUNK_FILES])) and pool.unclaimed() == 1
        outcomes = shifted.result(timeout=60)
        assert [outcome.instance is None for outcome in outcomes] == [True] * CHUNK_FILES  # the filter selects none
        transforms.read.offer(pool)  # offered again, then shut down (the launcher, after the run)
    finally:
        pool.shutdown()
    assert pool.unclaimed() == 0 and pool not in transforms.read._offered and pool not in transforms.read._running


def test_read_ahead_chunks_as_the_read_step_does(folder):
    """An input the read step does not hand to the processes ends its chunk there: the
    chunks read ahead are the read step's, even then."""
    inputs = [InputFile(str(path), path.stat().st_size) for path in sorted(folder.iterdir())][:40]
    pool = ReadProcesses(2, Opener(), None)
    try:
        odd = {inputs[5].path}
        pool._opener.is_local_file = lambda f: f.path not in odd  # (as an archive member would be)
        assert pool.read_ahead(inputs, most=30) == 37  # 5, then 16, 16
        assert set(pool._ahead) == {tuple(inputs[:5]), tuple(inputs[6:22]), tuple(inputs[22:38])}
        dofn = ReadInstances(opener=Opener(), processes=2)
        dofn.setup()
        dofn._read_processes = pool  # as if taken
        dofn._opener.is_local_file = lambda f: f.path not in odd
        dofn.start_bundle()
        for input_file in inputs:
            list(dofn.process(input_file))
        list(dofn.finish_bundle())
        assert pool.unclaimed() == 0  # the read step asked for every chunk read ahead
    finally:
        pool.shutdown()


@pytest.mark.parametrize("argv, starts", [
    (["--input", "/no/such/folder"], "beam imported: False, pydicom imported: False, Cloud Storage: False"),
    (["--input", "gs://b/x/", "--no-such-flag"],  # its client preloaded
     "beam imported: False, pydicom imported: False, Cloud Storage: True"),
    (["--help"], None),
    (["inspect", "x.dcm"], None),
])
def test_the_command_starts_the_read_server_before_it_imports_beam(argv, starts):
    """pipeline.cli.main: for an export, the fork server starts before Beam is imported,
    and before the launcher imports the reading code (pydicom), which the server imports
    meanwhile on the other core."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import transforms.fork_server as fork_server\n"
        "start = fork_server.start_fork_server\n"
        "fork_server.start_fork_server = lambda cloud_storage=False: print(\n"
        "    f\"beam imported: {'apache_beam' in sys.modules}, pydicom imported: {'pydicom' in sys.modules}, \"\n"
        "    f\"Cloud Storage: {cloud_storage}\") or start(cloud_storage)\n"
        "from pipeline import cli\n"
        f"cli.main({argv!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "Traceback" not in done.stderr, done.stderr
    can_start = transforms.read.usable_cores() > 1 and transforms.read.processes_available()
    started = [line for line in done.stdout.splitlines() if line.startswith("beam imported:")]
    assert started[:1] == ([starts] if starts and can_start else [])


def test_read_processes_write_nothing_to_the_terminal_when_the_launcher_hides_its_workers_output():
    """The fork server may start before pipeline.main hides descriptor 2 (pipeline.cli):
    the read processes follow the launcher's descriptor 2 as it is when they start."""
    with pipeline.main.workers_output_hidden():
        pool = ReadProcesses(1, Opener(), None)
        try:
            target = pool._executor.submit(os.readlink, "/proc/self/fd/2").result(timeout=60)
        finally:
            pool.shutdown()
    assert target == os.devnull
