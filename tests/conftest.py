"""Shared fixtures: pydicom's bundled test files, converted once per session."""

from __future__ import annotations

import os

import pytest
from pydicom.data import get_charset_files, get_testdata_files

from schemas.convert import flatten_instance
from transforms.header import InstanceError, read_header

os.environ.setdefault("NO_GCE_CHECK", "true")

_NOT_DICOM_SUFFIXES = (".json", ".txt", ".dump", ".icc", ".gz")


def bundled_files() -> list[str]:
    """Every file pydicom ships for its tests (charset files included), DICOM or not."""
    paths = get_testdata_files() + get_charset_files()
    return sorted(p for p in paths if os.path.isfile(p))


@pytest.fixture(scope="session")
def bundled_instances():
    """``{path: Flattened}`` for every bundled file that is an instance."""
    converted = {}
    for path in bundled_files():
        if path.endswith(_NOT_DICOM_SUFFIXES):
            continue
        with open(path, "rb") as fileobj:
            try:
                header = read_header(fileobj)
            except InstanceError:
                continue
            converted[path] = flatten_instance(
                header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred
            )
    assert len(converted) > 150
    return converted


# -- local emulators -------------------------------------------------------------------
# A real Cloud Storage emulator (gcp-storage-emulator) and a real BigQuery emulator
# (local-bigquery in its own Python 3.13 venv), started by the test session. See
# ../shared/notes/local-gcp-emulators.md. Production code knows nothing of them: Google's
# clients honour STORAGE_EMULATOR_HOST; Beam's BigQuery client needs the two patches in
# ``gcp_local`` (test process only).

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

PROJECT = "test-project"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited early with {proc.returncode}: {url}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is up
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"emulator not ready: {url}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """URL of a running gcp-storage-emulator; STORAGE_EMULATOR_HOST points at it."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "gcs.log", "w")
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    proc = subprocess.Popen(
        [exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/storage/v1/b", proc)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    yield url
    _stop(proc)
    if previous is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture(scope="session")
def anonymous_gcp():
    """No ADC here: make google.auth.default answer anonymously instead of retrying 16 s."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    patch = pytest.MonkeyPatch()
    patch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), PROJECT))
    yield
    patch.undo()


@pytest.fixture
def gcs_bucket(gcs_emulator, anonymous_gcp):
    """A fresh bucket in the emulator: ``(client, bucket)``."""
    import uuid

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
    bucket = client.create_bucket(f"b-{uuid.uuid4().hex[:12]}")
    return client, bucket


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "emulators"))
from venvs import bigquery_emulator_python  # noqa: E402


@pytest.fixture(scope="session")
def bq_emulator(gcs_emulator, tmp_path_factory):
    """URL of a running local-bigquery; gs:// load URIs are read from the GCS emulator."""
    python = bigquery_emulator_python()
    port, grpc_port = _free_port(), _free_port()
    data = tmp_path_factory.mktemp("bq")
    env = dict(os.environ, STORAGE_EMULATOR_HOST=gcs_emulator)
    launcher = os.path.join(REPO, "tests", "emulators", "run_local_bigquery.py")
    proc = subprocess.Popen(
        [python, launcher, "serve", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port),
         "--project", PROJECT, "--data-dir", str(data)],
        stdout=open(data / "bq.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + f"/bigquery/v2/projects/{PROJECT}/datasets", proc)
    yield url
    _stop(proc)


@pytest.fixture(scope="session")
def gcp_local(gcs_emulator, bq_emulator, anonymous_gcp):
    """Both emulators, with the two test-only patches Beam's BigQuery client needs:
    google-cloud-bigquery follows BIGQUERY_EMULATOR_HOST, Beam's apitools client only
    its class attribute BASE_URL."""
    from apache_beam.io.gcp.internal.clients import bigquery as bq_apitools

    patch = pytest.MonkeyPatch()
    patch.setenv("BIGQUERY_EMULATOR_HOST", bq_emulator)
    patch.setattr(bq_apitools.BigqueryV2, "BASE_URL", bq_emulator + "/bigquery/v2/")
    yield {"gcs": gcs_emulator, "bq": bq_emulator, "project": PROJECT}
    patch.undo()
