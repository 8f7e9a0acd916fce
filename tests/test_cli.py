"""The command as a user meets it (issue 11): exit codes, one-line errors and never a
traceback, nothing written when usage is wrong, --help, --version, a quiet default run,
and Ctrl-C."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import duckdb
import pytest

from pipeline import main as command
from pipeline.cli import NOT_FOR_BEAM, NOT_FOR_LOCAL_FILES, NOT_FOR_LOCAL_RUNS, NOT_FOR_LOCAL_TABLES
from pipeline.cli import not_for_beam as cli_not_for_beam
from tests.test_progress import copies_of_the_samples

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "dicom"


def cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env=env,
    )


@pytest.fixture
def table(tmp_path):
    """A DuckDB table holding one row: what no failed run may change."""
    path = tmp_path / "existing.duckdb"
    with duckdb.connect(str(path)) as connection:
        connection.execute("CREATE TABLE instances (Legacy VARCHAR)")
        connection.execute("INSERT INTO instances VALUES ('old')")
    return path


def table_rows(path: pathlib.Path) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as connection:
        return connection.execute("SELECT * FROM instances").fetchall()


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = command.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class TestHelpAndVersion:
    def test_version_prints_the_version_and_exits_0(self, capsys):
        code, out, err = run_main(capsys, "--version")
        assert (code, err) == (0, "")
        assert re.fullmatch(r"dicom-bq-export \d+\.\d+\.\d+\S*\n", out)

    def test_help_lists_this_tools_options_first_each_explained(self, capsys):
        code, out, _err = run_main(capsys, "--help")
        assert code == 0
        ours = ["--input PATTERN...", "--bq-table URI", "--write-disposition D", "--overwrite-table",
                "--filter-config-gcs-uri URI", "--input-layout LAYOUT", "--summary-json PATH", "--max-failures N",
                "--cluster-by COLUMNS", "--progress-seconds S", "--log-level LEVEL", "--debug", "--version"]
        positions = [out.index(f"\n  {flag}\n") for flag in ours]
        assert positions == sorted(positions)
        assert positions[-1] < out.index("Beam's own options pass")
        assert "[OVERWRITE_TABLE]" not in out and "OVERWRITE_TABLE" not in out
        for flag in ours:  # each followed by its explanation
            after = out[out.index(f"\n  {flag}\n") + len(flag) + 4:]
            assert after.startswith("      ") and len(after.split("\n", 1)[0].strip()) > 10

    def test_no_arguments_is_the_help_with_exit_2(self, capsys):
        code, out, err = run_main(capsys)
        assert code == 2 and "--input PATTERN" in err and out == ""


class TestUsageErrors:
    @pytest.mark.parametrize(
        "args, message",
        [
            (["--bq-tabel", "duckdb://x.duckdb#t"], "--bq-tabel: unknown option; did you mean --bq-table?"),
            (["--write-dispositon", "WRITE_TRUNCATE"], "--write-dispositon: unknown option; did you mean --write-disposition?"),
            (["--frobnicate"], "--frobnicate: unknown option (see --help)"),
            (["--max-failures", "abc"], "--max-failures: expected a whole number, not 'abc'"),
            (["--input-layout", "x"], "--input-layout: invalid choice: 'x' (choose from 'auto', 'by-uid', 'any')"),
            (["--log-level", "LOUD"], "--log-level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not 'LOUD'"),
        ],
    )
    def test_a_usage_error_is_one_line_exit_2_and_writes_nothing(self, capsys, table, args, message):
        code, out, err = run_main(capsys, "--input", str(SAMPLES), f"--bq-table=duckdb://{table}#instances",
                                  "--write-disposition=WRITE_TRUNCATE", *args)
        assert code == 2
        assert err == f"dicom-bq-export: error: {message}\n"
        assert out == ""
        assert table_rows(table) == [("old",)]

    @pytest.mark.parametrize("missing", ["typo", "**/*.DCM"])
    def test_an_input_naming_nothing_does_not_truncate_the_table(self, capsys, table, tmp_path, missing):
        if missing.startswith("**"):
            shutil_copy = copies_of_the_samples(tmp_path / "in", 10)
            pattern = str(shutil_copy / missing)
        else:
            pattern = str(tmp_path / missing)
        code, _out, err = run_main(capsys, "--input", pattern, f"--bq-table=duckdb://{table}#instances",
                                   "--write-disposition", "WRITE_TRUNCATE")
        assert code == 2
        assert re.fullmatch(r"dicom-bq-export: error: --input \S+: (no such file or folder|the pattern matches no "
                            r"file \(names are case-sensitive\))\n", err)
        assert table_rows(table) == [("old",)]


class TestErrorsAreOneLine:
    def test_a_destination_error_is_exit_1(self, capsys, table):
        code, _out, err = run_main(capsys, "--input", str(SAMPLES), f"--bq-table=duckdb://{table}#instances")
        assert code == 1
        assert err.startswith("dicom-bq-export: error: ") and err.count("\n") == 1
        assert table_rows(table) == [("old",)]

    def test_an_unexpected_error_names_its_type_and_debug_shows_the_traceback(self, capsys, monkeypatch):
        import pipeline.main

        def broken(argv):  # a programming error deep in a run: what no user can fix
            raise KeyError("internal")

        monkeypatch.setattr(pipeline.main, "run", broken)
        code, _out, err = run_main(capsys, "--input", str(SAMPLES))
        assert code == 1
        assert err == "dicom-bq-export: error: unexpected KeyError; run again with --debug to see the traceback\n"
        code, _out, err = run_main(capsys, "--input", str(SAMPLES), "--debug")
        assert code == 1 and "Traceback (most recent call last)" in err and "KeyError" in err

    def test_a_run_that_fails_while_its_pipeline_is_built_leaves_no_temporary_folder(self, capsys, monkeypatch,
                                                                                     tmp_path):
        import pipeline.main

        def broken(*args, **kwargs):
            raise KeyError("internal")

        temporary = tmp_path / "tmp"
        temporary.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # where Beam makes its pipeline's folder
        monkeypatch.setattr(pipeline.main, "build_pipeline", broken)
        code, _out, err = run_main(capsys, "--input", str(SAMPLES), f"--bq-table=duckdb://{tmp_path / 'out.duckdb'}#t")
        assert code == 1 and "unexpected KeyError" in err
        assert list(temporary.iterdir()) == []


def test_a_default_run_prints_only_the_summary(tmp_path):
    done = cli("--input", str(SAMPLES), "--bq-table", f"duckdb://{tmp_path / 'x.duckdb'}#t")
    assert done.returncode == 0
    assert done.stderr == ""
    assert done.stdout.startswith("dicom-bq-export: exported to ")


def test_log_level_shows_beams_records(tmp_path):
    done = cli("--input", str(SAMPLES), "--bq-table", f"duckdb://{tmp_path / 'x.duckdb'}#t", "--log-level", "INFO")
    assert done.returncode == 0
    assert re.search(r"^INFO apache_beam\.", done.stderr, re.M)


def test_the_readme_filter_example_runs_in_one_process(tmp_path):
    """The README's three-line filter example: no worker process is started."""
    from apache_beam.options.pipeline_options import DirectOptions

    from pipeline.options import ExportOptions, parse_pipeline_options

    options = parse_pipeline_options(["--input", str(SAMPLES), "--filter-config-gcs-uri",
                                      str(REPO / "samples" / "filter.txt")])
    plan, _filter = command.plan_export(options.view_as(ExportOptions), options)
    command._local_defaults(options, plan)
    assert options.view_as(DirectOptions).direct_running_mode == "in_memory"


def test_a_running_mode_given_on_the_command_line_is_kept():
    """``--direct_running_mode=in_memory`` is the user's choice even for an input that
    would otherwise get worker processes (several remote listing units)."""
    from apache_beam.options.pipeline_options import DirectOptions

    from pipeline.graph import ExportPlan
    from pipeline.options import parse_pipeline_options

    plan = ExportPlan(listing_units=("gs://b/d/*", str(SAMPLES) + "/**"))  # Cloud Storage and local files
    chosen = parse_pipeline_options(["--input", "gs://b/d", "--direct_running_mode=in_memory"])
    assert command._local_defaults(chosen, plan) is False
    assert chosen.view_as(DirectOptions).direct_running_mode == "in_memory"
    defaulted = parse_pipeline_options(["--input", "gs://b/d"])
    assert command._local_defaults(defaulted, plan) is (command.usable_cores() > 1)


# -- Ctrl-C -----------------------------------------------------------------------------------


def _processes_marked(mark: str) -> list[int]:
    """Processes (Beam's workers included) started with our marker in their environment."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if f"DICOM_BQ_EXPORT_TEST_MARK={mark}".encode() in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("when", ["after_a_second", "while_reading"])
def test_ctrl_c_is_one_line_exit_130_and_nothing_written(tmp_path, table, when):
    """A real run on 3,000 files (read processes), interrupted as a terminal does:
    SIGINT to the whole process group."""
    inputs = copies_of_the_samples(tmp_path / "in", 3000)
    mark = uuid.uuid4().hex
    env = dict(os.environ, DICOM_BQ_EXPORT_TEST_MARK=mark)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--input", str(inputs), f"--bq-table=duckdb://{table}#instances",
         "--write-disposition=WRITE_TRUNCATE", "--progress-seconds=0.2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
        # a terminal's foreground job: SIGINT not ignored, even if this test runs in the background
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    if when == "after_a_second":
        time.sleep(1)
    else:  # once the workers are reading (the progress lines say so)
        line = b""
        while b"files read" not in line:
            line = process.stderr.readline()
            assert line, "the run ended before reading"
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    lines = [line for line in err.decode().splitlines() if "files read" not in line and "listing" not in line
             and "starting" not in line]
    assert lines == ["dicom-bq-export: error: interrupted; nothing was written"], err.decode()[-3000:]
    assert out == b""
    assert table_rows(table) == [("old",)]
    time.sleep(0.5)
    assert _processes_marked(mark) == []  # no worker left behind


# -- the summary ------------------------------------------------------------------------------


def _counts(**figures) -> dict:
    counts = dict.fromkeys(
        ("files_listed", "files_matched", "succeeded", "failed", "not_selected", "bytes_read", "dropped_tags",
         "moved_to_other_elements", "charset_fallbacks", "undecodable_values", "too_deep",
         "dropped_by_rule", "dropped_not_fit"), 0)
    counts.update(figures)
    return counts


def _summary(counts: dict) -> dict:
    from pipeline.destinations import Disposition
    from pipeline.summary import build

    return build(counts, duration=2.0, destination="duckdb://x.duckdb#t", errors_table="duckdb://x.duckdb#t_errors",
                 disposition=Disposition.DEFAULT,
                 filter_file=None, lines_used=None, listing="patterns")


def test_the_summary_breaks_failures_down_by_type_most_frequent_first():
    from pipeline.summary import render

    kinds = {"NotDicomError": 40, "TruncatedError": 7, "MissingUIDError": 7, "A": 3, "B": 2, "C": 1, "D": 1}
    counts = _counts(files_matched=161, succeeded=100, failed=61, **{f"failed:{k}": v for k, v in kinds.items()})
    counts["failed:Unused"] = 0
    summary = _summary(counts)
    assert list(summary["failures_by_type"].items()) == [
        ("NotDicomError", 40), ("MissingUIDError", 7), ("TruncatedError", 7), ("A", 3), ("B", 2), ("C", 1), ("D", 1)]
    text = render(summary)
    failed = text.index("instances failed")
    shown = [re.match(r" {4}(\S.*?) +([\d,]+)$", line).groups() for line in text[failed:].splitlines()[1:7]]
    assert shown == [("NotDicomError", "40"), ("MissingUIDError", "7"), ("TruncatedError", "7"), ("A", "3"),
                     ("B", "2"), ("2 other types", "2")]


def test_the_summary_separates_tags_dropped_by_rule_from_values_that_did_not_fit():
    from pipeline.summary import render

    summary = _summary(_counts(files_matched=10, succeeded=10, dropped_tags=27, dropped_by_rule=25, dropped_not_fit=2))
    assert (summary["dropped_by_rule"], summary["dropped_not_fit"], summary["dropped_tags"]) == (25, 2, 27)
    text = render(summary)
    assert re.search(r"^  tags dropped by rule +25 +\(binary VRs, Pixel Data: by design\)$", text, re.M)
    assert re.search(r"^  tags dropped, not fit +2 +\(value could not be kept; named in DroppedTags\)$", text, re.M)
    assert "    " + "NotDicomError" not in text  # no failure lines without failures


def test_the_summary_json_has_the_same_breakdown(tmp_path):
    import json

    from pipeline.summary import write_json

    summary = _summary(_counts(files_matched=3, succeeded=1, failed=2, **{"failed:NotDicomError": 2},
                               dropped_by_rule=5, dropped_not_fit=1, dropped_tags=6))
    write_json(summary, str(tmp_path / "summary.json"))
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["failures_by_type"] == {"NotDicomError": 2}
    assert (written["dropped_by_rule"], written["dropped_not_fit"]) == (5, 1)


def test_beam_is_imported_without_the_modules_it_would_import_for_nothing():
    """The command imports Beam without pandas, pymongo and bson (which Beam imports, if
    installed, for its pandas batches and MongoDB IO: never used here), without Beam's
    warning about a missing bson, and they import as usual afterwards."""
    script = (
        "import importlib.util, json, sys\n"
        "from pipeline import cli\n"
        "with cli.beam_imported_without(cli.NOT_FOR_BEAM):\n"
        "    import pipeline.main\n"
        "during = {name: name in sys.modules for name in cli.NOT_FOR_BEAM}\n"
        "import pymongo, bson\n"
        "if importlib.util.find_spec('pandas') is not None:\n"
        "    import pandas\n"
        "after = {name: sys.modules.get(name) is not None for name in ('pymongo', 'bson', 'pandas')}\n"
        "print(json.dumps({'during': during, 'after': after}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    result = json.loads(done.stdout)
    assert result["during"] == {"pandas": False, "pymongo": False, "bson": False}
    has_pandas = importlib.util.find_spec("pandas") is not None
    assert result["after"] == {"pymongo": True, "bson": True, "pandas": has_pandas}


@pytest.mark.parametrize("argv, local_run, local_tables, local_files", [
    ([], True, True, True),
    (["--input", "scans", "--bq-table=duckdb://out.duckdb#t", "--bq_table", "parquet://out"], True, True, True),
    (["--runner=DirectRunner"], False, False, False),
    (["--runner", "x", "--input", "scans"], False, False, False),
    (["--input", "gs://bucket/scans"], True, True, False),
    (["--input", "scans", "--filter-config-gcs-uri", "gs://bucket/filter.txt"], True, True, False),
    (["--input", "scans", "--bq-table", "parquet+gs://bucket/out"], True, True, False),
    (["--input", "scans", "--bq-table", "bq://project.dataset.table"], True, False, False),
    (["--input", "scans", "--bq-table=project:dataset.table"], True, False, False),
    (["--input", "scans", "--bq_table", "project.dataset.table"], True, False, False),
    (["--input", "scans", "--bq-table"], True, False, False),
])
def test_beam_is_imported_without_what_the_command_line_cannot_use(argv, local_run, local_tables, local_files):
    """Without --runner, Beam is imported without the clients only a remote runner or a
    streaming pipeline uses; if the command line also names no BigQuery table (a
    scheme-less --bq-table is one), without Beam's BigQuery IO; if it names no Cloud
    Storage path either, without Beam's Cloud Storage client. With --runner, Beam is
    imported whole."""
    hides = set(cli_not_for_beam(argv))
    assert hides >= set(NOT_FOR_BEAM)
    assert (hides >= set(NOT_FOR_LOCAL_RUNS)) is local_run
    assert (hides >= set(NOT_FOR_LOCAL_TABLES)) is local_tables
    assert (hides >= set(NOT_FOR_LOCAL_FILES)) is local_files


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_a_local_run_exports_with_beam_imported_without_what_it_cannot_use(tmp_path, destination):
    """A local run into a DuckDB file or a Parquet folder, as the command imports Beam (the
    test above): it exports every instance; none of the modules hidden from Beam is
    imported by the run (but pyarrow's Parquet module, which the Parquet destination
    imports for itself), and each imports as usual afterwards."""
    uri = f"duckdb://{tmp_path / 'out.duckdb'}#instances" if destination == "duckdb" else f"parquet://{tmp_path / 'out'}"
    script = (
        "import importlib, json, sys\n"
        "from pipeline import cli\n"
        "hidden = cli.NOT_FOR_LOCAL_RUNS + cli.NOT_FOR_LOCAL_TABLES + cli.NOT_FOR_LOCAL_FILES\n"
        f"code = cli.main(['--input', {str(SAMPLES)!r}, '--bq-table={uri}', '--progress-seconds=0'])\n"
        "during = sorted(name for name in hidden if sys.modules.get(name) is not None)\n"
        "clients = ('google.cloud.storage', 'google.cloud.bigquery')\n"
        "clients_during = sorted(name for name in clients if name in sys.modules)\n"
        "after = [name for name in hidden + clients if importlib.util.find_spec(name) is not None]\n"
        "for name in after:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'code': code, 'during': during, 'clients': clients_during, 'after': after}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 0 and result["clients"] == []
    assert result["during"] == ([] if destination == "duckdb" else ["pyarrow.parquet"])
    # Installed with Beam's gcp extra: there was something to hide.
    assert {"google.cloud.dataflow", "google.cloud.storage", "apache_beam.io.gcp.gcsio"} <= set(result["after"])
    expected = len(list(SAMPLES.rglob("*.dcm")))
    if destination == "duckdb":
        with duckdb.connect(str(tmp_path / "out.duckdb"), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM instances").fetchone()[0] == expected
    else:
        with duckdb.connect() as con:
            rows = con.execute(f"SELECT count(*) FROM read_parquet('{tmp_path / 'out'}/*.parquet')").fetchone()[0]
        assert rows == expected
    assert "Traceback" not in done.stderr and "bigquery" not in done.stderr.lower()


def test_a_cloud_storage_run_exports_with_beam_imported_without_bigquery_io(gcs_bucket, gcs_emulator, tmp_path):
    """A local run from gs:// into DuckDB, as the command imports Beam: without Beam's
    BigQuery IO (never imported by the run), with its Cloud Storage filesystem; every
    instance is exported."""
    _client, bucket = gcs_bucket
    samples = sorted(SAMPLES.rglob("*.dcm"))
    for path in samples:
        bucket.blob("in/" + str(path.relative_to(SAMPLES))).upload_from_filename(str(path))
    argv = ["--input", f"gs://{bucket.name}/in/", f"--bq-table=duckdb://{tmp_path / 'out.duckdb'}#instances",
            "--progress-seconds=0"]
    assert set(NOT_FOR_LOCAL_TABLES) <= set(cli_not_for_beam(argv))
    script = (
        "import json, sys\n"
        "import google.auth\n"
        "from google.auth.credentials import AnonymousCredentials\n"
        "google.auth.default = lambda *a, **k: (AnonymousCredentials(), 'test-project')\n"
        "from pipeline import cli\n"
        f"code = cli.main({argv!r})\n"
        "during = sorted(name for name in cli.NOT_FOR_LOCAL_TABLES + ('google.cloud.bigquery',) if name in sys.modules)\n"
        "print(json.dumps({'code': code, 'during': during}))\n"
    )
    env = dict(os.environ, STORAGE_EMULATOR_HOST=gcs_emulator)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"code": 0, "during": []}
    with duckdb.connect(str(tmp_path / "out.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM instances").fetchone()[0] == len(samples)
    assert "Traceback" not in done.stderr
