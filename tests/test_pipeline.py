"""The export end to end on Beam's in-process runner, into a real DuckDB file (SPEC §1, §4, §6)."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import time

import duckdb
import pytest
from pydicom.data import get_testdata_file

from pipeline.destinations import DestinationError
from pipeline.destinations.duckdb import DuckDBTable
from pipeline.main import TooManyFailures, UsageError, run
from tests.builders import instance, to_bytes
from transforms.filter_file import FilterFileError
from transforms.header import read_header

SAMPLES = pathlib.Path(__file__).resolve().parents[1] / "samples" / "dicom"
FILTER = SAMPLES.parent / "filter.txt"


def export(*args: str) -> dict:
    return run(["--runner=FnApiRunner", "--progress-seconds=0", *args])


def sample_files() -> list[pathlib.Path]:
    return sorted(SAMPLES.rglob("*.dcm"))


def uids(path) -> tuple:
    with open(path, "rb") as fileobj:
        return read_header(fileobj).uids


def flat_copy(files, folder: pathlib.Path, names=None) -> pathlib.Path:
    """Copy files into one folder under meaningless names (no UID layout, no .dcm)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(files):
        shutil.copyfile(path, folder / (names[index] if names else f"file{index:03d}"))
    return folder


@pytest.fixture
def db(tmp_path):
    return DuckDBTable(str(tmp_path / "export.duckdb"), "instances")


def rows(db: DuckDBTable, table: str | None = None) -> list[dict]:
    return db.read_rows(table)


def sop_uids(db: DuckDBTable) -> set[str]:
    return {row["SOPInstanceUID"] for row in rows(db)}


def columns(db: DuckDBTable) -> list[str]:
    return [field["name"] for field in db.schema()]


def test_a_local_runs_bundles_end_without_waiting_out_beams_sampling_period(db):
    """STATE_SAMPLING_PERIOD_MS: the end of a long bundle (a local run's read step) joins
    Beam's state sampler, which first sleeps out its period: up to 200 ms by Beam's default."""
    from apache_beam.runners.worker import statesampler
    from apache_beam.utils.counters import CounterFactory

    from pipeline.main import STATE_SAMPLING_PERIOD_MS

    export("--input", str(SAMPLES), f"--bq-table={db}")
    assert statesampler.StateSampler("test", CounterFactory()).sampling_period_ms == STATE_SAMPLING_PERIOD_MS
    waits = []
    for _ in range(3):
        sampler = statesampler.StateSampler("test", CounterFactory())  # as Beam's bundle processor makes it
        sampler.start()
        time.sleep(0.4)  # a long bundle: the sampler's sleep has grown to its period
        started = time.monotonic()
        sampler.stop()
        waits.append(time.monotonic() - started)
    assert max(waits) < 3 * STATE_SAMPLING_PERIOD_MS / 1000 < statesampler.DEFAULT_SAMPLING_PERIOD_MS / 1000


# -- SPEC §4: one test per row of the disposition table -----------------------------------


@pytest.mark.parametrize(
    "options",
    [[], ["--write-disposition=WRITE_EMPTY"], ["--write-disposition=WRITE_APPEND"],
     ["--write-disposition=WRITE_TRUNCATE"], ["--overwrite-table"]],
    ids=["neither", "empty", "append", "truncate", "overwrite"],
)
def test_absent_table_is_created_whatever_the_options(db, options):
    summary = export("--input", str(SAMPLES), f"--bq-table={db}", *options)
    assert summary["succeeded"] == len(sample_files()) == len(rows(db))
    assert sop_uids(db) == {uids(p).instance for p in sample_files()}
    assert rows(db, "instances_errors") == []


def test_existing_table_with_overwrite_table_is_overwritten(db, tmp_path):
    files = sample_files()
    export("--input", str(flat_copy(files[:3], tmp_path / "a")), f"--bq-table={db}")
    export("--input", str(flat_copy(files[3:5], tmp_path / "b")), f"--bq-table={db}", "--overwrite-table")
    assert sop_uids(db) == {uids(p).instance for p in files[3:5]}


def _create_table(db: DuckDBTable, ddl: str, *inserts: str) -> None:
    con = duckdb.connect(db.path)
    con.execute(ddl)
    for statement in inserts:
        con.execute(statement)
    con.close()


def test_existing_table_without_an_option_is_an_error_even_if_empty(db, tmp_path):
    _create_table(db, 'CREATE TABLE instances ("SOPInstanceUID" VARCHAR)')
    with pytest.raises(DestinationError, match="already exists"):
        export("--input", str(SAMPLES), f"--bq-table={db}")
    assert rows(db) == [] and columns(db) == ["SOPInstanceUID"]


def test_existing_empty_table_with_write_empty_succeeds(db):
    _create_table(db, 'CREATE TABLE instances ("SOPInstanceUID" VARCHAR)')
    export("--input", str(SAMPLES), f"--bq-table={db}", "--write-disposition=WRITE_EMPTY")
    assert sop_uids(db) == {uids(p).instance for p in sample_files()}


def test_existing_table_with_rows_and_write_empty_is_an_error_and_untouched(db):
    _create_table(db, 'CREATE TABLE instances ("SOPInstanceUID" VARCHAR)', "INSERT INTO instances VALUES ('1.2.3')")
    with pytest.raises(DestinationError, match="not empty"):
        export("--input", str(SAMPLES), f"--bq-table={db}", "--write-disposition=write-empty")
    assert rows(db) == [{"SOPInstanceUID": "1.2.3"}]


def test_write_append_adds_rows_and_extends_the_schema(db, tmp_path):
    files = sample_files()
    ct = next(p for p in files if "20040119072730" in str(p))  # CT_small: GE private tags
    others = [p for p in files if p != ct]
    export("--input", str(flat_copy(others, tmp_path / "a")), f"--bq-table={db}")
    before = columns(db)
    export("--input", str(flat_copy([ct], tmp_path / "b")), f"--bq-table={db}", "--write-disposition=WRITE_APPEND")
    after = columns(db)
    added = [name for name in after if name not in before]
    assert after[: len(before)] == before and "FilterType" in added  # a tag only the CT has
    assert len(rows(db)) == len(files)
    by_sop = {row["SOPInstanceUID"]: row for row in rows(db)}
    assert by_sop[uids(ct).instance]["FilterType"] == "LARGE BOWTIE FIL"
    assert all(row["FilterType"] is None for sop, row in by_sop.items() if sop != uids(ct).instance)


def test_write_append_with_a_conflicting_field_fails_before_writing(db):
    _create_table(db, 'CREATE TABLE instances ("SOPInstanceUID" BIGINT)', "INSERT INTO instances VALUES (7)")
    with pytest.raises(DestinationError, match="SOPInstanceUID: the table has INTEGER NULLABLE, the export needs STRING"):
        export("--input", str(SAMPLES), f"--bq-table={db}", "--write-disposition=WRITE_APPEND")
    assert rows(db) == [{"SOPInstanceUID": 7}]
    assert "instances_errors" not in {r[0] for r in duckdb.connect(db.path).execute("SHOW TABLES").fetchall()}


def test_write_truncate_replaces_rows_and_schema(db):
    _create_table(db, 'CREATE TABLE instances ("Legacy" VARCHAR)', "INSERT INTO instances VALUES ('old')")
    export("--input", str(SAMPLES), f"--bq-table={db}", "--write-disposition=WRITE_TRUNCATE")
    assert "Legacy" not in columns(db)
    assert sop_uids(db) == {uids(p).instance for p in sample_files()}


def test_a_run_that_fails_after_preflight_leaves_the_truncated_table_intact(db, tmp_path):
    _create_table(db, 'CREATE TABLE instances ("Legacy" VARCHAR)', "INSERT INTO instances VALUES ('old')")
    folder = flat_copy(sample_files()[:2], tmp_path / "in")
    (folder / "broken").write_bytes(b"not a dicom file at all")
    with pytest.raises(TooManyFailures, match="1 instances failed"):
        export("--input", str(folder), f"--bq-table={db}", "--write-disposition=WRITE_TRUNCATE", "--max-failures=0")
    assert rows(db) == [{"Legacy": "old"}]


def test_an_export_selecting_no_instance_still_creates_the_table(db, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    summary = export("--input", str(empty), f"--bq-table={db}")
    assert summary["inputs"] == 0
    assert rows(db) == []
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "DroppedTags"} <= set(columns(db))


def test_an_export_selecting_no_instance_truncates_the_table(db, tmp_path):
    export("--input", str(SAMPLES), f"--bq-table={db}")
    filter_file = tmp_path / "none.txt"
    filter_file.write_text("/studies/1.2.3.999\n")
    summary = export("--input", str(SAMPLES), f"--bq-table={db}", "--write-disposition=WRITE_TRUNCATE",
                     f"--filter-config-gcs-uri={filter_file}")
    assert summary["succeeded"] == 0 and summary["filter_lines_selecting_nothing"] == [1]
    assert rows(db) == []


def test_giving_both_disposition_options_is_a_usage_error(db):
    with pytest.raises(UsageError, match="not both"):
        export("--input", str(SAMPLES), f"--bq-table={db}", "--overwrite-table", "--write-disposition=WRITE_APPEND")


@pytest.mark.parametrize("spelling", ["WRITE_APPEND", "write-append", "write_append", "Write-Append"])
def test_write_disposition_spellings(db, spelling):
    export("--input", str(SAMPLES), f"--bq-table={db}")
    export("--input", str(SAMPLES), f"--bq_table={db}", f"--write_disposition={spelling}")
    assert len(rows(db)) == 2 * len(sample_files())


def test_bad_destination_and_disposition_are_reported_before_reading(tmp_path):
    with pytest.raises(UsageError, match="--bq-table must be"):
        export("--input", str(SAMPLES), "--bq-table=postgres://x")
    with pytest.raises(DestinationError, match="table name"):
        export("--input", str(SAMPLES), f"--bq-table=duckdb://{tmp_path}/x.duckdb#bad-name")
    with pytest.raises(UsageError, match="write-disposition must be one of"):
        export("--input", str(SAMPLES), f"--bq-table=duckdb://{tmp_path}/x.duckdb#t", "--write-disposition=APPEND")
    assert not (tmp_path / "x.duckdb").exists()


# -- SPEC §1: the filter file -------------------------------------------------------------


def expected_selection() -> set[str]:
    """What samples/filter.txt selects: the CT study, the MR series, the RT plan instance."""
    selected = set()
    for path in sample_files():
        study, series, sop = uids(path)
        if (study == "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
                or series == "1.3.6.1.4.1.5962.1.3.4.1.20040826185059.5457"
                or sop == "1.2.777.777.77.7.7777.7777.20030903150023"):
            selected.add(sop)
    return selected


def test_filter_lines_on_a_uid_layout_become_path_prefixes(db):
    summary = export("--input", str(SAMPLES), f"--bq-table={db}", f"--filter-config-gcs-uri={FILTER}")
    assert sop_uids(db) == expected_selection() and len(expected_selection()) == 3
    assert summary["listing"].startswith("filter paths under")
    assert summary["files_matched"] == 3  # only the selected files were listed and read
    assert summary["filter_lines_selecting_nothing"] == [4]


@pytest.mark.parametrize("layout", ["auto", "any"])
def test_filter_lines_select_by_each_files_own_uids_in_any_other_layout(db, tmp_path, layout):
    folder = flat_copy(sample_files(), tmp_path / "flat")
    summary = export("--input", str(folder), f"--bq-table={db}", f"--filter-config-gcs-uri={FILTER}",
                     f"--input-layout={layout}")
    assert summary["listing"] == "patterns"
    assert sop_uids(db) == expected_selection()
    assert summary["files_matched"] == len(sample_files())
    assert summary["not_selected_by_filter"] == len(sample_files()) - 3
    assert summary["succeeded"] + summary["failed"] == summary["inputs"] == 3


def test_a_malformed_filter_line_stops_the_run_before_anything_is_read(db, tmp_path):
    filter_file = tmp_path / "filter.txt"
    filter_file.write_bytes(b"/studies/1.2.3\r\n\r\n/studies/1.2.3/series/x.y\r\n/studies/1.2/instances/3\n")
    with pytest.raises(FilterFileError, match=r"lines 3, 4: expected /studies/STUDY_UID"):
        export("--input", str(SAMPLES), f"--bq-table={db}", f"--filter-config-gcs-uri={filter_file}")
    assert not os.path.exists(db.path)


# -- SPEC §6: every input is a row or a dead letter ------------------------------------------


def test_a_folder_mixing_dicom_non_dicom_empty_and_truncated_files(db, tmp_path):
    folder = flat_copy(sample_files()[:3], tmp_path / "mixed")
    (folder / "notes.txt").write_text("hello")
    (folder / "empty").write_bytes(b"")
    data = pathlib.Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (folder / "sub").mkdir()
    (folder / "sub" / "truncated").write_bytes(data[:1000])
    dicomdir = next(pathlib.Path(get_testdata_file("CT_small.dcm")).parent.rglob("DICOMDIR"))
    shutil.copyfile(dicomdir, folder / "DICOMDIR")
    summary = export("--input", str(folder), f"--bq-table={db}", f"--summary-json={tmp_path / 'summary.json'}")
    assert (summary["files_matched"], summary["succeeded"], summary["failed"]) == (7, 3, 4)
    assert summary["succeeded"] + summary["failed"] == summary["inputs"]
    errors = {pathlib.Path(r["path"]).name: (r["stage"], r["error_type"]) for r in rows(db, "instances_errors")}
    assert errors == {
        "notes.txt": ("read", "NotDicomError"),
        "empty": ("read", "EmptyFileError"),
        "truncated": ("read", "TruncatedFileError"),
        "DICOMDIR": ("read", "MissingInstanceUIDError"),
    }
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert len(rows(db)) == 3


def test_dead_letter_messages_never_quote_tag_values(db, tmp_path):
    ds = instance()
    ds.PatientName = "Secret^Patient"
    data = to_bytes(ds)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "cut").write_bytes(data[: data.index(b"Secret") + 3])
    export("--input", str(folder), f"--bq-table={db}")
    [error] = rows(db, "instances_errors")
    assert error["error_type"] == "TruncatedFileError"
    assert "Secret" not in json.dumps(error, default=str)


def test_two_runs_on_shuffled_input_give_identical_schema_and_rows(tmp_path):
    files = sample_files()
    shuffled = files[:]
    random.Random(7).shuffle(shuffled)
    a = flat_copy(files, tmp_path / "a")
    b = flat_copy(shuffled, tmp_path / "b", names=[f"z{i}" for i in range(len(files))][::-1])
    first = DuckDBTable(str(tmp_path / "one.duckdb"), "t")
    second = DuckDBTable(str(tmp_path / "two.duckdb"), "t")
    export("--input", str(a), f"--bq-table={first}")
    export("--input", str(b), f"--bq-table={second}")
    assert first.schema() == second.schema()
    canonical = lambda table: sorted(json.dumps(r, sort_keys=True, default=str) for r in table.read_rows())  # noqa: E731
    assert canonical(first) == canonical(second)


def test_max_failures_allows_up_to_that_many(db, tmp_path):
    folder = flat_copy(sample_files()[:2], tmp_path / "in")
    (folder / "broken").write_bytes(b"nope")
    summary = export("--input", str(folder), f"--bq-table={db}", "--max-failures=1")
    assert summary["failed"] == 1 and len(rows(db)) == 2


# -- Cloud Storage input, through a real GCS emulator ------------------------------------------


def test_gs_input_reads_headers_with_small_ranged_reads(db, gcs_bucket, tmp_path):
    client, bucket = gcs_bucket
    for path in sample_files():
        bucket.blob("dicom/" + str(path.relative_to(SAMPLES))).upload_from_filename(str(path))
    big = instance()
    big.Rows, big.Columns, big.BitsAllocated, big.SamplesPerPixel = 4096, 5120, 16, 1
    big.PixelData = b"\x00\x01" * (4096 * 5120)  # 40 MiB of pixel data after a small header
    big["PixelData"].VR = "OW"
    bucket.blob("big/one").upload_from_string(to_bytes(big))
    assert bucket.get_blob("big/one").size > 40 * 2**20

    summary = export("--input", f"gs://{bucket.name}/big/**", f"--bq-table={db}")
    assert summary["succeeded"] == 1
    assert summary["bytes_read"] <= 128 * 1024  # a few KB of header, not 40 MiB

    filter_file = bucket.blob("config/filter.txt")
    filter_file.upload_from_filename(str(FILTER))
    summary = export("--input", f"gs://{bucket.name}/dicom/", f"--bq-table={db}", "--write-disposition=WRITE_TRUNCATE",
                     f"--filter-config-gcs-uri=gs://{bucket.name}/config/filter.txt")
    assert sop_uids(db) == expected_selection()
    assert summary["listing"].startswith("filter paths under gs://")
    assert summary["filter_lines_selecting_nothing"] == [4]


def test_write_append_extends_records_nested_in_sequences(db, tmp_path):
    from tests.builders import item, sequence

    first, second = instance(), instance()
    first.ReferencedImageSequence = sequence(item(ReferencedSOPInstanceUID="1.2.1"))
    second.ReferencedImageSequence = sequence(item(ReferencedSOPInstanceUID="1.2.2", ReferencedFrameNumber="3"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "one").write_bytes(to_bytes(first))
    (tmp_path / "b" / "two").write_bytes(to_bytes(second))
    export("--input", str(tmp_path / "a"), f"--bq-table={db}")
    export("--input", str(tmp_path / "b"), f"--bq-table={db}", "--write-disposition=WRITE_APPEND")
    [sequence_field] = [f for f in db.schema() if f["name"] == "ReferencedImageSequence"]
    assert [f["name"] for f in sequence_field["fields"]] == ["ReferencedSOPInstanceUID", "ReferencedFrameNumber"]
    items = {row["SOPInstanceUID"]: row["ReferencedImageSequence"] for row in rows(db)}
    # a REPEATED field is never NULL (SPEC §4): the older row's new nested field is []
    assert items[first.SOPInstanceUID] == [{"ReferencedSOPInstanceUID": "1.2.1", "ReferencedFrameNumber": []}]
    assert items[second.SOPInstanceUID] == [{"ReferencedSOPInstanceUID": "1.2.2", "ReferencedFrameNumber": ["3"]}]


def test_files_that_only_start_like_dicom_are_not_read_whole(db, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    # An MP4 and an ICC profile both start with two zero bytes, like group 0000.
    (folder / "movie.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 2_000_000)
    (folder / "profile.icc").write_bytes(b"\x00\x00\x0c\x48appl\x02\x10\x00\x00" + b"\x00" * 3000)
    summary = export("--input", str(folder), f"--bq-table={db}")
    assert summary["failed"] == 2
    assert {r["error_type"] for r in rows(db, "instances_errors")} == {"NotDicomError"}
    assert summary["bytes_read"] < 2 * 64 * 1024 + 10_000


def test_folders_with_glob_characters_in_their_names_are_listed(db, tmp_path):
    root = tmp_path / "in"
    for name in ("PAT1 [123]", "what?", "star*", "plain"):
        (root / name / "x").mkdir(parents=True)
        ds = instance()
        (root / name / "x" / "f.dcm").write_bytes(to_bytes(ds))
    summary = export("--input", str(root), f"--bq-table={db}")
    assert summary["succeeded"] == 4
