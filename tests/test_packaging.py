"""Packaging for Dataflow workers and Cloud Composer, in fresh virtual environments.

Slow (each builds a venv from the package index), but it is what a worker or a
Composer environment does: nothing here relies on the test venv's packages.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import duckdb
from apache_beam.runners.portability.stager import Stager

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "emulators"))
from venvs import airflow_python  # noqa: E402


def _venv(path: pathlib.Path) -> pathlib.Path:
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    return path / "bin" / "python"


def test_the_sdist_beam_stages_for_workers_installs_and_runs_the_sample_export(tmp_path):
    # What --setup_file ./setup.py makes Beam do: build an sdist, which workers pip install.
    sdist = Stager._build_setup_package(str(REPO / "setup.py"), str(tmp_path))
    python = _venv(tmp_path / "worker")
    subprocess.run([str(python), "-m", "pip", "install", "-q", sdist], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    database = tmp_path / "out.duckdb"
    result = subprocess.run(
        [str(tmp_path / "worker" / "bin" / "dicom-bq-export"), "--input", str(REPO / "samples" / "dicom"),
         f"--bq-table=duckdb://{database}#instances", "--progress-seconds=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "instances succeeded                10" in result.stdout
    rows = duckdb.connect(str(database), read_only=True).execute("SELECT count(*) FROM instances").fetchone()[0]
    assert rows == 10


DAG_CHECK = """
import sys
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
flex, small = bag.dags["dicom_bq_export"], bag.dags["dicom_bq_export_small"]
[launch] = flex.tasks
[local] = small.tasks
assert type(launch).__name__ == "DataflowStartFlexTemplateOperator", type(launch)
assert type(local).__name__ == "BeamRunPythonPipelineOperator", type(local)
parameters = launch.body["launchParameter"]["parameters"]
assert {"input", "bq_table", "write_disposition", "filter_config_gcs_uri"} <= set(parameters)
assert "'true'" in parameters["incremental"] and "'WRITE_APPEND'" in parameters["write_disposition"]  # incremental by default
assert local.runner == "DirectRunner" and local.py_file == "pipeline.main" and local.py_options == ["-m"]
print("ok", sorted(bag.dag_ids))
"""


def test_the_composer_dag_imports_in_a_real_airflow(tmp_path):
    python = airflow_python()  # apache-airflow 3.3.2 + the Google and Beam providers, own venv
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    result = subprocess.run(
        [str(python), "-c", DAG_CHECK, str(REPO / "templates" / "composer")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok ['dicom_bq_export', 'dicom_bq_export_small']" in result.stdout
