"""A raw loopback HTTP server whose every answer a test scripts byte for
byte, for the attacks on re-verification (``read_back``) and on webhook
notifications (test_hostile_scrub.py, test_hostile_notify.py): headers that
lie (a Content-Length, an ETag, a checksum), a body longer than announced,
one that trickles, never ends, or is chunked without end.  Stdlib only;
Python 3.6+.

``ScriptedServer(script)`` binds 127.0.0.1 on a free port and serves each
connection from a daemon thread, one request per connection.  For every
request it calls ``script(request)`` with a ``Seen`` (``method``, ``path``,
``query`` dict, ``headers`` dict of lower-case names, ``body``), noted in
``seen``; the script returns a ``Reply``:

* ``Reply(status, headers, body)``: ``headers`` a list of (name, value)
  pairs sent as they are (no Content-Length is added: a test that wants
  one says it, true or false); ``body`` bytes, or an iterable of bytes sent
  chunk after chunk (``chunked=True``: in HTTP chunked encoding);
* ``interval``: seconds between two body chunks (a trickle).

Every connection ends after ``limit`` seconds (a safety net: a client that
would read for ever makes the test fail on its own time check instead of
hanging), or as soon as the client goes away; ``sent`` counts the body
bytes that went out, ``closed_early`` the answers the client cut.

    with ScriptedServer(lambda req: Reply(200, [("Content-Length", "2")], b"ok")) as server:
        ... server.url ...
"""

import collections
import threading
import time

from support.harness import RawListener
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["Reply", "Seen", "ScriptedServer", "endless", "repeat"]

Reply = collections.namedtuple("Reply", "status headers body chunked interval")
Reply.__new__.__defaults__ = ((), b"", False, 0.0)

Seen = collections.namedtuple("Seen", "method path query headers body")


def endless(first, filler=b"\0" * 65536):
    """``first``, then ``filler`` for ever (an iterable of bytes)."""
    yield first
    while True:
        yield filler


def repeat(data, count):
    """``data`` ``count`` times (an iterable of bytes)."""
    for _ in range(count):
        yield data


class ScriptedServer(RawListener):
    """See the module docstring."""

    backlog = 32

    def __init__(self, script, limit=20.0):
        self.script, self.limit = script, limit
        self.seen = []
        self.sent = 0
        self.closed_early = 0
        self._lock = threading.Lock()
        RawListener.__init__(self)

    def requests(self, method=None):
        with self._lock:
            return [s for s in self.seen if method in (None, s.method)]

    def _accept(self):
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        end = time.monotonic() + self.limit
        try:
            conn.settimeout(self.limit)
            seen = _read_request(conn)
            if seen is None:
                return
            with self._lock:
                self.seen.append(seen)
            reply = self.script(seen)
            head = ["HTTP/1.1 %d %s" % (reply.status, "Scripted")]
            head += ["%s: %s" % pair for pair in reply.headers]
            if reply.chunked:
                head.append("Transfer-Encoding: chunked")
            head.append("Connection: close")
            conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            if seen.method != "HEAD":
                self._body(conn, reply, end)
        except OSError:
            with self._lock:
                self.closed_early += 1
        finally:
            conn.close()

    def _body(self, conn, reply, end):
        chunks = [reply.body] if isinstance(reply.body, bytes) else reply.body
        for chunk in chunks:
            if self._stopped.is_set() or time.monotonic() > end:
                return
            if not chunk:
                continue
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if reply.chunked else chunk)
            with self._lock:
                self.sent += len(chunk)
            if reply.interval:
                time.sleep(reply.interval)
        if reply.chunked:
            conn.sendall(b"0\r\n\r\n")


def _read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
        if len(data) > 1 << 20:
            return None
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target = lines[0].split(" ")[:2]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length") or 0)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    parts = urlsplit(target)
    return Seen(method, unquote(parts.path), dict(parse_qsl(parts.query, keep_blank_values=True)),
                headers, rest[:length])
