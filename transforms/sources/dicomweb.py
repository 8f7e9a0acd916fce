"""DICOMweb as an input: QIDO-RS listing, WADO-RS retrieve (header only) and metadata.

``--input dicomweb+https://HOST/ROOT`` (or ``dicomweb+http://`` for a server on this
machine, or a Healthcare API store's resource name) names a DICOMweb service root. Each
instance becomes an ``InputFile`` whose path is its full URL,
``dicomweb+https://HOST/ROOT/studies/S/series/SE/instances/I``: that URL is also the
path of its dead letter, so a run over several servers (and files) stays unambiguous.

Pure Python plus ``requests`` for the rules; the Beam DoFns at the end only wire them:

* listing: :func:`listing_units` (launcher) → :func:`split_studies` (a study search into
  per-study units, paging within the server's caps and splitting by StudyDate) →
  :func:`expand` (a unit → :class:`InstanceRef`);
* instance mode: :func:`open_instance` streams the first part of a WADO-RS multipart
  answer as a file object that ``transforms.header.read_header`` reads; closing it
  drops the connection, so the pixel data is never downloaded;
* metadata mode: :func:`read_series_metadata` + :func:`convert_metadata` (DICOM JSON →
  pydicom → ``flatten_instance``);
* :func:`read_many`: many instances in flight at once, over one pooled session.

Versions (the files table, ``--incremental``): DICOMweb has no generation or ETag in its
search answers, and a request per instance would cost what skipping it saves. So an
instance's version is a digest of its own QIDO record (:func:`qido_version`): every
attribute the server returns for it in the listing (by default SOP Class, Instance
Number, Rows, Columns, Number of Frames… plus Instance Creation Date and Time, asked
for), except where and how to retrieve it (Retrieve URL, Retrieve AE Title, Instance
Availability). Its limit: an instance stored again under the same SOP Instance UID with
none of those attributes changed keeps its version, and is not read again by
``--incremental``; a full export (WRITE_TRUNCATE) reads it.

Credentials come from the environment only and never appear in a message.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import http.client
import io
import itertools
import json
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Iterable, Iterator, NamedTuple

import requests
import urllib3

from schemas.columns import column_for_tag
from schemas.convert import Flattened, flatten_instance
from schemas.vr_types import is_excluded
from transforms.header import InstanceUIDs, MissingInstanceUIDError, read_header

PREFIX = "dicomweb+"
HEALTHCARE_HOST = "healthcare.googleapis.com"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CREDENTIAL_HINT = (
    "set DICOMWEB_TOKEN (a bearer token) or DICOMWEB_USER and DICOMWEB_PASSWORD (HTTP Basic) "
    "in the environment; for healthcare.googleapis.com, Application Default Credentials "
    "(gcloud auth application-default login, or the worker's service account)"
)
#: The smallest read from the socket: headers are read a few KB at a time, never the body.
MIN_READ = 2048
#: On close, the rest of an answer this small is read so the connection can be reused.
DRAIN_LIMIT = 64 * 1024

_HEALTHCARE_STORE = re.compile(r"projects/[^/]+/locations/[^/]+/datasets/[^/]+/dicomStores/[^/]+")
_UID = r"[0-9.]{1,64}"
_INSTANCE_URL = re.compile(
    rf"(?P<root>{re.escape(PREFIX)}https?://.+?)/studies/(?P<study>{_UID})"
    rf"/series/(?P<series>{_UID})/instances/(?P<instance>{_UID})"
)
class _AnswerCutShort(OSError):
    """The server's answer ended before the instance did (retried like a reset)."""


_TRANSPORT_ERRORS = (
    _AnswerCutShort,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


class DicomWebError(Exception):
    """A problem the user must fix (server, credentials, a store that cannot be listed
    completely): one line saying what to do. Never quotes a credential or a tag value."""


class DicomWebRequestError(OSError):
    """A request that failed for good: an HTTP status that is not retried, or retries
    exhausted. The message names the status, never a value (safe for dead letters)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# -- names -------------------------------------------------------------------------------


def is_dicomweb_input(text: str) -> bool:
    """True for ``dicomweb+http(s)://…`` and for a Healthcare API store's resource name."""
    return text.startswith(PREFIX) or bool(_HEALTHCARE_STORE.fullmatch(text.strip("/")))


def parse_root(text: str) -> str:
    """The canonical root URL, ``dicomweb+https://HOST/PATH`` without a trailing slash.

    A resource name ``projects/P/locations/L/datasets/D/dicomStores/S`` becomes the
    store's DICOMweb root on healthcare.googleapis.com (v1). Credentials in the URL are
    refused: they would end up in logs and in the job's parameters.
    """
    if _HEALTHCARE_STORE.fullmatch(text.strip("/")):
        return f"{PREFIX}https://{HEALTHCARE_HOST}/v1/{text.strip('/')}/dicomWeb"
    if not text.startswith((PREFIX + "https://", PREFIX + "http://")):
        raise DicomWebError("a DICOMweb input is dicomweb+https://HOST/PATH (or dicomweb+http:// for a local server)")
    scheme, rest = text[len(PREFIX):].split("://", 1)
    host, _, path = rest.partition("/")
    if "@" in host:
        raise DicomWebError("credentials do not belong in the DICOMweb URL: " + CREDENTIAL_HINT)
    if not host:
        raise DicomWebError("the DICOMweb URL names no host: dicomweb+https://HOST/PATH")
    if "?" in path or "#" in path:
        raise DicomWebError("the DICOMweb root URL takes no query or fragment")
    path = path.rstrip("/")
    return f"{PREFIX}{scheme}://{host}" + (f"/{path}" if path else "")


def http_url(root: str) -> str:
    return root[len(PREFIX):] if root.startswith(PREFIX) else root


class InstanceRef(NamedTuple):
    """One instance of one server."""

    root: str
    study: str
    series: str
    instance: str

    @property
    def resource_path(self) -> str:
        return f"/studies/{self.study}/series/{self.series}/instances/{self.instance}"

    @property
    def url(self) -> str:
        return self.root + self.resource_path

    @property
    def series_url(self) -> str:
        return f"{self.root}/studies/{self.study}/series/{self.series}"


def parse_instance_url(url: str) -> InstanceRef:
    match = _INSTANCE_URL.fullmatch(url)
    if match is None:
        raise ValueError("not a DICOMweb instance URL: expected dicomweb+https://HOST/ROOT/studies/S/series/SE/instances/I")
    return InstanceRef(**match.groupdict())


def is_instance_url(url: str) -> bool:
    return _INSTANCE_URL.fullmatch(url) is not None


# -- server limits -----------------------------------------------------------------------


class ServerLimits(NamedTuple):
    """What one QIDO query may ask for: ``limit`` per level, and ``max_results``, the
    most results one query can be paged through (``offset + limit`` cap). A query with
    more results is split; a server may still cap ``limit`` lower, silently."""

    studies: int = 1000
    series: int = 1000
    instances: int = 1000
    max_results: int = 10_000

    def limit(self, level: str) -> int:
        return getattr(self, level)


HEALTHCARE_LIMITS = ServerLimits(5000, 5000, 50_000, 1_000_000)
AZURE_LIMITS = ServerLimits(200, 200, 200, 10_000)
AWS_LIMITS = ServerLimits(1000, 1000, 1000, 10_000)


def server_limits(root: str) -> ServerLimits:
    """The documented caps of the server kind, else conservative defaults.

    ``DICOMWEB_QIDO_LIMIT`` and ``DICOMWEB_QIDO_MAX_RESULTS`` override them (e.g. to
    list a large Orthanc, which has no cap, without splitting).
    """
    host = _host(root)
    if host == HEALTHCARE_HOST:
        limits = HEALTHCARE_LIMITS
    elif host.endswith(".azurehealthcareapis.com"):
        limits = AZURE_LIMITS
    elif host.startswith("dicom-medical-imaging.") and host.endswith(".amazonaws.com"):
        limits = AWS_LIMITS
    else:
        limits = ServerLimits()
    limit = os.environ.get("DICOMWEB_QIDO_LIMIT")
    if limit:
        limits = limits._replace(studies=int(limit), series=int(limit), instances=int(limit))
    most = os.environ.get("DICOMWEB_QIDO_MAX_RESULTS")
    if most:
        limits = limits._replace(max_results=int(most))
    return limits


# -- HTTP --------------------------------------------------------------------------------


class RetryPolicy(NamedTuple):
    """Bounded retries: ``attempts`` in all and ``budget`` seconds in all per request;
    exponential backoff with jitter, or the server's ``Retry-After`` (capped)."""

    attempts: int = 6
    backoff: float = 0.5
    max_sleep: float = 30.0
    budget: float = 120.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def sleep_for(self, attempt: int, retry_after: str | None) -> float:
        seconds = None
        if retry_after:
            try:
                seconds = float(retry_after)
            except ValueError:
                when = email.utils.parsedate_to_datetime(retry_after)
                if when is not None:
                    seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        if seconds is None:
            seconds = self.backoff * (2 ** attempt) * (0.5 + random.random() / 2)
        return min(max(seconds, 0.0), self.max_sleep)


class Tally:
    """Requests, retries and bytes received by some work; safe to share across threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.bytes_received = 0

    def add(self, requests: int = 0, retries: int = 0, bytes_received: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.retries += retries
            self.bytes_received += bytes_received

    def snapshot(self) -> tuple[int, int, int]:
        with self._lock:
            return self.requests, self.retries, self.bytes_received


#: Sessions of this process, one per (server, auth); shared by every thread.
_SESSIONS: dict[tuple, requests.Session] = {}
_SESSIONS_LOCK = threading.Lock()
POOL_SIZE = 128


def _credentials_key(host: str) -> tuple:
    if host == HEALTHCARE_HOST:
        return ("google",)
    if os.environ.get("DICOMWEB_TOKEN"):
        return ("bearer", hash(os.environ["DICOMWEB_TOKEN"]))
    if os.environ.get("DICOMWEB_USER"):
        return ("basic", hash((os.environ["DICOMWEB_USER"], os.environ.get("DICOMWEB_PASSWORD", ""))))
    return ("none",)


def session_for(root: str) -> requests.Session:
    """The pooled session of this process for ``root``'s server (created on first use).

    Healthcare API: Google ADC (scope cloud-platform) through google-auth's
    ``AuthorizedSession``. Otherwise ``DICOMWEB_TOKEN`` (bearer) or ``DICOMWEB_USER`` /
    ``DICOMWEB_PASSWORD`` (Basic), read from the environment when the session is made.
    """
    base = http_url(root)
    scheme, rest = base.split("://", 1)
    host = rest.split("/", 1)[0]
    key = (scheme, host, _credentials_key(host.split(":")[0].lower()))
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            session = _SESSIONS[key] = _new_session(key[2])
        return session


def _new_session(credentials: tuple) -> requests.Session:
    if credentials[0] == "google":
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
        from google.auth.transport.requests import AuthorizedSession

        try:
            google_credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
        except DefaultCredentialsError:
            raise DicomWebError(
                "no Google credentials for the Healthcare API: run gcloud auth application-default login "
                "or set GOOGLE_APPLICATION_CREDENTIALS"
            ) from None
        session = AuthorizedSession(google_credentials)
    else:
        session = requests.Session()
        if credentials[0] == "bearer":
            session.headers["Authorization"] = "Bearer " + os.environ["DICOMWEB_TOKEN"]
        elif credentials[0] == "basic":
            session.auth = (os.environ["DICOMWEB_USER"], os.environ.get("DICOMWEB_PASSWORD", ""))
    session.trust_env = False  # no .netrc credentials, no proxy surprises
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=POOL_SIZE)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def reset_sessions() -> None:
    """Forget this process's sessions (after the environment's credentials changed)."""
    with _SESSIONS_LOCK:
        for session in _SESSIONS.values():
            session.close()
        _SESSIONS.clear()


class DicomWebClient:
    """Requests to one DICOMweb root with retries; cheap to create (the session is shared)."""

    def __init__(self, root: str, policy: RetryPolicy | None = None, limits: ServerLimits | None = None):
        self.root = parse_root(root)
        self.base = http_url(self.root)
        self.policy = policy or RetryPolicy()
        self.limits = limits or server_limits(self.root)
        self.session = session_for(self.root)
        #: Largest page seen per level: a shorter page than that is the end of a listing.
        self._proven_page: dict[str, int] = {}

    def get(self, path: str, *, params=None, headers=None, stream: bool = False, tally: Tally | None = None,
            ok_statuses=(200,), policy: RetryPolicy | None = None) -> requests.Response:
        """GET ``root + path``, retrying 429/5xx (honouring Retry-After) and connection
        resets and timeouts, within the policy's attempts and time budget."""
        policy = policy or self.policy
        started = time.monotonic()
        tally = tally if tally is not None else Tally()
        for attempt in range(policy.attempts):
            retry_after = None
            tally.add(requests=1)
            try:
                response = self.session.get(
                    self.base + path, params=params, headers=headers, stream=stream,
                    timeout=(policy.connect_timeout, policy.read_timeout),
                )
            except _TRANSPORT_ERRORS as error:
                failure = DicomWebRequestError(f"{type(error).__name__} talking to the DICOMweb server")
            else:
                if response.status_code in ok_statuses:
                    return response
                retry_after = response.headers.get("Retry-After")
                failure = DicomWebRequestError(
                    f"HTTP {response.status_code} {response.reason or ''}".strip(), response.status_code
                )
                response.close()
                if response.status_code not in RETRY_STATUSES:
                    raise failure
            sleep = policy.sleep_for(attempt, retry_after)
            if attempt + 1 >= policy.attempts or time.monotonic() - started + sleep > policy.budget:
                raise DicomWebRequestError(
                    f"{failure} (after {attempt + 1} attempts)", failure.status
                )
            tally.add(retries=1)
            time.sleep(sleep)
        raise AssertionError("unreachable")

    def search(self, path: str, params: dict, tally: Tally | None = None) -> list[dict]:
        """One QIDO-RS request → its results (a 204 or a 404 under a study is no result)."""
        try:
            response = self.get(
                path, params=params, headers={"Accept": "application/dicom+json"}, tally=tally,
                ok_statuses=(200, 204),
            )
        except DicomWebRequestError as error:
            if error.status == 404 and path != "/studies":
                return []
            raise
        with response:
            if response.status_code == 204 or not response.content.strip():
                return []
            results = response.json()
        if not isinstance(results, list):
            raise DicomWebError(f"the DICOMweb server at {self.root} answered a search with something else than a JSON list")
        return results

    def page_through(self, path: str, params: dict, level: str, tally: Tally | None = None) -> Iterator[dict]:
        """Every result of one QIDO query, page by page.

        Pages by the count each page actually returned (the server may cap ``limit``
        silently), stops at an empty page, or at a short page once the server has shown
        it returns longer ones. Raises :class:`_TooManyResults` rather than ask past
        ``max_results``: the caller splits the query.
        """
        limit = self.limits.limit(level)
        most = self.limits.max_results
        offset = 0
        previous_first = None
        while True:
            ask = min(limit, most - offset)
            if ask <= 0:
                if self.search(path, {**params, "offset": offset, "limit": 1}, tally):
                    raise _TooManyResults(path)
                return
            page = self.search(path, {**params, "offset": offset, "limit": ask}, tally)
            if not page:
                return
            first = _uid_of(page[0])
            if offset and first is not None and first == previous_first:
                raise DicomWebError(
                    f"the DICOMweb server at {self.root} ignores the QIDO offset parameter, so a listing "
                    "cannot be paged; use a filter file"
                )
            previous_first = first
            yield from page
            offset += len(page)
            proven = self._proven_page.get(level, 0)
            self._proven_page[level] = max(proven, len(page))
            if len(page) < ask and len(page) < proven:
                return

    def has_more_than(self, path: str, params: dict, count: int, tally: Tally | None = None) -> bool:
        return bool(self.search(path, {**params, "offset": count, "limit": 1}, tally))

    def retrieve(self, ref: InstanceRef, tally: Tally | None = None, policy: RetryPolicy | None = None) -> "InstanceStream":
        """Open a WADO-RS retrieve of ``ref`` as stored (``transfer-syntax=*``), streamed."""
        tally = tally if tally is not None else Tally()
        response = self.get(
            ref.resource_path, headers={"Accept": INSTANCE_ACCEPT, "Accept-Encoding": "identity"},
            stream=True, tally=tally, policy=policy,
        )
        return InstanceStream(response, tally)


class _TooManyResults(Exception):
    """A query with more results than the server lets one query page through."""


def _uid_of(result: dict) -> str | None:
    for tag in ("00080018", "0020000E", "0020000D"):
        value = _first_value(result, tag)
        if value:
            return value
    return None


def _first_value(result: dict, tag: str):
    values = (result.get(tag) or {}).get("Value") or []
    return values[0] if values else None


_CLIENTS: dict[tuple, DicomWebClient] = {}
_CLIENTS_LOCK = threading.Lock()


def client_for(root: str, policy: RetryPolicy | None = None, limits: ServerLimits | None = None) -> DicomWebClient:
    """A client for ``root`` (one per process and settings; the session is pooled)."""
    key = (parse_root(root), policy, limits, _credentials_key(_host(root)))
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = DicomWebClient(root, policy, limits)
        return client


def _host(root: str) -> str:
    return http_url(parse_root(root)).split("://", 1)[1].split("/", 1)[0].split(":")[0].lower()


# -- preflight ---------------------------------------------------------------------------


def check_server(root: str, policy: RetryPolicy | None = None) -> None:
    """Fail fast, before any instance is read, if the server cannot be used.

    Raises :class:`DicomWebError` with one line saying what to fix: unreachable, 401
    (credentials), 403 (permission), 404 (wrong root), anything else.
    """
    root = parse_root(root)
    policy = policy or RetryPolicy(attempts=3, backoff=0.5, budget=20.0, read_timeout=30.0)
    client = DicomWebClient(root, policy)
    try:
        client.search("/studies", {"limit": 1})
    except DicomWebRequestError as error:
        if error.status == 401:
            raise DicomWebError(f"the DICOMweb server at {root} refused the credentials (HTTP 401): {CREDENTIAL_HINT}") from None
        if error.status == 403:
            role = " (a Healthcare API store needs roles/healthcare.dicomViewer)" if _host(root) == HEALTHCARE_HOST else ""
            raise DicomWebError(
                f"the DICOMweb server at {root} denied access (HTTP 403): give these credentials read access to the store{role}"
            ) from None
        if error.status == 404:
            raise DicomWebError(
                f"no DICOMweb service at {root} (HTTP 404): check the root path (Orthanc: /dicom-web, "
                "Healthcare API: .../dicomStores/S/dicomWeb)"
            ) from None
        if error.status is None:
            raise DicomWebError(f"cannot reach the DICOMweb server at {root} ({error}): check the host, port and network") from None
        raise DicomWebError(f"the DICOMweb server at {root} cannot be searched: {error}") from None
    except ValueError:
        raise DicomWebError(f"{root} does not answer like a DICOMweb server (a QIDO search did not return JSON)") from None


# -- listing -----------------------------------------------------------------------------


class ListingUnit(NamedTuple):
    """One piece of a listing, small enough for one worker: a study search (``study`` is
    None; ``dates`` None for all dates, ``("", "")`` for no StudyDate, else an inclusive
    ``YYYYMMDD`` range), or a study, a series or an instance (from the filter file or
    from a study search)."""

    root: str
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    dates: tuple[str, str] | None = None

    @property
    def is_study_search(self) -> bool:
        return self.study is None


def listing_units(root: str, filter_file=None) -> list[ListingUnit]:
    """The units that list ``root``: one per filter line, or one search of all studies."""
    root = parse_root(root)
    if filter_file is None:
        return [ListingUnit(root)]
    return [ListingUnit(root, line.study, line.series, line.instance) for line in filter_file.lines]


_FIRST_DAY = datetime.date(1, 1, 1)
_LAST_DAY = datetime.date(9999, 12, 31)
_STUDY_FIELDS = {"includefield": "00080020"}


def split_studies(unit: ListingUnit, client: DicomWebClient, tally: Tally | None = None) -> Iterator[ListingUnit]:
    """A study search → one unit per study, each study once.

    If the server cannot page through all its studies in one query (more than
    ``max_results``), the search is split by StudyDate ranges (halved until each fits)
    plus the studies with no StudyDate, found by empty-value matching (PS3.4
    C.2.2.2.1). A server that does not support that — an undated study among the first
    studies that this search does not find — makes the listing fail: it could not be
    complete.
    """
    if not unit.is_study_search:
        yield unit
        return
    seen: set[str] = set()
    for result in _study_results(unit, client, tally):
        study = _first_value(result, "0020000D")
        if study and study not in seen:
            seen.add(study)
            yield ListingUnit(unit.root, study)


def _study_results(unit: ListingUnit, client: DicomWebClient, tally) -> Iterator[dict]:
    most = client.limits.max_results
    if not client.has_more_than("/studies", _STUDY_FIELDS, most, tally):
        yield from client.page_through("/studies", _STUDY_FIELDS, "studies", tally)
        return
    first = itertools.islice(
        client.page_through("/studies", _STUDY_FIELDS, "studies", tally), min(most, client.limits.studies)
    )
    undated_seen = {_first_value(r, "0020000D") for r in first if not _first_value(r, "00080020")}
    undated = list(_search_or_fail(client, {**_STUDY_FIELDS, "StudyDate": '""'}, tally, "with no StudyDate"))
    if any(_first_value(r, "00080020") for r in undated) or not undated_seen <= {
        _first_value(r, "0020000D") for r in undated
    }:
        raise DicomWebError(
            f"the DICOMweb server at {client.root} has more than {most:,} studies and cannot search for "
            "studies without a StudyDate (empty value matching), so listing them all cannot be guaranteed "
            "complete: use a filter file of /studies/UID lines"
        )
    yield from undated
    ranges = [(_FIRST_DAY, _LAST_DAY)]
    while ranges:
        low, high = ranges.pop()
        dates = {**_STUDY_FIELDS, "StudyDate": f"{_da(low)}-{_da(high)}"}
        if client.has_more_than("/studies", dates, most, tally):
            if low == high:
                raise DicomWebError(
                    f"the DICOMweb server at {client.root} has more than {most:,} studies on one StudyDate, "
                    "more than one search can page through: use a filter file of /studies/UID lines"
                )
            middle = low + (high - low) // 2
            ranges += [(middle + datetime.timedelta(days=1), high), (low, middle)]
            continue
        yield from _search_or_fail(client, dates, tally, f"dated {_da(low)}-{_da(high)}")


def _da(day: datetime.date) -> str:
    """A DA value (``strftime`` does not zero-pad years before 1000 everywhere)."""
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


def _search_or_fail(client: DicomWebClient, params: dict, tally, what: str) -> Iterator[dict]:
    try:
        yield from client.page_through("/studies", params, "studies", tally)
    except _TooManyResults:
        raise DicomWebError(
            f"the DICOMweb server at {client.root} returned more studies {what} than one search can page "
            "through (the store changed while listing?): run again, or use a filter file"
        ) from None


#: Asked of every instance search: the series and instance UIDs, and Instance Creation
#: Date and Time for the version (:func:`qido_version`).
_INSTANCE_FIELDS = {"includefield": ["0020000E", "00080018", "00080012", "00080013"]}
#: Not part of a version: where and how an instance can be retrieved, not what it holds.
_NOT_VERSIONED = frozenset({"00081190", "00080054", "00080056"})


def qido_version(result: dict) -> str:
    """An instance's version from its QIDO record: ``qido:`` and a SHA-256 of the record's
    attributes (canonical JSON, sorted), without :data:`_NOT_VERSIONED`."""
    kept = {tag: value for tag, value in result.items() if tag not in _NOT_VERSIONED}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "qido:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def expand(unit: ListingUnit, client: DicomWebClient, tally: Tally | None = None) -> Iterator[InstanceRef]:
    """A unit → its instances, each once. A study search is split first (see
    :func:`split_studies`); a study too large for one search is listed series by series."""
    for ref, _version in expand_versioned(unit, client, tally):
        yield ref


def expand_versioned(unit: ListingUnit, client: DicomWebClient, tally: Tally | None = None
                     ) -> Iterator[tuple[InstanceRef, str]]:
    """:func:`expand`, with each instance's version (:func:`qido_version`)."""
    if unit.is_study_search:
        for study_unit in split_studies(unit, client, tally):
            yield from expand_versioned(study_unit, client, tally)
        return
    seen: set[str] = set()
    for ref, version in _unit_instances(unit, client, tally):
        if ref.instance not in seen:
            seen.add(ref.instance)
            yield ref, version


def _unit_instances(unit: ListingUnit, client: DicomWebClient, tally) -> Iterator[tuple[InstanceRef, str]]:
    if unit.series is None:
        path = f"/studies/{unit.study}/instances"
        try:
            results = list(client.page_through(path, _INSTANCE_FIELDS, "instances", tally))
        except _TooManyResults:
            for series in client.page_through(f"/studies/{unit.study}/series", {}, "series", tally):
                uid = _first_value(series, "0020000E")
                if uid:
                    yield from _unit_instances(unit._replace(series=uid), client, tally)
            return
        yield from _refs(unit, results)
        return
    params = dict(_INSTANCE_FIELDS)
    if unit.instance is not None:
        params["SOPInstanceUID"] = unit.instance
    path = f"/studies/{unit.study}/series/{unit.series}/instances"
    try:
        yield from _refs(unit, client.page_through(path, params, "instances", tally))
    except _TooManyResults:
        raise DicomWebError(
            f"a series of the DICOMweb server at {client.root} has more instances than one search can page "
            "through: set DICOMWEB_QIDO_MAX_RESULTS if the server allows larger offsets"
        ) from None


def _refs(unit: ListingUnit, results: Iterable[dict]) -> Iterator[tuple[InstanceRef, str]]:
    for result in results:
        instance = _first_value(result, "00080018")
        series = unit.series or _first_value(result, "0020000E")
        if not instance or not series:
            continue
        if unit.instance is not None and instance != unit.instance:
            continue  # a server that ignored the SOPInstanceUID match
        yield InstanceRef(unit.root, unit.study, series, instance), qido_version(result)


# -- instance mode -----------------------------------------------------------------------


class InstanceStream(io.RawIOBase):
    """The first part of a WADO-RS answer as a read-only, seekable file object.

    The multipart framing (boundary from the Content-Type) is parsed as the bytes
    arrive; only what the reader asks for is received, a few KB at a time. Everything
    received is kept, so seeking back works anywhere; seeking forward receives up to
    there. ``seek(0, SEEK_END)`` goes to the end of what has been received *without*
    receiving more: ``read_header``'s check that skipped values are complete compares
    them with that end, which is right because skipping a value receives it.
    ``bytes_read`` counts the bytes received from the server (framing included).
    Closing it closes the answer: the rest (the pixel data) is never received.
    """

    def __init__(self, response: requests.Response, tally: Tally | None = None):
        super().__init__()
        self._response = response
        self._raw = response.raw
        self._tally = tally
        self.bytes_read = 0
        self._body = bytearray()
        self._pending = bytearray()
        self._position = 0
        self._ended = False
        self._delimiter = None
        content_type = response.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/"):
            boundary = _boundary(content_type)
            if not boundary:
                raise DicomWebRequestError("the server's multipart answer names no boundary")
            self._delimiter = b"\r\n--" + boundary.encode("latin-1")
            self._skip_to_first_part(boundary.encode("latin-1"))

    def _receive(self, size: int) -> bytes:
        chunk = self._raw.read(size)
        self.bytes_read += len(chunk)
        if self._tally is not None:
            self._tally.add(bytes_received=len(chunk))
        return chunk

    def _skip_to_first_part(self, boundary: bytes) -> None:
        opening = b"--" + boundary
        while True:
            start = self._pending.find(opening)
            if start >= 0:
                end = self._pending.find(b"\r\n\r\n", start)
                if end >= 0:
                    del self._pending[: end + 4]
                    return
            chunk = self._receive(MIN_READ)
            if not chunk:
                raise _AnswerCutShort("the server's multipart answer ended before its first part")
            self._pending += chunk

    def _fill(self, end: int) -> None:
        """Receive body bytes until ``len(self._body) >= end`` or the part ends."""
        while len(self._body) < end and not self._ended:
            want = end - len(self._body)
            if self._delimiter is None:
                chunk = self._receive(max(want, MIN_READ))
                if not chunk:
                    self._ended = True
                self._body += chunk
                continue
            need = want + len(self._delimiter)
            if len(self._pending) < need:
                chunk = self._receive(max(need - len(self._pending), MIN_READ))
                if not chunk:
                    raise _AnswerCutShort("the server's answer ended inside the instance")
                self._pending += chunk
            found = self._pending.find(self._delimiter)
            if found >= 0:
                self._body += self._pending[:found]
                del self._pending[:]
                self._ended = True
            else:
                safe = len(self._pending) - len(self._delimiter) + 1
                if safe > 0:
                    self._body += self._pending[:safe]
                    del self._pending[:safe]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            while not self._ended:
                self._fill(len(self._body) + 1024 * 1024)
            end = len(self._body)
        else:
            end = self._position + size
            if end > len(self._body):
                self._fill(end)
        data = bytes(self._body[self._position:end])
        self._position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:  # the part's length is not known before it is all received
            raise io.UnsupportedOperation("a streamed instance has no known end")
        else:
            raise ValueError(f"invalid whence {whence}")
        if position < 0:
            raise OSError("negative seek position")
        if whence != io.SEEK_END:
            self._fill(position)
        self._position = position
        return position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            try:
                self._drain_small_rest()
            finally:
                self._response.close()
        super().close()

    def _drain_small_rest(self) -> None:
        """Read the rest of a small answer so that its connection goes back to the pool."""
        length = self._response.headers.get("Content-Length")
        if not length or not length.isdigit():
            return
        rest = int(length) - self.bytes_read
        if 0 < rest <= DRAIN_LIMIT:
            try:
                while rest > 0:
                    chunk = self._receive(rest)
                    if not chunk:
                        break
                    rest -= len(chunk)
            except _TRANSPORT_ERRORS:
                pass


_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


def _boundary(content_type: str) -> str | None:
    """The ``boundary`` parameter of a multipart Content-Type (RFC 2046), quoted or not."""
    match = _BOUNDARY.search(content_type)
    return (match.group(1) or match.group(2)) if match else None



def open_instance(url: str, tally: Tally | None = None) -> tuple[InstanceStream, InstanceStream]:
    """The storage opener's seam: ``(file object, counter)`` for a DICOMweb instance URL;
    ``counter.bytes_read`` is what was received. Close the file object when done."""
    ref = parse_instance_url(url)
    stream = client_for(ref.root).retrieve(ref, tally)
    return stream, stream


class _InstanceCounter:
    """What opening one instance cost: ``bytes_read`` (received) and ``counts``, the
    requests and retries by counter name, read once the stream has been used."""

    def __init__(self, stream: InstanceStream, tally: Tally):
        self._stream = stream
        self._tally = tally

    @property
    def bytes_read(self) -> int:
        return self._stream.bytes_read

    @property
    def counts(self) -> dict[str, int]:
        from transforms import counters

        requests_, retries, _received = self._tally.snapshot()
        return {counters.DICOMWEB_REQUESTS: requests_, counters.DICOMWEB_RETRIES: retries}


def open_counted(url: str) -> tuple[InstanceStream, _InstanceCounter]:
    """:func:`open_instance` with its requests and retries counted (``counter.counts``):
    what ``transforms.storage.Opener.open`` returns for a DICOMweb instance URL."""
    tally = Tally()
    stream, _ = open_instance(url, tally)
    return stream, _InstanceCounter(stream, tally)


class InstanceRow(NamedTuple):
    """One instance converted: what the read step needs for its row and its counters."""

    uids: InstanceUIDs
    flattened: Flattened


def convert_stream(fileobj) -> InstanceRow:
    """Instance mode's conversion: exactly what is done to a file (header, then flatten)."""
    header = read_header(fileobj)
    flattened = flatten_instance(header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred)
    return InstanceRow(header.uids, flattened)


def read_instance(url: str, handle: Callable = convert_stream, *, tally: Tally | None = None,
                  policy: RetryPolicy | None = None, limits: ServerLimits | None = None):
    """Retrieve one instance and ``handle(stream)`` it while it is open.

    Failures of the transfer itself (a reset or a timeout in the middle of the body)
    retry the whole retrieve. Every request for the instance counts against one bound:
    the policy's attempts and time budget, whatever failed.
    """
    ref = parse_instance_url(url)
    client = client_for(ref.root, policy, limits)
    policy = client.policy
    mine = Tally()  # this instance's requests only (the caller's tally may be shared)
    started = time.monotonic()
    try:
        while True:
            made = mine.requests
            remaining = policy._replace(
                attempts=policy.attempts - made, budget=policy.budget - (time.monotonic() - started)
            )
            try:
                with client.retrieve(ref, mine, remaining) as stream:
                    return handle(stream)
            except _TRANSPORT_ERRORS as error:
                sleep = policy.sleep_for(mine.requests - 1, None)
                if mine.requests >= policy.attempts or time.monotonic() - started + sleep > policy.budget:
                    raise DicomWebRequestError(
                        f"{type(error).__name__} while receiving the instance (after {mine.requests} attempts)"
                    ) from None
                mine.add(retries=1)
                time.sleep(sleep)
    finally:
        if tally is not None:
            tally.add(*mine.snapshot())


def read_many(urls: Iterable[str], handle: Callable = convert_stream, *, max_workers: int = 32,
              tally: Tally | None = None, policy: RetryPolicy | None = None,
              limits: ServerLimits | None = None) -> Iterator[tuple[str, object]]:
    """Read many instances with up to ``max_workers`` requests in flight.

    Yields ``(url, result)`` as each completes, where result is ``handle``'s return
    value or the exception that failed it (after retries). At most twice
    ``max_workers`` URLs are taken from ``urls`` ahead of the results.
    """
    urls = iter(urls)
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dicomweb") as pool:
        pending: dict = {}

        def submit_more():
            while len(pending) < 2 * max_workers:
                url = next(urls, None)
                if url is None:
                    return
                future = pool.submit(read_instance, url, handle, tally=tally, policy=policy, limits=limits)
                pending[future] = url

        submit_more()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                url = pending.pop(future)
                error = future.exception()
                yield url, (error if error is not None else future.result())
            submit_more()


# -- metadata mode -----------------------------------------------------------------------


def read_series_metadata(series_url: str, *, tally: Tally | None = None, policy: RetryPolicy | None = None,
                         limits: ServerLimits | None = None) -> list[dict]:
    """WADO-RS ``/studies/S/series/SE/metadata``: the DICOM JSON of every instance."""
    root, path = series_url.rsplit("/studies/", 1)
    client = client_for(root, policy, limits)
    response = client.get(
        f"/studies/{path}/metadata", headers={"Accept": "application/dicom+json"}, tally=tally
    )
    with response:
        tally_bytes = len(response.content)
        if tally is not None:
            tally.add(bytes_received=tally_bytes)
        results = response.json()
    if not isinstance(results, list):
        raise DicomWebRequestError("the server's series metadata is not a JSON list")
    return results


def series_url_of(instance_url: str) -> str:
    return parse_instance_url(instance_url).series_url


def convert_metadata(instance_json: dict) -> InstanceRow:
    """One instance's DICOM JSON (PS3.18 Annex F) → the same row shape as a file's.

    An element given by ``BulkDataURI`` has no value here: one of an excluded VR (OB,
    OW, UN…) is named in DroppedTags by the usual rule; one of an exported VR (a large
    sequence or text a server moved to bulk data) is left out and named in DroppedTags
    too, after the others, and counted as ``dropped_not_fit``.
    """
    from pydicom.dataset import Dataset

    bulk: list[str] = []
    cleaned = _without_bulk_values(instance_json, "", bulk)
    dataset = Dataset.from_json(cleaned)
    _keep_number_texts(dataset, cleaned)
    uids = _uids_from(dataset)
    flattened = flatten_instance(dataset)
    if bulk:
        dropped = [entry["TagName"] for entry in flattened.row.get("DroppedTags", [])]
        added = [name for name in bulk if name not in dropped]
        flattened.row["DroppedTags"] = [{"TagName": name} for name in dropped + added]
        flattened.counts["dropped_tags"] += len(added)
        flattened.counts["dropped_not_fit"] += len(added)
    return InstanceRow(uids, flattened)


def _without_bulk_values(dataset_json: dict, prefix: str, bulk: list[str]) -> dict:
    cleaned = {}
    for tag, element in dataset_json.items():
        if not isinstance(element, dict):
            continue
        vr = element.get("vr")
        if "BulkDataURI" in element:
            if is_excluded(vr):
                element = {"vr": vr}  # no value; the flattener names it in DroppedTags
            else:
                bulk.append(prefix + column_for_tag(int(tag, 16)).name)
                continue
        elif vr in ("DS", "IS") and element.get("Value"):
            element = {**element, "Value": [_number_text(value) for value in element["Value"]]}
        elif vr == "SQ" and element.get("Value"):
            name = column_for_tag(int(tag, 16)).name
            element = {
                **element,
                "Value": [_without_bulk_values(item, f"{prefix}{name}.", bulk) for item in element["Value"]],
            }
        cleaned[tag] = element
    return cleaned


def _number_text(value):
    """A DS/IS value as the server wrote it in the JSON (``10`` stays ``"10"``), rather than
    as pydicom would reformat a float (``"10.0"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return str(value) if isinstance(value, int) else repr(value)


def _keep_number_texts(dataset, dataset_json: dict) -> None:
    """Give DS/IS elements the text of their JSON numbers (pydicom's ``from_json`` makes
    floats of them, which would print ``10`` as ``10.0``)."""
    for tag, element in dataset_json.items():
        vr, values = element.get("vr"), element.get("Value")
        if not values:
            continue
        if vr in ("DS", "IS"):
            texts = [value if isinstance(value, str) else "" for value in values]
            dataset[int(tag, 16)].value = texts[0] if len(texts) == 1 else texts
        elif vr == "SQ":
            for item, item_json in zip(dataset[int(tag, 16)].value, values):
                _keep_number_texts(item, item_json)


def _uids_from(dataset) -> InstanceUIDs:
    values = [str(dataset.get(keyword, "") or "").strip() for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    if not all(values):
        raise MissingInstanceUIDError("not an instance: a UID is missing from its metadata")
    return InstanceUIDs(*values)


__all__ = [
    "DicomWebClient",
    "DicomWebError",
    "DicomWebRequestError",
    "InstanceRef",
    "InstanceRow",
    "InstanceStream",
    "ListingUnit",
    "RetryPolicy",
    "ServerLimits",
    "Tally",
    "check_server",
    "client_for",
    "convert_metadata",
    "convert_stream",
    "expand",
    "expand_versioned",
    "qido_version",
    "is_dicomweb_input",
    "is_instance_url",
    "listing_units",
    "open_counted",
    "open_instance",
    "parse_instance_url",
    "parse_root",
    "read_instance",
    "read_many",
    "read_series_metadata",
    "server_limits",
    "split_studies",
]


# -- Beam: the two seams -----------------------------------------------------------------
# Listing: units → InputFile(url, 0). Reading: open_instance (one at a time, for the
# storage opener), or ReadDicomWebInstances / ReadDicomWebMetadata (many in flight).

import apache_beam as beam  # noqa: E402
from apache_beam.metrics import Metrics  # noqa: E402
from apache_beam.transforms.window import GlobalWindows  # noqa: E402

from transforms.storage import InputFile

from transforms.counters import DICOMWEB_REQUESTS as REQUESTS_COUNTER  # noqa: E402
from transforms.counters import DICOMWEB_RETRIES as RETRIES_COUNTER  # noqa: E402
from transforms.counters import NAMESPACE  # noqa: E402


class DicomWebResult(NamedTuple):
    """What reading one listed instance gave: a row, or an error for its dead letter
    (``path`` is the instance URL, ``stage`` "read" or "convert")."""

    path: str
    row: InstanceRow | None
    error: tuple[str, str] | None
    stage: str
    bytes_received: int
    requests: int
    retries: int


def _failure(path: str, stage: str, error: BaseException, tally: Tally | None = None) -> DicomWebResult:
    from transforms.header import describe_error

    requests_, retries, received = tally.snapshot() if tally else (0, 0, 0)
    return DicomWebResult(path, None, (type(error).__name__, describe_error(error)), stage, received, requests_, retries)


class _Counting:
    """Beam counters of the DICOMweb requests, incremented on the DoFn's own thread
    (Beam's metrics are thread-local, so worker threads only return numbers)."""

    def _make_counters(self):
        self._requests = Metrics.counter(NAMESPACE, REQUESTS_COUNTER)
        self._retries = Metrics.counter(NAMESPACE, RETRIES_COUNTER)

    def _publish(self, requests_: int, retries: int) -> None:
        if requests_:
            self._requests.inc(requests_)
        if retries:
            self._retries.inc(retries)


class _SplitStudySearches(beam.DoFn, _Counting):
    def __init__(self, policy: RetryPolicy | None = None, limits: ServerLimits | None = None):
        self._policy, self._limits = policy, limits
        self._make_counters()

    def process(self, unit: ListingUnit):
        tally = Tally()
        yield from split_studies(unit, client_for(unit.root, self._policy, self._limits), tally)
        self._publish(*tally.snapshot()[:2])


class ExpandDicomWebUnit(beam.DoFn, _Counting):
    """A listing unit → ``InputFile(instance URL, 0, version=…)`` for each of its
    instances, versioned by their QIDO records (:func:`qido_version`).

    A listing that cannot be completed raises: the run fails rather than miss instances.
    """

    def __init__(self, policy: RetryPolicy | None = None, limits: ServerLimits | None = None):
        self._policy, self._limits = policy, limits
        self._make_counters()
        self._listed = Metrics.counter(NAMESPACE, "files_listed")

    def process(self, unit: ListingUnit):
        tally = Tally()
        count = 0
        for ref, version in expand_versioned(unit, client_for(unit.root, self._policy, self._limits), tally):
            count += 1
            yield InputFile(ref.url, 0, version=version)
        self._listed.inc(count)
        self._publish(*tally.snapshot()[:2])


class ListDicomWeb(beam.PTransform):
    """Listing units (:func:`listing_units`) → one ``InputFile`` per instance.

    Study searches are split into one unit per study first, and those are spread over
    workers before their instances are listed.
    """

    def __init__(self, policy: RetryPolicy | None = None, limits: ServerLimits | None = None):
        super().__init__()
        self._policy, self._limits = policy, limits

    def expand(self, units):
        return (
            units
            | "SplitStudySearches" >> beam.ParDo(_SplitStudySearches(self._policy, self._limits))
            | "SpreadStudies" >> beam.Reshuffle()
            | "ListInstances" >> beam.ParDo(ExpandDicomWebUnit(self._policy, self._limits))
        )


class _ConcurrentDoFn(beam.DoFn, _Counting):
    """Runs :meth:`work` on up to ``max_workers`` elements of a bundle at once and yields
    their results as they complete (the rest at the end of the bundle)."""

    def __init__(self, max_workers: int = 32, policy: RetryPolicy | None = None, limits: ServerLimits | None = None):
        self.max_workers = max_workers
        self._policy, self._limits = policy, limits
        self._make_counters()

    def setup(self):
        from transforms.header import silence_pydicom

        silence_pydicom()
        self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="dicomweb")

    def start_bundle(self):
        self._pending = set()

    def process(self, element):
        self._pending.add(self._pool.submit(self.work, element))
        block = len(self._pending) >= 2 * self.max_workers
        done, self._pending = wait(self._pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            yield from self._results(future)

    def finish_bundle(self):
        pending, self._pending = self._pending, set()
        for future in wait(pending).done:
            for result in self._results(future):
                yield GlobalWindows.windowed_value(result)

    def _results(self, future):
        for result in future.result():
            self._publish(result.requests, result.retries)
            yield result

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)

    def work(self, element) -> list[DicomWebResult]:
        raise NotImplementedError


class ReadDicomWebInstances(_ConcurrentDoFn):
    """Instance mode: ``InputFile`` (a DICOMweb instance URL) → :class:`DicomWebResult`,
    with up to ``max_workers`` retrieves in flight per DoFn instance."""

    def work(self, input_file) -> list[DicomWebResult]:
        tally = Tally()
        stage = ["read"]

        def handle(stream):
            header = read_header(stream)
            stage[0] = "convert"
            flattened = flatten_instance(
                header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred
            )
            return InstanceRow(header.uids, flattened)

        try:
            row = read_instance(input_file.path, handle, tally=tally, policy=self._policy, limits=self._limits)
        except Exception as error:
            return [_failure(input_file.path, stage[0], error, tally)]
        requests_, retries, received = tally.snapshot()
        return [DicomWebResult(input_file.path, row, None, "convert", received, requests_, retries)]


class ReadDicomWebMetadata(_ConcurrentDoFn):
    """Metadata mode: ``(series URL, its listed InputFiles)`` → a :class:`DicomWebResult`
    per listed instance, from one WADO-RS metadata request per series. A listed instance
    missing from the metadata fails with ``NotInSeriesMetadata``."""

    def work(self, element) -> list[DicomWebResult]:
        series_url, input_files = element
        paths = sorted({f.path for f in input_files})
        tally = Tally()
        try:
            items = read_series_metadata(series_url, tally=tally, policy=self._policy, limits=self._limits)
        except Exception as error:
            return [_failure(path, "read", error, tally if i == 0 else None) for i, path in enumerate(paths)]
        by_instance = {}
        for item in items:
            uid = _first_value(item, "00080018") if isinstance(item, dict) else None
            if uid:
                by_instance[uid] = item
        requests_, retries, received = tally.snapshot()
        results = []
        for i, path in enumerate(paths):
            counts = (received, requests_, retries) if i == 0 else (0, 0, 0)
            item = by_instance.get(parse_instance_url(path).instance)
            if item is None:
                error = ("NotInSeriesMetadata", "the series metadata does not hold this instance")
                results.append(DicomWebResult(path, None, error, "read", *counts))
                continue
            try:
                row = convert_metadata(item)
            except Exception as error:
                failed = _failure(path, "convert", error)
                results.append(failed._replace(bytes_received=counts[0], requests=counts[1], retries=counts[2]))
                continue
            results.append(DicomWebResult(path, row, None, "convert", *counts))
        return results


class ReadDicomWebMetadataBySeries(beam.PTransform):
    """Instance ``InputFile``s → grouped by series → :class:`ReadDicomWebMetadata`."""

    def __init__(self, max_workers: int = 32, policy: RetryPolicy | None = None, limits: ServerLimits | None = None):
        super().__init__()
        self._dofn = ReadDicomWebMetadata(max_workers, policy, limits)

    def expand(self, input_files):
        return (
            input_files
            | "KeyBySeries" >> beam.Map(lambda f: (series_url_of(f.path), f))
            | "GroupBySeries" >> beam.GroupByKey()
            | "ReadMetadata" >> beam.ParDo(self._dofn)
        )


__all__ += [
    "DicomWebResult",
    "ExpandDicomWebUnit",
    "ListDicomWeb",
    "ReadDicomWebInstances",
    "ReadDicomWebMetadata",
    "ReadDicomWebMetadataBySeries",
]


# -- Beam: wired into the export's graph -------------------------------------------------


class _FirstOfEach(beam.DoFn):
    """``(path, [InputFile, ...])`` → the first, counted in ``files_matched`` (an instance
    several filter lines list is read once)."""

    def __init__(self, reporter=None):
        self._matched = Metrics.counter(NAMESPACE, "files_matched")
        self._reporter = reporter

    def process(self, element):
        _path, input_files = element
        self._matched.inc()
        if self._reporter is not None:
            self._reporter.listed(1)
        yield next(iter(input_files))

    def finish_bundle(self):
        if self._reporter is not None:
            self._reporter.flush()


class ListDicomWebInputs(beam.PTransform):
    """Listing units → distinct instance ``InputFile`` s, counted like matched files."""

    def __init__(self, reporter=None, policy: RetryPolicy | None = None, limits: ServerLimits | None = None):
        super().__init__()
        self._reporter = reporter
        self._policy, self._limits = policy, limits

    def expand(self, units):
        return (
            units
            | "List" >> ListDicomWeb(self._policy, self._limits)
            | "KeyByURL" >> beam.Map(lambda f: (f.path, f))
            | "GroupByURL" >> beam.GroupByKey()
            | "Distinct" >> beam.ParDo(_FirstOfEach(self._reporter))
        )


class MetadataToInstances(beam.DoFn):
    """Metadata mode's :class:`DicomWebResult` s → ``Instance`` (main output) or a dead
    letter (``DEAD_LETTERS``), selected by the filter file (a side input) by the UIDs of
    the metadata, and counted like files (``bytes_read``: the JSON received)."""

    def __init__(self, run_started: str | None = None, reporter=None):
        from transforms.sources.outcomes import Outcomes

        self.outcomes = Outcomes(run_started, reporter)

    def process(self, result: DicomWebResult, filter_file=None):
        outcomes = self.outcomes
        outcomes.bytes_read(result.bytes_received)
        outcomes.read()
        if result.error is not None:
            yield outcomes.failed(result.path, result.stage, *result.error)
            return
        lines = outcomes.selected_lines(result.row.uids, filter_file)
        if lines is not None:
            yield outcomes.succeeded(result.row.flattened, lines, result.path)

    def finish_bundle(self):
        self.outcomes.flush()


class ReadDicomWebMetadataRows(beam.PTransform):
    """Metadata mode in the export: instance ``InputFile`` s → ``(instances, dead letters)``
    by way of one WADO-RS metadata request per series."""

    def __init__(self, run_started: str | None = None, reporter=None, filter_side_inputs=(),
                 max_workers: int = 32, policy: RetryPolicy | None = None, limits: ServerLimits | None = None):
        super().__init__()
        self._run_started, self._reporter = run_started, reporter
        self._side_inputs = list(filter_side_inputs)
        self._read = ReadDicomWebMetadataBySeries(max_workers, policy, limits)

    def expand(self, input_files):
        from transforms.flatten import DEAD_LETTERS

        converted = (
            input_files
            | "BySeries" >> self._read
            | "ToInstances" >> beam.ParDo(
                MetadataToInstances(self._run_started, self._reporter), *self._side_inputs
            ).with_outputs(DEAD_LETTERS, main="instances")
        )
        return converted.instances, converted[DEAD_LETTERS]


__all__ += ["ListDicomWebInputs", "MetadataToInstances", "ReadDicomWebMetadataRows"]
