"""Loopback stand-ins for the tests of the S3 upload path and the AWS
credential expiry rules: stores and services that answer as a broken or
lying server would.  Stdlib only; works on Python 3.6+.

* ``FakeS3`` -- an in-memory S3 bucket (path style, ``/snapshots/<key>``):
  PutObject, the multipart calls, HeadObject and an empty ListObjectsV2,
  honouring ``If-None-Match: *`` as S3 does (412 PreconditionFailed when
  the key exists; 409 ConditionalRequestConflict for ``conflicts`` answers).
  Its lies, set as attributes:

  - ``etag_lie``: a PutObject is stored, but answered with an ETag that is
    not the body's MD5 (and no checksum echo);
  - ``checksum_lie``: a PutObject echoes an ``x-amz-checksum-sha256`` that
    is not the one sent;
  - ``multipart_etag``: the ETag CompleteMultipartUpload answers (e.g.
    without the ``-N`` part count);
  - ``complete_fault``: ``"lost-answer"``: the first CompleteMultipartUpload
    creates the object, then answers 500 InternalError; the upload is gone,
    so a retry gets 404 NoSuchUpload.  ``"replaced"``: the same, but the
    object is then replaced by other bytes (another writer);
  - ``put_fault``: ``"lost-answer"``: the first PutObject stores the object
    and answers 500, so the retry (with If-None-Match) gets 412;
  - ``echo_checksum``: echo the checksum sent (as AWS does).

  Signatures are not checked (moto does that).  ``requests`` lists
  ``(method, path with query, headers dict)``; ``objects`` maps a key to its
  bytes.

* ``S3Front`` -- a forwarding proxy in front of a real S3 (moto) whose
  ``intercept(method, path)`` may answer a request itself, before or after
  forwarding it: returns None (forward), ``("answer", status, code)`` (do
  not forward) or ``("after", status, code)`` (forward, then answer that
  instead of the store's answer).  The Host header is kept, so SigV4
  signatures still verify.

* ``StsServer`` -- STS AssumeRole and AssumeRoleWithWebIdentity answering
  with ``expiration`` (any text) as the credentials' Expiration.
"""

import base64
import hashlib
import http.client
import re
import threading
from urllib.parse import parse_qs, unquote, urlsplit

from support.harness import LoopbackServer

__all__ = ["FakeS3", "S3Front", "StsServer", "BUCKET"]

BUCKET = "snapshots"
XML = {"Content-Type": "application/xml"}


def _error(status, code, message="injected by aws_fakes"):
    return status, XML, ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>%s</Code>"
                         "<Message>%s</Message></Error>" % (code, message))


def md5_hex(data):
    return hashlib.md5(data).hexdigest()


def multipart_etag(parts):
    """S3's ETag of a multipart object: MD5 of the parts' binary MD5s, -N."""
    joined = b"".join(hashlib.md5(p).digest() for p in parts)
    return "%s-%d" % (hashlib.md5(joined).hexdigest(), len(parts))


class FakeS3(LoopbackServer):
    """An in-memory S3 bucket with the lies of the module docstring."""

    server_version = "fake-s3"

    def __init__(self):
        LoopbackServer.__init__(self)
        self.objects = {}          # key -> bytes
        self.etags = {}            # key -> ETag without quotes
        self.uploads = {}          # upload id -> {part number: bytes}
        self.requests = []
        self.etag_lie = self.checksum_lie = self.echo_checksum = False
        self.multipart_etag = None
        self.complete_fault = self.put_fault = None
        self.conflicts = 0          # answer that many conditional writes with 409
        self.head_refused = False   # HeadObject is 403 (credentials that may write, not read)
        self._lock = threading.Lock()
        self._next_upload = 0

    def storage_block(self, **extra):
        """An ``aws_storage`` block for this bucket (static keys, path style)."""
        block = {"access_key_id": "AKIDFAKES3", "secret_access_key": "fake-s3-secret",
                 "s3_endpoint": self.url, "s3_region": "us-east-1", "s3_bucket": BUCKET}
        block.update(extra)
        return block

    def count(self, method, query_word=None):
        return len([r for r in self.requests if r[0] == method
                    and (query_word is None or query_word in r[1].partition("?")[2])])

    def answer(self, handler):
        body = handler.read_body()
        parts = urlsplit(handler.path)
        query = dict((k, v[-1]) for k, v in parse_qs(parts.query, keep_blank_values=True).items())
        headers = dict((k.lower(), v) for k, v in handler.headers.items())
        key = unquote(parts.path).lstrip("/").partition("/")[2]
        with self._lock:
            self.requests.append((handler.command, handler.path, headers))
            return self._route(handler.command, key, query, headers, body)

    def _route(self, method, key, query, headers, body):
        if method == "GET" and "list-type" in query:
            return 200, XML, ("<ListBucketResult><Name>%s</Name><IsTruncated>false</IsTruncated>"
                              "</ListBucketResult>" % BUCKET)
        if method == "HEAD":
            if self.head_refused:
                return 403, {}, b""
            if key not in self.objects:
                return 404, {}, b""
            return 200, {"ETag": '"%s"' % self.etags[key]}, self.objects[key]
        if method == "PUT" and "partNumber" in query:
            self.uploads[query["uploadId"]][int(query["partNumber"])] = body
            return 200, {"ETag": '"%s"' % md5_hex(body)}, b""
        if method == "PUT":
            return self._put(key, headers, body)
        if method == "POST" and "uploads" in query:
            self._next_upload += 1
            upload = "upload-%d" % self._next_upload
            self.uploads[upload] = {}
            return 200, XML, ("<InitiateMultipartUploadResult><Key>%s</Key><UploadId>%s</UploadId>"
                              "</InitiateMultipartUploadResult>" % (key, upload))
        if method == "POST" and "uploadId" in query:
            return self._complete(key, query["uploadId"], headers, body)
        if method == "DELETE" and "uploadId" in query:
            self.uploads.pop(query["uploadId"], None)
            return 204, {}, b""
        return _error(400, "NotImplemented", "fake S3 does not do %s" % method)

    def _precondition(self, key, headers):
        """The answer to a conditional write that may not go on, or None."""
        if headers.get("if-none-match") != "*":
            return None
        if self.conflicts:
            self.conflicts -= 1
            return _error(409, "ConditionalRequestConflict", "A conflicting conditional operation "
                                                             "is currently in progress")
        if key in self.objects:
            return _error(412, "PreconditionFailed", "At least one of the pre-conditions you "
                                                     "specified did not hold")
        return None

    def _put(self, key, headers, body):
        refused = self._precondition(key, headers)
        if refused is not None:
            return refused
        self.objects[key], self.etags[key] = body, md5_hex(body)
        if self.put_fault == "lost-answer":
            self.put_fault = None
            return _error(500, "InternalError")
        answer = {"ETag": '"%s"' % (md5_hex(body + b"lie") if self.etag_lie else md5_hex(body))}
        sent = headers.get("x-amz-checksum-sha256")
        if sent and self.checksum_lie:
            answer["x-amz-checksum-sha256"] = base64.b64encode(
                hashlib.sha256(body + b"lie").digest()).decode("ascii")
        elif sent and self.echo_checksum:
            answer["x-amz-checksum-sha256"] = sent
        return 200, answer, b""

    def _complete(self, key, upload, headers, body):
        if upload not in self.uploads:
            return _error(404, "NoSuchUpload", "The specified upload does not exist")
        refused = self._precondition(key, headers)
        if refused is not None:
            return refused
        numbers = [int(n) for n in re.findall(rb"<PartNumber>(\d+)</PartNumber>", body)]
        pieces = [self.uploads[upload][n] for n in numbers]
        del self.uploads[upload]
        self.objects[key], self.etags[key] = b"".join(pieces), multipart_etag(pieces)
        fault, self.complete_fault = self.complete_fault, None
        if fault == "replaced":
            self.objects[key] = b"other bytes"
            self.etags[key] = md5_hex(b"other bytes")
        if fault:
            return _error(500, "InternalError")
        return 200, XML, ("<CompleteMultipartUploadResult><Key>%s</Key><ETag>&quot;%s&quot;</ETag>"
                          "</CompleteMultipartUploadResult>" % (
                              key, self.etags[key] if self.multipart_etag is None else self.multipart_etag))


class S3Front(LoopbackServer):
    """Forward to ``target`` (``http://127.0.0.1:PORT``) unless ``intercept``
    says otherwise (see the module docstring)."""

    server_version = "s3-front"

    def __init__(self, target, intercept):
        LoopbackServer.__init__(self)
        self.target = urlsplit(target)
        self.intercept = intercept
        self.seen = []

    def answer(self, handler):
        body = handler.read_body()
        self.seen.append((handler.command, handler.path))
        plan = self.intercept(handler.command, handler.path)
        if plan is not None and plan[0] == "answer":
            return _error(plan[1], plan[2])
        conn = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=30)
        try:
            conn.request(handler.command, handler.path, body or None, dict(handler.headers.items()))
            resp = conn.getresponse()
            data = resp.read()
            headers = dict((k, v) for k, v in resp.getheaders()
                           if k.lower() not in ("content-length", "connection", "transfer-encoding",
                                                "server", "date"))
        finally:
            conn.close()
        if plan is not None:
            return _error(plan[1], plan[2])
        if handler.command == "HEAD":        # the handler sends len(payload) as Content-Length
            data = bytes(int(resp.getheader("Content-Length") or 0))
        return resp.status, headers, data


class StsServer(LoopbackServer):
    """STS AssumeRole / AssumeRoleWithWebIdentity answering credentials
    whose Expiration is ``expiration`` (text, as STS writes it)."""

    def __init__(self, expiration):
        LoopbackServer.__init__(self)
        self.expiration = expiration
        self.calls = 0

    def answer(self, handler):
        form = parse_qs(handler.read_body().decode("utf-8", "replace"))
        action = form.get("Action", [""])[-1]
        self.calls += 1
        return 200, {"Content-Type": "text/xml"}, (
            "<%sResponse><%sResult><Credentials><AccessKeyId>ASIASTS%d</AccessKeyId>"
            "<SecretAccessKey>sts-secret</SecretAccessKey><SessionToken>sts-token</SessionToken>"
            "<Expiration>%s</Expiration></Credentials></%sResult></%sResponse>"
            % (action, action, self.calls, self.expiration, action, action))
