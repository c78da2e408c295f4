"""Loopback stand-ins for the AWS credential endpoints, for tests of the
agent's credential chain.  Stdlib only; works on Python 3.6+.

* ``ImdsServer`` -- the EC2 Instance Metadata Service (IMDSv2 session tokens,
  optionally IMDSv1) serving role credentials;
* ``ContainerCredentialsServer`` -- the ECS task-role / EKS Pod Identity
  container credential endpoint.

Each runs ``http.server`` in a daemon thread on 127.0.0.1:<free port>::

    with ImdsServer(role="snap-role") as imds:       # start() ... stop()
        os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imds.url
        ...
        assert [r.path for r in imds.requests] == [...]

    ecs = ContainerCredentialsServer(authorization="secret-token").start()
    os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = ecs.full_uri
    ecs.stop()

Protocol facts relied on (AWS documentation, found with the search tool):

IMDS -- "How Instance Metadata Service Version 2 works", Amazon EC2 User Guide
(docs.aws.amazon.com/AWSEC2/latest/UserGuide/instance-metadata-v2-how-it-works.html):
  - a session starts with ``PUT /latest/api/token`` carrying the header
    ``X-aws-ec2-metadata-token-ttl-seconds``; the body of the answer is the
    token; the TTL is at least one second and at most six hours (21600 s);
  - later requests send the token in ``X-aws-ec2-metadata-token``; a token can
    be reused until it expires, then a new one is needed;
  - the TTL header is required: without it the PUT gets ``400`` (the Snowball
    Edge IMDS page says "400 - Missing or Invalid Parameters");
  - with IMDSv2 *required* ("httpTokens: required", EC2 API / CDK HttpTokens
    reference) a token must be sent with every metadata request and IMDSv1
    credentials are not available; with "optional" a request without a token
    is answered as IMDSv1.  A request without a valid token on such an
    instance gets ``401 Unauthorized`` (as reported by users of IMDSv2-only
    instances, e.g. connormanning/arbiter#44).
  Credentials: ``GET /latest/meta-data/iam/security-credentials/`` lists the
  role name; ``GET .../security-credentials/<role>`` returns JSON with
  ``Code`` ("Success"), ``LastUpdated``, ``Type`` ("AWS-HMAC"),
  ``AccessKeyId``, ``SecretAccessKey``, ``Token`` and ``Expiration``
  (ISO 8601 UTC, e.g. "2020-11-05T02:02:26Z") -- the EC2 User Guide's
  "Retrieve security credentials from instance metadata" example and the
  SDKs' IAMSecurityCredential types (Code, LastUpdated, Type, AccessKeyId,
  SecretAccessKey, Token, Expiration, Message).
  SDK side -- "IMDS credential provider", AWS SDKs and Tools Reference Guide
  (docs.aws.amazon.com/sdkref/latest/guide/feature-imds-credentials.html):
  IMDSv2 is used by default and, if the token request fails with a
  non-retryable 403, 404 or 405, IMDSv1 is the fallback (unless
  ``AWS_EC2_METADATA_V1_DISABLED``); ``AWS_EC2_METADATA_SERVICE_ENDPOINT``
  overrides the endpoint (default http://169.254.169.254);
  ``AWS_EC2_METADATA_DISABLED=true`` switches the provider off.  Hence
  ``token_status`` below, to answer the PUT with 403/404/405.

Container -- "Container credential provider", AWS SDKs and Tools Reference
Guide (docs.aws.amazon.com/sdkref/latest/guide/feature-container-credentials.html)
and the SDKs' ECS provider docs (aws-config ``ecs`` module on docs.rs):
  - the SDK sends a ``GET`` to the endpoint; ECS task roles set
    ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` (a path appended to
    http://169.254.170.2); EKS Pod Identity sets
    ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` (http://169.254.170.23/v1/credentials)
    and ``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE``;
  - a full URI over plain http must point at a loopback address or one of
    the ECS/EKS link-local addresses -- so 127.0.0.1 is a legal FULL_URI;
  - the token (``AWS_CONTAINER_AUTHORIZATION_TOKEN`` or the content of
    ``..._TOKEN_FILE``) is sent as the ``Authorization`` header value;
  - the answer is JSON ``{"AccessKeyId", "SecretAccessKey", "Token",
    "Expiration"}`` (Expiration like "2016-02-25T06:03:31Z"); errors MAY carry
    ``code`` and ``message`` fields.
"""

from __future__ import print_function

import atexit
import datetime
import json
import socketserver
import threading
import time
import uuid

import http.server

__all__ = ["ImdsServer", "ContainerCredentialsServer", "RecordedRequest", "iso8601"]

IMDS_TOKEN_PATH = "/latest/api/token"
IMDS_CREDS_PATH = "/latest/meta-data/iam/security-credentials/"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL = 21600


def iso8601(value):
    """``datetime`` (naive = UTC) or string -> "YYYY-MM-DDTHH:MM:SSZ"."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _utcnow():
    return datetime.datetime.utcnow().replace(microsecond=0)


class RecordedRequest(object):
    """One request as the server saw it."""

    def __init__(self, method, path, headers, body, status=None):
        self.method = method
        self.path = path
        self.headers = headers          # list of (name, value) as received
        self.body = body
        self.status = status            # status code answered
        self.time = time.time()

    def header(self, name, default=None):
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    def has_header(self, name):
        return self.header(name) is not None

    def __repr__(self):
        return "<%s %s -> %s>" % (self.method, self.path, self.status)


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cred-test-server"
    sys_version = ""

    def _handle(self):
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        record = RecordedRequest(self.command, self.path, list(self.headers.items()), body)
        with owner._lock:
            owner.requests.append(record)
            fault = owner._take_fault()
            delay = owner.delay
        if delay:
            time.sleep(delay)
        if fault is not None:
            status, headers, payload = fault
        else:
            status, headers, payload = owner.respond(record)
        record.status = status
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode("utf-8")
            headers = dict(headers or {})
            headers.setdefault("Content-Type", "application/json")
        elif isinstance(payload, str):
            payload = payload.encode("utf-8")
        payload = payload or b""
        self.send_response(status)
        for key, value in sorted((headers or {}).items()):
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def log_message(self, *args):
        pass


class _CredServer(object):
    """Common lifecycle, request log and fault injection."""

    def __init__(self, access_key_id, secret_access_key, token, expiration):
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.token = token
        self.expiration = expiration
        self.requests = []
        self.delay = 0.0
        self._faults = []
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self.port = None
        atexit.register(self.stop)

    # lifecycle
    @property
    def url(self):
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return "http://127.0.0.1:%d" % self.port

    def start(self):
        if self._server is not None:
            return self
        server = _ThreadingServer(("127.0.0.1", 0), _Handler)
        server.owner = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever,
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Shut the server down (idempotent; also at exit)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # credentials
    def set_credentials(self, access_key_id=None, secret_access_key=None,
                        token=None, expiration=None):
        """Change what the next credential request returns (a rotation)."""
        with self._lock:
            if access_key_id is not None:
                self.access_key_id = access_key_id
            if secret_access_key is not None:
                self.secret_access_key = secret_access_key
            if token is not None:
                self.token = token
            if expiration is not None:
                self.expiration = expiration

    def _expiration(self):
        exp = self.expiration
        if exp is None:
            exp = _utcnow() + datetime.timedelta(hours=6)
        return iso8601(exp)

    # fault injection
    def fail_next(self, status=500, body=None, times=1, headers=None):
        """Answer the next ``times`` requests (any path) with ``status``."""
        if body is None:
            body = {"code": "InternalError", "message": "injected failure"}
        with self._lock:
            for _ in range(times):
                self._faults.append((status, headers, body))

    def _take_fault(self):
        return self._faults.pop(0) if self._faults else None

    def clear(self):
        """Forget recorded requests and pending faults."""
        with self._lock:
            del self.requests[:]
            del self._faults[:]

    def paths(self):
        return [r.path for r in self.requests]

    def respond(self, record):  # pragma: no cover - overridden
        raise NotImplementedError


class ImdsServer(_CredServer):
    """EC2 instance metadata service serving one role's credentials.

    ``imdsv1``: also answer requests that carry no token (httpTokens
    "optional"); default False = IMDSv2 required, token-less GETs get 401.
    ``token_status``: if set (e.g. 403, 404, 405), the token PUT is answered
    with that status -- an IMDSv1-only service, or a blocked PUT.
    ``role``: None = no instance profile (the role listing gives 404).
    ``tokens`` maps each issued token to its expiry (time.time()).
    """

    def __init__(self, role="snapshot-instance-role",
                 access_key_id="ASIAIMDSEXAMPLE00001",
                 secret_access_key="imdsSecretKeyExample/0000000000000000000",
                 token="IMDS-SESSION-TOKEN-EXAMPLE", expiration=None,
                 imdsv1=False, token_status=None):
        _CredServer.__init__(self, access_key_id, secret_access_key, token, expiration)
        self.role = role
        self.imdsv1 = imdsv1
        self.token_status = token_status
        self.tokens = {}
        self.last_updated = _utcnow()

    def expire_tokens(self):
        """Make every issued session token invalid (-> 401 on next use)."""
        with self._lock:
            self.tokens.clear()

    def set_credentials(self, *args, **kwargs):
        _CredServer.set_credentials(self, *args, **kwargs)
        self.last_updated = _utcnow()

    def credentials_document(self):
        return {
            "Code": "Success",
            "LastUpdated": iso8601(self.last_updated),
            "Type": "AWS-HMAC",
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.token,
            "Expiration": self._expiration(),
        }

    def respond(self, record):
        text = {"Content-Type": "text/plain"}
        path = record.path.split("?", 1)[0]
        if path == IMDS_TOKEN_PATH:
            if record.method != "PUT":
                return 405, text, "Method Not Allowed"
            if self.token_status:
                return self.token_status, text, "token endpoint disabled"
            ttl = record.header(TTL_HEADER)
            try:
                ttl = int(ttl)
            except (TypeError, ValueError):
                return 400, text, "Missing or Invalid Parameters"
            if not 1 <= ttl <= MAX_TOKEN_TTL:
                return 400, text, "Missing or Invalid Parameters"
            token = "imds-token-" + uuid.uuid4().hex
            with self._lock:
                self.tokens[token] = time.time() + ttl
            return 200, {"Content-Type": "text/plain", TTL_HEADER: str(ttl)}, token
        if record.method != "GET":
            return 405, text, "Method Not Allowed"
        token = record.header(TOKEN_HEADER)
        if token is not None:
            with self._lock:
                expires = self.tokens.get(token)
            if expires is None or expires < time.time():
                return 401, text, "Unauthorized"
        elif not self.imdsv1:
            return 401, text, "Unauthorized"
        if path in (IMDS_CREDS_PATH, IMDS_CREDS_PATH.rstrip("/")):
            if self.role is None:
                return 404, text, "Not Found"
            return 200, text, self.role
        if path.startswith(IMDS_CREDS_PATH):
            name = path[len(IMDS_CREDS_PATH):].rstrip("/")
            if self.role is None or name != self.role:
                return 404, text, "Not Found"
            with self._lock:
                doc = self.credentials_document()
            return 200, {"Content-Type": "text/plain"}, json.dumps(doc, indent=2)
        return 404, text, "Not Found"


class ContainerCredentialsServer(_CredServer):
    """ECS / EKS Pod Identity container credential endpoint.

    ``path``: the relative URI served (default ``/v2/credentials/<uuid>``,
    ECS-style; use "/v1/credentials" to mimic the Pod Identity agent).
    ``authorization``: if set, the exact ``Authorization`` header value
    required (missing or different -> 401 with code/message JSON).
    ``role_arn``: included as "RoleArn" when set (ECS includes it).
    """

    def __init__(self, path=None, authorization=None,
                 access_key_id="ASIACONTAINEREXAMPLE",
                 secret_access_key="containerSecretKeyExample/00000000000000",
                 token="CONTAINER-SESSION-TOKEN-EXAMPLE", expiration=None,
                 role_arn=None):
        _CredServer.__init__(self, access_key_id, secret_access_key, token, expiration)
        self.path = path or "/v2/credentials/" + str(uuid.uuid4())
        self.authorization = authorization
        self.role_arn = role_arn

    @property
    def relative_uri(self):
        """Value for AWS_CONTAINER_CREDENTIALS_RELATIVE_URI (the path)."""
        return self.path

    @property
    def full_uri(self):
        """Value for AWS_CONTAINER_CREDENTIALS_FULL_URI."""
        return self.url + self.path

    def credentials_document(self):
        doc = {
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.token,
            "Expiration": self._expiration(),
        }
        if self.role_arn:
            doc["RoleArn"] = self.role_arn
        return doc

    def respond(self, record):
        if record.path.split("?", 1)[0] != self.path:
            return 404, None, {"code": "NotFound", "message": "no such path"}
        if record.method != "GET":
            return 405, None, {"code": "MethodNotAllowed", "message": record.method}
        if self.authorization is not None and record.header("Authorization") != self.authorization:
            return 401, None, {"code": "AccessDenied",
                               "message": "missing or invalid Authorization header"}
        with self._lock:
            doc = self.credentials_document()
        return 200, None, doc
