"""The DICOMweb source against a real Orthanc with its DICOMweb plugin (Debian packages).

The session starts ``/usr/sbin/Orthanc`` on a free loopback port with HTTP Basic on,
uploads ``samples/dicom`` and a 40 MB instance built with pydicom, and stops it at the
end. ``tests/dicomweb_proxy.py`` sits in front of it where a test needs another server's
caps (a small ``limit``, an offset cap) or a bad network (429, 503, resets, slowness).
Orthanc missing is a failure, not a skip: ``apt-get install -y orthanc orthanc-dicomweb``.
"""

from __future__ import annotations

import base64
import collections
import glob
import io
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import apache_beam as beam
import pydicom
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from schemas.convert import flatten_instance
from tests.builders import instance, to_bytes
from tests.dicomweb_proxy import free_port as _free_port
from tests.dicomweb_proxy import DicomWebProxy, OrthancNotInstalled, run_orthanc, upload
from transforms.filter_file import parse_filter_file
from transforms.header import read_header
from transforms.sources import dicomweb as dw

USER = "exporter"
PASSWORD = "Pw-7f3a9c-never-printed"
SAMPLES = sorted(glob.glob(str(Path(__file__).resolve().parent.parent / "samples/dicom/**/*.dcm"), recursive=True))
#: Quick retries for tests; a "slow" fault answers after 1.5 s, past the read timeout.
POLICY = dw.RetryPolicy(attempts=4, backoff=0.02, max_sleep=2.0, budget=10.0, connect_timeout=2.0, read_timeout=1.0)
#: The same with time for the proxy to relay the 40 MB instance.
PATIENT_POLICY = POLICY._replace(read_timeout=20.0)
BIG_PIXEL_BYTES = 40 * 1024 * 1024


def _big_instance() -> tuple[bytes, int]:
    """A CT-like instance: a header of a few KB, then 40 MB of native Pixel Data.
    Returns the file's bytes and the size of its header (up to Pixel Data's value)."""
    ds = instance()
    ds.StudyDate = "20240102"
    ds.Modality = "CT"
    ds.PatientName = "Big^Instance"
    ds.PatientID = "BIG-1"
    ds.ImageComments = "synthetic instance for the header-only retrieve test " * 80
    ds.Rows, ds.Columns = 4096, 5120
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    header = to_bytes(ds)
    ds.PixelData = b"\x01\x02" * (BIG_PIXEL_BYTES // 2)
    ds["PixelData"].VR = "OW"
    data = to_bytes(ds)
    header_size = len(header) + 12  # the Pixel Data element's tag, VR and length
    assert data[:len(header)] == header
    return data, header_size


def _large_values_instance() -> bytes:
    """Values over read_header's 64 KiB deferral before Pixel Data: an ICC profile (OB,
    skipped unread) and a long TextValue (UT, exported, so read back after a seek)."""
    ds = instance()
    ds.TextValue = "a long text value " * 5000
    ds.ICCProfile = bytes(range(256)) * 400
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(256)
    return to_bytes(ds)


def _flatten_file(fileobj):
    header = read_header(fileobj)
    return header.uids, flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    home = tmp_path_factory.mktemp("orthanc")
    try:
        server = run_orthanc(home, USER, PASSWORD)
        url = server.__enter__()
    except OrthancNotInstalled as error:
        pytest.fail(str(error))
    try:
        disk = {}
        big, big_header_size = _big_instance()
        study = pydicom.uid.generate_uid()
        series = [pydicom.uid.generate_uid(), pydicom.uid.generate_uid()]
        built = [big, _large_values_instance()] + [to_bytes(instance(study, series[i % 2])) for i in range(3)]
        for data in [Path(path).read_bytes() for path in SAMPLES] + built:
            upload(url, data, USER, PASSWORD)
            uids, flattened = _flatten_file(io.BytesIO(data))
            disk[uids.instance] = SimpleNamespace(uids=uids, flattened=flattened, data=data)
        root = f"dicomweb+{url}/dicom-web"
        yield SimpleNamespace(
            url=url, root=root, disk=disk, big=_flatten_file(io.BytesIO(big))[0], big_header_size=big_header_size,
            multi_series_study=study, urls={uid: dw.InstanceRef(root, *entry.uids).url for uid, entry in disk.items()},
        )
    finally:
        server.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    monkeypatch.delenv("DICOMWEB_TOKEN", raising=False)
    monkeypatch.setenv("DICOMWEB_USER", USER)
    monkeypatch.setenv("DICOMWEB_PASSWORD", PASSWORD)


def _list(root, filter_file=None, policy=POLICY, limits=None):
    client = dw.DicomWebClient(root, policy, limits)
    return [ref for unit in dw.listing_units(root, filter_file) for ref in dw.expand(unit, client)]


def _via(proxy: DicomWebProxy) -> str:
    return f"dicomweb+{proxy.url('/dicom-web')}"


# -- names -------------------------------------------------------------------------------


class TestNames:
    def test_root_is_canonical(self):
        assert dw.parse_root("dicomweb+http://127.0.0.1:8042/dicom-web/") == "dicomweb+http://127.0.0.1:8042/dicom-web"
        assert dw.parse_root("dicomweb+https://example.org") == "dicomweb+https://example.org"

    def test_healthcare_store_resource_name_is_its_dicomweb_root(self):
        name = "projects/p/locations/us-central1/datasets/d/dicomStores/s"
        assert dw.is_dicomweb_input(name)
        assert dw.parse_root(name) == (
            "dicomweb+https://healthcare.googleapis.com/v1/projects/p/locations/us-central1/datasets/d/dicomStores/s/dicomWeb"
        )

    def test_credentials_in_the_url_are_refused_without_being_quoted(self):
        with pytest.raises(dw.DicomWebError) as caught:
            dw.parse_root(f"dicomweb+https://{USER}:{PASSWORD}@pacs.example.org/dicom-web")
        assert PASSWORD not in str(caught.value) and "DICOMWEB_PASSWORD" in str(caught.value)

    def test_other_inputs_are_not_dicomweb(self):
        assert not dw.is_dicomweb_input("gs://bucket/prefix")
        assert not dw.is_dicomweb_input("projects/p/somewhere")
        with pytest.raises(dw.DicomWebError):
            dw.parse_root("dicomweb+ftp://host/x")

    def test_instance_url_round_trips(self):
        ref = dw.parse_instance_url("dicomweb+http://h:1/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4")
        assert ref == dw.InstanceRef("dicomweb+http://h:1/dicom-web", "1.2", "1.2.3", "1.2.3.4")
        assert ref.resource_path == "/studies/1.2/series/1.2.3/instances/1.2.3.4"
        assert ref.url == "dicomweb+http://h:1/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4"

    def test_server_caps_by_kind(self, monkeypatch):
        monkeypatch.delenv("DICOMWEB_QIDO_LIMIT", raising=False)
        monkeypatch.delenv("DICOMWEB_QIDO_MAX_RESULTS", raising=False)
        healthcare = dw.server_limits("projects/p/locations/l/datasets/d/dicomStores/s")
        assert (healthcare.studies, healthcare.instances, healthcare.max_results) == (5000, 50_000, 1_000_000)
        assert dw.server_limits("dicomweb+https://ws-x.dicom.azurehealthcareapis.com/v2").studies == 200
        monkeypatch.setenv("DICOMWEB_QIDO_MAX_RESULTS", "123")
        assert dw.server_limits("dicomweb+http://127.0.0.1:1/dicom-web").max_results == 123


# -- preflight and credentials -----------------------------------------------------------


class TestPreflight:
    def test_a_good_server_passes(self, orthanc):
        dw.check_server(orthanc.root)

    def test_wrong_password_is_a_clear_error_before_any_read(self, orthanc, monkeypatch):
        monkeypatch.setenv("DICOMWEB_PASSWORD", "wrong-" + PASSWORD[::-1])
        with DicomWebProxy(orthanc.url) as proxy:
            with pytest.raises(dw.DicomWebError) as caught:
                dw.check_server(_via(proxy))
            assert [path for path, _query in proxy.requests] == ["/dicom-web/studies"]  # nothing retrieved
        message = str(caught.value)
        assert "401" in message and "DICOMWEB_USER" in message and "DICOMWEB_PASSWORD" in message
        assert "\n" not in message and PASSWORD[::-1] not in message

    def test_no_credentials_is_a_401_error(self, orthanc, monkeypatch):
        monkeypatch.delenv("DICOMWEB_USER")
        monkeypatch.delenv("DICOMWEB_PASSWORD")
        with pytest.raises(dw.DicomWebError, match="HTTP 401.*DICOMWEB_TOKEN"):
            dw.check_server(orthanc.root)

    def test_a_bearer_token_is_sent_and_never_quoted(self, orthanc, monkeypatch):
        token = "tok-" + PASSWORD[::-1]
        monkeypatch.setenv("DICOMWEB_TOKEN", token)
        with DicomWebProxy(orthanc.url) as proxy:
            with pytest.raises(dw.DicomWebError) as caught:
                dw.check_server(_via(proxy))  # Orthanc takes Basic only: 401
            assert proxy.authorizations == ["Bearer " + token]  # the token wins over Basic
        assert "401" in str(caught.value) and token not in str(caught.value)

    def test_healthcare_without_google_credentials_is_one_line(self, monkeypatch, tmp_path):
        import google.auth
        import google.auth._default

        # the real lookup, even if the session's emulator fixtures answered it anonymously
        monkeypatch.setattr(google.auth, "default", google.auth._default.default)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
        with pytest.raises(dw.DicomWebError, match="no Google credentials.*application-default login") as caught:
            dw.check_server("projects/p/locations/l/datasets/d/dicomStores/s")
        assert "\n" not in str(caught.value)

    def test_forbidden_says_so(self, orthanc):
        with DicomWebProxy(orthanc.url) as proxy:
            proxy.fault(r"/studies$", "403", times=-1)
            with pytest.raises(dw.DicomWebError, match="HTTP 403"):
                dw.check_server(_via(proxy))

    def test_unreachable_server(self):
        with pytest.raises(dw.DicomWebError, match="cannot reach the DICOMweb server"):
            dw.check_server(f"dicomweb+http://127.0.0.1:{_free_port()}/dicom-web", dw.RetryPolicy(attempts=2, backoff=0.01))

    def test_wrong_root_path(self, orthanc):
        with pytest.raises(dw.DicomWebError, match="HTTP 404.*root path"):
            dw.check_server(orthanc.root.replace("/dicom-web", "/not-dicom-web"))

    def test_no_credential_in_any_output(self, orthanc, monkeypatch, capfd, caplog, tmp_path):
        """Everything a run does — preflight, listing, reads, metadata, a failed read, a
        refused login — and nothing printed, logged or raised holds the password."""
        caplog.set_level(logging.DEBUG)
        texts = []
        dw.check_server(orthanc.root)
        refs = _list(orthanc.root)
        for _url, result in dw.read_many([r.url for r in refs] + [refs[0].url + "9"], policy=POLICY):
            texts.append(repr(result))
        for series in {r.series_url for r in refs}:
            for item in dw.read_series_metadata(series, policy=POLICY):
                texts.append(repr(dw.convert_metadata(item).flattened.row))
        monkeypatch.setenv("DICOMWEB_PASSWORD", "x" + PASSWORD)
        with pytest.raises(dw.DicomWebError) as caught:
            dw.check_server(orthanc.root)
        texts.append(str(caught.value))
        captured = capfd.readouterr()
        texts += [captured.out, captured.err, caplog.text]
        basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        for text in texts:
            assert PASSWORD not in text and basic not in text


# -- listing -----------------------------------------------------------------------------


class TestListing:
    def test_all_studies_list_every_instance_once(self, orthanc):
        refs = _list(orthanc.root)
        assert sorted(r.url for r in refs) == sorted(orthanc.urls.values())

    def test_filter_lines_of_study_series_and_instance(self, orthanc):
        entries = sorted(orthanc.disk.values(), key=lambda e: e.uids.instance)
        study, series, single = entries[0].uids, entries[1].uids, entries[2].uids
        text = (
            f"/studies/{study.study}\n"
            f"/studies/{series.study}/series/{series.series}\r\n"
            f"\n/studies/{single.study}/series/{single.series}/instances/{single.instance}\n"
            "/studies/1.2.3.999/series/1.2.3.999.1\n"  # selects nothing
        )
        refs = _list(orthanc.root, parse_filter_file(text))
        assert sorted(r.instance for r in refs) == sorted({study.instance, series.instance, single.instance})

    def test_paging_with_a_capped_limit_and_offset_splits_and_lists_each_instance_once(self, orthanc):
        limits = dw.ServerLimits(studies=5, series=5, instances=5, max_results=5)
        with DicomWebProxy(orthanc.url, limit_cap=2, max_results=5, empty_matching=True) as proxy:
            refs = _list(_via(proxy), limits=limits)
            queries = [q for path, q in proxy.requests if path.endswith("/studies")]
        urls = [r.url.replace(_via(proxy), orthanc.root) for r in refs]
        assert sorted(urls) == sorted(orthanc.urls.values())  # every instance, exactly once
        assert any("StudyDate=%22%22" in q for q in queries)  # studies without a date
        assert any("StudyDate=0001" in q for q in queries)  # split by date ranges
        assert any("offset=2" in q for q in queries)  # paged by what the capped server returned

    def test_split_fails_loudly_when_undated_studies_cannot_be_searched(self, orthanc):
        limits = dw.ServerLimits(studies=5, series=5, instances=5, max_results=5)
        with DicomWebProxy(orthanc.url, limit_cap=2, max_results=5, empty_matching=False) as proxy:
            with pytest.raises(dw.DicomWebError, match="without a StudyDate.*filter file"):
                _list(_via(proxy), limits=limits)

    def test_more_undated_studies_than_one_search_can_page_fails_loudly(self, orthanc):
        undated = sum(1 for e in orthanc.disk.values() if not e.flattened.row.get("StudyDate"))
        limit = len({e.uids.study for e in orthanc.disk.values() if not e.flattened.row.get("StudyDate")}) - 1
        limits = dw.ServerLimits(studies=5, series=5, instances=5, max_results=limit)
        with DicomWebProxy(orthanc.url, limit_cap=2, max_results=limit, empty_matching=True) as proxy:
            with pytest.raises(dw.DicomWebError, match="more studies with no StudyDate than one search"):
                _list(_via(proxy), limits=limits)
        assert undated > limit

    def test_a_study_too_large_for_one_search_is_listed_by_series(self, orthanc):
        study = orthanc.multi_series_study
        with DicomWebProxy(orthanc.url) as proxy:
            refs = _list(_via(proxy), parse_filter_file(f"/studies/{study}"), limits=dw.ServerLimits(5, 5, 5, 2))
            paths = [path for path, _query in proxy.requests]
        listed = sorted(r.url.replace(_via(proxy), orthanc.root) for r in refs)
        assert listed == sorted(url for url in orthanc.urls.values() if f"/studies/{study}/" in url)
        assert len(listed) == 3
        assert f"/dicom-web/studies/{study}/series" in paths


# -- instance mode -----------------------------------------------------------------------


def _before_pixel_data(row: dict) -> dict:
    """A file's row without what it holds after Pixel Data (here: DataSetTrailingPadding in
    DroppedTags), which a streamed retrieve does not receive."""
    names = _dropped(row)
    if "PixelData" not in names:
        return row
    return dict(row, DroppedTags=row["DroppedTags"][: names.index("PixelData") + 1])


def _after_pixel_data(row: dict) -> set[str]:
    """The names a file's row drops after Pixel Data (absent from a streamed retrieve)."""
    names = _dropped(row)
    return set(names[names.index("PixelData") + 1:]) if "PixelData" in names else set()


class TestInstanceMode:
    def test_rows_are_identical_to_the_rows_of_the_files_up_to_pixel_data(self, orthanc):
        seen = []
        tally = dw.Tally()
        for url, result in dw.read_many(orthanc.urls.values(), tally=tally, policy=POLICY, max_workers=8):
            assert not isinstance(result, Exception), result
            expected = orthanc.disk[result.uids.instance]
            assert result.uids == expected.uids
            # the one documented difference: what follows Pixel Data is not received
            assert result.flattened.row == _before_pixel_data(expected.flattened.row)
            assert result.flattened.fragment == expected.flattened.fragment
            has_pixel_data = "PixelData" in _dropped(expected.flattened.row)
            assert result.flattened.counts.get("unread_after_pixel_data", 0) == int(has_pixel_data)
            seen.append(url)
        assert sorted(seen) == sorted(orthanc.urls.values())
        assert tally.bytes_received < sum(len(e.data) for e in orthanc.disk.values()) / 10

    def test_the_stream_is_the_stored_file(self, orthanc):
        for uid, entry in orthanc.disk.items():
            if uid == orthanc.big.instance:
                continue
            stream, counter = dw.open_instance(orthanc.urls[uid])
            with stream:
                assert stream.read(200) == entry.data[:200]
                stream.seek(10)  # back, within what was received
                assert stream.read(5) == entry.data[10:15]
                stream.seek(1000, io.SEEK_CUR)  # forward: received on the way
                assert stream.tell() == 1015
                assert stream.read() == entry.data[1015:]
                with pytest.raises(io.UnsupportedOperation):  # its end is not known before it is received
                    stream.seek(0, io.SEEK_END)
            assert counter.bytes_read >= len(entry.data)

    def test_a_40_mb_instance_is_not_downloaded(self, orthanc):
        tally = dw.Tally()
        row = dw.read_instance(orthanc.urls[orthanc.big.instance], tally=tally, policy=POLICY)
        assert row.flattened.row == orthanc.disk[orthanc.big.instance].flattened.row
        assert tally.bytes_received <= 2 * orthanc.big_header_size, (tally.bytes_received, orthanc.big_header_size)
        assert {"TagName": "PixelData"} in row.flattened.row["DroppedTags"]

    def test_closing_a_40_mb_answer_stops_the_transfer(self, orthanc):
        """What the server side wrote before the client closed: its send buffer and the
        client's receive window, not the 40 MB."""
        url = orthanc.urls[orthanc.big.instance]
        with DicomWebProxy(orthanc.url) as proxy:
            dw.read_instance(url.replace(orthanc.root, _via(proxy)), policy=PATIENT_POLICY)
            time.sleep(0.5)  # the proxy's next writes fail: the connection is gone
            sent = proxy.bytes_sent["/dicom-web" + dw.parse_instance_url(url).resource_path]
        assert 0 < sent < 1024 * 1024, sent

    def test_faults_are_retried_and_counted_and_a_permanent_404_is_one_failure(self, orthanc):
        uids = sorted(uid for uid in orthanc.disk if uid != orthanc.big.instance)
        faults = {uids[0]: "429", uids[1]: "503", uids[2]: "reset", uids[3]: "slow", uids[4]: "cut", uids[5]: "502"}
        gone = uids[6]
        with DicomWebProxy(orthanc.url, slow_seconds=1.5) as proxy:
            for uid, kind in faults.items():
                proxy.fault(rf"/instances/{uid}$", kind)
            proxy.fault(rf"/instances/{gone}$", "404", times=-1)
            urls = [orthanc.urls[uid].replace(orthanc.root, _via(proxy)) for uid in uids]
            tally = dw.Tally()
            started = time.monotonic()
            results = dict(dw.read_many(urls, tally=tally, policy=POLICY))
            elapsed = time.monotonic() - started
            assert sum(proxy.served.values()) == len(faults) + 1
        failed = {url: r for url, r in results.items() if isinstance(r, Exception)}
        assert list(failed) == [u for u in urls if u.endswith("/instances/" + gone)]
        error = failed.popitem()[1]
        assert isinstance(error, dw.DicomWebRequestError) and error.status == 404 and "HTTP 404" in str(error)
        for result in results.values():
            if not isinstance(result, Exception):
                assert result.flattened.row == _before_pixel_data(orthanc.disk[result.uids.instance].flattened.row)
        assert tally.retries == len(faults)
        assert elapsed >= 1.0  # the 429 said Retry-After: 1

    def test_retries_are_bounded(self, orthanc):
        uid = next(iter(orthanc.disk))
        with DicomWebProxy(orthanc.url) as proxy:
            proxy.fault(rf"/instances/{uid}$", "503", times=-1)
            tally = dw.Tally()
            with pytest.raises(dw.DicomWebRequestError, match=r"HTTP 503.*after 4 attempts"):
                dw.read_instance(orthanc.urls[uid].replace(orthanc.root, _via(proxy)), tally=tally, policy=POLICY)
        assert (tally.requests, tally.retries) == (4, 3)


# -- metadata mode -----------------------------------------------------------------------


def _numbers_equal(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _undocumented_differences(file_row, meta_row, path="") -> list[str]:
    """Differences between a file's row and its metadata row that the README's list does
    not explain: group 0002 absent; DS/IS text reformatted (same number); an empty first
    Specific Character Set value dropped; DroppedTags without file meta and encapsulated
    Pixel Data, with elements after Pixel Data."""
    problems = []
    if isinstance(file_row, dict) and isinstance(meta_row, dict):
        for key in sorted(set(file_row) | set(meta_row)):
            where = f"{path}.{key}"
            if key == "DroppedTags" and not path:
                continue
            if key not in meta_row:
                if not (not path and _is_file_meta(key)):
                    problems.append(f"{where} missing")
            elif key not in file_row:
                problems.append(f"{where} added")
            elif key == "SpecificCharacterSet" and [v for v in file_row[key] if v] == meta_row[key]:
                continue
            else:
                problems += _undocumented_differences(file_row[key], meta_row[key], where)
    elif isinstance(file_row, list) and isinstance(meta_row, list) and len(file_row) == len(meta_row):
        for i, (a, b) in enumerate(zip(file_row, meta_row)):
            problems += _undocumented_differences(a, b, f"{path}[{i}]")
    elif file_row != meta_row and not _numbers_equal(file_row, meta_row):
        problems.append(f"{path} changed")
    return problems


def _is_file_meta(keyword: str) -> bool:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    return tag is not None and tag >> 16 == 0x0002


def _dropped(row) -> list[str]:
    return [entry["TagName"] for entry in row.get("DroppedTags", [])]


class TestMetadataMode:
    def test_a_row_per_instance_differing_only_as_documented(self, orthanc):
        refs = _list(orthanc.root)
        rows = {}
        for series in sorted({r.series_url for r in refs}):
            for item in dw.read_series_metadata(series, policy=POLICY):
                converted = dw.convert_metadata(item)
                assert converted.uids.instance not in rows
                rows[converted.uids.instance] = converted
        assert set(rows) == set(orthanc.disk)
        reformatted = 0
        for uid, converted in rows.items():
            file_row, meta_row = orthanc.disk[uid].flattened.row, converted.flattened.row
            assert _undocumented_differences(file_row, meta_row) == [], uid
            file_dropped = [n for n in _dropped(file_row) if not _is_file_meta(n)]
            meta_dropped = _dropped(meta_row)
            after_pixel_data = _after_pixel_data(file_row)
            encapsulated = _is_encapsulated(orthanc.disk[uid].data)
            expected = [n for n in file_dropped if not (encapsulated and n == "PixelData") and n not in after_pixel_data]
            assert [n for n in meta_dropped if n not in after_pixel_data] == expected, uid
            assert not any(_is_file_meta(k) for k in meta_row)
            reformatted += _count_number_changes(file_row, meta_row)
        assert reformatted > 50  # Orthanc rewrites DS/IS text (the README's measured figure)
        charset = [r for r in rows.values() if r.flattened.row.get("SpecificCharacterSet") == ["ISO 2022 IR 87"]]
        assert charset, "the ISO 2022 sample lost its empty first charset value, as documented"

    def test_bulk_data_of_an_exported_vr_is_named_in_dropped_tags(self):
        item = {
            "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
            "00080018": {"vr": "UI", "Value": ["1.2.3.4"]},
            "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
            "0020000E": {"vr": "UI", "Value": ["1.2.3.5"]},
            "00204000": {"vr": "LT", "BulkDataURI": "http://server/bulk/1"},
            "00082112": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2"]},
                                               "00204000": {"vr": "LT", "BulkDataURI": "http://server/bulk/2"}}]},
            "7FE00010": {"vr": "OW", "BulkDataURI": "http://server/bulk/3"},
        }
        converted = dw.convert_metadata(item)
        assert "ImageComments" not in converted.flattened.row
        assert _dropped(converted.flattened.row) == ["PixelData", "ImageComments", "SourceImageSequence.ImageComments"]
        assert converted.flattened.counts["dropped_not_fit"] == 2


def _is_encapsulated(data: bytes) -> bool:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    meta = getattr(ds, "file_meta", None)
    return bool(meta is not None and "TransferSyntaxUID" in meta and meta.TransferSyntaxUID.is_compressed)


def _count_number_changes(a, b) -> int:
    if isinstance(a, dict) and isinstance(b, dict):
        return sum(_count_number_changes(a[k], b[k]) for k in set(a) & set(b))
    if isinstance(a, list) and isinstance(b, list):
        return sum(_count_number_changes(x, y) for x, y in zip(a, b))
    return int(a != b and _numbers_equal(a, b))


# -- Beam ----------------------------------------------------------------------------------


def test_beam_lists_and_reads_every_instance_once(orthanc):
    """The seams in a real pipeline (FnApiRunner), through the capping proxy with faults:
    every listed instance is read exactly once, in both modes, and retries are counted."""
    limits = dw.ServerLimits(studies=5, series=5, instances=5, max_results=5)
    gone = sorted(orthanc.disk)[3]
    with DicomWebProxy(orthanc.url, limit_cap=2, max_results=5, empty_matching=True) as proxy:
        root = _via(proxy)
        proxy.fault(r"/instances/" + sorted(orthanc.disk)[1] + "$", "503")
        proxy.fault(r"/instances/" + gone + "$", "404", times=-1)
        expected = sorted(url.replace(orthanc.root, root) for url in orthanc.urls.values())
        pipeline = beam.Pipeline(runner=FnApiRunner())
        files = pipeline | beam.Create(dw.listing_units(root)) | dw.ListDicomWeb(PATIENT_POLICY, limits)
        instances = files | "Instances" >> beam.ParDo(dw.ReadDicomWebInstances(8, PATIENT_POLICY, limits))
        metadata = files | "Metadata" >> dw.ReadDicomWebMetadataBySeries(8, PATIENT_POLICY, limits)
        assert_that(files | "ListedPaths" >> beam.Map(lambda f: (f.path, f.size)), equal_to([(u, 0) for u in expected]), label="Listed")
        assert_that(instances | "ReadPaths" >> beam.Map(lambda r: r.path), equal_to(expected), label="ReadOnce")
        assert_that(
            instances | "Failures" >> beam.Filter(lambda r: r.error is not None) | beam.Map(lambda r: (r.path.rsplit("/", 1)[1], r.error[0])),
            equal_to([(gone, "DicomWebRequestError")]), label="OneDeadLetter",
        )
        assert_that(metadata | "MetaPaths" >> beam.Map(lambda r: (r.path, r.error)), equal_to([(u, None) for u in expected]), label="MetadataOnce")
        result = pipeline.run()
        result.wait_until_finish()
    counters = collections.Counter()
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        counters[counter.key.metric.name] += counter.committed  # summed over steps
    assert counters["dicomweb_retries"] == 1
    assert counters["files_listed"] == len(expected)
    assert counters["dicomweb_requests"] > 2 * len(expected)  # listing, retrieves, metadata


# -- the export: pipeline.main.run through the CLI path (FnApiRunner), into DuckDB -------

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples" / "dicom"


def _export(*args: str) -> dict:
    from pipeline.main import run

    return run(["--runner=FnApiRunner", "--progress-seconds=0", *args])


def _table(tmp_path, name="instances"):
    from pipeline.destinations.duckdb import DuckDBTable

    return DuckDBTable(str(tmp_path / "export.duckdb"), name)


def _sample_uids() -> dict:
    return {entry.uids.instance: entry.uids for entry in (
        SimpleNamespace(uids=read_header(io.BytesIO(Path(p).read_bytes())).uids) for p in SAMPLES)}


def test_the_command_exports_from_dicomweb_with_beam_imported_as_it_imports_it(orthanc, tmp_path):
    """``dicom-bq-export`` as a user runs it (no --runner, in a process of its own): Beam
    imported without its Cloud Storage and BigQuery IO and Google's older API client
    (``pipeline.cli.not_for_beam``: the command line names no gs:// and no BigQuery table),
    a DICOM store's every instance exported into DuckDB."""
    import json
    import subprocess
    import sys

    database = tmp_path / "export.duckdb"
    script = (
        "import json, sys\n"
        "from pipeline import cli\n"
        f"code = cli.main(['--input', {orthanc.root!r}, '--bq-table=duckdb://{database}#instances',\n"
        "                 '--progress-seconds=0'])\n"
        "hidden = cli.NOT_FOR_LOCAL_TABLES + cli.NOT_FOR_LOCAL_FILES\n"
        "print(json.dumps({'code': code, 'imported': [name for name in hidden if name in sys.modules]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"code": 0, "imported": []}
    table = _table(tmp_path)
    assert sorted(row["SOPInstanceUID"] for row in table.read_rows()) == sorted(orthanc.disk)
    assert PASSWORD not in done.stderr + done.stdout


class TestExport:
    def test_files_and_dicomweb_in_one_run_give_the_same_rows_up_to_pixel_data(self, orthanc, tmp_path):
        table = _table(tmp_path)
        summary = _export("--input", str(SAMPLES_DIR), "--input", orthanc.root, f"--bq-table={table}")
        samples = _sample_uids()
        assert summary["files_matched"] == len(samples) + len(orthanc.disk)
        assert (summary["succeeded"], summary["failed"]) == (len(samples) + len(orthanc.disk), 0)
        assert summary["dicomweb_requests"] >= len(orthanc.disk) and "dicomweb_retries" not in summary
        # the 40 MB instance costs its header, not its pixel data
        assert summary["bytes_read"] < 5 * 1024 * 1024
        by_uid = collections.defaultdict(list)
        for row in table.read_rows():
            by_uid[row["SOPInstanceUID"]].append(row)
        assert set(by_uid) == set(orthanc.disk)
        trailing = 0
        for uid in samples:
            first, second = by_uid[uid]  # one from the file, one from DICOMweb (same table, same schema)
            assert _before_pixel_data(first) == _before_pixel_data(second), uid
            if first != second:  # the file's row names what follows Pixel Data; the retrieve's does not
                trailing += 1
                longer, shorter = sorted((first, second), key=lambda row: len(_dropped(row)), reverse=True)
                assert shorter == _before_pixel_data(longer) and "PixelData" in _dropped(shorter)
        assert trailing >= 1  # the samples hold Data Set Trailing Padding: the difference is exercised

    def test_metadata_mode_gives_a_row_per_instance(self, orthanc, tmp_path):
        table = _table(tmp_path)
        summary = _export("--input", orthanc.root, "--dicomweb-mode", "metadata", f"--bq-table={table}")
        assert (summary["files_matched"], summary["succeeded"], summary["failed"]) == (len(orthanc.disk),) * 2 + (0,)
        series = {(e.uids.study, e.uids.series) for e in orthanc.disk.values()}
        assert summary["dicomweb_requests"] >= len(series)
        rows = table.read_rows()
        assert sorted(r["SOPInstanceUID"] for r in rows) == sorted(orthanc.disk)
        assert not any("TransferSyntaxUID" in r and r["TransferSyntaxUID"] for r in rows)  # no group 0002, as documented

    def test_a_filter_file_of_study_series_and_instance_lines(self, orthanc, tmp_path):
        entries = sorted((e.uids for e in orthanc.disk.values()), key=lambda u: u.instance)
        multi = [u for u in entries if u.study == orthanc.multi_series_study]
        single = next(u for u in entries if u.study != orthanc.multi_series_study and u.instance != orthanc.big.instance)
        lines = [
            f"/studies/{multi[0].study}/series/{multi[0].series}",
            f"/studies/{single.study}/series/{single.series}/instances/{single.instance}",
            f"/studies/{orthanc.big.study}",
            f"/studies/{orthanc.big.study}/series/{orthanc.big.series}/instances/{orthanc.big.instance}",  # twice
        ]
        filter_path = tmp_path / "filter.txt"
        filter_path.write_text("\n".join(lines) + "\n")
        expected = {u.instance for u in entries if u.series == multi[0].series or u.instance == single.instance
                    or u.study == orthanc.big.study}
        table = _table(tmp_path)
        summary = _export("--input", orthanc.root, f"--filter-config-gcs-uri={filter_path}", f"--bq-table={table}")
        assert sorted(r["SOPInstanceUID"] for r in table.read_rows()) == sorted(expected)
        assert summary["files_matched"] == len(expected)  # the instance listed twice is read once
        assert summary["not_selected_by_filter"] == 0 and summary["filter_lines_selecting_nothing"] == []

    def test_wrong_credentials_stop_the_run_before_any_read_and_are_never_printed(self, orthanc, tmp_path,
                                                                                  monkeypatch, capfd):
        from pipeline.main import main

        wrong = "Wrong-" + PASSWORD
        monkeypatch.setenv("DICOMWEB_PASSWORD", wrong)
        table = _table(tmp_path)
        with DicomWebProxy(orthanc.url) as proxy:
            status = main(["--input", str(SAMPLES_DIR), "--input", _via(proxy), f"--bq-table={table}",
                           "--runner=FnApiRunner", "--progress-seconds=0"])
            paths = [path for path, _query in proxy.requests]
        out, err = capfd.readouterr()
        assert status == 1
        assert err.count("\n") == 1 and "HTTP 401" in err and "DICOMWEB_USER" in err and out == ""
        assert paths == ["/dicom-web/studies"]  # the preflight's one search; no listing, no retrieve
        assert not (tmp_path / "export.duckdb").exists()  # nothing written
        basic = base64.b64encode(f"{USER}:{wrong}".encode()).decode()
        for secret in (wrong, PASSWORD, basic):
            assert secret not in out + err

    def test_a_listing_that_cannot_be_completed_fails_the_run_in_one_line(self, orthanc, tmp_path, monkeypatch,
                                                                          capfd):
        from pipeline.main import main

        monkeypatch.setenv("DICOMWEB_QIDO_LIMIT", "5")
        monkeypatch.setenv("DICOMWEB_QIDO_MAX_RESULTS", "5")
        table = _table(tmp_path)
        with DicomWebProxy(orthanc.url, limit_cap=2, max_results=5, empty_matching=False) as proxy:
            status = main(["--input", _via(proxy), f"--bq-table={table}", "--runner=FnApiRunner",
                           "--progress-seconds=0"])
        _out, err = capfd.readouterr()
        assert status == 1
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.startswith("dicom-bq-export: error: the DICOMweb server at ") and "use a filter file" in err
        assert not (tmp_path / "export.duckdb").exists() or table.read_rows() == []

    def test_no_credential_in_the_tables_or_the_summary(self, orthanc, tmp_path, capfd):
        table = _table(tmp_path)
        uid, busy = sorted(orthanc.disk)[:2]
        with DicomWebProxy(orthanc.url) as proxy:
            proxy.fault(rf"/instances/{uid}$", "404", times=-1)
            proxy.fault(rf"/instances/{busy}$", "503")
            summary = _export("--input", _via(proxy), f"--bq-table={table}")
        assert (summary["succeeded"], summary["failed"]) == (len(orthanc.disk) - 1, 1)
        assert summary["dicomweb_retries"] == 1
        out, err = capfd.readouterr()
        import duckdb

        with duckdb.connect(str(tmp_path / "export.duckdb"), read_only=True) as connection:
            dead_letters = connection.sql("SELECT path, stage, error_type, message FROM instances_errors").fetchall()
            text = " ".join(str(r) for r in connection.sql("SELECT * FROM instances").fetchall())
        assert [(p.rsplit("/", 1)[1], s, t) for p, s, t, _m in dead_letters] == [(uid, "read", "DicomWebRequestError")]
        assert dead_letters[0][0].startswith("dicomweb+http://") and "HTTP 404" in dead_letters[0][3]
        basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        assert "DICOMweb retries                    1" in out  # shown in the summary when not zero
        for output in (out, err, text, str(dead_letters), json_dumps(summary)):
            assert PASSWORD not in output and basic not in output


def json_dumps(value) -> str:
    import json

    return json.dumps(value)


def test_inspect_reads_a_dicomweb_instance_as_the_export_does(orthanc):
    from pipeline import inspect

    uid = next(uid for uid, entry in orthanc.disk.items() if "DataSetTrailingPadding" in _dropped(entry.flattened.row))
    out = io.StringIO()
    assert inspect.run([orthanc.urls[uid], orthanc.urls[uid] + "9"], out=out) == 0
    found, missing = [json_loads(line) for line in out.getvalue().splitlines()]
    assert found["path"] == orthanc.urls[uid]
    assert found["row"] == _before_pixel_data(orthanc.disk[uid].flattened.row)
    assert missing["error"]["type"] == "DicomWebRequestError" and "404" in missing["error"]["message"]


def json_loads(text: str):
    import json

    return json.loads(text)


# -- --incremental: versions from the QIDO listing (last: it adds an instance for a while) --


def _retrieved(proxy) -> list[str]:
    """The paths of instance retrieves and series metadata requests the proxy relayed."""
    return [path for path, _query in proxy.requests if "/instances/" in path or path.endswith("/metadata")]


@pytest.mark.parametrize("mode", ["instance", "metadata"])
def test_an_unchanged_incremental_run_over_dicomweb_retrieves_nothing(orthanc, tmp_path, mode):
    import requests

    table = _table(tmp_path)
    with DicomWebProxy(orthanc.url) as proxy:
        args = ("--input", _via(proxy), "--dicomweb-mode", mode, f"--bq-table={table}", "--incremental")
        first = _export(*args)
        assert first["rows_added"] == len(orthanc.disk)
        records = {r["path"]: r for r in table.read_rows("instances_files")}
        assert len(records) == len(orthanc.disk)
        assert all(r["version"].startswith("qido:") and r["outcome"] == "row" for r in records.values())
        rows = sorted(table.read_rows(), key=lambda row: row["SOPInstanceUID"])

        proxy.requests.clear()
        again = _export(*args, "--write-disposition=WRITE_APPEND")
        assert _retrieved(proxy) == [] and again["bytes_read"] == 0
        assert again["unchanged_files"] == len(orthanc.disk) and (again["rows_added"], again["rows_replaced"]) == (0, 0)
        assert sorted(table.read_rows(), key=lambda row: row["SOPInstanceUID"]) == rows
        assert {r["path"]: r for r in table.read_rows("instances_files")} == records

        added = instance(pydicom.uid.generate_uid(), pydicom.uid.generate_uid())
        upload(orthanc.url, to_bytes(added), USER, PASSWORD)
        try:
            proxy.requests.clear()
            third = _export(*args, "--write-disposition=WRITE_APPEND")
            assert len(_retrieved(proxy)) == 1 and third["rows_added"] == 1
            assert third["unchanged_files"] == len(orthanc.disk)
        finally:
            auth = (USER, PASSWORD)
            found = requests.post(orthanc.url + "/tools/lookup", data=added.SOPInstanceUID, auth=auth, timeout=30)
            for hit in found.json():
                requests.delete(f"{orthanc.url}/instances/{hit['ID']}", auth=auth, timeout=30).raise_for_status()


def test_a_qido_version_ignores_where_an_instance_is_retrieved_from():
    record = {"00080018": {"vr": "UI", "Value": ["1.2.3"]}, "00200013": {"vr": "IS", "Value": [1]},
              "00081190": {"vr": "UR", "Value": ["http://a/studies/1"]}}
    moved = dict(record, **{"00081190": {"vr": "UR", "Value": ["http://b/studies/1"]}})
    renumbered = dict(record, **{"00200013": {"vr": "IS", "Value": [2]}})
    assert dw.qido_version(record) == dw.qido_version(moved) != dw.qido_version(renumbered)
