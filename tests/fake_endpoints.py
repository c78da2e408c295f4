"""Small loopback HTTP(S) servers for the hostile-input tests (issue 14):
a fake Vault that serves real-looking snapshot archives, and a generic
endpoint answering with a function (fake token endpoints, fake S3 / Azure /
GCS listings).  Every request is recorded.  Stdlib only; Python 3.6+.

    with FakeVault(token="s.abc") as vault:         # token auth only
        ... addr = vault.url ...
        assert vault.tokens_seen == ["s.abc", ...]

    with Endpoint(lambda req: (200, {}, b"{}")) as ep:
        ... ep.url ... ep.requests[0].headers["authorization"] ...

``Endpoint(..., tls=(certfile, keyfile))`` serves HTTPS (a self-signed cert
from ``azurite.make_self_signed_cert``).
"""

import http.server
import json
import socketserver
import ssl
import threading

from archives import build_archive

__all__ = ["Request", "Endpoint", "FakeVault", "self_signed_cert"]


class Request(object):
    """One recorded request: method, path (with query), headers (lower-case
    names; the last value wins), body bytes."""

    def __init__(self, method, path, headers, body):
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def __repr__(self):
        return "<%s %s>" % (self.method, self.path)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-endpoint"
    sys_version = ""
    timeout = 30

    def _handle(self):
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = b""
        while len(body) < length:
            chunk = self.rfile.read(min(1 << 20, length - len(body)))
            if not chunk:
                break
            body += chunk
        headers = dict((k.lower(), v) for k, v in self.headers.items())
        record = Request(self.command, self.path, headers, body)
        with owner.lock:
            owner.requests.append(record)
        status, extra, payload = owner.respond(record)
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode("utf-8")
            extra = dict(extra or {})
            extra.setdefault("Content-Type", "application/json")
        elif isinstance(payload, str):
            payload = payload.encode("utf-8")
        payload = payload or b""
        self.send_response(status)
        for key, value in sorted((extra or {}).items()):
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def log_message(self, *args):
        pass


class Endpoint(object):
    """A threaded HTTP server on 127.0.0.1:<free port> answering every
    request with ``respond(Request) -> (status, headers dict, body)`` (body:
    bytes, str, or a dict/list sent as JSON)."""

    def __init__(self, respond=None, tls=None):
        if respond is not None:
            self.respond = respond
        self.tls = tls
        self.requests = []
        self.lock = threading.Lock()
        self._server = self._thread = None
        self.port = None

    def respond(self, request):          # overridden by subclasses or the constructor
        return 404, {}, {"errors": ["no such path"]}

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.port)

    def start(self):
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls[0], self.tls[1])
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="fake-endpoint")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self):
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


class FakeVault(Endpoint):
    """Just enough of Vault's API for a snapshot cycle and a restore:
    ``sys/leader`` (the active node), AppRole login (``role_id`` /
    ``secret_id``, when given), ``auth/token/lookup-self``, the snapshot
    (``GET``: a valid archive from archives.build_archive), the restore
    (``POST sys/storage/raft/snapshot[-force]``) and ``capabilities-self``.
    Only ``token`` (and the token the login hands out) is accepted in
    ``X-Vault-Token``; anything else gets 403.  ``tokens_seen``: every
    X-Vault-Token received; ``restores``: bodies of the restore requests."""

    LOGIN_TOKEN = "s.FakeVaultLoginToken0123456789"

    def __init__(self, token=None, role_id=None, secret_id=None, archive=None):
        Endpoint.__init__(self)
        self.token, self.role_id, self.secret_id = token, role_id, secret_id
        self.archive = archive if archive is not None else build_archive(state=b"s" * 4096)
        self.tokens_seen = []
        self.restores = []

    def _denied(self):
        return 403, {}, {"errors": ["permission denied"]}

    def respond(self, request):
        path = request.path.split("?", 1)[0]
        token = request.headers.get("x-vault-token")
        if token is not None:
            with self.lock:
                self.tokens_seen.append(token)
        valid = token is not None and token in (self.token, self.LOGIN_TOKEN)
        if path == "/v1/sys/leader":
            return 200, {}, {"ha_enabled": True, "is_self": True, "leader_address": self.url}
        if path.startswith("/v1/auth/") and path.endswith("/login"):
            try:
                form = json.loads(request.body.decode("utf-8"))
            except ValueError:
                form = {}
            if self.role_id is None or (form.get("role_id") == self.role_id
                                        and form.get("secret_id") == self.secret_id):
                return 200, {}, {"auth": {"client_token": self.LOGIN_TOKEN, "lease_duration": 3600,
                                          "renewable": True, "policies": ["snapshot"]}}
            return 400, {}, {"errors": ["invalid role or secret ID"]}
        if not valid:
            return self._denied()
        if path == "/v1/auth/token/lookup-self":
            return 200, {}, {"data": {"ttl": 0, "renewable": False, "policies": ["root"]}}
        if path == "/v1/auth/token/renew-self":
            return 200, {}, {"auth": {"client_token": token, "lease_duration": 3600,
                                      "renewable": True}}
        if path == "/v1/sys/capabilities-self":
            try:
                paths = json.loads(request.body.decode("utf-8")).get("paths") or []
            except (ValueError, AttributeError):
                paths = []
            answer = dict((p, ["root"]) for p in paths)
            answer["capabilities"] = ["root"]
            answer["data"] = dict(answer)
            return 200, {}, answer
        if path == "/v1/sys/storage/raft/snapshot" and request.method == "GET":
            return 200, {"Content-Type": "application/gzip"}, self.archive
        if path in ("/v1/sys/storage/raft/snapshot", "/v1/sys/storage/raft/snapshot-force") \
                and request.method in ("POST", "PUT"):
            with self.lock:
                self.restores.append(request.body)
            return 204, {}, b""
        return 404, {}, {"errors": ["no handler for route %s" % path]}


def self_signed_cert(directory):
    """(certfile, keyfile) of a fresh self-signed cert for 127.0.0.1 (the
    openssl CLI, as for Azurite over HTTPS); the key is an RSA-2048 PKCS#8
    PEM, usable as a service account's private_key too."""
    from azurite import make_self_signed_cert
    return make_self_signed_cert(str(directory))
