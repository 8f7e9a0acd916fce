"""Isolated virtual environments the tests need beside the project's own (stdlib only).

* local-bigquery 0.4.0, the BigQuery emulator: needs Python 3.13 and packages that
  cannot share a venv with Beam (pyarrow>=26, numpy>=2.5);
* Apache Airflow 3.3.2 with the Google and Apache Beam providers, to import the
  Composer DAG for real.

Each is built once under .emulators/ and reused (a ``.ready`` file marks a finished
build). The tests build them on first use; ``.ci/run`` builds them in the background
while it installs the project (``python3 tests/emulators/venvs.py``).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMULATORS = os.path.join(REPO, ".emulators")

BIGQUERY_EMULATOR = [
    ["local-bigquery==0.4.0"],
    # local-bigquery declares duckdb>=2, but DuckDB's extensions ship on PyPI only up to
    # 1.5.5 and it cannot download them offline: pin 1.5.5 with its extension packages
    # (pip then reports the declared-version conflict; that is expected).
    ["duckdb==1.5.5", "duckdb-extension-ducklake==1.5.5", "duckdb-extension-spatial==1.5.5",
     "duckdb-extension-httpfs==1.5.5"],
]
AIRFLOW = [
    ["apache-airflow==3.3.2", "apache-airflow-providers-google==22.8.0",
     "apache-airflow-providers-apache-beam==6.3.1"],
]


def _python_3_13() -> str:
    candidates = [shutil.which("python3.13")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.13*/bin/python3.13")))
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            return candidate
    raise RuntimeError(
        "the BigQuery emulator (local-bigquery 0.4.0) needs Python 3.13: put python3.13 on PATH "
        "or set BQ_EMULATOR_PYTHON to a Python with local-bigquery installed"
    )


def _build(name: str, base_python: str, installs: list[list[str]], check: str) -> str:
    venv = os.path.join(EMULATORS, name)
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".ready")
    if not os.path.exists(marker):
        subprocess.run([base_python, "-m", "venv", "--clear", venv], check=True,
                       env=dict(os.environ, PYENV_VERSION="3.13"))
        for packages in installs:
            subprocess.run([python, "-m", "pip", "install", "-q", *packages], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([python, "-c", check], check=True)
        open(marker, "w").close()
    return python


def bigquery_emulator_python() -> str:
    if os.environ.get("BQ_EMULATOR_PYTHON"):
        return os.environ["BQ_EMULATOR_PYTHON"]
    return _build("local-bigquery-0.4.0", _python_3_13(), BIGQUERY_EMULATOR,
                  "import local_bigquery, duckdb_extension_ducklake")


def airflow_python() -> str:
    return _build("airflow-3.3.2", sys.executable, AIRFLOW,
                  "import airflow.providers.google.cloud.operators.dataflow, airflow.providers.apache.beam")


if __name__ == "__main__":
    print("BigQuery emulator:", bigquery_emulator_python())
    print("Airflow:", airflow_python())
