"""``dicom-bq-export inspect``: one JSON line per file, errors as data, exit 0."""

from __future__ import annotations

import json
import subprocess
import sys

from pydicom.data import get_testdata_file

from tests.builders import instance, to_bytes


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.main", "inspect", *args], capture_output=True, text=True, timeout=120
    )


def test_inspect_prints_row_and_schema_or_error_per_file(tmp_path):
    good = get_testdata_file("CT_small.dcm")
    folder = tmp_path / "folder"
    folder.mkdir()
    ds = instance()
    ds.PatientID = "P-7"
    (folder / "a").write_bytes(to_bytes(ds))
    (folder / "b.txt").write_text("not dicom")
    result = run_inspect(good, str(folder), str(tmp_path / "missing.dcm"))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [good, str(folder / "a"), str(folder / "b.txt"), str(tmp_path / "missing.dcm")]
    assert lines[0]["row"]["Modality"] == "CT"
    assert {"name": "Modality", "type": "STRING", "mode": "NULLABLE"} in lines[0]["schema"]
    assert lines[1]["row"]["PatientID"] == "P-7"
    assert lines[2]["error"]["type"] == "NotDicomError"
    assert lines[3]["error"]["type"] == "FileNotFoundError"
    assert "P-7" not in result.stderr


def test_inspect_without_files_is_a_usage_error():
    result = run_inspect()
    assert result.returncode == 2
    assert "FILE" in result.stderr


def test_inspect_reads_cloud_storage_objects(gcs_bucket):
    from pipeline.inspect import inspect_file

    _, bucket = gcs_bucket
    ds = instance()
    ds.PatientID = "P-9"
    bucket.blob("x/one").upload_from_string(to_bytes(ds))
    found = inspect_file(f"gs://{bucket.name}/x/one")
    assert found["row"]["PatientID"] == "P-9"
    missing = inspect_file(f"gs://{bucket.name}/x/none")
    assert missing["error"]["type"] == "FileNotFoundError"
