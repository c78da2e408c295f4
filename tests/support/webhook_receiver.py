"""A loopback webhook receiver for the tests of ``notify_url``
(test_notify.py), and the private CA its HTTPS needs. Stdlib only (the
certificates come from the ``openssl`` CLI); Python 3.6+.

    with WebhookReceiver([Answer(503), Answer(200)]) as hook:
        ... notify_url = hook.url ...      # http://127.0.0.1:PORT/services/T000/B000/<random>
        hook.wait_for(2)                   # the recorded Posts
        hook.posts[0].json()["event"]

* Every request is recorded (``posts``: method, path, headers with
  lower-case names, body, ``at``: time.monotonic() once its body was read)
  before it is answered.
* Answers are taken in order from ``answers`` (then ``default`` for ever):
  ``Answer(status, headers, body, delay, endless, trickle)``: ``delay``
  seconds before the status line; ``endless``: no Content-Length, body
  bytes sent as fast as the client takes them (``sent`` counts them) until
  it goes away (or ``limit`` bytes); ``trickle``: a complete head
  (Content-Length 100000) then one body byte every ``trickle`` seconds.
  Every wait ends at ``stop()``; no connection lasts more than ``limit_s``.
* ``tls=(certfile, keyfile)``: HTTPS. ``make_private_ca(directory, hosts)``
  writes a CA and a server certificate for ``hosts`` signed by it.
* ``path``: the secret part of a chat webhook URL, unique per receiver.
"""

import collections
import http.server
import json
import os
import re
import shutil
import socketserver
import ssl
import subprocess
import threading
import time

__all__ = ["Answer", "OK", "Post", "WebhookReceiver", "make_private_ca"]

Answer = collections.namedtuple("Answer", "status headers body delay endless trickle")
Answer.__new__.__defaults__ = (200, None, b"ok", 0.0, False, 0.0)
OK = Answer()


class Post:
    """One recorded request."""

    def __init__(self, method, path, headers, body, at):
        self.method, self.path, self.headers, self.body, self.at = method, path, headers, body, at

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<%s %s %r>" % (self.method, self.path, self.body[:80])


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        owner = self.server.owner
        self.connection.settimeout(owner.limit_s)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = dict((k.lower(), v) for k, v in self.headers.items())
        answer = owner._record(Post(self.command, self.path, headers, body, time.monotonic()))
        if answer.delay and owner._stopped.wait(answer.delay):
            self.close_connection = True        # stopped: hang up without an answer
            return
        self.send_response(answer.status)
        for name, value in sorted((answer.headers or {}).items()):
            self.send_header(name, value)
        if answer.endless or answer.trickle:
            self._stream(owner, answer)
            return
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_PUT = do_POST

    def _stream(self, owner, answer):
        self.close_connection = True
        if answer.trickle:
            self.send_header("Content-Length", "100000")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        block = b"e" * 65536 if answer.endless else b"t"
        end = time.monotonic() + owner.limit_s
        while owner.sent < owner.limit and time.monotonic() < end:
            self.wfile.write(block)
            self.wfile.flush()
            with owner.lock:
                owner.sent += len(block)
            if answer.trickle and owner._stopped.wait(answer.trickle):
                return

    def handle(self):
        try:
            http.server.BaseHTTPRequestHandler.handle(self)
        except (OSError, ssl.SSLError):
            pass        # the agent hung up (a deadline, a body it does not read)

    def log_message(self, *args):
        pass


class WebhookReceiver:
    """See the module docstring."""

    def __init__(self, answers=(), default=OK, tls=None, limit=1 << 30, limit_s=8.0,
                 host="127.0.0.1"):
        self.answers, self.default = list(answers), default
        self.tls, self.limit, self.limit_s, self.host = tls, limit, limit_s, host
        self.path = "/services/T000/B000/%s" % os.urandom(12).hex()
        self.posts, self.sent = [], 0
        self.lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = None
        self.port = None

    @property
    def url(self):
        return "%s://%s:%d%s" % ("https" if self.tls else "http", self.host, self.port, self.path)

    def _record(self, post):
        with self.lock:
            self.posts.append(post)
            return self.answers.pop(0) if self.answers else self.default

    def wait_for(self, count, timeout=10.0):
        """The posts once there are ``count`` of them; AssertionError after ``timeout``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if len(self.posts) >= count:
                    return list(self.posts)
            time.sleep(0.01)
        raise AssertionError("%d posts after %ss, expected %d" % (len(self.posts), timeout, count))

    def events(self):
        """The ``event`` of every post (JSON bodies), in order."""
        with self.lock:
            return [p.json()["event"] for p in self.posts]

    def start(self):
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls[0], self.tls[1])
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server, self.port = server, server.server_address[1]
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self):
        self._stopped.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def make_private_ca(directory, hosts=("127.0.0.1", "localhost")):
    """A private CA and a server certificate for ``hosts`` (IP or DNS
    subject alternative names) signed by it, with the ``openssl`` CLI:
    (ca_cert, server_cert, server_key) paths in ``directory``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl CLI not found")
    path = lambda name: os.path.join(str(directory), name)    # noqa: E731
    san = ",".join(("IP:%s" % h) if re.match(r"^[0-9.]+$", h) else ("DNS:%s" % h) for h in hosts)
    with open(path("server.ext"), "w") as handle:
        handle.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\n"
                     "extendedKeyUsage=serverAuth\n" % san)
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
         "-subj", "/CN=notify test CA", "-keyout", path("ca-key.pem"), "-out", path("ca.pem")],
        ["req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", "/CN=%s" % hosts[0],
         "-keyout", path("server-key.pem"), "-out", path("server.csr")],
        ["x509", "-req", "-in", path("server.csr"), "-CA", path("ca.pem"), "-CAkey",
         path("ca-key.pem"), "-CAcreateserial", "-days", "2", "-sha256", "-extfile",
         path("server.ext"), "-out", path("server.pem")],
    ]
    for step in steps:
        proc = subprocess.run([openssl] + step, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError("openssl %s failed: %s" % (step[0], proc.stdout.decode("utf-8", "replace")))
    return path("ca.pem"), path("server.pem"), path("server-key.pem")


