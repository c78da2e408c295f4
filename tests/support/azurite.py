"""Run Azurite's Blob service (Microsoft's Azure Storage emulator, an npm
package) on loopback for the Azure Blob storage tests, and talk to it with a
small Shared Key / SAS client of our own.

Stdlib only; works on Python 3.6+.  Node.js and the npm package are needed
only to *run* Azurite: ``python tests/support/azurite.py install .venv/azurite``
(= ``npm install --prefix .venv/azurite azurite@AZURITE_VERSION``).

Typical use::

    az = Azurite("/tmp/somewhere").start()   # azurite-blob on 127.0.0.1:<free>
    az.create_container("snapshots")
    az.put_blob("snapshots", "a/b.snap", b"data")
    assert az.get_blob("snapshots", "a/b.snap") == b"data"
    az.list_blobs("snapshots", prefix="a/")  # [{"name":..., "size":...}, ...]
    sas = az.make_sas("snapshots")           # "sv=...&sr=c&sp=racwdl&se=...&sig=..."
    az.stop()                                # by PID (process group); idempotent; at exit

Facts relied on
---------------

Shared Key -- "Authorize with Shared Key", Azure Storage REST reference
(learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key)::

    StringToSign = VERB + "\\n" + Content-Encoding + "\\n" + Content-Language
                   + "\\n" + Content-Length + "\\n" + Content-MD5 + "\\n"
                   + Content-Type + "\\n" + Date + "\\n" + If-Modified-Since
                   + "\\n" + If-Match + "\\n" + If-None-Match + "\\n"
                   + If-Unmodified-Since + "\\n" + Range + "\\n"
                   + CanonicalizedHeaders + CanonicalizedResource
    Authorization = "SharedKey <account>:" + Base64(HMAC-SHA256(Base64Decode(key), UTF-8(StringToSign)))

  - Content-Length is the empty string when it is zero (version 2015-02-21+);
    a header that is absent is the empty string; Date is empty when
    ``x-ms-date`` is sent;
  - CanonicalizedHeaders: every ``x-ms-*`` header, name lower-cased, sorted by
    name, linear whitespace in the value replaced by one space, no space
    around the colon, each followed by "\\n";
  - CanonicalizedResource: "/" + account + the encoded URI path, then for
    each query parameter (names lower-cased, sorted) "\\n" + name + ":" +
    URL-decoded value (several values: sorted, comma-separated);
  - the document's own example, for a path-style (emulator / IP) URL, is
    ``/myaccount/myaccount/mycontainer\\ncomp:metadata\\nrestype:container\\ntimeout:20``:
    the account appears twice, once as the signing account and once as the
    first path segment.  Azurite does exactly that (``"/" + account +
    req.path``, dist/src/blob/authentication/BlobSharedKeyAuthenticator.js).

Service SAS -- "Create a service SAS" (.../create-service-sas), versions
2020-12-06 and later: the string to sign is these 16 fields joined by "\\n"
(no trailing newline): sp, st, se, canonicalizedResource
(``/blob/<account>/<container>[/<blob>]``), si, sip, spr, sv, sr, snapshot
time, ses (encryption scope), rscc, rscd, rsce, rscl, rsct; ``sig`` is
Base64(HMAC-SHA256(key, it)).  Azurite computes the same
(IBlobSASSignatureValues.js, generateBlobSASSignature20201206).

Azurite facts (3.37.0; checked by tests/test_azure_fixtures.py and by
reading its dist/ sources):

  - the well-known account ``devstoreaccount1`` and its key are public
    ("Use the Azurite emulator", Microsoft docs); ``AZURITE_ACCOUNTS``
    ("name:key1[:key2];...") *replaces* the account list;
  - Shared Key and SAS signatures are really checked: a wrong key, a
    tampered ``sig`` or an expired SAS gets 403 ``AuthorizationFailure``
    (real Azure says ``AuthenticationFailed`` for a bad signature: match on
    the status, not the code); a SAS lacking the permission gets 403
    ``AuthorizationPermissionMismatch``; anonymous requests get 403
    ``AuthorizationFailure``;
  - a host name containing a dot that is not an IP (e.g.
    ``devstoreaccount1.blob.localhost:PORT``) selects the production URL form:
    the account comes from the host and the path is ``/container/blob``;
    the canonicalized resource is then ``/devstoreaccount1/container/blob``;
  - Bearer tokens are accepted only with ``--oauth basic`` *and* HTTPS
    (``--cert``/``--key``; ``Azurite(https=True)`` makes a self-signed cert
    with the openssl CLI); over HTTP they get 403 ``AuthenticationFailed``
    with <AuthenticationErrorDetail> "Authentication scheme Bearer is not
    allowed with HTTP."; without ``--oauth`` a Bearer header is just an
    unauthenticated request (403 ``AuthorizationFailure``).  Rejected
    tokens get 403 ``AuthenticationFailed`` (no WWW-Authenticate
    challenge).  "basic" decodes the JWT without
    checking its signature and checks: ``iat``/``nbf``/``exp`` present,
    ``nbf <= now <= exp``, ``iss`` starting with ``https://sts.windows.net/``
    (or the other national-cloud STS prefixes), ``aud`` one of
    ``https://storage.azure.com[/]``, ``e406a681-f3d4-42a8-90b6-c2b029497af1``
    or ``https://<account>.blob.core.windows.net[/]``;
  - Put Block (and Put Blob) with a wrong ``Content-MD5`` gets 400
    ``Md5Mismatch``;
  - List Blobs honours ``maxresults`` and returns ``NextMarker`` (Azurite's
    marker is the last name returned; real Azure's is opaque);
  - Get Block List (blocklisttype=all) of a blob that has only uncommitted
    blocks answers 200 with them, although Get Blob Properties says 404;
  - responses carry ``x-ms-version: 2026-06-06`` whatever was asked; request
    versions it does not know get 400 unless ``--skipApiVersionCheck``.
"""

import base64
import collections
import datetime
import email.utils
import hashlib
import hmac
import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote, unquote

if not __package__:      # run as a script (python tests/support/azurite.py): tests/ on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support.harness import ServerProcess, child_env

__all__ = [
    "Azurite", "AzuriteError", "AzureResponse", "find_azurite", "install_azurite",
    "AZURITE_VERSION", "ACCOUNT", "ACCOUNT_KEY", "API_VERSION", "SAS_VERSION",
    "string_to_sign", "canonicalized_headers", "canonicalized_resource",
    "sign", "shared_key_authorization", "service_sas_string_to_sign",
    "service_sas", "sas_time", "make_self_signed_cert",
]

AZURITE_VERSION = "3.37.0"
ACCOUNT = "devstoreaccount1"
# Azurite's (and the old Storage Emulator's) well-known, publicly documented key.
ACCOUNT_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
               "K1SZFPTOtr/KBHBeksoGMGw==")
API_VERSION = "2021-08-06"      # x-ms-version the helpers send
SAS_VERSION = "2021-08-06"      # sv of the SAS tokens make_sas() builds
DEFAULT_START_TIMEOUT = 30.0
BIN_NAME = "azurite-blob"

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_DIR = os.path.dirname(TESTS_DIR)
DEFAULT_PREFIX = os.path.join(ROOT_DIR, ".venv", "azurite")

_SIGNED_HEADERS = ("content-encoding", "content-language", "content-length",
                   "content-md5", "content-type", "date", "if-modified-since",
                   "if-match", "if-none-match", "if-unmodified-since", "range")


class AzuriteError(RuntimeError):
    """Azurite missing / did not start, or a helper request failed."""

    def __init__(self, message, response=None):
        RuntimeError.__init__(self, message)
        self.response = response


# ------------------------------------------------------------- finding it


def _bin_in(prefix):
    return os.path.join(prefix, "node_modules", ".bin", BIN_NAME)


def find_azurite(path=None):
    """Path of ``azurite-blob``: explicit, ``$AZURITE_DIR/node_modules/.bin``,
    ``<repo>/.venv/azurite/node_modules/.bin``, then PATH."""
    if path:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
        raise AzuriteError("azurite-blob not found or not executable: %s" % path)
    candidates = []
    if os.environ.get("AZURITE_DIR"):
        candidates.append(_bin_in(os.environ["AZURITE_DIR"]))
    candidates.append(_bin_in(DEFAULT_PREFIX))
    candidates.append(shutil.which(BIN_NAME))
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise AzuriteError("azurite-blob not found (python tests/support/azurite.py install .venv/azurite)")


def installed_version(prefix):
    """Version of the azurite package under ``prefix`` or None."""
    import json
    try:
        with open(os.path.join(prefix, "node_modules", "azurite", "package.json")) as fh:
            return json.load(fh).get("version")
    except (IOError, OSError, ValueError):
        return None


def install_azurite(prefix=DEFAULT_PREFIX, version=AZURITE_VERSION, force=False):
    """``npm install --prefix PREFIX azurite@VERSION --no-audit --no-fund``
    (skipped when that version is already there); returns the binary path."""
    prefix = os.path.abspath(prefix)
    if not force and installed_version(prefix) == version and os.path.exists(_bin_in(prefix)):
        return _bin_in(prefix)
    npm = shutil.which("npm")
    if npm is None:
        raise AzuriteError("npm not found: Node.js (with npm) is needed to install Azurite")
    if not os.path.isdir(prefix):
        os.makedirs(prefix)
    cmd = [npm, "install", "--prefix", prefix, "azurite@%s" % version,
           "--no-audit", "--no-fund"]
    rc = subprocess.call(cmd)
    if rc != 0:
        raise AzuriteError("%s failed with exit status %d" % (" ".join(cmd), rc))
    return _bin_in(prefix)


# ------------------------------------------------------- Shared Key and SAS


def _as_pairs(query):
    if not query:
        return []
    if isinstance(query, dict):
        return list(query.items())
    return list(query)


def canonicalized_headers(headers):
    """``x-ms-*`` headers, lower-cased, sorted, "name:value\\n" each."""
    out = {}
    for name, value in _as_pairs(headers):
        lname = name.strip().lower()
        if not lname.startswith("x-ms-"):
            continue
        value = re.sub(r"\s+", " ", str(value).strip())
        out[lname] = value if lname not in out else out[lname] + "," + value
    return "".join("%s:%s\n" % (name, out[name]) for name in sorted(out))


def canonicalized_resource(account, path, query=None):
    """``/account`` + the encoded request path, then "\\nname:value" for each
    query parameter (decoded values, names lower-cased and sorted; several
    values for one name sorted and comma-joined).  ``path`` is exactly what
    goes on the wire, so for a path-style URL it starts with the account."""
    groups = collections.defaultdict(list)
    for name, value in _as_pairs(query):
        groups[name.lower()].append(unquote(str(value)))
    out = "/" + account + (path or "/")
    for name in sorted(groups):
        out += "\n%s:%s" % (name, ",".join(sorted(groups[name])))
    return out


def string_to_sign(method, account, path, query=None, headers=None):
    """The Shared Key (Blob service, version 2009-09-19+) string to sign."""
    lower = {}
    for name, value in _as_pairs(headers):
        lower[name.lower()] = str(value)
    fields = [method.upper()]
    for name in _SIGNED_HEADERS:
        value = lower.get(name, "")
        if name == "content-length" and value == "0":
            value = ""
        fields.append(value)
    return ("\n".join(fields) + "\n" + canonicalized_headers(headers)
            + canonicalized_resource(account, path, query))


def sign(key, text):
    """Base64(HMAC-SHA256(Base64Decode(key), UTF-8(text)))."""
    digest = hmac.new(base64.b64decode(key), text.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def shared_key_authorization(account, key, method, path, query=None, headers=None):
    """``Authorization`` header value: "SharedKey account:signature"."""
    return "SharedKey %s:%s" % (account, sign(key, string_to_sign(method, account, path,
                                                                   query, headers)))


def sas_time(value):
    """``datetime`` (naive = UTC) / seconds from now (int/float) / string ->
    "YYYY-MM-DDTHH:MM:SSZ"."""
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        value = (datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                 + datetime.timedelta(seconds=value))
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def service_sas_string_to_sign(account, container, blob=None, permissions="",
                               start="", expiry="", identifier="", ip="",
                               protocol="", version=SAS_VERSION, resource=None,
                               snapshot="", encryption_scope="", cache_control="",
                               content_disposition="", content_encoding="",
                               content_language="", content_type=""):
    """Service SAS string to sign, version 2020-12-06 and later (16 fields)."""
    if resource is None:
        resource = "b" if blob else "c"
    canon = "/blob/%s/%s" % (account, container)
    if blob and resource in ("b", "bs", "bv"):
        canon += "/" + blob
    return "\n".join([permissions, start, expiry, canon, identifier, ip, protocol,
                      version, resource, snapshot, encryption_scope, cache_control,
                      content_disposition, content_encoding, content_language,
                      content_type])


def service_sas(account, key, container, blob=None, permissions="racwdl",
                expiry=3600, start=None, ip="", protocol="", version=SAS_VERSION):
    """A service SAS token (query string without "?") for a container
    (sr=c) or, with ``blob``, one blob (sr=b)."""
    st, se = sas_time(start), sas_time(expiry)
    resource = "b" if blob else "c"
    text = service_sas_string_to_sign(account, container, blob, permissions, st, se,
                                      ip=ip, protocol=protocol, version=version,
                                      resource=resource)
    params = [("sv", version)]
    if st:
        params.append(("st", st))
    params += [("se", se), ("sr", resource), ("sp", permissions)]
    if ip:
        params.append(("sip", ip))
    if protocol:
        params.append(("spr", protocol))
    params.append(("sig", sign(key, text)))
    return "&".join("%s=%s" % (k, quote(v, safe="")) for k, v in params)


# --------------------------------------------------------------- TLS cert


def make_self_signed_cert(directory, hosts=("127.0.0.1", "localhost")):
    """Self-signed cert + key (PEM) via the ``openssl`` CLI, with the hosts as
    subjectAltName; returns (cert_path, key_path)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise AzuriteError("openssl CLI not found (needed for https=True)")
    cert = os.path.join(directory, "azurite-cert.pem")
    key = os.path.join(directory, "azurite-key.pem")
    san = ",".join(("IP:%s" % h) if re.match(r"^[0-9.]+$", h) else ("DNS:%s" % h)
                   for h in hosts)
    cmd = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
           "-days", "2", "-subj", "/CN=%s" % hosts[0], "-addext",
           "subjectAltName=%s" % san, "-keyout", key, "-out", cert]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise AzuriteError("openssl failed: %s" % proc.stdout.decode("utf-8", "replace"))
    return cert, key


# ---------------------------------------------------------------- server


def _text(elem, tag, default=None):
    child = elem.find(tag)
    return child.text if child is not None and child.text is not None else default


class AzureResponse:
    """status, reason, headers (dict, lower-case names), body (bytes)."""

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    @property
    def error_code(self):
        """``x-ms-error-code`` (or <Code> of the XML error body) or None."""
        code = self.headers.get("x-ms-error-code")
        if code is None and self.body.startswith(b"<?xml"):
            try:
                code = _text(ET.fromstring(self.body), "Code")
            except ET.ParseError:
                pass
        return code

    def __repr__(self):
        return "<AzureResponse %s %s>" % (self.status, self.error_code or self.reason)


class Azurite(ServerProcess):
    """``azurite-blob`` in its own process group on 127.0.0.1:<free port>
    (harness.ServerProcess: ``stop()`` by PID, SIGTERM then SIGKILL,
    idempotent, also at exit).

    ``https``: serve TLS with a fresh self-signed cert (``.cert`` is its path,
    for ``ssl.create_default_context(cafile=...)``); ``oauth``: "basic" to
    accept Bearer tokens (needs https); ``debug``: True (``workdir/debug.log``)
    or a path for Azurite's ``--debug`` log; ``accounts``: extra
    ``{name: base64 key}`` (devstoreaccount1 is always kept); ``loose`` /
    ``skip_api_version_check``: the Azurite flags of those names.
    """

    label = BIN_NAME
    error = AzuriteError
    start_timeout = DEFAULT_START_TIMEOUT
    poll_interval = 0.05

    def __init__(self, workdir, binary=None, https=False, oauth=None, debug=False,
                 accounts=None, loose=False, skip_api_version_check=False,
                 in_memory=False):
        self.workdir = os.path.abspath(workdir)
        ServerProcess.__init__(self, os.path.join(self.workdir, "azurite.log"),
                               cwd=self.workdir)
        self.binary = binary
        self.https = https
        self.oauth = oauth
        self.debug = debug
        self.accounts = dict(accounts or {})
        self.loose = loose
        self.skip_api_version_check = skip_api_version_check
        self.in_memory = in_memory
        self.account = ACCOUNT
        self.key = ACCOUNT_KEY
        self.api_version = API_VERSION
        self.cert = None
        self.cert_key = None
        self.debug_path = None
        self.location = os.path.join(self.workdir, "data")

    # ---------------------------------------------------------- lifecycle
    @property
    def scheme(self):
        return "https" if self.https else "http"

    @property
    def endpoint(self):
        """``http://127.0.0.1:PORT/devstoreaccount1`` (path style)."""
        return "%s://127.0.0.1:%d/%s" % (self.scheme, self.port, self.account)

    @property
    def production_host(self):
        """``devstoreaccount1.blob.localhost:PORT`` -- a Host header that makes
        Azurite take the account from the host (production URL form)."""
        return "%s.blob.localhost:%d" % (self.account, self.port)

    @property
    def connection_string(self):
        return ("DefaultEndpointsProtocol=%s;AccountName=%s;AccountKey=%s;BlobEndpoint=%s;"
                % (self.scheme, self.account, self.key, self.endpoint))

    def command(self):
        cmd = [self.binary or find_azurite(), "--blobHost", "127.0.0.1",
               "--blobPort", str(self.port), "--location", self.location,
               "--silent", "--disableTelemetry"]
        if self.debug_path:
            cmd += ["--debug", self.debug_path]
        if self.https:
            cmd += ["--cert", self.cert, "--key", self.cert_key]
        if self.oauth:
            cmd += ["--oauth", self.oauth]
        if self.loose:
            cmd.append("--loose")
        if self.skip_api_version_check:
            cmd.append("--skipApiVersionCheck")
        if self.in_memory:
            cmd.append("--inMemoryPersistence")
        return cmd

    def environment(self):
        env = child_env(drop=("AZURITE_ACCOUNTS",))
        if self.accounts:
            accts = [(ACCOUNT, ACCOUNT_KEY)] + sorted(self.accounts.items())
            env["AZURITE_ACCOUNTS"] = ";".join("%s:%s" % a for a in accts)
        return env

    def ready(self):
        socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        return True

    def start(self, timeout=None):
        """Launch azurite-blob and wait until it accepts connections."""
        if self.running:
            return self
        if not os.path.isdir(self.location):
            os.makedirs(self.location)
        if self.binary is None:
            self.binary = find_azurite()
        if self.debug:
            self.debug_path = (os.path.join(self.workdir, "debug.log")
                               if self.debug is True else os.path.abspath(self.debug))
        if self.https and self.cert is None:
            self.cert, self.cert_key = make_self_signed_cert(self.workdir)
        return ServerProcess.start(self, timeout)

    # ------------------------------------------------------------- client
    def ssl_context(self):
        return ssl.create_default_context(cafile=self.cert) if self.https else None

    def url(self, container="", blob=""):
        """Path-style URL of a container or blob (blob name percent-encoded)."""
        out = self.endpoint
        if container:
            out += "/" + container
            if blob:
                out += "/" + quote(blob, safe="/~")
        return out

    def request(self, method, container="", blob="", query=None, headers=None, body=b"",
                auth="key", key=None, account=None, token=None, sas=None, host=None,
                timeout=30):
        """One request; returns an ``AzureResponse`` (never raises on status).

        ``auth``: "key" (Shared Key with ``key`` or the account key), "sas"
        (``sas`` token appended to the query), "bearer" (``token``) or None.
        ``host``: send this Host header (e.g. ``self.production_host``): the
        path then leaves the account out, as in production URLs.
        """
        account = account or self.account
        path = "" if host else "/" + account
        if container:
            path += "/" + container
            if blob:
                path += "/" + quote(blob, safe="/~")
        path = path or "/"
        pairs = _as_pairs(query)
        hdrs = [("x-ms-date", email.utils.formatdate(usegmt=True)),
                ("x-ms-version", self.api_version)]
        given = _as_pairs(headers)
        given_names = set(n.lower() for n, _ in given)
        hdrs = [(n, v) for n, v in hdrs if n not in given_names] + given
        if body is None:
            body = b""
        if method in ("PUT", "POST") or body:
            if "content-length" not in given_names:
                hdrs.append(("Content-Length", str(len(body))))
        if host:
            hdrs.append(("Host", host))
        qs = "&".join("%s=%s" % (quote(str(k), safe=""), quote(str(v), safe=""))
                      for k, v in pairs)
        if auth == "sas":
            qs = (qs + "&" if qs else "") + (sas or "").lstrip("?")
        elif auth == "key":
            hdrs.append(("Authorization", shared_key_authorization(
                account, key or (self.key if account == self.account else self.accounts[account]),
                method, path, pairs, hdrs)))
        elif auth == "bearer":
            hdrs.append(("Authorization", "Bearer " + token))
        target = path + ("?" + qs if qs else "")
        if self.https:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                               context=self.ssl_context())
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.putrequest(method, target, skip_host=bool(host), skip_accept_encoding=True)
            for name, value in hdrs:
                conn.putheader(name, value)
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
            return AzureResponse(resp.status, resp.reason,
                                 dict((k.lower(), v) for k, v in resp.getheaders()), data)
        finally:
            conn.close()

    def _ok(self, resp, what, statuses=(200, 201, 202)):
        if resp.status not in statuses:
            raise AzuriteError("%s: HTTP %s %s\n%s" % (what, resp.status, resp.error_code,
                                                     resp.body[:2000].decode("utf-8", "replace")),
                               resp)
        return resp

    # ------------------------------------------------------------ helpers
    def create_container(self, name, exist_ok=True):
        """Create Container; True if created, False if it existed."""
        resp = self.request("PUT", name, query=[("restype", "container")])
        if resp.status == 409 and exist_ok and resp.error_code == "ContainerAlreadyExists":
            return False
        self._ok(resp, "create container %s" % name)
        return True

    def delete_container(self, name):
        resp = self.request("DELETE", name, query=[("restype", "container")])
        self._ok(resp, "delete container %s" % name, (202, 404))

    def list_blobs(self, container, prefix="", include_snapshots=False, maxresults=None,
                   include_metadata=False):
        """All blobs (List Blobs, following NextMarker), as dicts: ``name``,
        ``size`` (int), ``snapshot`` (or None), ``properties`` (dict of the
        <Properties> children), ``metadata`` (dict; with include_metadata)."""
        include = [w for w, on in (("snapshots", include_snapshots),
                                   ("metadata", include_metadata)) if on]
        out, marker = [], None
        while True:
            query = [("restype", "container"), ("comp", "list")]
            if prefix:
                query.append(("prefix", prefix))
            if include:
                query.append(("include", ",".join(include)))
            if maxresults:
                query.append(("maxresults", str(maxresults)))
            if marker:
                query.append(("marker", marker))
            resp = self._ok(self.request("GET", container, query=query),
                            "list blobs %s/%s" % (container, prefix))
            root = ET.fromstring(resp.body)
            for blob in root.iter("Blob"):
                props_elem = blob.find("Properties")
                props = dict((c.tag, c.text) for c in
                             (props_elem if props_elem is not None else []))
                meta_elem = blob.find("Metadata")
                out.append({
                    "name": _text(blob, "Name"),
                    "snapshot": _text(blob, "Snapshot"),
                    "size": int(props.get("Content-Length") or 0),
                    "properties": props,
                    "metadata": dict((c.tag, c.text) for c in meta_elem)
                    if meta_elem is not None else {},
                })
            marker = _text(root, "NextMarker")
            if not marker:
                return out

    def blob_names(self, container, prefix=""):
        return [b["name"] for b in self.list_blobs(container, prefix)]

    def get_blob(self, container, name):
        """The blob's content (bytes); AzuriteError if it cannot be read."""
        return self._ok(self.request("GET", container, name),
                        "get blob %s/%s" % (container, name)).body

    def put_blob(self, container, name, data, headers=None):
        """Put Blob (BlockBlob); returns the response headers."""
        hdrs = [("x-ms-blob-type", "BlockBlob")] + _as_pairs(headers)
        return self._ok(self.request("PUT", container, name, headers=hdrs, body=data),
                        "put blob %s/%s" % (container, name)).headers

    def put_many(self, container, names, data=b"", workers=8):
        """Put every name (concurrently); ``data`` bytes or callable(name)."""
        def one(name):
            return self.put_blob(container, name, data(name) if callable(data) else data)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, list(names)))

    def delete_blob(self, container, name, snapshots="include"):
        hdrs = [("x-ms-delete-snapshots", snapshots)] if snapshots else None
        resp = self.request("DELETE", container, name, headers=hdrs)
        self._ok(resp, "delete blob %s/%s" % (container, name), (202, 404))

    def blob_properties(self, container, name):
        """Get Blob Properties: dict of response headers (lower-case names),
        or None if the blob does not exist."""
        resp = self.request("HEAD", container, name)
        if resp.status == 404:
            return None
        return self._ok(resp, "blob properties %s/%s" % (container, name)).headers

    def put_block(self, container, name, block_id, data, content_md5=None):
        """Put Block (``block_id`` is the base64 id as sent); the response."""
        hdrs = [("Content-MD5", content_md5)] if content_md5 else None
        return self.request("PUT", container, name, body=data, headers=hdrs,
                            query=[("comp", "block"), ("blockid", block_id)])

    def put_block_list(self, container, name, block_ids, headers=None):
        body = ('<?xml version="1.0" encoding="utf-8"?><BlockList>%s</BlockList>'
                % "".join("<Latest>%s</Latest>" % b for b in block_ids)).encode("utf-8")
        return self._ok(self.request("PUT", container, name, body=body, headers=headers,
                                     query=[("comp", "blocklist")]),
                        "put block list %s/%s" % (container, name)).headers

    def block_list(self, container, name):
        """Get Block List (blocklisttype=all): {"committed": [(id, size)],
        "uncommitted": [(id, size)]}, ids as the base64 strings sent; None
        if there is neither a blob nor uncommitted blocks."""
        resp = self.request("GET", container, name,
                            query=[("comp", "blocklist"), ("blocklisttype", "all")])
        if resp.status == 404:
            return None
        root = ET.fromstring(self._ok(resp, "block list %s/%s" % (container, name)).body)
        out = {}
        for key, tag in (("committed", "CommittedBlocks"), ("uncommitted", "UncommittedBlocks")):
            elem = root.find(tag)
            out[key] = [(_text(b, "Name"), int(_text(b, "Size", "0")))
                        for b in (elem if elem is not None else [])]
        return out

    def list_uncommitted_blocks(self, container, name):
        """[(block id, size)] of the blob's uncommitted blocks ([] if none)."""
        blocks = self.block_list(container, name)
        return blocks["uncommitted"] if blocks else []

    def make_sas(self, container, permissions="racwdl", expiry=3600, blob=None,
                 start=None, key=None, protocol="", version=SAS_VERSION):
        """Service SAS query string for the container (or one blob); expiry:
        seconds from now, a datetime or an ISO string."""
        return service_sas(self.account, key or self.key, container, blob, permissions,
                           expiry, start, protocol=protocol, version=version)


def _main(argv):
    usage = "usage: azurite.py install [PREFIX] [--force] | find | version"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "install":
            force = "--force" in rest
            rest = [a for a in rest if a != "--force"]
            print(install_azurite(rest[0] if rest else DEFAULT_PREFIX, force=force))
        elif cmd == "find":
            print(find_azurite())
        elif cmd == "version":
            print(AZURITE_VERSION)
        else:
            print(usage, file=sys.stderr)
            return 2
    except AzuriteError as exc:
        print("azurite.py: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
