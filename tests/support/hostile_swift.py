"""A small in-memory Swift (tempauth and one account) on loopback whose
answers a test bends, as an attacker or a broken store would, for
test_hostile_swift.py. Stdlib only; Python 3.6+.

``FakeSwift()`` serves ``GET /auth/v1.0`` (user ``test:tester``, key
``KEY``: ``X-Auth-Token``, ``X-Storage-Url`` ``<url>/v1/AUTH_test``) and,
under that account, containers created on demand: object PUT (with
``If-None-Match: *``: 412 when the name is taken; ``X-Object-Meta-*``
kept; the answer's ETag the body's MD5), a Static Large Object manifest
(``?multipart-manifest=put``: every segment must exist with its ETag and
size; ETag: the MD5 of the segments' ETags, quoted as Swift does), HEAD,
GET, DELETE (``?multipart-manifest=delete``: the manifest and its segments,
a JSON summary) and JSON listings (``prefix``, ``delimiter``, ``marker``,
``limit``). A token not handed out gets 401.

``hooks`` (functions ``hook(req)`` -> None or ``(status, headers,
payload)``, or the string ``"cut"``: the connection is closed without an
answer) are asked first, in order; ``req`` has ``method``, ``path``,
``query`` (dict), ``headers``, ``body``, ``container``, ``obj`` (None for a
container or auth request). ``requests`` records (method, container, obj,
query) of every request; ``objects`` is ``{(container, name): Obj}``.

    with FakeSwift() as swift:
        swift.hooks.append(lambda req: (401, {}, b"") if req.obj else None)
        block = swift.storage_block(prefix="p")
"""

import hashlib
import json
import socket
import threading
import urllib.parse

from support.harness import LoopbackServer

__all__ = ["FakeSwift", "Obj", "USER", "KEY", "ACCOUNT"]

USER, KEY, ACCOUNT = "test:tester", "hostile-swift-key-0123456789", "AUTH_test"


class Obj:
    """A stored object: its bytes, MD5 ETag, metadata headers, and the
    manifest's segment list for a Static Large Object (None otherwise)."""

    def __init__(self, data, meta, segments=None):
        self.data, self.meta, self.segments = data, meta, segments
        if segments is None:
            self.etag = hashlib.md5(data).hexdigest()
            self.size = len(data)
        else:
            self.etag = hashlib.md5("".join(s["etag"] for s in segments).encode()).hexdigest()
            self.size = sum(s["size_bytes"] for s in segments)


class Req:
    def __init__(self, method, path, query, headers, body, container, obj):
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.body, self.container, self.obj = body, container, obj


class FakeSwift(LoopbackServer):
    server_version = "hostile-swift"
    handler_timeout = 30
    close_connections = True

    def __init__(self, hooks=(), token_prefix="AUTH_tkhostile"):
        LoopbackServer.__init__(self)
        self.hooks = list(hooks)
        self.objects = {}
        self.requests = []
        self.tokens = []
        self.token_prefix = token_prefix
        self.lock = threading.RLock()

    # -- helpers for tests

    def storage_url(self):
        return "%s/v1/%s" % (self.url, ACCOUNT)

    def storage_block(self, container="snaps", **extra):
        block = {"auth_url": self.url + "/auth/v1.0", "container": container, "username": USER,
                 "password": KEY}
        block.update(extra)
        return {"swift_storage": block}

    def put(self, container, name, data=b"x", meta=None):
        with self.lock:
            self.objects[(container, name)] = Obj(data, dict(meta or {}))

    def names(self, container="snaps"):
        with self.lock:
            return sorted(n for c, n in self.objects if c == container)

    def count(self, method, obj_part=None, query_key=None):
        """Requests with ``method`` whose object name holds ``obj_part`` (and
        whose query has ``query_key``)."""
        with self.lock:
            return len([r for r in self.requests if r[0] == method
                        and (obj_part is None or (r[2] is not None and obj_part in r[2]))
                        and (query_key is None or query_key in r[3])])

    # -- serving

    def answer(self, handler):
        body = handler.read_body()
        parts = urllib.parse.urlsplit(handler.path)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        path = urllib.parse.unquote(parts.path)
        container = obj = None
        account_root = "/v1/%s/" % ACCOUNT
        if path.startswith(account_root):
            container, _, obj = path[len(account_root):].partition("/")
            obj = obj or None
        req = Req(handler.command, path, query, handler.headers, body, container, obj)
        with self.lock:
            self.requests.append((req.method, container, obj, query))
        for hook in list(self.hooks):
            result = hook(req)
            if result == "cut":
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
                raise ConnectionResetError("cut by the test")
            if result is not None:
                return result
        return self.serve(req)

    def login(self, req):
        if req.headers.get("X-Auth-User") != USER or req.headers.get("X-Auth-Key") != KEY:
            return 401, {}, b"<html><h1>Unauthorized</h1></html>"
        with self.lock:
            token = "%s%04d" % (self.token_prefix, len(self.tokens))
            self.tokens.append(token)
        return 200, {"X-Auth-Token": token, "X-Storage-Token": token,
                     "X-Storage-Url": self.storage_url(), "X-Auth-Token-Expires": "3600"}, b""

    def serve(self, req):
        if req.path.rstrip("/") == "/auth/v1.0":
            return self.login(req)
        if req.container is None:
            return 404, {}, b"Not Found"
        if req.headers.get("X-Auth-Token") not in self.tokens:
            return 401, {}, b"<html><h1>Unauthorized</h1><p>This server could not verify</p></html>"
        with self.lock:
            if req.obj is None:
                return self.listing(req)
            return self.object(req)

    def listing(self, req):
        if req.method != "GET":
            return 204, {}, b""
        prefix, delim = req.query.get("prefix", ""), req.query.get("delimiter")
        marker, limit = req.query.get("marker", ""), int(req.query.get("limit", "10000"))
        out, seen = [], set()
        for (container, name), item in sorted(self.objects.items()):
            if container != req.container or not name.startswith(prefix) or name <= marker:
                continue
            rest = name[len(prefix):]
            if delim and delim in rest:
                sub = prefix + rest.split(delim, 1)[0] + delim
                if sub not in seen and sub > marker:
                    seen.add(sub)
                    out.append({"subdir": sub})
            else:
                out.append({"name": name, "bytes": item.size, "hash": item.etag,
                            "content_type": "application/octet-stream",
                            "last_modified": "2026-01-01T00:00:00.000000"})
            if len(out) >= limit:
                break
        return 200, {"Content-Type": "application/json; charset=utf-8"}, out

    def object(self, req):
        key = (req.container, req.obj)
        item = self.objects.get(key)
        if req.method == "PUT":
            if req.headers.get("If-None-Match") == "*" and item is not None:
                return 412, {}, b"<html><h1>Precondition Failed</h1></html>"
            meta = dict((k, v) for k, v in req.headers.items() if k.lower().startswith("x-object-meta-"))
            if req.query.get("multipart-manifest") == "put":
                segments = json.loads(req.body.decode("utf-8"))
                stored = []
                for seg in segments:
                    c, _, n = seg["path"].lstrip("/").partition("/")
                    part = self.objects.get((c, n))
                    if part is None or part.etag != seg["etag"] or part.size != seg["size_bytes"]:
                        return 400, {}, b"Errors: bad segment %s" % seg["path"].encode()
                    stored.append(dict(seg))
                self.objects[key] = Obj(b"", meta, stored)
                return 201, {"Etag": '"%s"' % self.objects[key].etag}, b""
            self.objects[key] = Obj(req.body, meta)
            return 201, {"Etag": self.objects[key].etag}, b""
        if item is None:
            return 404, {}, b"<html><h1>Not Found</h1></html>"
        headers = dict(item.meta, **{"Etag": item.etag, "Content-Type": "application/octet-stream",
                                     "Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"})
        if item.segments is not None:
            headers["X-Static-Large-Object"] = "True"
        data = item.data if item.segments is None else b"".join(
            self.objects[tuple(s["path"].lstrip("/").split("/", 1))].data for s in item.segments)
        if req.method in ("HEAD", "GET"):     # HEAD: the harness sends Content-Length, no body
            return 200, headers, data
        if req.method == "DELETE":
            if req.query.get("multipart-manifest") == "delete":
                if item.segments is None:
                    return 200, {}, {"Number Deleted": 0, "Number Not Found": 0, "Response Status":
                                     "400 Bad Request", "Errors": [[req.path, "Not an SLO manifest"]]}
                for seg in item.segments:
                    c, _, n = seg["path"].lstrip("/").partition("/")
                    self.objects.pop((c, n), None)
                del self.objects[key]
                return 200, {}, {"Number Deleted": len(item.segments) + 1, "Errors": [],
                                 "Response Status": "200 OK"}
            del self.objects[key]
            return 204, {}, b""
        return 405, {}, b""
