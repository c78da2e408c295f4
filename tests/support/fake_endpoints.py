"""Small loopback HTTP(S) servers for the hostile-input tests (issue 14):
a fake Vault that serves real-looking snapshot archives, and a generic
endpoint answering with a function (fake token endpoints, fake S3 / Azure /
GCS listings).  Every request is recorded.  Both are harness.LoopbackServer
subclasses (as are cred_servers' and hostile_servers').  Stdlib only;
Python 3.6+.

    with FakeVault(token="s.abc") as vault:         # token auth only
        ... addr = vault.url ...
        assert vault.tokens_seen == ["s.abc", ...]

    with Endpoint(lambda req: (200, {}, b"{}")) as ep:
        ... ep.url ... ep.requests[0].headers["authorization"] ...

``Endpoint(..., tls=(certfile, keyfile))`` serves HTTPS (a self-signed cert
from ``azurite.make_self_signed_cert``).
"""

import json
import threading

from support.archives import build_archive
from support.harness import LoopbackServer

__all__ = ["Request", "Endpoint", "FakeVault", "self_signed_cert"]


class Request:
    """One recorded request: method, path (with query), headers (lower-case
    names; the last value wins), body bytes."""

    def __init__(self, method, path, headers, body):
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def __repr__(self):
        return "<%s %s>" % (self.method, self.path)


class Endpoint(LoopbackServer):
    """A threaded HTTP server on 127.0.0.1:<free port> (harness.LoopbackServer)
    answering every request with ``respond(Request) -> (status, headers dict,
    body)`` (body: bytes, str, or a dict/list sent as JSON)."""

    server_version = "fake-endpoint"
    handler_timeout = 30

    def __init__(self, respond=None, tls=None):
        LoopbackServer.__init__(self)
        if respond is not None:
            self.respond = respond
        self.tls = tls
        self.requests = []
        self.lock = threading.Lock()

    def respond(self, request):          # overridden by subclasses or the constructor
        return 404, {}, {"errors": ["no such path"]}

    def answer(self, handler):
        body = handler.read_body()
        headers = dict((k.lower(), v) for k, v in handler.headers.items())
        record = Request(handler.command, handler.path, headers, body)
        with self.lock:
            self.requests.append(record)
        return self.respond(record)


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
    from support.azurite import make_self_signed_cert
    return make_self_signed_cert(str(directory))
