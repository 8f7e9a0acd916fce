"""A real DICOMweb server (Orthanc) and a small HTTP proxy in front of it, for tests and
benchmarks.

:func:`run_orthanc` starts Debian's ``/usr/sbin/Orthanc`` with its DICOMweb plugin on a
free loopback port (HTTP Basic on, ``StudiesMetadata``/``SeriesMetadata`` Full) and stops
it afterwards. :class:`DicomWebProxy` forwards to it;
``python -m tests.dicomweb_proxy UPSTREAM --latency 0.02`` runs the proxy in its own
process (so that its work does not share the measured process's interpreter).

It forwards every GET (headers included, so the server checks the credentials) and can
act like other servers or like a bad network:

* ``limit_cap``: QIDO ``limit`` is silently lowered to it (as Azure caps at 200);
* ``max_results``: a QIDO page at an ``offset`` beyond it is silently empty;
* ``empty_matching``: ``StudyDate=""`` matches the studies without a StudyDate
  (PS3.4 empty value matching, which Orthanc lacks);
* ``latency``: seconds added before each answer;
* faults: :meth:`DicomWebProxy.fault` queues, for paths matching a regex, answers of
  ``429`` (with Retry-After), ``503``, ``404``, ``reset`` (connection reset without an
  answer), ``slow`` (answer after ``slow_seconds``) or ``cut`` (reset after 200 bytes of the body); any other number: that status.

``bytes_sent`` counts the body bytes written to clients per path (what really left;
``GET /proxy-stats`` returns it as JSON).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DicomWebProxy:
    def __init__(self, upstream: str, *, limit_cap: int | None = None, max_results: int | None = None,
                 empty_matching: bool = False, latency: float = 0.0, slow_seconds: float = 2.0,
                 send_buffer: int = 32 * 1024):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port
        self.limit_cap = limit_cap
        self.max_results = max_results
        self.empty_matching = empty_matching
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.send_buffer = send_buffer
        self._faults: list[list] = []  # [regex, kind, remaining]
        self._lock = threading.Lock()
        self._upstream = threading.local()  # one kept-alive connection per proxy thread
        self.served = Counter()  # faults served, by kind
        self.bytes_sent = Counter()  # body bytes written, by path
        self.requests = []  # (path, query)
        self.authorizations = []  # the Authorization header of each request
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else delayed ACKs add 40 ms to small answers

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                # A small send buffer, so that bytes_sent is close to what reached the client.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, proxy.send_buffer)

            def do_GET(self):
                proxy._handle(self)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def fault(self, pattern: str, kind: str, times: int = 1) -> None:
        """Answer the next ``times`` requests whose path matches ``pattern`` with ``kind``
        (``times=-1``: every one)."""
        with self._lock:
            self._faults.append([re.compile(pattern), kind, times])

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, path: str) -> str | None:
        with self._lock:
            for rule in self._faults:
                if rule[2] != 0 and rule[0].search(path):
                    if rule[2] > 0:
                        rule[2] -= 1
                    self.served[rule[1]] += 1
                    return rule[1]
        return None

    # -- handling --------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        split = urllib.parse.urlsplit(handler.path)
        query = urllib.parse.parse_qsl(split.query, keep_blank_values=True)
        if split.path == "/proxy-stats":  # for a proxy in another process
            time.sleep(0.2)  # let the writes of answers just closed by the client fail
            with self._lock:
                stats = json.dumps({"bytes_sent": dict(self.bytes_sent)}).encode()
            self._send(handler, 200, stats, "application/json", {})
            return
        with self._lock:
            self.requests.append((split.path, split.query))
            self.authorizations.append(handler.headers.get("Authorization", ""))
        if self.latency:
            time.sleep(self.latency)
        fault = self._take_fault(split.path)
        if fault == "reset":
            _reset(handler)
            return
        if fault is not None and fault.isdigit():
            headers = {"Retry-After": "1"} if fault == "429" else {}
            self._send(handler, int(fault), b"", "text/plain", headers)
            return
        if fault == "slow":
            time.sleep(self.slow_seconds)
        status, headers, body = self._forward(handler, split, query)
        if status == 200 and self._is_search(split.path, headers):
            body = self._rewrite_search(handler, split, query, body)
        if fault == "cut":
            self._send_cut(handler, status, headers, body)
            return
        self._send(handler, status, body, headers.get("Content-Type", "application/octet-stream"), {}, split.path)

    @staticmethod
    def _is_search(path: str, headers) -> bool:
        return headers.get("Content-Type", "").startswith("application/dicom+json") and not path.endswith("/metadata")

    def _forward(self, handler, split, query, *, drop=()):
        params = [(k, v) for k, v in query if k not in drop]
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("authorization", "accept")}
        target = split.path + ("?" + urllib.parse.urlencode(params) if params else "")
        for attempt in range(2):  # a kept-alive upstream connection may have been closed
            connection = getattr(self._upstream, "connection", None)
            if connection is None:
                connection = self._upstream.connection = http.client.HTTPConnection(
                    self.upstream_host, self.upstream_port, timeout=60
                )
            try:
                connection.request("GET", target, headers=headers)
                response = connection.getresponse()
                body = response.read()
                break
            except (http.client.HTTPException, OSError):
                connection.close()
                self._upstream.connection = None
                if attempt:
                    raise
        return response.status, dict(response.getheaders()), body

    def _rewrite_search(self, handler, split, query, body: bytes) -> bytes:
        params = dict(query)
        offset = int(params.get("offset", 0) or 0)
        limit = int(params["limit"]) if params.get("limit") else None
        if self.empty_matching and params.get("StudyDate") == '""':
            _status, _headers, everything = self._forward(handler, split, query, drop=("StudyDate", "offset", "limit"))
            results = [r for r in json.loads(everything) if not (r.get("00080020") or {}).get("Value")]
            results = results[offset:]
            if limit is not None:
                results = results[:limit]
        else:
            results = json.loads(body) if body.strip() else []
        if self.max_results is not None and offset > self.max_results:
            results = []
        if self.limit_cap is not None:
            results = results[: self.limit_cap]
        return json.dumps(results).encode()

    def _send(self, handler, status: int, body: bytes, content_type: str, headers: dict, path: str = "") -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            for start in range(0, len(body), 16 * 1024):
                chunk = body[start:start + 16 * 1024]
                handler.wfile.write(chunk)
                with self._lock:
                    self.bytes_sent[path] += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True

    def _send_cut(self, handler, status: int, headers: dict, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", headers.get("Content-Type", "application/octet-stream"))
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:200])
        handler.wfile.flush()
        _reset(handler)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # connections the faults reset on purpose


def _reset(handler) -> None:
    """Close the connection with a TCP reset (SO_LINGER 0), not a clean close."""
    handler.close_connection = True
    try:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()
    except OSError:
        pass


ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancNotInstalled(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def run_orthanc(home: Path, user: str, password: str):
    """Orthanc on a free loopback port; yields its base URL (``http://127.0.0.1:PORT``)."""
    if not (os.path.exists(ORTHANC) and os.path.exists(DICOMWEB_PLUGIN)):
        raise OrthancNotInstalled("Orthanc with its DICOMweb plugin is needed: apt-get install -y orthanc orthanc-dicomweb")
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "dicom-bq-export-tests",
        "StorageDirectory": str(home / "db"), "IndexDirectory": str(home / "db"), "HttpPort": port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {user: password},
        "DicomServerEnabled": False, "UnknownSopClassAccepted": True, "HttpTimeout": 60,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{port}", "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }
    (home / "config.json").write_text(json.dumps(config))
    url = f"http://127.0.0.1:{port}"
    with open(home / "orthanc.log", "wb") as log:
        process = subprocess.Popen([ORTHANC, str(home / "config.json")], cwd=home, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(url + "/system", process, home / "orthanc.log")
            yield url
        finally:
            process.terminate()
            process.wait(timeout=20)


def _wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}; see {log}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without credentials)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s; see {log}")


def upload(url: str, data: bytes, user: str, password: str) -> None:
    """POST one DICOM file to Orthanc's REST API."""
    import requests

    answer = requests.post(url + "/instances", data=data, auth=(user, password), timeout=120)
    answer.raise_for_status()


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="A latency-adding proxy in front of a DICOMweb server.")
    parser.add_argument("upstream")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--port-file", help="write the proxy's port here once it listens")
    args = parser.parse_args(argv)
    with DicomWebProxy(args.upstream, latency=args.latency) as proxy:
        if args.port_file:
            Path(args.port_file).write_text(str(proxy.port))
        print(proxy.port, flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
