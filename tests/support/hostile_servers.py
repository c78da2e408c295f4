"""Loopback servers that answer as an attacker (or a badly broken store)
would, for the tests of hostile storage listings and uploads
(test_hostile_listings.py) and for measuring the agent against them.
Stdlib only; works on Python 3.6+.

* ``S3ListServer``, ``AzureListServer``, ``GcsListServer``: a bucket or
  container listing.  ``mode`` picks the attack:

  - ``"repeat"``: every page says "more" and hands back the same
    continuation token (S3 ``NextContinuationToken``, Azure ``NextMarker``,
    GCS ``nextPageToken``): a client that trusts it lists forever;
  - ``"endless"``: every page says "more" with a NEW token (``delay``
    seconds per page makes it a slow, never-ending listing);
  - ``"odd_size"``: one page whose sizes are not integers (S3
    ``<Size>1.5e3</Size>``, Azure ``Content-Length`` ``x``, GCS
    ``"size": "x"``) next to one normal object.

  Each page carries ``page_keys`` snapshot names (from 2020, so in the past).
* ``GcsStuckSession``: a GCS resumable upload whose session answers every
  chunk (and every status query) with ``308`` and ``Range: bytes=0-0``: it
  never makes progress.

(The Vault side of a cycle without a cluster is fake_endpoints.FakeVault.
These servers share harness.LoopbackServer with it, but not its request
log: they must not keep request bodies -- a measurement sends thousands of
1 MiB chunks, read and dropped past the first 64 KiB -- and need per-kind
counts, a delay and a limit.)

Each server binds 127.0.0.1 on a free port, serves from a daemon thread
(one request per connection) and counts the requests it saw by kind
(``count("list")``, ``count("chunk")`` ...).  ``limit`` ends an attack after
that many requests of its main kind (``list`` or ``chunk``) with a
non-retryable ``403``, so a test run against an agent that would never stop
on its own fails instead of hanging; None:
the attack goes on for ever (for measurements, with a kill timer).

    with S3ListServer("repeat", limit=300) as s3:
        block = s3.storage_block()           # "aws_storage" config block
        ...
        assert s3.count("list") <= 3
"""

import base64
import collections
import datetime
import threading
import time
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape as xml_escape

from support.harness import LoopbackServer

__all__ = ["HostileServer", "S3ListServer", "AzureListServer", "GcsListServer",
           "GcsStuckSession", "snapshot_names", "BUCKET"]

BUCKET = "snapshots"            # S3 bucket, Azure container, GCS bucket
AZURE_ACCOUNT = "devstoreaccount1"
AZURE_KEY = base64.b64encode(b"hostile-servers-test-key-not-a-secret").decode("ascii")
PAST = datetime.datetime(2020, 1, 1)


def snapshot_names(start, count):
    """``count`` snapshot names (the agent's own style) one minute apart, the
    first ``start`` minutes after 2020-01-01 (always in the past)."""
    names = []
    for number in range(start, start + count):
        when = PAST + datetime.timedelta(minutes=number)
        names.append("raft_snapshot-%s.000Z.snap" % when.strftime("%Y%m%dT%H%M%S"))
    return names


class HostileServer(LoopbackServer):
    """Counting and the ``limit`` of every server here (lifecycle from
    harness.LoopbackServer); subclasses implement ``respond(method, path,
    query, headers, body)`` returning ``(kind, status, headers, payload)``.
    A request body is read and dropped past its first 64 KiB."""

    main_kind = "list"
    server_version = "hostile-test-server"
    close_connections = True
    BODY_KEPT = 64 * 1024

    def __init__(self, limit=None, delay=0.0):
        LoopbackServer.__init__(self)
        self.limit = limit
        self.delay = delay
        self.counts = collections.Counter()
        self.recent = collections.deque(maxlen=50)     # (kind, method, path), newest last
        self._lock = threading.Lock()

    endpoint = LoopbackServer.url          # ``http://127.0.0.1:PORT`` (no trailing slash)

    def answer(self, handler):
        body = handler.read_body(keep=self.BODY_KEPT)     # chunk bodies: counted, dropped
        parts = urlsplit(handler.path)
        query = dict((k, v[-1]) for k, v in parse_qs(parts.query, keep_blank_values=True).items())
        kind, status, headers, payload = self.respond(handler.command, parts.path, query,
                                                      handler.headers, body)
        self._record(kind, handler.command, handler.path)
        delay = self.delay if kind == self.main_kind else 0.0
        if delay:
            time.sleep(delay)
        return status, headers, payload

    def _record(self, kind, method, path):
        with self._lock:
            self.counts[kind] += 1
            self.recent.append((kind, method, path))

    def count(self, kind=None):
        """Requests seen of ``kind`` (all kinds when None)."""
        with self._lock:
            return self.counts[kind] if kind is not None else sum(self.counts.values())

    def _limit_reached(self, kind):
        """True once ``limit`` requests of ``kind`` were answered already."""
        with self._lock:
            return self.limit is not None and self.counts[kind] >= self.limit

    def respond(self, method, path, query, headers, body):  # pragma: no cover - overridden
        raise NotImplementedError


class _ListServer(HostileServer):
    """A listing attack (see the module docstring for ``mode``)."""

    MODES = ("repeat", "endless", "odd_size")

    def __init__(self, mode, page_keys=5, limit=None, delay=0.0):
        if mode not in self.MODES:
            raise ValueError("mode must be one of %s" % ", ".join(self.MODES))
        HostileServer.__init__(self, limit, delay)
        self.mode = mode
        self.page_keys = page_keys
        self._pages = 0

    def page(self):
        """(names on this page, next token or None, odd-size name or None)."""
        with self._lock:
            number = self._pages
            self._pages += 1
        if self.mode == "odd_size":
            return snapshot_names(0, 2), None, snapshot_names(0, 1)[0]
        names = snapshot_names((number * self.page_keys) % 500000, self.page_keys)
        token = "same-token-again" if self.mode == "repeat" else "token-%d" % (number + 1)
        return names, token, None

    def respond(self, method, path, query, headers, body):
        if not self.is_list(method, path, query):
            return "other", 404, {}, b""
        if self._limit_reached("list"):
            return ("list",) + self.refuse()
        names, token, odd = self.page()
        return ("list", 200) + self.render(names, token, odd)


class S3ListServer(_ListServer):
    """ListObjectsV2 (path style: ``GET /snapshots?list-type=2``)."""

    prefix = "raft_snapshots/"

    def is_list(self, method, path, query):
        return method == "GET" and path.strip("/") == BUCKET and query.get("list-type") == "2"

    def refuse(self):
        return 403, {"Content-Type": "application/xml"}, (
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code>"
            "<Message>hostile test server: limit of %s pages reached</Message></Error>" % self.limit)

    def render(self, names, token, odd):
        items = "".join("<Contents><Key>%s</Key><LastModified>2020-01-01T00:00:00.000Z</LastModified>"
                        "<Size>%s</Size><StorageClass>STANDARD</StorageClass></Contents>"
                        % (xml_escape(self.prefix + name), "1.5e3" if name == odd else "2048")
                        for name in names)
        more = ("<IsTruncated>true</IsTruncated><NextContinuationToken>%s</NextContinuationToken>"
                % token) if token else "<IsTruncated>false</IsTruncated>"
        return {"Content-Type": "application/xml"}, (
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>"
            "<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
            "<Name>%s</Name><Prefix>%s</Prefix><KeyCount>%d</KeyCount><MaxKeys>1000</MaxKeys>"
            "%s%s</ListBucketResult>" % (BUCKET, self.prefix, len(names), items, more))

    def storage_block(self, **extra):
        """An ``aws_storage`` block for this server (static keys, path style)."""
        block = {"access_key_id": "AKIDHOSTILETEST", "secret_access_key": "hostile-test-secret",
                 "s3_endpoint": self.endpoint, "s3_region": "us-east-1", "s3_bucket": BUCKET}
        block.update(extra)
        return {"aws_storage": block}


class AzureListServer(_ListServer):
    """List Blobs (``GET /devstoreaccount1/snapshots?restype=container&comp=list``)."""

    def is_list(self, method, path, query):
        return (method == "GET" and path.strip("/") == "%s/%s" % (AZURE_ACCOUNT, BUCKET)
                and query.get("comp") == "list")

    def refuse(self):
        return 403, {"Content-Type": "application/xml", "x-ms-error-code": "AuthorizationFailure"}, (
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthorizationFailure</Code>"
            "<Message>hostile test server: limit of %s pages reached</Message></Error>" % self.limit)

    def render(self, names, token, odd):
        items = "".join("<Blob><Name>%s</Name><Properties><Content-Length>%s</Content-Length>"
                        "<BlobType>BlockBlob</BlobType></Properties></Blob>"
                        % (xml_escape(name), "x" if name == odd else "2048") for name in names)
        return {"Content-Type": "application/xml"}, (
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults ServiceEndpoint=\"%s/%s/\" "
            "ContainerName=\"%s\"><MaxResults>5000</MaxResults><Blobs>%s</Blobs>"
            "<NextMarker>%s</NextMarker></EnumerationResults>"
            % (self.endpoint, AZURE_ACCOUNT, BUCKET, items, token or ""))

    def storage_block(self, **extra):
        """An ``azure_storage`` block (Shared Key, path-style endpoint as for Azurite)."""
        block = {"account_name": AZURE_ACCOUNT, "account_key": AZURE_KEY,
                 "container_name": BUCKET, "endpoint": "%s/%s" % (self.endpoint, AZURE_ACCOUNT)}
        block.update(extra)
        return {"azure_storage": block}


class GcsListServer(_ListServer):
    """objects.list of the JSON API (``GET /storage/v1/b/snapshots/o``)."""

    def is_list(self, method, path, query):
        return method == "GET" and path.rstrip("/") == "/storage/v1/b/%s/o" % BUCKET

    def refuse(self):
        return 403, {"Content-Type": "application/json"}, {"error": {
            "code": 403, "message": "hostile test server: limit of %s pages reached" % self.limit,
            "errors": [{"reason": "forbidden"}]}}

    def render(self, names, token, odd):
        page = {"kind": "storage#objects",
                "items": [{"kind": "storage#object", "bucket": BUCKET, "name": name,
                           "size": "x" if name == odd else "2048"} for name in names]}
        if token:
            page["nextPageToken"] = token
        return {"Content-Type": "application/json"}, page

    def storage_block(self, **extra):
        """A ``google_storage`` block (emulator style: endpoint, anonymous)."""
        block = {"bucket": BUCKET, "endpoint": self.endpoint, "anonymous": True}
        block.update(extra)
        return {"google_storage": block}


class GcsStuckSession(HostileServer):
    """A GCS bucket whose resumable sessions never make progress.

    ``POST /upload/storage/v1/b/snapshots/o?uploadType=resumable`` opens a
    session (kind ``start``); every chunk ``PUT`` to it (kind ``chunk``) and
    every status query (``Content-Range: bytes */N``, kind ``status``) is
    answered ``308`` with ``Range: bytes=0-0``.  ``DELETE`` (kind ``cancel``)
    gets 499 as from GCS.  A simple upload (kind ``simple``) is refused, and
    listings (kind ``list``) are empty.
    """

    main_kind = "chunk"

    def respond(self, method, path, query, headers, body):
        upload_path = "/upload/storage/v1/b/%s/o" % BUCKET
        if path.rstrip("/") == "/storage/v1/b/%s/o" % BUCKET and method == "GET":
            return "list", 200, {"Content-Type": "application/json"}, {"kind": "storage#objects"}
        if path != upload_path:
            return "other", 404, {}, b""
        if method == "POST" and query.get("uploadType") == "resumable":
            location = "%s%s?uploadType=resumable&upload_id=stuck-%d" % (
                self.endpoint, upload_path, self.count("start") + 1)
            return "start", 200, {"Location": location}, b""
        if method == "POST":
            return "simple", 400, {"Content-Type": "application/json"}, {"error": {
                "code": 400, "message": "hostile test server: resumable uploads only",
                "errors": [{"reason": "invalid"}]}}
        if method == "DELETE":
            return "cancel", 499, {}, b""
        if method == "PUT" and "upload_id" in query:
            content_range = headers.get("Content-Range") or ""
            kind = "status" if content_range.startswith("bytes */") else "chunk"
            if kind == "chunk" and self._limit_reached("chunk"):
                return "chunk", 403, {"Content-Type": "application/json"}, {"error": {
                    "code": 403, "message": "hostile test server: limit of %s chunks reached"
                    % self.limit, "errors": [{"reason": "forbidden"}]}}
            return kind, 308, {"Range": "bytes=0-0"}, b""
        return "other", 404, {}, b""

    def storage_block(self, **extra):
        """A ``google_storage`` block (emulator style, 1 MiB chunks)."""
        block = {"bucket": BUCKET, "endpoint": self.endpoint, "anonymous": True,
                 "chunk_size_mb": 1}
        block.update(extra)
        return {"google_storage": block}
