"""Reading while Beam is imported (pipeline.early, pipeline.cli).

Real files (pydicom's bundled test files, twice over: more than the read processes'
minimum), real read processes, the real Beam runner and real DuckDB files. A run whose
first files were read before Beam was imported must be exactly the run without that;
where the guess was wrong, the processes it started are ended and the run reads for itself.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import NamedTuple

import duckdb
import pytest

import pipeline.early as early
import pipeline.main
import transforms.read
from tests.conftest import bundled_files

COUNTS = ("files_matched", "succeeded", "failed", "failures_by_type", "dropped_tags", "dropped_by_rule",
          "dropped_not_fit", "moved_to_other_elements", "charset_fallbacks", "undecodable_values", "bytes_read")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def folder(tmp_path):
    """pydicom's bundled files twice (in two sub-folders: the input is split into listing
    units), a file that is not DICOM: more files than READ_PROCESSES_MIN_FILES."""
    folder = tmp_path / "input"
    for copy in ("a", "b"):
        (folder / copy).mkdir(parents=True)
        for index, path in enumerate(bundled_files()):
            shutil.copyfile(path, folder / copy / f"{index:04d}_{os.path.basename(path)}")
    (folder / "notes.txt").write_text("not DICOM\n")
    assert len(bundled_files()) * 2 >= early.READ_PROCESSES_MIN_FILES
    return folder


@pytest.fixture(autouse=True)
def nothing_left_started():
    """No test leaves read processes started early for the next one to claim."""
    yield
    early.discard()


@pytest.fixture
def two_cores(monkeypatch):
    """One read process per core, two cores, whatever the machine."""
    monkeypatch.setattr(early, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline.main, "usable_cores", lambda: 2)


@pytest.fixture
def claims(monkeypatch):
    """What each early.claim returned (True: the run took the processes started early)."""
    taken = []
    claim = early.claim
    monkeypatch.setattr(early, "claim", lambda *a: taken.append(claim(*a)) or taken[-1])
    return taken


def _table(db) -> tuple[list, list]:
    with duckdb.connect(str(db)) as con:
        rows = sorted(json.dumps(row, sort_keys=True, default=str) for row in
                      [dict(zip([c[0] for c in con.description], r)) for r in con.execute("SELECT * FROM t").fetchall()])
        errors = sorted(con.execute("SELECT path, stage, error_type, message FROM t_errors").fetchall())
    return rows, errors


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # (gone while read)
        return False


def _all_ended(pids: list[int], seconds: float = 10) -> bool:
    """True once none of the processes runs (a killed one may take a moment to go)."""
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class _Running(NamedTuple):
    pids: list[int]  # the processes early.start started
    manager: threading.Thread  # their executor's thread


def _started() -> _Running:
    """What early.start started, once its listing thread is done and the processes read."""
    early._thread.join()
    assert early._started is not None
    pool = early._started.processes
    for future in list(pool._ahead.values())[:1]:
        future.result(timeout=60)  # the processes are up and reading
    return _Running([process.pid for process in pool._executor._processes.values()],
                    pool._executor._executor_manager_thread)


def _ended_cleanly(running: _Running) -> bool:
    """The processes are gone and so is their executor's thread, which an interpreter
    joins when it exits (a process killed while sending its outcomes would leave it
    waiting forever for the rest of the message: the command would never exit)."""
    running.manager.join(timeout=30)
    return _all_ended(running.pids) and not running.manager.is_alive()


@pytest.mark.parametrize("argv, expected", [
    (["--input", "F"], (("F",), "json", True, False)),
    (["export", "--input", "F", "G", "--bq-table", "duckdb://x.duckdb#t"], (("F", "G"), "json", True, False)),
    (["--input=F", "--bq_table=parquet://out", "--debug"], (("F",), "pickle", False, False)),
    (["--input", "F", "--overwrite-table", "--write_disposition", "WRITE_APPEND", "--summary-json", "s.json",
      "--progress-seconds=0", "--max-failures", "3", "--log-level", "INFO"], (("F",), "json", True, False)),
    (["--input", "F", "--overwrite-table", "true", "--input", "G"], (("F", "G"), "json", True, False)),
    (["--input", "F", "--bq-table", "bq://p.d.t"], None),  # not a local destination
    (["--input", "F", "--bq-table"], None),
    (["--input", "F", "--runner", "DataflowRunner"], None),  # anything else decides for itself
    (["--input", "F", "--filter-config-gcs-uri", "f.txt"], None),
    (["--input", "F", "--incremental"], None),
    (["--input", "F", "--no-archives"], None),
    (["--input", "F", "--direct_num_workers=2"], None),
    (["--input", "F", "stray"], None),
    (["--input", "--bq-table", "duckdb://x.duckdb#t"], None),  # no input value
    (["--input", "F/*.dcm"], None),  # a glob: Beam's glob rules
    (["--input", "gs://bucket/x/", "gs://other"], (("gs://bucket/x/", "gs://other"), "json", True, True)),
    (["--input", "gs://bucket/x/", "F"], None),  # Cloud Storage and local disk: the run decides
    (["--input", "gs://bucket/x/", "--project", "p"], None),  # the client would not be the guessed one
    (["--input", "gs:///x"], None),  # no bucket
    (["--input", "gs://bucket/x/*.dcm"], None),
    (["--input", "s3://bucket/x/"], None),
    (["--input", "no/such/folder"], None),  # the run reports it
    (["--help"], None),
    ([], None),
])
def test_which_command_lines_are_read_early(tmp_path, monkeypatch, argv, expected):
    for name in ("F", "G"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    guess = early.recognise(argv)
    assert (None if guess is None else tuple(guess)) == expected


def test_the_command_reads_before_beam_is_imported_and_the_run_takes_those_reads(folder, tmp_path):
    """pipeline.cli.main in a fresh process: the listing thread starts before Beam is
    imported, the run claims its processes, and the table is the table of a run that
    read everything itself."""
    db = tmp_path / "early.duckdb"
    script = (
        "import json, sys\n"
        "import pipeline.early as early\n"
        "seen = {}\n"
        "start, claim = early.start, early.claim\n"
        "def started(argv):\n"
        "    seen['beam imported at start'] = 'apache_beam' in sys.modules\n"
        "    return start(argv)\n"
        "def claimed(*args):\n"
        "    taken = claim(*args)\n"
        "    seen['claimed'] = taken is not None\n"
        "    return taken\n"
        "early.start, early.claim = started, claimed\n"
        "from pipeline import cli\n"
        f"code = cli.main(['--input', {str(folder)!r}, '--bq-table', 'duckdb://{db}#t'])\n"
        "print(json.dumps({'code': code, **seen}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "Traceback" not in done.stderr, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    can_start = transforms.read.usable_cores() > 1 and transforms.read.processes_available()
    expected = {"code": 0, "beam imported at start": False, "claimed": True} if can_start else {"code": 0}
    assert result == expected
    summary = pipeline.main.run(["--input", str(folder), "--bq-table", f"duckdb://{tmp_path / 'late.duckdb'}#t"])
    assert summary["succeeded"] > 300 and summary["failed"] > 0
    assert _table(db) == _table(tmp_path / "late.duckdb")


def test_a_wrong_guess_is_ended_and_the_run_reads_for_itself(folder, tmp_path, two_cores, claims):
    """Started for DuckDB (rows as JSON), run into Parquet (rows pickled): the run does
    not take them, ends them, and exports every file."""
    assert early.start(["--input", str(folder), "--bq-table", f"duckdb://{tmp_path / 'x.duckdb'}#t"])
    running = _started()
    assert running.pids and all(_alive(pid) for pid in running.pids)
    code = pipeline.main.main(["--input", str(folder), "--bq-table", f"parquet://{tmp_path / 'out'}"])
    assert code == 0 and claims == [None]
    assert _ended_cleanly(running)
    assert early._started is None and not transforms.read._running
    with duckdb.connect() as con:
        parquet = con.execute(f"SELECT count(*) FROM '{tmp_path / 'out'}/**/*.parquet'").fetchone()[0]
    summary = pipeline.main.run(["--input", str(folder), "--bq-table", f"duckdb://{tmp_path / 'y.duckdb'}#t"])
    assert parquet == summary["succeeded"] > 300


def test_files_that_changed_since_the_early_listing_are_read_as_the_run_lists_them(folder, tmp_path, two_cores,
                                                                                   claims):
    """A file added after the early listing: the run's listing differs, so it reads
    everything itself, the new file included."""
    db = tmp_path / "t.duckdb"
    argv = ["--input", str(folder), "--bq-table", f"duckdb://{db}#t"]
    assert early.start(argv)
    running = _started()
    shutil.copyfile(bundled_files()[0], folder / "b" / "added.dcm")
    summary = tmp_path / "summary.json"
    assert pipeline.main.main([*argv, "--summary-json", str(summary)]) == 0 and claims == [None]
    assert _ended_cleanly(running)
    files = sum(len(names) for _root, _dirs, names in os.walk(folder))
    assert json.loads(summary.read_text())["files_matched"] == files


def test_a_run_that_fails_before_reading_ends_what_was_started_early(folder, tmp_path, two_cores, claims, capsys):
    db = tmp_path / "t.duckdb"
    argv = ["--input", str(folder), "--bq-table", f"duckdb://{db}#t"]
    assert pipeline.main.main(argv) == 0
    assert early.start(argv)
    running = _started()
    assert pipeline.main.main(argv) == 1  # the table exists (and no --write-disposition)
    assert "already exists" in capsys.readouterr().err
    assert claims == [None] and early._started is None  # (the first run's: nothing was started for it)
    assert _ended_cleanly(running)


def test_the_run_takes_the_early_reads_when_the_guess_is_right(folder, tmp_path, two_cores, claims):
    """In this process (Beam already imported): the same settings and listing, the
    processes are taken, every chunk read early is used, and the rows are those of a
    run that read everything itself."""
    argv = ["--input", str(folder), "--bq-table", f"duckdb://{tmp_path / 'early.duckdb'}#t"]
    assert early.start(argv)
    assert _started().pids
    pool = early._started.processes
    left = []
    shutdown = pool.shutdown
    pool.shutdown = lambda: left.append(pool.unclaimed()) or shutdown()
    assert pipeline.main.main([*argv, "--summary-json", str(tmp_path / "early.json")]) == 0
    assert claims == [pool] and left and set(left) == {0}
    assert not transforms.read._running and not transforms.read._offered
    late = pipeline.main.run(["--input", str(folder), "--bq-table", f"duckdb://{tmp_path / 'late.duckdb'}#t"])
    counted = json.loads((tmp_path / "early.json").read_text())
    assert {name: counted[name] for name in COUNTS} == {name: late[name] for name in COUNTS}
    assert _table(tmp_path / "early.duckdb") == _table(tmp_path / "late.duckdb")


def test_a_folders_own_units_list_every_file_below_it_once(tmp_path):
    """transforms.listing matches FOLDER/** and FOLDER/* (the units a folder input is split
    into) without Beam's glob rules, for folder names that are glob characters
    themselves too: every file once, a name with a backslash included (Beam's ``*``
    matches no backslash: such a file directly in a split folder was listed by no unit)."""
    from transforms.listing import iter_files, listing_units, shard_listing_units

    root = tmp_path / "in"
    for folder in ("", "a[1]*", "a[1]*/b[2]", "c?", "c?/d/e"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in ("x.dcm", "back\\slash", "[y]"):
            (root / folder / name).write_bytes(b"")
    every = sorted(os.path.join(folder, name) for folder, _dirs, names in os.walk(root) for name in names)
    assert len(every) == 15
    units = shard_listing_units(listing_units(str(root)))
    assert len(units) > 3 and all(unit.endswith(("/*", "/**")) for unit in units)
    listed = [f.path for unit in units for f in iter_files(unit)]
    assert sorted(listed) == every  # each file in exactly one unit
    named = listing_units(str(root / "a[1]*"))  # a folder named with glob characters: one unit
    assert sorted(f.path for f in iter_files(named[0])) == [p for p in every if "/a[1]*/" in p]
    assert sorted(f.path for f in iter_files(glob.escape(str(root / "c?")) + "/*")) == [
        str(root / "c?" / name) for name in sorted(("x.dcm", "back\\slash", "[y]"))]


def test_cloud_storage_client_settings_made_without_beam_are_beams(gcs_emulator, monkeypatch):
    """transforms.storage.default_client_settings guesses the client Beam makes for a run
    with no Google Cloud options (Beam's scopes, user agent and audit header); the guess
    is the same as Beam's own for the same credentials, and any difference in what makes
    a client (credentials, project, headers, endpoint) is seen."""
    import google.auth
    from apache_beam.internal.gcp import auth
    from apache_beam.io.gcp import gcsio
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
    from google.oauth2.credentials import Credentials

    from transforms import storage

    assert list(storage.BEAM_OAUTH_SCOPES) == GoogleCloudOptions.OAUTH_SCOPES
    asked = []

    def user_credentials(*args, scopes=None, **kwargs):
        asked.append(tuple(scopes))
        return Credentials(token="t", refresh_token="r", client_id="someone", client_secret="s", scopes=scopes), "p"

    monkeypatch.setattr(google.auth, "default", user_credentials)
    monkeypatch.setattr(auth._Credentials, "_credentials_init", False)  # Beam keeps the first it found
    guessed = storage.default_client_settings()
    beams = storage._settings_of(gcsio.create_storage_client(PipelineOptions([])))
    assert asked == [storage.BEAM_OAUTH_SCOPES] * 2
    assert guessed is not None and guessed.credentials is not None and storage.same_client(guessed, beams)
    other = Credentials(token="t", refresh_token="r", client_id="another", client_secret="s",
                        scopes=list(storage.BEAM_OAUTH_SCOPES))
    for changed in (beams._replace(credentials=other), beams._replace(credentials=None),
                    beams._replace(project="other"), beams._replace(emulator_host="http://elsewhere"),
                    beams._replace(extra_headers={"x-goog-custom-audit-job": "job"}), None):
        assert not storage.same_client(guessed, changed)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (_ for _ in ()).throw(
        google.auth.exceptions.DefaultCredentialsError("none here")))
    assert storage.default_client_settings() is None  # the run finds its own (Beam retries)


@pytest.fixture
def bucket_folder(gcs_bucket, folder):
    """The folder fixture's files uploaded under gs://BUCKET/in/: ``gs://`` folder URL."""
    _client, bucket = gcs_bucket
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        bucket.blob("in/" + str(path.relative_to(folder))).upload_from_filename(str(path))
    return f"gs://{bucket.name}/in/"


@pytest.fixture
def beams_credentials_found_again(monkeypatch):
    """Beam keeps the credentials it first found in a process; another test may have
    found none (an anonymous client) before the anonymous_gcp fixture was in place."""
    from apache_beam.internal.gcp import auth

    monkeypatch.setattr(auth._Credentials, "_credentials_init", False)


def test_cloud_storage_is_read_while_beam_is_imported_and_taken_by_the_run(
        bucket_folder, tmp_path, two_cores, claims, beams_credentials_found_again):
    """gs:// inputs: listed and read early through the guessed client, taken by the run
    whose own client has the same settings; the rows are those of a run that read
    everything itself."""
    argv = ["--input", bucket_folder, "--bq-table", f"duckdb://{tmp_path / 'early.duckdb'}#t"]
    assert early.start(argv)
    assert _started().pids
    pool = early._started.processes
    assert early._started.client is not None
    assert pipeline.main.main([*argv, "--summary-json", str(tmp_path / "early.json")]) == 0
    assert claims == [pool]
    late = pipeline.main.run(["--input", bucket_folder, "--bq-table", f"duckdb://{tmp_path / 'late.duckdb'}#t"])
    counted = json.loads((tmp_path / "early.json").read_text())
    assert counted["succeeded"] > 300
    assert {name: counted[name] for name in COUNTS} == {name: late[name] for name in COUNTS}
    assert _table(tmp_path / "early.duckdb") == _table(tmp_path / "late.duckdb")


def test_cloud_storage_read_early_with_another_client_is_not_taken(
        bucket_folder, tmp_path, two_cores, claims, beams_credentials_found_again, monkeypatch):
    """A guessed client that is not the run's (here: another audit header): the run does
    not take what was read with it, ends it, and reads everything itself."""
    from transforms import storage

    guess = storage.default_client_settings
    monkeypatch.setattr(early, "default_client_settings",
                        lambda: guess()._replace(extra_headers={"x-goog-custom-audit-job": "another"}))
    argv = ["--input", bucket_folder, "--bq-table", f"duckdb://{tmp_path / 'early.duckdb'}#t"]
    assert early.start(argv)
    running = _started()
    assert pipeline.main.main([*argv, "--summary-json", str(tmp_path / "early.json")]) == 0
    assert claims == [None]
    assert _ended_cleanly(running)
    files = sum(1 for path in (tmp_path / "input").rglob("*") if path.is_file())
    counted = json.loads((tmp_path / "early.json").read_text())
    assert counted["files_matched"] == files and counted["succeeded"] + counted["failed"] == files


def test_a_run_does_not_wait_long_for_an_early_start_and_what_starts_late_is_ended(
        bucket_folder, tmp_path, two_cores, claims, beams_credentials_found_again, monkeypatch):
    """Credentials slow to come (a metadata server): the run waits WAIT_SECONDS for the
    early start, then lists and reads for itself; what the thread starts afterwards is
    shut down at once, never left running."""
    from transforms import storage

    release = threading.Event()
    guess = storage.default_client_settings
    monkeypatch.setattr(early, "default_client_settings", lambda: release.wait(60) and guess())
    monkeypatch.setattr(early, "WAIT_SECONDS", 0.2)
    started = []
    monkeypatch.setattr(early, "ReadProcesses", lambda *a, **k: started.append(transforms.read.ReadProcesses(*a, **k))
                        or started[-1])
    argv = ["--input", bucket_folder, "--bq-table", f"duckdb://{tmp_path / 'early.duckdb'}#t"]
    assert early.start(argv)
    assert pipeline.main.main([*argv, "--summary-json", str(tmp_path / "early.json")]) == 0
    assert claims == [None] and early._thread.is_alive()
    assert json.loads((tmp_path / "early.json").read_text())["succeeded"] > 300
    release.set()
    early._thread.join(60)
    assert len(started) == 1 and started[0] not in transforms.read._running  # started, then shut down
    assert early._started is None
