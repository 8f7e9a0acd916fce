"""Concurrent reads and listing (issue 12): every input read exactly once, many at a time,
on one shared client; dead letters and accounting unchanged under concurrency.

Cloud Storage is the real gcp-storage-emulator, reached through bench/latency_proxy.py
(which counts requests per path and how many were in flight at once).
"""

from __future__ import annotations

import pathlib
import sys
import threading

import duckdb
import pytest
from apache_beam.io.filesystems import FileSystems

from pipeline.destinations.duckdb import DuckDBTable
from pipeline.graph import ExportPlan
from pipeline.main import _one_beam_process, run
from tests.builders import instance, to_bytes
from transforms.flatten import LIST, READ, Outcome, read_input
from transforms.listing import iter_files, units_may_overlap
from transforms.storage import REMOTE_CONCURRENCY, InputFile, Opener, storage_client

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import latency_proxy  # noqa: E402

DELAY_MS = 30
SAMPLES = pathlib.Path(__file__).resolve().parents[1] / "samples" / "dicom"


@pytest.fixture
def proxy(gcs_emulator, monkeypatch):
    """The emulator behind a proxy adding DELAY_MS per request; clients use the proxy."""
    server, url = latency_proxy.start(gcs_emulator, DELAY_MS)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    yield server.stats
    server.shutdown()


def _upload(bucket, prefix: str, count: int, broken: set[int] = frozenset()) -> list[str]:
    names = []
    for index in range(count):
        name = f"{prefix}/{index:03d}"
        data = b"not DICOM at all" if index in broken else to_bytes(instance())
        bucket.blob(name).upload_from_string(data)
        names.append(name)
    return names


def _object_gets(stats, bucket: str) -> dict[str, int]:
    """GETs of object bytes (media downloads), per object name."""
    media = f"/download/storage/v1/b/{bucket}/o/"
    gets: dict[str, int] = {}
    for (method, path), count in stats.paths.items():
        if method == "GET" and path.startswith(media):
            name = path[len(media):].split("?", 1)[0].replace("%2F", "/")
            gets[name] = gets.get(name, 0) + count
    return gets


def test_gs_export_reads_every_object_once_with_many_requests_in_flight(gcs_bucket, proxy, tmp_path):
    _client, bucket = gcs_bucket
    names = _upload(bucket, "dicom", 48)
    db = tmp_path / "out.duckdb"
    summary = run(["--input", f"gs://{bucket.name}/dicom/", f"--bq-table=duckdb://{db}#t", "--progress-seconds=0"])
    assert summary["succeeded"] == 48 and summary["failed"] == 0
    assert _object_gets(proxy, bucket.name) == {name: 1 for name in names}  # one ranged GET each, no re-read
    assert proxy.max_in_flight > 4  # reads overlap: a serial loop never has more than one
    metadata = [p for (m, p), _ in proxy.paths.items() if m == "GET" and p.startswith(f"/storage/v1/b/{bucket.name}/o/")]
    assert metadata == []  # no per-object metadata request: the size comes from the listing
    assert sum(proxy.paths.values()) <= 48 * 1.2


def test_one_failing_object_among_many_concurrent_reads_is_exactly_one_dead_letter(gcs_bucket, proxy, tmp_path):
    _client, bucket = gcs_bucket
    names = _upload(bucket, "mixed", 40, broken={7, 23})
    db = tmp_path / "out.duckdb"
    summary = run(["--input", f"gs://{bucket.name}/mixed/", f"--bq-table=duckdb://{db}#t", "--progress-seconds=0"])
    assert (summary["succeeded"], summary["failed"]) == (38, 2)
    assert summary["succeeded"] + summary["failed"] == summary["files_matched"] == 40
    with duckdb.connect(str(db)) as con:
        dead = sorted(con.execute("SELECT path, stage FROM t_errors").fetchall())
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 38
    assert dead == [(f"gs://{bucket.name}/{names[7]}", READ), (f"gs://{bucket.name}/{names[23]}", READ)]


def test_overlapping_gs_patterns_still_read_each_object_once(gcs_bucket, proxy, tmp_path):
    _client, bucket = gcs_bucket
    names = _upload(bucket, "over", 12)
    db = DuckDBTable(str(tmp_path / "out.duckdb"), "t")
    summary = run(["--input", f"gs://{bucket.name}/over/", "--input", f"gs://{bucket.name}/over/00*",
                   f"--bq-table=duckdb://{db.path}#t", "--progress-seconds=0"])
    assert summary["succeeded"] == 12 and summary["files_matched"] == 12
    assert _object_gets(proxy, bucket.name) == {name: 1 for name in names}


def test_read_input_runs_concurrently_on_one_opener(gcs_bucket, proxy):
    _client, bucket = gcs_bucket
    names = _upload(bucket, "threads", 20, broken={5})
    files = [InputFile(f"gs://{bucket.name}/{name}", bucket.get_blob(name).size) for name in names]
    files.append(InputFile(f"gs://{bucket.name}/gone", 10))  # listed, then deleted
    files.append(InputFile("/a/fifo", 0, ("NotARegularFile", "a FIFO")))
    opener = Opener()
    assert opener.concurrency(files[0]) == REMOTE_CONCURRENCY
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(REMOTE_CONCURRENCY) as pool:
        outcomes: list[Outcome] = list(pool.map(lambda f: read_input(f, opener), files))
    assert [o.instance is not None for o in outcomes] == [i != 5 for i in range(20)] + [False, False]
    assert outcomes[5].failure[0] == READ and outcomes[20].failure[0] == READ
    assert outcomes[21].failure == (LIST, "NotARegularFile", "a FIFO")
    assert all(o.bytes_read > 0 for o in outcomes[:20])


def test_one_storage_client_per_process_shared_by_threads(gcs_emulator, anonymous_gcp):
    clients = []
    threads = [threading.Thread(target=lambda: clients.append(storage_client())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(client) for client in clients}) == 1
    adapter = clients[0]._http.get_adapter("http://127.0.0.1/")
    assert adapter._pool_maxsize >= REMOTE_CONCURRENCY


@pytest.mark.parametrize("pattern", ["over/**", "over/*", "over/0*", "over/01?", "over/[01]0*", "over/000", "over"])
def test_gs_listing_matches_what_beam_matches(gcs_bucket, pattern):
    _client, bucket = gcs_bucket
    for name in ("over/000", "over/011", "over/sub/100", "over/sub/deeper/200", "overt/300"):
        bucket.blob(name).upload_from_string(b"x" * 3)
    full = f"gs://{bucket.name}/{pattern}"
    ours = sorted((f.path, f.size) for f in iter_files(full))
    beams = sorted((m.path, m.size_in_bytes) for m in FileSystems.match([full])[0].metadata_list)
    assert ours == beams


@pytest.mark.parametrize("units, overlap", [
    (["gs://b/d/*", "gs://b/d/a/**", "gs://b/d/b/**"], False),  # a folder split by shard_listing_units
    (["gs://b/x", "gs://b/x/**"], False),  # an object or a prefix
    (["gs://b/d/**"], False),
    (["gs://b/d/**", "gs://b/d/a/**"], True),
    (["gs://b/a*", "gs://b/ab/**"], True),
    (["gs://b/d/x", "gs://b/d/*"], True),
    (["gs://b/d/y/z", "gs://b/d/*"], False),
    (["folder/**"], True),  # local: links may lead anywhere, and the dedupe spreads the files
])
def test_units_may_overlap(units, overlap):
    assert units_may_overlap(units) is overlap


@pytest.mark.parametrize("plan, one_process, without_read_processes", [
    (ExportPlan(listing_units=("gs://b/d/**",)), True, True),  # one unit: one worker lists and reads it
    # several units: read on the read processes, else spread over Beam's workers
    (ExportPlan(listing_units=("gs://b/d/*", "gs://b/d/a/**")), True, False),
    (ExportPlan(listing_units=("gs://b/d/**",), uid_roots=("gs://b/d",)), True, False),
    (ExportPlan(listing_units=("gs://b/d/**", "/local/**")), False, False),  # Cloud Storage and local files
    (ExportPlan(listing_units=(str(SAMPLES) + "/**",), uid_roots=(str(SAMPLES),)), True, True),  # local: read processes
])
def test_runs_that_stay_in_one_process(plan, one_process, without_read_processes, monkeypatch):
    import pipeline.main

    assert _one_beam_process(plan) is one_process
    monkeypatch.setattr(pipeline.main, "processes_available", lambda: False)  # (Windows)
    assert _one_beam_process(plan) is without_read_processes


def _list_units(units: list[str], expected: list[str] | None = None) -> None:
    """A pipeline of ListFiles over ``units`` (all in one bundle, listed by one worker),
    asserting that it finds exactly ``expected``."""
    import apache_beam as beam
    from apache_beam.testing import test_pipeline as beam_testing
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.match import ListFiles

    with beam_testing.TestPipeline(runner="FnApiRunner") as p:
        paths = p | beam.Create(units, reshuffle=False) | beam.ParDo(ListFiles()) | beam.Map(lambda f: f.path)
        if expected is not None:
            assert_that(paths, equal_to(expected))


def test_remote_units_are_listed_several_at_once_each_file_once(gcs_bucket, proxy):
    _client, bucket = gcs_bucket
    names = [name for study in range(12) for name in _upload(bucket, f"studies/{study:02d}", 2)]
    units = [f"gs://{bucket.name}/studies/{study:02d}/**" for study in range(12)]
    proxy.max_in_flight = 0
    _list_units(units, [f"gs://{bucket.name}/{name}" for name in names])  # each exactly once
    assert proxy.max_in_flight > 2  # listings overlap: one at a time never has more than one request out


def test_splitting_a_folder_asks_for_its_sub_folders_names_only(gcs_bucket, proxy):
    """shard_listing_units' delimiter listing pages through the folder's own objects too:
    their metadata, which the files' listing asks for again, is left out of its answers."""
    from transforms.listing import match_files, shard_listing_units

    _client, bucket = gcs_bucket
    names = [name for study in range(3) for name in _upload(bucket, f"split/{study}", 1)] + _upload(bucket, "split", 2)
    proxy.paths.clear()
    units = shard_listing_units([f"gs://{bucket.name}/split/**"])
    assert f"gs://{bucket.name}/split/*" in units and len(units) >= 4  # the sub-folders were found
    delimited = [path for (_method, path) in proxy.paths if "delimiter=" in path]
    assert delimited and all("fields=prefixes%2CnextPageToken" in path for path in delimited)
    assert sorted(f.path for unit in units for f in match_files(unit)) == sorted(
        f"gs://{bucket.name}/{name}" for name in names)


def test_a_failing_remote_listing_fails_the_run(gcs_bucket, proxy):
    _client, bucket = gcs_bucket
    _upload(bucket, "ok", 1)
    with pytest.raises(Exception, match="NotFound|404|no-such-bucket"):
        _list_units([f"gs://{bucket.name}/ok/**", "gs://no-such-bucket-dicom-test/x/**"])


def test_the_launcher_lists_remote_units_several_at_once_in_order(gcs_bucket, proxy):
    """The launcher's listing (a local --incremental run compares it with the files table
    before any pipeline) overlaps units as ListFiles does, and keeps the units' order."""
    from transforms.listing import iter_units

    _client, bucket = gcs_bucket
    names = [name for study in range(12) for name in _upload(bucket, f"studies/{study:02d}", 2)]
    units = [f"gs://{bucket.name}/studies/{study:02d}/**" for study in range(12)]
    proxy.max_in_flight = 0
    assert [f.path for f in iter_units(units)] == [f"gs://{bucket.name}/{name}" for name in names]
    assert proxy.max_in_flight > 2
    listed = iter_units(units + ["gs://no-such-bucket-dicom-test/x/**"])
    with pytest.raises(Exception, match="NotFound|404|no-such-bucket"):
        list(listed)


def _rows_and_errors(db) -> tuple[list, list]:
    import json

    with duckdb.connect(str(db)) as con:
        cursor = con.execute("SELECT * FROM t")
        columns = [c[0] for c in cursor.description]
        rows = sorted(json.dumps(dict(zip(columns, row)), sort_keys=True, default=str) for row in cursor.fetchall())
        errors = sorted(con.execute("SELECT path, stage, error_type, message FROM t_errors").fetchall())
    return rows, errors


def test_gs_objects_are_read_on_the_read_processes_with_the_rows_of_one_thread(gcs_bucket, proxy, tmp_path,
                                                                               monkeypatch):
    """A local run over Cloud Storage (here a folder and its sub-folder) lists in the
    launcher and reads on the read processes, in one Beam process (each read process
    with the launcher's client settings, many objects in flight): the
    same requests, and exactly the rows, dead letters and counts of the same run read on
    the launcher's threads."""
    import pipeline.main
    from tests.conftest import bundled_files
    from transforms.read import ReadProcesses

    _client, bucket = gcs_bucket
    names = []
    for index, path in enumerate(bundled_files()[:70]):  # many vendors, odd and broken files among them
        name = f"mixed/f{index:03d}"
        bucket.blob(name).upload_from_filename(path)
        names.append(name)
    names += _upload(bucket, "mixed/broken", 3, broken={0, 2})  # (a sub-folder: two listing units)
    monkeypatch.setattr(pipeline.main, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline.main, "READ_PROCESSES_MIN_FILES", 50)
    pools, plans, left = [], [], []
    init, shutdown, build = ReadProcesses.__init__, ReadProcesses.shutdown, pipeline.main.build_pipeline
    monkeypatch.setattr(ReadProcesses, "__init__", lambda self, *a, **k: pools.append(self) or init(self, *a, **k))
    monkeypatch.setattr(ReadProcesses, "shutdown", lambda self: left.append(self.unclaimed()) or shutdown(self))
    monkeypatch.setattr(pipeline.main, "build_pipeline", lambda p, plan, *a, **k: plans.append(plan) or build(p, plan, *a, **k))
    argv = ["--input", f"gs://{bucket.name}/mixed/", "--progress-seconds=0"]

    pooled = run(argv + [f"--bq-table=duckdb://{tmp_path / 'pooled.duckdb'}#t"])
    assert len(plans[-1].listing_units) == 2  # mixed/* and mixed/broken/**, listed by the launcher:
    assert plans[-1].read_processes == 2 and len(plans[-1].listed_files) == len(names)
    assert len(pools) == 1 and pools[0].client is not None and set(left) == {0}  # read ahead, every chunk taken
    gets = _object_gets(proxy, bucket.name)
    assert set(gets) == set(names) and sum(gets.values()) <= 1.2 * len(names)  # (a header past 64 KiB: two)
    proxy.reset()
    threaded = run(argv + [f"--bq-table=duckdb://{tmp_path / 'threaded.duckdb'}#t", "--direct_running_mode=in_memory"])
    assert plans[-1].read_processes == 0 and len(pools) == 1
    assert _object_gets(proxy, bucket.name) == gets  # the same requests
    counts = ("files_matched", "succeeded", "failed", "tags_dropped_by_rule", "tags_dropped_not_fit",
              "other_elements", "charset_fallbacks", "bytes_read")
    assert {name: pooled.get(name) for name in counts} == {name: threaded.get(name) for name in counts}
    assert pooled["failed"] >= 2 and pooled["succeeded"] > 50
    assert _rows_and_errors(tmp_path / "pooled.duckdb") == _rows_and_errors(tmp_path / "threaded.duckdb")


def test_read_processes_rebuild_the_launchers_storage_client_without_beam(gcs_emulator, anonymous_gcp):
    """transforms.storage.ClientSettings: what a read process needs to build the same
    client as the launcher's (Beam's), picklable; a process given them never imports Beam."""
    import pickle
    import subprocess

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from transforms.storage import ClientSettings, client_settings

    settings = client_settings()
    handed = pickle.loads(pickle.dumps(settings))
    assert handed._replace(client_info=None) == settings._replace(client_info=None)
    assert handed.client_info.to_user_agent() == settings.client_info.to_user_agent()
    assert settings.emulator_host == gcs_emulator
    client = storage_client()
    assert (settings.project, settings.extra_headers) == (client.project, client._connection.extra_headers)
    assert "apache-beam" in settings.client_info.user_agent
    credentialed = ClientSettings(AnonymousCredentials(), "p", settings.client_info, {"x-goog-custom-audit-job": "j"},
                                  None).client()
    assert isinstance(credentialed, storage.Client) and credentialed.project == "p"
    assert credentialed._connection.extra_headers == {"x-goog-custom-audit-job": "j"}
    assert credentialed._connection.user_agent.count("gcloud-python") == 1
    script = (
        "import pickle, sys\n"
        "from transforms import storage\n"
        f"storage.use_client_settings(pickle.loads({pickle.dumps(settings)!r}))\n"
        "client = storage.storage_client()\n"
        "print(sorted(b.name for b in client.list_buckets()) is not None, 'apache_beam' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    assert done.stdout.split() == ["True", "False"], done.stderr[-2000:]


def test_a_cloud_storage_listing_that_fails_in_the_launcher_is_left_to_the_pipeline(gcs_bucket, proxy):
    """pipeline.main._list_here: the launcher lists Cloud Storage for a run in one Beam
    process; should that listing fail, the pipeline lists (and reports) it, as it did
    before the launcher listed anything; nor does the launcher list for Beam's workers."""
    import pipeline.main
    from pipeline.options import parse_pipeline_options

    _client, bucket = gcs_bucket
    names = _upload(bucket, "here", 3)
    options = parse_pipeline_options(["--input", f"gs://{bucket.name}/here/"])
    listed = pipeline.main._list_here(ExportPlan(listing_units=(f"gs://{bucket.name}/here/*",)), options)
    assert listed is not None and [f.path for f in listed[1]] == [f"gs://{bucket.name}/{name}" for name in names]
    gone = ExportPlan(listing_units=("gs://no-such-bucket-dicom-test/x/*",))
    assert pipeline.main._list_here(gone, options) is None
    several_workers = parse_pipeline_options(["--input", "x", "--direct_running_mode=multi_processing"])
    assert pipeline.main._list_here(ExportPlan(listing_units=(f"gs://{bucket.name}/here/*",)), several_workers) is None


def _download_path(bucket: str, name: str) -> tuple[str, str]:
    return "GET", f"/download/storage/v1/b/{bucket}/o/{name.replace('/', '%2F')}?alt=media"


def test_ranged_reads_go_by_urllib3_with_the_clients_own_request(gcs_bucket, proxy, monkeypatch):
    """transforms.storage.ranged_get: the GET download_as_bytes makes (same URL, same
    headers: user agent, audit header, range), sent by google-auth's urllib3 transport
    rather than the requests session; the same bytes, the same exception for an error."""
    from google.api_core import exceptions
    from google.api_core.client_info import ClientInfo
    from google.auth.credentials import AnonymousCredentials
    from google.auth.transport.urllib3 import AuthorizedHttp
    from google.cloud import storage as gcs

    from transforms import storage

    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    _client, bucket = gcs_bucket
    name = _upload(bucket, "lean", 1)[0]
    client = gcs.Client(project="p", credentials=AnonymousCredentials(),
                        client_info=ClientInfo(user_agent="apache-beam/0 (GPN:Beam)"),
                        extra_headers={"x-goog-custom-audit-job": "job"})
    blob = client.bucket(bucket.name).blob(name)
    key = _download_path(bucket.name, name)
    expected = blob.download_as_bytes(start=3, end=202, raw_download=True, checksum=None)
    by_client = {k.lower(): v for k, v in proxy.headers[key].items()}
    sent = []
    session_request = type(client._http).request
    monkeypatch.setattr(type(client._http), "request", lambda *a, **k: sent.append(a) or session_request(*a, **k))
    assert storage.ranged_get(blob, 3, 202) == expected and len(expected) == 200
    assert sent == []  # not by the requests session
    assert isinstance(storage._read_transports[client], AuthorizedHttp)
    ours = {k.lower(): v for k, v in proxy.headers[key].items()}
    invocation = "x-goog-api-client"  # ends with an id of its own per request
    assert ours[invocation].rsplit(" ", 1)[0] == by_client[invocation].rsplit(" ", 1)[0]
    assert {k: v for k, v in ours.items() if k != invocation} == {k: v for k, v in by_client.items() if k != invocation}
    assert ours["range"] == "bytes=3-202" and ours["x-goog-custom-audit-job"] == "job"
    assert ours["user-agent"].startswith("apache-beam/0 (GPN:Beam)")
    with pytest.raises(exceptions.NotFound):
        storage.ranged_get(client.bucket(bucket.name).blob("lean/none"), 0, 9)
    assert storage.ranged_get(blob, 10**9, 10**9 + 9) == blob.download_as_bytes(start=10**9, end=10**9 + 9,
                                                                               raw_download=True, checksum=None)


def test_ranged_reads_use_the_clients_session_where_it_connects_another_way(gcs_bucket, monkeypatch, tmp_path):
    """A proxy from the environment for the endpoint (or one set on the session): the
    client's own download reads (requests' proxy handling); a CA bundle named in the
    environment: the urllib3 transport verifies with it, as requests would."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    from transforms import storage

    _client, bucket = gcs_bucket
    name = _upload(bucket, "way", 1)[0]

    def transport():
        client = gcs.Client(project="p", credentials=AnonymousCredentials())
        blob = client.bucket(bucket.name).blob(name)
        return storage._read_transport(client, blob), client

    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert transport()[0] is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the emulator's host: no proxy for it
    assert transport()[0] is not None
    monkeypatch.delenv("HTTP_PROXY")
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    http, _client = transport()
    assert http.http.connection_pool_kw["ca_certs"] == str(bundle)
    proxied = gcs.Client(project="p", credentials=AnonymousCredentials())
    proxied._http.proxies = {"http": "http://127.0.0.1:9"}
    assert storage._read_transport(proxied, proxied.bucket(bucket.name).blob(name)) is None


def test_a_ranged_read_is_retried_as_the_client_retries_a_download(gcs_bucket, gcs_emulator, monkeypatch):
    """A 503 and a connection reset before the answer: the read is retried (the storage
    client's DEFAULT_RETRY) and returns the bytes; a 404 or a 416 is not retried, and
    raises the exception the client raises for it."""
    from google.api_core import exceptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    from tests.dicomweb_proxy import DicomWebProxy
    from transforms import storage

    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    _client, bucket = gcs_bucket
    names = _upload(bucket, "retry", 2)
    with DicomWebProxy(gcs_emulator) as faulty:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", faulty.url())
        client = gcs.Client(project="p", credentials=AnonymousCredentials())
        faulty.fault(r"retry%2F000", "503")
        faulty.fault(r"retry%2F001", "reset")
        for name in names:
            blob = client.bucket(bucket.name).blob(name)
            assert storage.ranged_get(blob, 0, 99) == bucket.blob(name).download_as_bytes(start=0, end=99)
        assert storage._read_transports[client] is not None  # by the urllib3 transport
        faulty.fault(r"retry%2F000", "404")
        with pytest.raises(exceptions.NotFound):
            storage.ranged_get(client.bucket(bucket.name).blob(names[0]), 0, 99)
        faulty.fault(r"retry%2F000", "416")  # Cloud Storage's answer to a range past the end
        with pytest.raises(exceptions.RequestRangeNotSatisfiable) as past_the_end:
            storage.ranged_get(client.bucket(bucket.name).blob(names[0]), 0, 99)
        assert past_the_end.value.code == 416  # what RangedBlob takes for the end of an object of unknown size
