"""A loopback HTTP proxy that adds a fixed delay to every request and counts them.

    python bench/latency_proxy.py --upstream http://127.0.0.1:9023 --delay-ms 50 [--port 0]

It stands in for the distance between a worker and a remote server (Cloud Storage, a
DICOMweb server): each request waits ``delay`` before it is forwarded, as a round trip
would. Requests are served by a thread each (ThreadingHTTPServer) and forwarded over one
keep-alive connection per thread, so concurrency is what the client makes of it.
``GET /__proxy/stats`` answers the request count and bytes sent back, by method, and
the most requests that were in flight at once; ``GET /__proxy/reset`` answers the same
and sets them to zero. In the process that started it, ``server.stats.paths`` counts
the requests per method and path (for tests: was every object read exactly once?).

Used by bench/remote.py; a benchmark tool only (it targets 127.0.0.1 alone).
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.paths: dict[tuple[str, str], int] = {}
        self.headers: dict[tuple[str, str], dict] = {}
        self.bytes_out = 0
        self.in_flight = self.max_in_flight = 0

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def add(self, method: str, size: int, path: str = "", headers: dict | None = None) -> None:
        with self.lock:
            self.in_flight -= 1
            self.requests[method] = self.requests.get(method, 0) + 1
            self.paths[method, path] = self.paths.get((method, path), 0) + 1
            self.headers[method, path] = headers or {}
            self.bytes_out += size

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": dict(self.requests), "total": sum(self.requests.values()), "bytes_out": self.bytes_out,
                    "max_in_flight": self.max_in_flight}

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.paths.clear()
            self.headers.clear()
            self.bytes_out = 0
            self.max_in_flight = self.in_flight


def make_handler(upstream: str, delay: float, stats: _Stats):
    parsed = urllib.parse.urlsplit(upstream)
    local = threading.local()

    def connection() -> http.client.HTTPConnection:
        if getattr(local, "conn", None) is None:
            local.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        return local.conn

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # else the body, written after the headers, waits for the client's delayed ACK of
        # them: ~40 ms more on every request than the delay asked for
        disable_nagle_algorithm = True

        def log_message(self, *args):  # quiet
            pass

        def _stats(self) -> bool:
            if not self.path.startswith("/__proxy/"):
                return False
            body = json.dumps(stats.snapshot()).encode()
            if self.path == "/__proxy/reset":
                stats.reset()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return True

        def _forward(self) -> None:
            if self._stats():
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
            headers["Host"] = parsed.netloc
            stats.begin()
            time.sleep(delay)
            for attempt in (1, 2):
                try:
                    conn = connection()
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    break
                except (http.client.HTTPException, OSError):
                    local.conn = None
                    if attempt == 2:
                        stats.add(self.command, 0, self.path, headers)
                        raise
            stats.add(self.command, len(data), self.path, headers)
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    return Handler


class _Server(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a client opening many connections at once
    # (each read process its own pool) would have its connection attempts dropped and
    # retried a second later, a wait no storage service imposes
    request_queue_size = 1024


def start(upstream: str, delay_ms: float, port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start the proxy in a daemon thread; returns (server, its URL)."""
    stats = _Stats()
    server = _Server(("127.0.0.1", port), make_handler(upstream, delay_ms / 1000.0, stats))
    server.daemon_threads = True
    server.stats = stats
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--delay-ms", type=float, default=50)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server, url = start(args.upstream, args.delay_ms, args.port)
    print(url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
