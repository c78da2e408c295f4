"""Raw loopback TCP servers that answer slowly, or without end, for the
tests of the transport's deadline, stop handling and CONNECT parsing
(test_transport_deadlines.py, test_transport_proxies.py).  Stdlib only;
works on Python 3.6+.

* ``TrickleServer(mode)``: reads each request's head, then

  - ``"headers"``: ``HTTP/1.1 200 OK`` and one header byte every
    ``interval`` seconds, never ending the headers;
  - ``"body"``: complete headers (``Content-Length: 100000``), then one body
    byte every ``interval`` seconds;
  - ``"stream"``: complete headers (``Content-Length: length``), then the
    body one byte every ``interval`` seconds to its end: a stream that
    is slow but never idle;
  - ``"silent"``: nothing at all (a TLS handshake waits for ever);
  - ``"endless_headers"``: ``HTTP/1.1 200 OK`` and header lines as fast as
    the client takes them, never ending;
  - ``"slow_answer"``: reads the request body (``Content-Length``), then
    answers ``200`` with an empty body: its answer time is the upload's.

  Every connection ends after ``limit`` seconds at most (a safety net: an
  agent without a deadline fails the test's time check instead of hanging).
* ``RecordingProxy(mode)``: an HTTP forward proxy that forwards nothing:
  it records the first bytes of every connection (``received``) and
  answers ``"refuse"``: ``502``; ``"endless_headers"``: a CONNECT with
  ``200`` then header lines without end; ``"trickle_headers"``: the same,
  one line every ``interval`` seconds.
* ``TunnelProxy(target)``: a CONNECT proxy that answers ``200`` and splices
  the connection to ``target`` (host, port), in both directions, until
  either side ends (or ``limit`` seconds idle).

All bind 127.0.0.1 on a free port, serve each connection from a daemon
thread, and count connections (``connections``)::

    with TrickleServer("headers") as server:
        http.request("GET", server.url + "/v1/sys/leader")

``EndlessServer(mode, limit)`` (a socketserver; it counts the bytes it
``sent``) answers every request with ``200`` and a body without end
(``limit`` bytes on the wire, then it closes), for the tests of the snapshot
stream's bounded memory (test_snapshot.py): bytes that are not gzip, a tar
whose ``state.bin`` (or PAX header) never ends, or a gzip bomb.
"""

import os
import socket
import socketserver
import tarfile
import threading
import time
import zlib

from support.harness import RawListener

__all__ = ["TrickleServer", "RecordingProxy", "TunnelProxy", "EndlessServer"]

MB = 1024 * 1024


class _RawServer(RawListener):
    """Listening socket, accept thread, per-connection daemon threads."""

    def __init__(self, mode, interval=0.05, limit=8.0):
        self.mode, self.interval, self.limit = mode, interval, limit
        self.connections = 0
        self.received = []             # first bytes of each connection
        self._lock = threading.Lock()
        RawListener.__init__(self)

    def _accept(self):
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        end = time.monotonic() + self.limit
        try:
            conn.settimeout(self.limit)
            head = _read_head(conn)
            with self._lock:
                self.received.append(head)
            self.answer(conn, head, end)
        except OSError:
            pass
        finally:
            conn.close()

    def _drip(self, conn, data, end):
        """Send ``data`` one byte per ``interval`` until it is sent, the
        time is up or the server stops; True when all of it went."""
        for index in range(len(data)):
            if self._stopped.is_set() or time.monotonic() > end:
                return False
            conn.sendall(data[index:index + 1])
            time.sleep(self.interval)
        return True

    def _lines(self, conn, end, pause):
        """Header lines without end (``pause`` seconds apart)."""
        number = 0
        while not self._stopped.is_set() and time.monotonic() < end:
            number += 1
            conn.sendall(b"X-Endless-%d: yes\r\n" % number)
            if pause:
                time.sleep(pause)

    def answer(self, conn, head, end):  # pragma: no cover - overridden
        raise NotImplementedError


def _read_head(conn):
    """The request head (up to the blank line; at most 64 KiB)."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


class TrickleServer(_RawServer):
    """See the module docstring."""

    def __init__(self, mode, interval=0.05, limit=8.0, length=40):
        _RawServer.__init__(self, mode, interval, limit)
        self.length = length

    def answer(self, conn, head, end):
        mode = self.mode
        if mode == "headers":
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            self._drip(conn, b"X-Slow: " + b"a" * 100000, end)
        elif mode in ("body", "stream"):
            length = 100000 if mode == "body" else self.length
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % length)
            self._drip(conn, b" " * length, end)
        elif mode == "endless_headers":
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            self._lines(conn, end, 0)
        elif mode == "slow_answer":
            self._read_body(conn, head)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        elif mode == "silent":
            self._stopped.wait(max(0.0, end - time.monotonic()))

    @staticmethod
    def _read_body(conn, head):
        header, _, rest = head.partition(b"\r\n\r\n")
        length = 0
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        length -= len(rest)
        while length > 0:
            chunk = conn.recv(min(length, 65536))
            if not chunk:
                return
            length -= len(chunk)


class RecordingProxy(_RawServer):
    """See the module docstring."""

    def answer(self, conn, head, end):
        if self.mode == "refuse":
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        elif self.mode in ("endless_headers", "trickle_headers"):
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n")
            self._lines(conn, end, self.interval if self.mode == "trickle_headers" else 0)


class TunnelProxy(_RawServer):
    """See the module docstring."""

    def __init__(self, target, limit=8.0):
        _RawServer.__init__(self, "tunnel", limit=limit)
        self.target = target

    def answer(self, conn, head, end):
        upstream = socket.create_connection(self.target, timeout=self.limit)
        try:
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
            back.start()
            _pump(conn, upstream)
            back.join(max(0.0, end - time.monotonic()))
        finally:
            upstream.close()


def _pump(source, sink):
    """Copy ``source`` to ``sink`` until ``source`` ends; then end ``sink``'s
    writing half."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


SLOW_DOWN = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
             "<Message>Please reduce your request rate.</Message></Error>")


def throttled(server_class, throttle, retry_after):
    """A subclass of a hostile_servers listing server whose first
    ``throttle`` listing requests get ``503`` (S3's SlowDown) with
    ``Retry-After: retry_after`` (counted as ``"throttled"``); the listing
    after them is the class's own."""

    class Throttled(server_class):
        def respond(self, method, path, query, headers, body):
            if self.is_list(method, path, query) and self.count("throttled") < throttle:
                return ("throttled", 503, {"Retry-After": retry_after,
                                           "Content-Type": "application/xml"}, SLOW_DOWN)
            return server_class.respond(self, method, path, query, headers, body)

    Throttled.__name__ = "Throttled" + server_class.__name__
    return Throttled


def _tar_header(name, size, kind=b"0"):
    info = tarfile.TarInfo(name)
    info.size = 0
    info.type = kind
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    field = b"\x80" + size.to_bytes(11, "big")          # GNU base-256: any size
    header[124:136] = field
    header[148:156] = b" " * 8
    header[148:156] = ("%06o\0 " % sum(header)).encode("ascii")
    return bytes(header)


class EndlessServer:
    """An HTTP server on loopback that answers every request with 200 and a
    body that goes on for ``limit`` bytes (on the wire), then closes.

    ``mode``: "random" (bytes that are not gzip), "state" (a valid gzip stream
    of a tar whose state.bin never ends), "pax" (the same, but the endless
    member is a PAX extended header), "bomb" (state.bin of zeros at gzip level
    9: ``limit`` is then the *inflated* size)."""

    def __init__(self, mode, limit):
        self.mode, self.limit, self.sent = mode, limit, 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                sock = self.request
                sock.settimeout(30)
                try:
                    sock.recv(65536)
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\n"
                                 b"Connection: close\r\n\r\n")
                    for chunk in outer._chunks():
                        sock.sendall(chunk)
                        outer.sent += len(chunk)
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
        self.thread.daemon = True

    def _chunks(self):
        block = os.urandom(MB)
        if self.mode == "random":
            while self.sent < self.limit:
                yield block
            return
        if self.mode == "bomb":
            deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
            zeros = bytes(4 * MB)
            yield deflate.compress(_tar_header("state.bin", 2 ** 60))
            inflated = 0
            while inflated < self.limit:
                data = deflate.compress(zeros)
                inflated += len(zeros)
                if data:
                    yield data
            yield deflate.flush(zlib.Z_SYNC_FLUSH)
            return
        deflate = zlib.compressobj(0, zlib.DEFLATED, 31)
        header = _tar_header("state.bin", 2 ** 60) if self.mode == "state" else \
            _tar_header("././@PaxHeader", 2 ** 60, tarfile.XHDTYPE)
        yield deflate.compress(header)
        while self.sent < self.limit:
            yield deflate.compress(block)

    def __enter__(self):
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
