"""A path-style S3 bucket in memory, on a loopback port, for unit tests of
retention and of the schedule (no moto needed): PUT and GET of an object,
ListObjectsV2 (one page), DeleteObjects. Signatures are not checked. Every
request is recorded (fake_endpoints.Endpoint). Stdlib only; Python 3.6+.

    with FakeS3({"raft_snapshots/a.snap": b"..."}) as s3:
        block = s3.storage_block(s3_key_prefix="raft_snapshots")
        ... s3.objects ... s3.deletes() ... s3.paths("GET") ...

``FakeS3(put_status=403)`` refuses every PUT with AccessDenied (a bucket
policy that denies writes).
"""

import re
import urllib.parse

from support.fake_endpoints import Endpoint

__all__ = ["BUCKET", "FakeS3"]

BUCKET = "snapshots"


class FakeS3(Endpoint):
    """Bucket ``BUCKET``; ``objects``: key -> bytes."""

    def __init__(self, objects=None, put_status=200):
        Endpoint.__init__(self)
        self.objects = dict(objects or {})
        self.put_status = put_status

    def storage_block(self, **extra):
        """An ``aws_storage`` block for this server (static keys, path style)."""
        block = {"access_key_id": "AKIDFAKES3TEST", "secret_access_key": "fake-s3-test-secret",
                 "s3_endpoint": self.url, "s3_region": "us-east-1", "s3_bucket": BUCKET}
        block.update(extra)
        return block

    def respond(self, request):
        parts = urllib.parse.urlsplit(request.path)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        bucket, _, key = urllib.parse.unquote(parts.path).lstrip("/").partition("/")
        if bucket != BUCKET:
            return 404, {}, b"<Error><Code>NoSuchBucket</Code></Error>"
        if request.method == "PUT" and key:
            return self._put(key, request.body)
        if request.method == "GET" and not key and query.get("list-type") == "2":
            return self._list(query.get("prefix", ""))
        if request.method == "GET" and key:
            with self.lock:
                data = self.objects.get(key)
            if data is None:
                return 404, {}, b"<Error><Code>NoSuchKey</Code></Error>"
            return 200, {"Content-Type": "application/octet-stream"}, data
        if request.method == "POST" and "delete" in query:
            return self._delete(request.body.decode("utf-8"))
        return 501, {}, b"<Error><Code>NotImplemented</Code></Error>"

    def _put(self, key, body):
        if self.put_status != 200:
            return self.put_status, {"Content-Type": "application/xml"}, (
                "<Error><Code>AccessDenied</Code><Message>fake S3 refuses PUT</Message></Error>")
        with self.lock:
            self.objects[key] = body
        import hashlib
        return 200, {"ETag": '"%s"' % hashlib.md5(body).hexdigest()}, b""

    def _list(self, prefix):
        with self.lock:
            keys = sorted(k for k in self.objects if k.startswith(prefix))
            items = "".join("<Contents><Key>%s</Key><Size>%d</Size></Contents>"
                            % (k, len(self.objects[k])) for k in keys)
        return 200, {"Content-Type": "application/xml"}, (
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>"
            "<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>%s</Name>"
            "<Prefix>%s</Prefix><KeyCount>%d</KeyCount><IsTruncated>false</IsTruncated>%s"
            "</ListBucketResult>" % (BUCKET, prefix, len(keys), items))

    def _delete(self, body):
        keys = re.findall(r"<Key>([^<]*)</Key>", body)
        with self.lock:
            for key in keys:
                self.objects.pop(key, None)
        return 200, {"Content-Type": "application/xml"}, (
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><DeleteResult></DeleteResult>")

    def deletes(self):
        """The DeleteObjects requests received."""
        with self.lock:
            return [r for r in self.requests if r.method == "POST" and "delete" in r.path]

    def paths(self, method):
        """The (unquoted) paths of the ``method`` requests received, in order."""
        with self.lock:
            return [urllib.parse.unquote(r.path.split("?", 1)[0]) for r in self.requests
                    if r.method == method]
