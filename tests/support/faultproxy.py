"""A loopback TCP proxy that injects faults, for tests.  Stdlib only, 3.6+.

::

    with FaultProxy("127.0.0.1", 8200) as proxy:
        client_url = proxy.addr                 # http://127.0.0.1:<proxy.port>
        proxy.cut_after(4096)                   # next connections: truncate
        ...
        proxy.pass_through()                    # back to normal
        proxy.fail_requests(lambda m, p: p.startswith("/v1/sys/storage"),
                            status=503, times=2)
        ...
        assert not proxy.saw_header("X-Vault-Token")

Behaviour is a setting read when a connection is accepted, so a change
applies to *subsequent* connections; connections already open keep what they
had.  Faults can be combined (e.g. ``delay`` and ``cut_after``); ``reset``
wins over everything, then a matching ``fail_requests`` rule.  ``cut_after``
and ``reset`` take an optional ``times`` (number of connections to affect;
None = until changed).

HTTP mode (the default) reads each request head (up to the blank line),
records it, applies ``fail_requests`` rules, and rewrites the request's
``Connection`` header to ``close`` so that every TCP connection carries exactly
one request/response: the server closes after answering and the client sees
``Connection: close`` and opens a new connection for the next request.  This is
what makes per-request recording and fault injection exact without parsing
bodies.  ``FaultProxy(..., http=False)`` is a plain byte pipe (no recording,
no ``fail_requests``).
"""

import socket
import struct
import threading
import time

__all__ = ["FaultProxy", "RequestHead"]

_MAX_HEAD = 256 * 1024
_CHUNK = 65536

_REASONS = {
    200: "OK", 204: "No Content", 301: "Moved Permanently", 302: "Found",
    307: "Temporary Redirect", 308: "Permanent Redirect", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 412: "Precondition Failed",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


class RequestHead:
    """One request head seen by the proxy.

    ``method``, ``path`` (the raw request target), ``version``, ``line`` (the
    request line), ``headers`` (list of ``(name, value)`` in arrival order,
    before any rewriting), ``raw`` (bytes as received), ``conn_id`` and
    ``action`` ("forwarded", "failed" or "reset").
    """

    def __init__(self, raw, conn_id):
        self.raw = raw
        self.conn_id = conn_id
        self.action = "forwarded"
        text = raw.decode("latin-1")
        lines = text.split("\r\n")
        self.line = lines[0]
        parts = self.line.split(" ")
        self.method = parts[0] if parts else ""
        self.path = parts[1] if len(parts) > 1 else ""
        self.version = parts[2] if len(parts) > 2 else ""
        self.headers = []
        for line in lines[1:]:
            if not line or ":" not in line:
                continue
            name, value = line.split(":", 1)
            self.headers.append((name.strip(), value.strip()))

    def header(self, name, default=None):
        """First value of header ``name`` (case-insensitive)."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return default

    def has_header(self, name):
        return self.header(name) is not None

    def __repr__(self):
        return "<RequestHead %s %s>" % (self.line, self.action)


class _Rule:
    def __init__(self, predicate, status, body, headers, times, content_type):
        self.predicate = predicate
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.times = times
        self.content_type = content_type
        self.hits = 0


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``target_host:target_port`` with faults."""

    def __init__(self, target_host, target_port, listen_host="127.0.0.1", http=True,
                 connect_timeout=10.0):
        self.target_host = target_host
        self.target_port = int(target_port)
        self.listen_host = listen_host
        self.http = http
        self.connect_timeout = connect_timeout
        self.port = None
        self.requests = []        # request lines, e.g. "GET /v1/sys/leader HTTP/1.1"
        self.request_heads = []   # RequestHead objects
        self.connections = 0      # accepted connections
        self.bytes_to_client = 0  # server->client bytes forwarded (all connections)
        self._lock = threading.Lock()
        self._listener = None
        self._thread = None
        self._closing = False
        self._socks = set()
        self._workers = []
        self.pass_through()

    # ------------------------------------------------------------ lifecycle

    @property
    def addr(self):
        return "http://%s:%d" % (self.listen_host, self.port)

    def start(self):
        if self._listener is not None:
            return self
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((self.listen_host, 0))
        lst.listen(64)
        lst.settimeout(0.2)
        self._listener = lst
        self.port = lst.getsockname()[1]
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop,
                                        name="faultproxy-%d" % self.port)
        self._thread.daemon = True
        self._thread.start()
        return self

    def close(self):
        """Stop accepting and tear down every open connection."""
        self._closing = True
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            socks = list(self._socks)
            workers = list(self._workers)
        for s in socks:
            _shutdown(s)
        for t in workers:
            t.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------ behaviour

    def pass_through(self):
        """Forward everything unchanged (clears every fault)."""
        with self._lock:
            self._cut = None        # (nbytes, rst, remaining_times)
            self._delay = 0.0
            self._reset = None      # remaining times, or -1 for unlimited
            self._rules = []

    clear = pass_through

    def cut_after(self, nbytes, rst=False, times=None):
        """Close the client connection after forwarding ``nbytes`` bytes of
        the server's response (headers included).  ``rst`` closes with a TCP
        reset instead of a FIN."""
        with self._lock:
            self._cut = [int(nbytes), bool(rst), -1 if times is None else int(times)]

    def delay(self, seconds):
        """Sleep ``seconds`` before forwarding each chunk (<= 64 KiB) of the
        server's response (0 turns it off)."""
        with self._lock:
            self._delay = float(seconds)

    def reset(self, times=None):
        """Answer new connections with an immediate TCP RST (SO_LINGER 0),
        before anything is read or forwarded."""
        with self._lock:
            self._reset = -1 if times is None else int(times)

    def fail_requests(self, predicate=None, status=503, body=b'{"errors":["injected by faultproxy"]}',
                      times=None, headers=None, content_type="application/json"):
        """Answer requests for which ``predicate(method, path)`` is true (all
        requests if None) with a canned response instead of forwarding them,
        ``times`` times (None = until changed).  ``headers`` adds response
        headers (e.g. ``{"Location": ...}`` for a fake redirect).  Several
        rules may be active; the first matching one with times left answers.
        Returns the rule; its ``hits`` counts answered requests."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        rule = _Rule(predicate, int(status), body, headers, times, content_type)
        with self._lock:
            self._rules.append(rule)
        return rule

    # ------------------------------------------------------------- queries

    def saw_header(self, name):
        """True if any recorded request carried header ``name``."""
        return any(h.has_header(name) for h in list(self.request_heads))

    def header_values(self, name):
        return [h.header(name) for h in list(self.request_heads) if h.has_header(name)]

    def forget(self):
        """Clear the recorded requests/heads."""
        with self._lock:
            del self.requests[:]
            del self.request_heads[:]

    # ------------------------------------------------------------ internals

    def _accept_loop(self):
        conn_id = 0
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closing:
                    return
                time.sleep(0.05)
                continue
            conn_id += 1
            client.settimeout(None)
            with self._lock:
                self.connections += 1
                plan = self._take_plan()
                self._socks.add(client)
                self._workers = [t for t in self._workers if t.is_alive()]
                t = threading.Thread(target=self._serve, args=(client, conn_id, plan),
                                     name="faultproxy-conn-%d" % conn_id)
                t.daemon = True
                self._workers.append(t)
            t.start()

    def _take_plan(self):
        """Snapshot the behaviour for one connection (lock held)."""
        plan = {"reset": False, "cut": None, "rst": False, "delay": self._delay}
        if self._reset is not None:
            plan["reset"] = True
            if self._reset > 0:
                self._reset -= 1
                if self._reset == 0:
                    self._reset = None
            return plan
        if self._cut is not None:
            plan["cut"], plan["rst"] = self._cut[0], self._cut[1]
            if self._cut[2] > 0:
                self._cut[2] -= 1
                if self._cut[2] == 0:
                    self._cut = None
        return plan

    def _match_rule(self, method, path):
        with self._lock:
            for rule in self._rules:
                if rule.times is not None and rule.hits >= rule.times:
                    continue
                try:
                    ok = rule.predicate is None or rule.predicate(method, path)
                except Exception:
                    ok = False
                if ok:
                    rule.hits += 1
                    return rule
        return None

    def _forget_sock(self, *socks):
        with self._lock:
            for s in socks:
                self._socks.discard(s)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def _serve(self, client, conn_id, plan):
        server = None
        try:
            if plan["reset"]:
                _rst(client)
                return
            first = b""
            if self.http:
                head, rest = _read_head(client)
                if head is None:       # client went away / sent garbage
                    first = rest
                else:
                    req = RequestHead(head, conn_id)
                    with self._lock:
                        self.requests.append(req.line)
                        self.request_heads.append(req)
                    rule = self._match_rule(req.method, req.path)
                    if rule is not None:
                        req.action = "failed"
                        self._answer(client, req, rule, rest)
                        return
                    first = _force_close(head) + rest
            try:
                server = socket.create_connection((self.target_host, self.target_port),
                                                  timeout=self.connect_timeout)
            except OSError:
                _rst(client)
                return
            server.settimeout(None)
            with self._lock:
                self._socks.add(server)
            if first:
                server.sendall(first)
            up = threading.Thread(target=_pump_up, args=(client, server))
            up.daemon = True
            up.start()
            self._pump_down(server, client, plan)
            up.join(5)
        except OSError:
            pass
        finally:
            self._forget_sock(client, *([server] if server is not None else []))

    def _pump_down(self, server, client, plan):
        sent = 0
        limit = plan["cut"]
        while True:
            try:
                data = server.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                _shutdown(client, socket.SHUT_WR)
                return
            if plan["delay"]:
                time.sleep(plan["delay"])
            if limit is not None and sent + len(data) >= limit:
                data = data[: max(0, limit - sent)]
                try:
                    if data:
                        client.sendall(data)
                        with self._lock:
                            self.bytes_to_client += len(data)
                finally:
                    if plan["rst"]:
                        _rst(client)
                    else:
                        _shutdown(client)
                    _shutdown(server)
                return
            try:
                client.sendall(data)
            except OSError:
                _shutdown(server)
                return
            sent += len(data)
            with self._lock:
                self.bytes_to_client += len(data)

    def _answer(self, client, req, rule, rest):
        body = rule.body
        lines = ["HTTP/1.1 %d %s" % (rule.status, _REASONS.get(rule.status, "Injected"))]
        if rule.content_type and body:
            lines.append("Content-Type: %s" % rule.content_type)
        for k, v in rule.headers.items():
            lines.append("%s: %s" % (k, v))
        lines.append("Content-Length: %d" % len(body))
        lines.append("Connection: close")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        # drain a declared request body so closing does not RST the client
        try:
            want = int(req.header("Content-Length", "0") or 0)
        except ValueError:
            want = 0
        want -= len(rest)
        client.settimeout(2.0)
        try:
            while want > 0:
                chunk = client.recv(min(_CHUNK, want))
                if not chunk:
                    break
                want -= len(chunk)
            client.sendall(payload)
            _shutdown(client, socket.SHUT_WR)
            # wait briefly for the client to close its side
            while client.recv(_CHUNK):
                pass
        except OSError:
            pass


# ---------------------------------------------------------------- helpers


def _read_head(sock):
    """Read up to the end of the request head.  Returns (head, rest) or
    (None, bytes_read) if the connection ended or the head is too large."""
    buf = b""
    while True:
        idx = buf.find(b"\r\n\r\n")
        if idx >= 0:
            return buf[: idx + 4], buf[idx + 4:]
        if len(buf) > _MAX_HEAD:
            return None, buf
        try:
            chunk = sock.recv(_CHUNK)
        except OSError:
            chunk = b""
        if not chunk:
            return None, buf
        buf += chunk


def _force_close(head):
    """Rewrite a request head so it carries ``Connection: close`` (and no
    ``Keep-Alive``)."""
    lines = head[:-4].split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name in (b"connection", b"keep-alive", b"proxy-connection"):
            continue
        out.append(line)
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


def _pump_up(client, server):
    while True:
        try:
            data = client.recv(_CHUNK)
        except OSError:
            data = b""
        if not data:
            _shutdown(server, socket.SHUT_WR)
            return
        try:
            server.sendall(data)
        except OSError:
            return


def _shutdown(sock, how=socket.SHUT_RDWR):
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _rst(sock):
    """Abort the connection with a TCP RST.  SHUT_RD first wakes any thread
    blocked in recv() on it (close() alone would not) without sending a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _shutdown(sock, socket.SHUT_RD)
    try:
        sock.close()
    except OSError:
        pass
