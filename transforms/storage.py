"""Byte access to inputs: the reference to one input, local files, ranged Cloud Storage
reads, and a raw reader that counts what was really transferred.

Reading goes through a :data:`READ_BUFFER_BYTES` buffer over a raw reader that fetches
only what is asked for. On Cloud Storage that raw reader issues ranged GETs through the
storage client Beam itself configures, so a header of a few KB costs one small request,
not the whole object (and no metadata request: the size comes from listing), and
``bytes_read`` counts what was transferred.

A read process opens a chunk's local files ahead (:meth:`Opener.open_ahead`), asking the
kernel to fetch their first bytes meanwhile, so a cold disk or a network filesystem is
not waited on one file at a time.

A worker process holds one storage client (:func:`storage_client`), shared by every
thread that reads or lists, with an HTTP connection pool as large as
:data:`REMOTE_CONCURRENCY`: on a network, latency rather than CPU is what a serial loop
pays for, so the read step keeps that many inputs in flight.

:meth:`Opener.open` is the single dispatch point of byte access, so that whatever
concurrency the read step has applies to every source: a path ``ARCHIVE#member`` opens
the member through :mod:`transforms.sources.archives` (the archive itself through this
opener), a DICOMweb instance URL streams its retrieve through
:mod:`transforms.sources.dicomweb`. Those modules are imported on first use only: this
module sits at the bottom of the imports (listing, sources and the flatten step all use
it).
"""

from __future__ import annotations

import io
import os
import threading
import weakref
from typing import NamedTuple

from transforms.limits import open_regular_file

#: Read-ahead of the buffer in front of every file: one request covers most headers.
READ_BUFFER_BYTES = 64 * 1024
#: Remote inputs (Cloud Storage, other remote filesystems, DICOMweb instances) a worker
#: process reads at once (bench/remote.py, 400 objects, 50 ms per request: 83–84/s with 16,
#: 95–102/s with 32; DICOMweb's metadata mode has as many series requests out).
REMOTE_CONCURRENCY = 32
#: Local inputs a worker process reads at once: parsing is CPU-bound and holds the GIL,
#: so threads only add switching (bench/stages.py measures 1, 2 and 4).
LOCAL_CONCURRENCY = 1


def is_remote(path: str) -> bool:
    """True for a path some filesystem other than the local disk serves (``gs://``…)."""
    return "://" in path


_clients: dict = {}
_clients_lock = threading.Lock()
_settings: "ClientSettings | None" = None  # a read process's: the launcher's client, rebuilt here


def storage_client(pipeline_options=None):
    """This process's Cloud Storage client, created on first use and shared by all its
    threads (google-cloud-storage's client is safe to share for reads and listings),
    with a connection pool of :data:`REMOTE_CONCURRENCY` connections so that
    concurrent requests neither wait for a connection nor open and drop new ones.

    It is the client Beam itself configures from the pipeline options (credentials,
    project, audit headers); a read process, which has no Beam, rebuilds the launcher's
    from its :class:`ClientSettings` (:func:`use_client_settings`). Given
    :class:`ClientSettings` instead of options (``pipeline/early.py``'s guess at Beam's,
    :func:`default_client_settings`), the client they make, kept apart from this one."""
    if isinstance(pipeline_options, ClientSettings):
        return _client_of_settings(pipeline_options)
    # a forked worker builds its own (connections must not cross processes); so does a
    # process whose emulator endpoint changed (tests)
    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if _settings is not None:
                client = _settings.client()
            else:
                from apache_beam.io.gcp import gcsio
                from apache_beam.options.pipeline_options import PipelineOptions

                client = gcsio.create_storage_client(pipeline_options or PipelineOptions([]))
            _pooled(client)
            _clients.clear()
            _clients[key] = client
        return client


def _pooled(client):
    """``client`` with a connection pool for :data:`REMOTE_CONCURRENCY` requests at once."""
    import requests.adapters

    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=REMOTE_CONCURRENCY * 2)
    client._http.mount("https://", adapter)
    client._http.mount("http://", adapter)
    return client


_settings_clients: dict = {}  # id(ClientSettings) -> (those settings, their client), this process's


def _client_of_settings(settings: "ClientSettings"):
    key = (os.getpid(), id(settings))
    with _clients_lock:
        kept = _settings_clients.get(key)
        if kept is None or kept[0] is not settings:
            kept = (settings, _pooled(settings.client()))
            _settings_clients[key] = kept
        return kept[1]


class ClientSettings(NamedTuple):
    """What another process of this machine needs to build the same Cloud Storage
    client as :func:`storage_client` without importing Beam: its credentials (None:
    anonymous), project, client info (the user agent) and extra headers, and the
    emulator endpoint it was made for (``STORAGE_EMULATOR_HOST``)."""

    credentials: object | None
    project: str | None
    client_info: object | None
    extra_headers: dict
    emulator_host: str | None

    def client(self):
        from google.cloud import storage

        if self.credentials is None:
            return storage.Client.create_anonymous_client()
        return storage.Client(credentials=self.credentials, project=self.project, client_info=self.client_info,
                              extra_headers=dict(self.extra_headers))


def client_settings(pipeline_options=None) -> ClientSettings | None:
    """The :class:`ClientSettings` of this process's client; None where they cannot be
    handed to another process (credentials that cannot be pickled)."""
    return _settings_of(storage_client(pipeline_options))


def _settings_of(client) -> ClientSettings | None:
    import pickle

    from google.auth.credentials import AnonymousCredentials

    credentials = client._credentials
    connection = client._connection
    settings = ClientSettings(
        credentials=None if isinstance(credentials, AnonymousCredentials) else credentials,
        project=client.project,
        client_info=getattr(connection, "_client_info", None),
        extra_headers=dict(getattr(connection, "extra_headers", None) or {}),
        emulator_host=os.environ.get("STORAGE_EMULATOR_HOST"),
    )
    try:
        pickle.dumps(settings)
    except Exception:  # noqa: BLE001 — a credentials type that stays in its process
        return None
    return settings


#: The OAuth scopes Beam asks Application Default Credentials for when no
#: ``--gcp_oauth_scopes`` is given (``GoogleCloudOptions.OAUTH_SCOPES``; a test checks
#: that they are still Beam's).
BEAM_OAUTH_SCOPES = (
    "https://www.googleapis.com/auth/bigquery",
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/devstorage.full_control",
    "https://www.googleapis.com/auth/userinfo.email",
    "https://www.googleapis.com/auth/datastore",
    "https://www.googleapis.com/auth/spanner.admin",
    "https://www.googleapis.com/auth/spanner.data",
)


def default_client_settings() -> ClientSettings | None:
    """The settings of the client Beam makes for a run given none of Google Cloud's
    options (``gcsio.create_storage_client``: Application Default Credentials for
    :data:`BEAM_OAUTH_SCOPES`, no project, Beam's user agent and audit header), made
    without importing Beam, for ``pipeline/early.py`` to list and read Cloud Storage
    while Beam is imported. A guess: the run uses what it reads with these only if
    :func:`same_client` finds them equal to the settings of its own client. None where
    Application Default Credentials are not at hand (Beam retries, then connects
    anonymously: the run's own way) or cannot be handed to a read process."""
    import importlib.metadata

    import google.auth
    from google.api_core.client_info import ClientInfo
    from google.cloud import storage

    try:
        credentials, _ = google.auth.default(scopes=list(BEAM_OAUTH_SCOPES))
        version = importlib.metadata.version("apache-beam")
    except Exception:  # noqa: BLE001 — no credentials here: the run finds its own
        return None
    client = storage.Client(
        credentials=credentials,
        project=None,
        client_info=ClientInfo(user_agent=f"apache-beam/{version} (GPN:Beam)"),
        extra_headers={"x-goog-custom-audit-job": "UNKNOWN"},
    )
    return _settings_of(client)


def same_client(first: ClientSettings | None, second: ClientSettings | None) -> bool:
    """True if two settings make the same client: the same endpoint, project, user agent
    and headers, and credentials of the same kind for the same account and scopes
    (credentials objects compare by identity, and a token refreshed meanwhile is no
    difference)."""
    if first is None or second is None:
        return first is second

    def identity(settings: ClientSettings) -> tuple:
        credentials, info = settings.credentials, settings.client_info
        account = None if credentials is None else (
            type(credentials).__module__,
            type(credentials).__qualname__,
            getattr(credentials, "service_account_email", None),
            getattr(credentials, "client_id", None),
            getattr(credentials, "quota_project_id", None),
            tuple(getattr(credentials, "scopes", None) or ()),
        )
        agent = info.to_user_agent() if hasattr(info, "to_user_agent") else info
        return (account, settings.project, agent, sorted(settings.extra_headers.items()), settings.emulator_host)

    return identity(first) == identity(second)


def use_client_settings(settings: ClientSettings) -> None:
    """Make :func:`storage_client` of this process (a read process) build its client
    from ``settings`` (when first asked for), for the endpoint they were made for."""
    global _settings
    if settings.emulator_host is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = settings.emulator_host
    with _clients_lock:
        _settings = settings
        _clients.clear()


class InputFile(NamedTuple):
    """One input to read. ``error`` = ``(error_type, message)`` is set by listing for an
    input that must become a dead letter (stage ``list``) without being opened.
    ``version`` identifies this content of the path, from the listing itself (the object
    generation on Cloud Storage, ``MTIME_NS:SIZE`` locally; None where unknown): the
    files table and ``--incremental`` compare it (see :mod:`pipeline.ledger`)."""

    path: str
    size: int
    error: tuple[str, str] | None = None
    version: str | None = None


class CountingRaw(io.RawIOBase):
    """A raw reader that counts the bytes it delivers (what was read from storage)."""

    def __init__(self, raw):
        self._raw = raw
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._raw.readinto(buffer)
        self.bytes_read += count or 0
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._raw.close()
        super().close()


class RangedBlob(io.RawIOBase):
    """A Cloud Storage object read by ranged GETs, exactly the ranges asked for.

    ``size`` None (an archive opened for one of its members, whose listing gave the
    member's size, not the archive's): reads ask for what is wanted and stop at the
    object's end; the size is fetched (one metadata request) only for ``SEEK_END``.
    """

    def __init__(self, blob, size: int | None):
        self._blob = blob
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = len(buffer) if self._size is None else min(len(buffer), self._size - self._position)
        if count <= 0:
            return 0
        try:
            data = ranged_get(self._blob, self._position, self._position + count - 1)
        except Exception as error:  # past the end of an object of unknown size: HTTP 416
            if self._size is None and getattr(error, "code", None) == 416:
                return 0
            raise
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._position = offset
        elif whence == io.SEEK_CUR:
            self._position += offset
        else:
            if self._size is None:
                self._blob.reload()
                self._size = self._blob.size
            self._position = self._size + offset
        return self._position

    def tell(self) -> int:
        return self._position


#: Seconds a ranged read waits to connect, and then for the answer (the storage client's
#: default for a download).
READ_TIMEOUT_SECONDS = 60.0


def ranged_get(blob, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (inclusive) of a Cloud Storage object, as stored (no
    decompression, no checksum: a range has none), by one GET retried as the storage
    client retries a download (``google.cloud.storage.retry.DEFAULT_RETRY``); an error
    answer raises the exception the client raises for it (``google.api_core.exceptions``:
    ``NotFound``, ``RequestRangeNotSatisfiable``...).

    The GET is the one ``blob.download_as_bytes`` makes (its URL, headers and the
    client's credentials), sent by google-auth's urllib3 transport rather than by the
    client's requests session: requests costs ~0.7 ms more CPU per request on the read
    processes' 32 threads (reading its proxy settings from the environment twice per
    request among it), which is about a third of what parsing a header costs there
    (bench/remote.py). Where that session connects in a way this transport would not
    (mutual TLS, a proxy, a client certificate, its own CA bundle), the client's
    ``download_as_bytes`` reads instead; a CA bundle named in the environment
    (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``) is used as requests would."""
    client = blob.client
    http = _read_transport(client, blob)
    if http is None:
        return blob.download_as_bytes(start=start, end=end, raw_download=True, checksum=None)
    import urllib3
    from google.cloud.storage._helpers import _get_default_headers

    # as the client's download merges them (names are case-insensitive)
    headers = urllib3.HTTPHeaderDict(_get_default_headers(client._connection.user_agent))
    headers["accept-encoding"] = "gzip"  # and decode_content=False: the bytes as stored, as a raw download
    headers.update(getattr(client, "_extra_headers", {}))
    headers["range"] = f"bytes={start}-{end}"
    return _retried_get()(http, blob._get_download_url(client), headers, start, end)


def _get(http, url: str, headers: dict, start: int, end: int) -> bytes:
    import urllib3
    from google.api_core import exceptions

    response = http.request("GET", url, headers=headers, retries=False, preload_content=True, decode_content=False,
                            timeout=urllib3.Timeout(connect=READ_TIMEOUT_SECONDS, read=READ_TIMEOUT_SECONDS))
    if response.status == 206:
        return response.data
    if response.status == 200:  # the whole object: a server may ignore a Range (RFC 9110)
        return response.data[start: end + 1]
    text = response.data[:500].decode("utf-8", "replace")
    raise exceptions.from_http_status(response.status, f"GET {url}: {text}")


_retried = None
_read_transports: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # client -> its transport, or None


def _retried_get():
    global _retried
    if _retried is None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        _retried = DEFAULT_RETRY(_get)
    return _retried


def _read_transport(client, blob):
    """The urllib3 transport :func:`ranged_get` sends ``client``'s reads by (made on first
    use, one per client, pooled for :data:`REMOTE_CONCURRENCY` requests at once), or None
    where the client's session connects otherwise."""
    with _clients_lock:
        if client in _read_transports:
            return _read_transports[client]
    import requests.utils
    import urllib3
    from google.auth.transport.requests import AuthorizedSession
    from google.auth.transport.urllib3 import AuthorizedHttp

    session = client._http
    url = blob._get_download_url(client)
    environment = session.trust_env  # as requests reads it: proxies and a CA bundle from the environment
    proxy = environment and requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    bundle = (environment and (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"))
              or requests.utils.DEFAULT_CA_BUNDLE_PATH)  # requests' own (certifi's)
    http = None
    if (type(session) is AuthorizedSession and not session.is_mtls and not session.proxies and not proxy
            and session.cert is None and session.verify is True):
        pool = urllib3.PoolManager(num_pools=4, maxsize=REMOTE_CONCURRENCY * 2, cert_reqs="CERT_REQUIRED",
                                   **{"ca_cert_dir" if os.path.isdir(bundle) else "ca_certs": bundle})
        http = AuthorizedHttp(client._credentials, http=pool)
    with _clients_lock:
        return _read_transports.setdefault(client, http)


class _Counters:
    """The counters of the files one input opened (an archive member: the archive)."""

    def __init__(self):
        self.parts: list = []

    @property
    def bytes_read(self) -> int:
        return sum(part.bytes_read for part in self.parts)


class Opener:
    """Opens inputs for header reads; safe to use from several threads at once (the
    Cloud Storage client is the process's shared one, :func:`storage_client`).

    ``expand_archives`` False (``--no-archives``): ``ARCHIVE#member`` is a plain path.
    ``nested_archives``: members of archives inside archives are opened too.
    """

    def __init__(self, pipeline_options=None, *, expand_archives: bool = True, nested_archives: bool = False):
        self._options = pipeline_options
        self.expand_archives = expand_archives
        self.nested_archives = nested_archives
        self._opened_ahead: dict[str, io.FileIO] = {}

    def open_ahead(self, inputs: list[InputFile]) -> None:
        """Open the local files among ``inputs`` now, each asking the kernel to fetch its
        first :data:`READ_BUFFER_BYTES` in the background (``posix_fadvise`` WILLNEED), so
        that parsing one header overlaps fetching the next ones from a cold disk or a
        network filesystem; :meth:`open` then takes the file opened here. A file that
        cannot be opened now is left to :meth:`open` (its dead letter says why); what is
        not taken is closed by :meth:`close_ahead`. For one thread at a time (a read
        process's chunk)."""
        if not hasattr(os, "posix_fadvise"):  # not Linux: the kernel reads ahead on its own terms
            return
        for input_file in inputs:
            path = input_file.path
            if path in self._opened_ahead or not self.is_local_file(input_file):
                continue
            try:
                raw = open_regular_file(path)
            except Exception:  # left to open(): its dead letter says why
                continue
            try:
                os.posix_fadvise(raw.fileno(), 0, READ_BUFFER_BYTES, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            self._opened_ahead[path] = raw

    def close_ahead(self) -> None:
        """Close the files :meth:`open_ahead` opened that :meth:`open` did not take."""
        while self._opened_ahead:
            self._opened_ahead.popitem()[1].close()

    def concurrency(self, input_file: InputFile) -> int:
        """How many inputs like this one to read at once."""
        return REMOTE_CONCURRENCY if is_remote(input_file.path) else LOCAL_CONCURRENCY

    def is_local_file(self, input_file: InputFile) -> bool:
        """True for a whole file on this machine's disk (not an archive member: the
        launcher has that archive's index, a read process would list it again)."""
        return not is_remote(input_file.path) and not self._is_member(input_file.path)

    def is_cloud_storage_object(self, input_file: InputFile) -> bool:
        """True for a whole Cloud Storage object to read (not an archive member, not one
        listing marked failed): a read process with the launcher's client settings reads
        it as it reads a local file (``transforms.read.ReadProcesses``)."""
        path = input_file.path
        return path.startswith("gs://") and input_file.error is None and not self._is_member(path)

    def _is_member(self, path: str) -> bool:
        """True for ``ARCHIVE#member`` (when archives are expanded)."""
        if not self.expand_archives or "#" not in path:
            return False
        from transforms.sources import archives

        return archives.split_member_path(path) is not None

    def open(self, input_file: InputFile):
        """``(file object, counter)``; ``counter.bytes_read`` is what came from storage
        (for a DICOMweb instance, the bytes received; its ``counts`` are the requests and
        retries it took)."""
        path = input_file.path
        if path.startswith("dicomweb+"):
            from transforms.sources import dicomweb

            return dicomweb.open_counted(path)
        if self.expand_archives and "#" in path:
            from transforms.sources import archives

            if archives.split_member_path(path) is not None:
                counters = _Counters()

                def open_file(archive_path: str):
                    fileobj, counter = self._open_file(InputFile(archive_path, None))
                    counters.parts.append(counter)
                    return fileobj

                fileobj = archives.open_input(path, open_file, nested_archives=self.nested_archives)
                return fileobj, counters
        return self._open_file(input_file)

    def _open_file(self, input_file: InputFile):
        """A whole file (local, gs:// or another filesystem Beam knows), buffered and counted."""
        path = input_file.path
        if path.startswith("gs://"):
            raw = RangedBlob(self._blob(path), input_file.size)
        elif "://" in path:  # other filesystems Beam knows: their own reader, counted
            from apache_beam.io.filesystems import FileSystems

            raw = FileSystems.open(path)
        else:  # never a FIFO or device, even if listing missed it
            raw = self._opened_ahead.pop(path, None)
            if raw is None:
                raw = open_regular_file(path)
        counting = CountingRaw(raw)
        return io.BufferedReader(counting, buffer_size=READ_BUFFER_BYTES), counting

    def _blob(self, path: str):
        bucket, name = path[len("gs://"):].split("/", 1)
        return storage_client(self._options).bucket(bucket).blob(name)
