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

and for the Google credential chain (GCS backend):

* ``GoogleTokenServer`` -- the OAuth 2.0 token endpoint (``POST /token``):
  service-account JWT bearer grants, checked for real (RS256 signature with
  ``cryptography``, header, claims), and ``refresh_token`` grants for
  ``authorized_user`` files;
* ``GceMetadataServer`` -- the Compute Engine metadata server's token and
  project-id endpoints.

::

    key = rsa_keys.make_rsa_key()
    with GoogleTokenServer(key.public_pem) as oauth:
        sa = rsa_keys.service_account_json(key.private_pem, oauth.token_url)
        ...                                   # agent signs a JWT, posts it
        assert oauth.grants[-1]["claims"]["scope"] == "...devstorage.read_write"

    with GceMetadataServer(access_token="ya29.meta") as mds:
        os.environ["GCE_METADATA_HOST"] = mds.host      # "127.0.0.1:PORT"

(``cryptography`` is imported only when a GoogleTokenServer gets a key, so
the module stays importable without it.)  Google protocol facts are noted
above the Google classes, at the end of this file.

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

Azure (for the Azure Blob storage backend):

* ``AzureImdsServer`` -- the Azure Instance Metadata Service managed-identity
  token endpoint;
* ``EntraTokenServer`` -- the Microsoft Entra ID (Azure AD) v2.0 token
  endpoint, client-credentials grant with a secret or a federated
  (workload identity) assertion.

Both hand out, unless a fixed ``token`` is set, a fresh JWT-shaped access
token (``make_azure_jwt``: RS256 header, fake signature -- nothing checks it) whose
claims Azurite's ``--oauth basic`` accepts: ``iss`` https://sts.windows.net/
<tenant>/, ``aud`` the storage audience, ``iat``/``nbf``/``exp``.

Azure IMDS -- "How to use managed identities for Azure resources on an Azure
VM to acquire an access token" (learn.microsoft.com/entra/identity/
managed-identities-azure-resources/how-to-use-vm-token):
  - ``GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=R``
    with header ``Metadata: true`` (lower case); optional ``client_id``,
    ``object_id`` or ``mi_res_id`` (``msi_res_id``) picks a user-assigned
    identity;
  - answer: JSON with *string* values ``access_token``, ``refresh_token``
    (""), ``expires_in``, ``expires_on`` (epoch seconds = the ``exp``
    claim), ``not_before``, ``resource`` (as requested), ``token_type``
    ("Bearer");
  - errors are JSON ``{"error", "error_description"}``: a missing/wrong
    Metadata header is ``400 bad_request_102`` "Required metadata header not
    specified"; a bad resource ``400 invalid_resource`` (AADSTS50001); 404,
    429 and 5xx are to be retried with backoff.

Entra -- "Microsoft identity platform and the OAuth 2.0 client credentials
flow" (learn.microsoft.com/entra/identity-platform/
v2-oauth2-client-creds-grant-flow):
  - ``POST /{tenant}/oauth2/v2.0/token``, form-encoded ``client_id``,
    ``scope`` (resource + "/.default", here https://storage.azure.com/.default),
    ``grant_type=client_credentials`` and either ``client_secret`` or
    ``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer``
    + ``client_assertion`` (for workload identity federation the token read
    from ``AZURE_FEDERATED_TOKEN_FILE``);
  - answer ``{"token_type": "Bearer", "expires_in": 3599, "access_token"}``
    (``expires_in`` a number here), errors ``{"error", "error_description"
    ("AADSTSnnnn: ..."), "error_codes", "timestamp", "trace_id",
    "correlation_id"}``: ``invalid_scope`` (400), a wrong secret
    ``invalid_client`` AADSTS7000215 (401), an unmatched federated assertion
    ``invalid_request`` AADSTS70021 (400, as seen in
    Azure/azure-workload-identity#616).
"""

import atexit
import base64
import binascii
import datetime
import json
import threading
import time
import urllib.parse
import uuid
from urllib.parse import parse_qs, urlsplit

from support.harness import LoopbackServer

__all__ = ["ImdsServer", "ContainerCredentialsServer", "RecordedRequest", "iso8601",
           "AzureImdsServer", "EntraTokenServer", "make_azure_jwt", "decode_jwt",
           "STORAGE_RESOURCE", "STORAGE_SCOPE", "CLIENT_ASSERTION_TYPE",
           "GoogleTokenServer", "GceMetadataServer", "JWT_BEARER_GRANT"]

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
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, microsecond=0)


class RecordedRequest:
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


class _CredServer(LoopbackServer):
    """Common lifecycle (harness.LoopbackServer), request log and fault
    injection."""

    server_version = "cred-test-server"

    def __init__(self, access_key_id, secret_access_key, token, expiration):
        LoopbackServer.__init__(self)
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.token = token
        self.expiration = expiration
        self.requests = []
        self.delay = 0.0
        self._faults = []
        self._lock = threading.Lock()
        atexit.register(self.stop)

    def answer(self, handler):
        body = handler.read_body()
        record = RecordedRequest(handler.command, handler.path, list(handler.headers.items()), body)
        with self._lock:
            self.requests.append(record)
            fault = self._take_fault()
            delay = self.delay
        if delay:
            time.sleep(delay)
        if fault is not None:
            status, headers, payload = fault
        else:
            status, headers, payload = self.respond(record)
        record.status = status
        return status, headers, payload

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


# ------------------------------------------------------------------ Google
#
# Protocol facts relied on (Google documentation, found with the search tool):
#
# OAuth 2.0 token endpoint -- "Using OAuth 2.0 for Server to Server
# Applications" (developers.google.com/identity/protocols/oauth2/service-account):
#   - the client POSTs ``application/x-www-form-urlencoded`` to the token URI
#     (``token_uri`` of the key file, https://oauth2.googleapis.com/token)
#     with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` and
#     ``assertion=<JWT>``;
#   - the JWT is ``b64url(header).b64url(claims).b64url(signature)``, header
#     ``{"alg":"RS256","typ":"JWT"}`` (client libraries add ``"kid"``, the
#     key file's private_key_id), signature RSA SHA-256 (PKCS#1 v1.5) over
#     the first two parts with the key file's private key;
#   - claims: ``iss`` (the service account's email), ``scope``
#     (space-delimited), ``aud`` (the token URI), ``iat`` and ``exp`` in
#     seconds since the epoch, exp at most one hour after iat; ``sub``
#     optional (domain-wide delegation);
#   - the answer: ``{"access_token", "expires_in", "token_type": "Bearer"}``;
#     failures are 400 ``{"error": "invalid_grant", "error_description":
#     ...}`` -- "Invalid JWT Signature.", "Invalid JWT: Token must be a
#     short-lived token (60 minutes) and in a reasonable timeframe. Check your
#     iat and exp values in the JWT claim.", "Invalid JWT: Failed audience
#     check. The right audience is ..." (texts as reported in
#     googleapis/google-cloud-python#10004, google-api-php-client#1501,
#     requests-oauthlib#247).
#   Refresh tokens (RFC 6749 section 6, Google "Using OAuth 2.0 for Web
#   Server Applications"): ``grant_type=refresh_token`` with ``client_id``,
#   ``client_secret`` and ``refresh_token``; a bad refresh token gives 400
#   ``invalid_grant``, an unknown client 401 ``invalid_client``.
#
# Metadata server -- "About VM metadata" / "Authenticate workloads"
# (cloud.google.com/compute/docs/metadata/...):
#   - ``GET http://metadata.google.internal/computeMetadata/v1/instance/
#     service-accounts/default/token`` with header ``Metadata-Flavor: Google``
#     answers ``{"access_token", "expires_in", "token_type": "Bearer"}``
#     (optional ``?scopes=a,b``); ``.../project/project-id`` answers the
#     project id as text;
#   - a request without ``Metadata-Flavor: Google`` (or with an
#     ``X-Forwarded-For`` header) is refused with 403; every answer carries
#     ``Metadata-Flavor: Google`` (clients check it to know they are on GCE);
#   - client libraries take the host from ``GCE_METADATA_HOST`` (google-auth:
#     also ``GCE_METADATA_IP``), default metadata.google.internal /
#     169.254.169.254.

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_LIFETIME = 3600          # the longest exp - iat Google accepts
_JWT_TIMEFRAME = ("Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                  "reasonable timeframe. Check your iat and exp values in the JWT claim.")
_B64URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class _JwtError(Exception):
    def __init__(self, error, description, status=400):
        Exception.__init__(self, description)
        self.error = error
        self.description = description
        self.status = status


def _b64url_decode(segment, strict=True):
    if strict and not (set(segment) <= _B64URL_CHARS):
        raise ValueError("not unpadded base64url")
    segment = segment.rstrip("=")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


class _GoogleServer(_CredServer):
    """Common parts of the two Google endpoints: bearer tokens handed out."""

    def __init__(self, access_token, expires_in):
        _CredServer.__init__(self, None, None, None, None)
        self.access_token = access_token      # None: a fresh token each time
        self.expires_in = expires_in
        self.issued = []                      # tokens handed out, in order
        self._expiry = {}                     # token -> time.time() it expires
        self._counter = 0

    def set_token(self, access_token=None, expires_in=None):
        """What the next token request returns (``access_token=None`` keeps
        the current setting; see ``access_token`` in the constructor)."""
        with self._lock:
            if access_token is not None:
                self.access_token = access_token
            if expires_in is not None:
                self.expires_in = expires_in

    def _issue(self, prefix):
        with self._lock:
            self._counter += 1
            token = self.access_token or "%s-%d-%s" % (prefix, self._counter, uuid.uuid4().hex[:12])
            expires_in = self.expires_in
            self.issued.append(token)
            self._expiry[token] = time.time() + expires_in
        return {"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}

    def is_valid_token(self, token):
        """True if ``token`` (or ``"Bearer <token>"``) was issued here and
        has not expired."""
        if token and token.startswith("Bearer "):
            token = token[len("Bearer "):]
        with self._lock:
            expires = self._expiry.get(token)
        return expires is not None and expires > time.time()

    def expire_tokens(self):
        """Make every token issued so far invalid for ``is_valid_token``."""
        with self._lock:
            for token in self._expiry:
                self._expiry[token] = 0


class GoogleTokenServer(_GoogleServer):
    """OAuth 2.0 token endpoint for service-account JWTs and refresh tokens.

    ``public_key_pem``: the service account's public key (a ``BEGIN PUBLIC
    KEY`` PEM; a private key PEM works too, its public half is used); more
    with ``add_key(pem, kid)``.  A JWT whose header ``kid`` names a key
    added with that kid is checked against that key only, otherwise against
    every key.
    ``client_email``: if set, the only ``iss`` accepted (others get
    ``invalid_grant`` "Invalid grant: account not found").
    ``access_token``: fixed token to return; None (default) = a fresh
    ``ya29.test-N-...`` token each time.  ``expires_in``: seconds (3599).
    ``path``: the token path ("/token"); ``token_url`` = url + path, the
    only ``aud`` accepted.
    ``require_scope``: a JWT without ``scope`` gets 400 ``invalid_scope``.
    ``strict``: header exactly alg/typ[/kid], segments unpadded base64url,
    iat/exp integers, form Content-Type required.
    ``skew``: seconds of clock skew tolerated on iat/exp (300).
    ``authorized_users``: {client_id: (client_secret, refresh_token)} for
    ``grant_type=refresh_token`` (``add_authorized_user`` adds more).

    Recorded: ``requests`` (every HTTP request), ``grants`` (one dict per
    token request: ``grant_type``, ``header``, ``claims``, ``assertion``,
    ``form``, ``ok``, ``error``, ``error_description``, ``status``),
    ``claims`` (decoded claim sets of JWT grants) and ``issued`` (tokens).
    ``clock`` (default time.time) is what iat/exp are compared with.
    """

    def __init__(self, public_key_pem=None, client_email=None, access_token=None,
                 expires_in=3599, path="/token", require_scope=True, strict=True,
                 skew=300, authorized_users=None):
        _GoogleServer.__init__(self, access_token, expires_in)
        self.path = path
        self.client_email = client_email
        self.require_scope = require_scope
        self.strict = strict
        self.skew = skew
        self.clock = time.time
        self.keys = []                        # [(kid or None, public key object)]
        self.grants = []
        self.authorized_users = dict(authorized_users or {})
        if public_key_pem:
            self.add_key(public_key_pem)

    @property
    def token_url(self):
        """``http://127.0.0.1:PORT/token`` -- the key file's ``token_uri``
        and the JWT ``aud``."""
        return self.url + self.path

    @property
    def claims(self):
        with self._lock:
            return [g["claims"] for g in self.grants if g.get("claims") is not None]

    def add_key(self, pem, kid=None):
        """Accept JWTs signed by this key (optionally only under ``kid``)."""
        from cryptography.hazmat.backends import default_backend
        from cryptography.hazmat.primitives import serialization

        data = pem.encode("ascii") if isinstance(pem, str) else pem
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, None, default_backend()).public_key()
        else:
            key = serialization.load_pem_public_key(data, default_backend())
        with self._lock:
            self.keys.append((kid, key))
        return self

    def add_authorized_user(self, client_id, client_secret, refresh_token):
        with self._lock:
            self.authorized_users[client_id] = (client_secret, refresh_token)
        return self

    def clear(self):
        _CredServer.clear(self)
        with self._lock:
            del self.grants[:]

    # ---------------------------------------------------------------- HTTP

    def respond(self, record):
        path = record.path.split("?", 1)[0]
        if path != self.path:
            return 404, None, {"error": "not_found", "error_description": "no such path"}
        if record.method != "POST":
            return 405, None, {"error": "invalid_request",
                               "error_description": "method %s not allowed" % record.method}
        grant = {"grant_type": None, "header": None, "claims": None, "assertion": None,
                 "form": None, "ok": False, "error": None, "error_description": None,
                 "status": None}
        try:
            answer = self._grant(record, grant)
            grant["ok"] = True
            grant["status"] = 200
            return 200, {"Cache-Control": "no-store", "Pragma": "no-cache"}, answer
        except _JwtError as exc:
            grant["error"], grant["error_description"] = exc.error, exc.description
            grant["status"] = exc.status
            return exc.status, None, {"error": exc.error, "error_description": exc.description}
        finally:
            with self._lock:
                self.grants.append(grant)

    def _grant(self, record, grant):
        ctype = (record.header("Content-Type") or "").split(";", 1)[0].strip().lower()
        if self.strict and ctype != "application/x-www-form-urlencoded":
            raise _JwtError("invalid_request",
                            "Content-Type must be application/x-www-form-urlencoded, not %r"
                            % ctype)
        try:
            form = urllib.parse.parse_qs(record.body.decode("utf-8"), keep_blank_values=True,
                                         strict_parsing=bool(record.body))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _JwtError("invalid_request", "cannot parse the form: %s" % exc) from None
        for name, values in form.items():
            if len(values) != 1:
                raise _JwtError("invalid_request", "parameter %s given %d times"
                                % (name, len(values)))
        form = dict((k, v[0]) for k, v in form.items())
        grant["form"] = form
        grant_type = form.get("grant_type")
        grant["grant_type"] = grant_type
        if grant_type == JWT_BEARER_GRANT:
            return self._jwt_grant(form, grant)
        if grant_type == "refresh_token":
            return self._refresh_grant(form)
        if not grant_type:
            raise _JwtError("invalid_request", "Missing required parameter: grant_type")
        raise _JwtError("unsupported_grant_type", "Invalid grant_type: %s" % grant_type)

    def _refresh_grant(self, form):
        for name in ("client_id", "client_secret", "refresh_token"):
            if not form.get(name):
                raise _JwtError("invalid_request", "Missing required parameter: %s" % name)
        with self._lock:
            entry = self.authorized_users.get(form["client_id"])
        if entry is None or entry[0] != form["client_secret"]:
            raise _JwtError("invalid_client", "The OAuth client was not found.", 401)
        if entry[1] != form["refresh_token"]:
            raise _JwtError("invalid_grant", "Bad Request")
        return self._issue("ya29.test-refresh")

    def _jwt_grant(self, form, grant):
        assertion = form.get("assertion")
        grant["assertion"] = assertion
        if not assertion:
            raise _JwtError("invalid_request", "Missing required parameter: assertion")
        parts = assertion.split(".")
        if len(parts) != 3:
            raise _JwtError("invalid_grant", "Invalid JWT: expected 3 dot-separated parts, got %d"
                            % len(parts))
        try:
            header = json.loads(_b64url_decode(parts[0], self.strict).decode("utf-8"))
            claims = json.loads(_b64url_decode(parts[1], self.strict).decode("utf-8"))
            signature = _b64url_decode(parts[2], self.strict)
        except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
            raise _JwtError("invalid_grant", "Invalid JWT: cannot decode (%s)" % exc) from None
        grant["header"], grant["claims"] = header, claims
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise _JwtError("invalid_grant", "Invalid JWT: header and claims must be objects")
        # header
        if header.get("alg") != "RS256":
            raise _JwtError("invalid_grant", "Invalid JWT: alg must be RS256, not %r"
                            % (header.get("alg"),))
        if header.get("typ", "JWT") != "JWT" or (self.strict and "typ" not in header):
            raise _JwtError("invalid_grant", "Invalid JWT: typ must be JWT")
        extra = set(header) - set(("alg", "typ", "kid"))
        if self.strict and extra:
            raise _JwtError("invalid_grant", "Invalid JWT: unexpected header fields %s"
                            % sorted(extra))
        # signature
        signing_input = (parts[0] + "." + parts[1]).encode("ascii")
        if not self._signature_ok(header.get("kid"), signing_input, signature):
            raise _JwtError("invalid_grant", "Invalid JWT Signature.")
        # claims
        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise _JwtError("invalid_grant", "Invalid JWT: missing iss")
        if self.client_email is not None and iss != self.client_email:
            raise _JwtError("invalid_grant", "Invalid grant: account not found")
        aud = claims.get("aud")
        if aud != self.token_url:
            raise _JwtError("invalid_grant", "Invalid JWT: Failed audience check. "
                            "The right audience is %s" % self.token_url)
        iat, exp = claims.get("iat"), claims.get("exp")
        numeric = _is_int if self.strict else (
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
        if not numeric(iat) or not numeric(exp):
            raise _JwtError("invalid_grant", "Invalid JWT: iat and exp must be %s"
                            % ("integers" if self.strict else "numbers"))
        now = self.clock()
        if (exp <= iat or exp - iat > GOOGLE_TOKEN_LIFETIME
                or iat > now + self.skew or exp < now - self.skew):
            raise _JwtError("invalid_grant", _JWT_TIMEFRAME)
        scope = claims.get("scope")
        if scope is not None and (not isinstance(scope, str) or not scope.strip()):
            raise _JwtError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        if scope is None and self.require_scope:
            raise _JwtError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        return self._issue("ya29.test")

    def _signature_ok(self, kid, signing_input, signature):
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        with self._lock:
            keys = list(self.keys)
        if kid is not None and any(k == kid for k, _ in keys):
            keys = [(k, key) for k, key in keys if k == kid]
        for _, key in keys:
            try:
                key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
                return True
            except InvalidSignature:
                continue
        return False


class GceMetadataServer(_GoogleServer):
    """Compute Engine metadata server: default service account token, its
    email and the project id.

    ``access_token``: fixed token to return; None = a fresh
    ``ya29.metadata-N-...`` each time.  ``expires_in``: seconds (3599).
    ``project_id``, ``email``, ``scopes`` (list) as served.
    Every answer carries ``Metadata-Flavor: Google``; requests without that
    header (or with ``X-Forwarded-For``) get 403.  ``host`` is the value for
    ``GCE_METADATA_HOST`` ("127.0.0.1:PORT").  Recorded: ``requests``,
    ``issued`` (tokens), ``token_requests()``.
    """

    PREFIX = "/computeMetadata/v1/"
    TOKEN_PATH = PREFIX + "instance/service-accounts/default/token"
    PROJECT_PATH = PREFIX + "project/project-id"

    def __init__(self, access_token=None, expires_in=3599, project_id="test-project",
                 email=None, scopes=("https://www.googleapis.com/auth/cloud-platform",)):
        _GoogleServer.__init__(self, access_token, expires_in)
        self.project_id = project_id
        self.email = email or "1234567890-compute@developer.gserviceaccount.com"
        self.scopes = list(scopes)

    @property
    def host(self):
        return "127.0.0.1:%d" % self.port

    @property
    def token_url(self):
        return self.url + self.TOKEN_PATH

    def token_requests(self):
        return [r for r in self.requests if r.path.split("?", 1)[0] == self.TOKEN_PATH]

    def respond(self, record):
        flavor = {"Metadata-Flavor": "Google"}
        text = dict(flavor, **{"Content-Type": "application/text"})
        html = dict(flavor, **{"Content-Type": "text/html; charset=UTF-8"})
        path = record.path.split("?", 1)[0]
        if record.method != "GET":
            return 405, html, "Method Not Allowed"
        if path == "/":                      # the "am I on GCE?" ping
            return 200, text, "computeMetadata/\n"
        if record.header("Metadata-Flavor") != "Google" or record.has_header("X-Forwarded-For"):
            return 403, html, ("Your client does not have permission to get URL %s from "
                               "this server. Missing Metadata-Flavor:Google header." % path)
        sa = self.PREFIX + "instance/service-accounts/default/"
        if path == self.TOKEN_PATH:
            return 200, dict(flavor, **{"Content-Type": "application/json"}), \
                self._issue("ya29.metadata")
        if path == self.PROJECT_PATH:
            return 200, text, self.project_id
        if path == sa + "email":
            return 200, text, self.email
        if path == sa + "scopes":
            return 200, text, "\n".join(self.scopes) + "\n"
        if path in (self.PREFIX, self.PREFIX.rstrip("/")):
            return 200, text, "instance/\nproject/\n"
        return 404, html, "Not Found"


# ------------------------------------------------------------------ Azure

STORAGE_RESOURCE = "https://storage.azure.com/"
STORAGE_SCOPE = "https://storage.azure.com/.default"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
AZURE_IMDS_TOKEN_PATH = "/metadata/identity/oauth2/token"
DEFAULT_TENANT = "72f988bf-0000-4000-8000-00000000aaaa"
DEFAULT_CLIENT_ID = "5a1e7c2b-0000-4000-8000-00000000bbbb"
DEFAULT_MI_CLIENT_ID = "0d5e3f1a-0000-4000-8000-00000000cccc"


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_azure_jwt(audience="https://storage.azure.com", tenant=DEFAULT_TENANT, lifetime=3599,
             now=None, **claims):
    """A JWT-shaped token (RS256 header, fake signature: nothing here checks
    signatures) with ``aud``, ``iss`` (https://sts.windows.net/<tenant>/),
    ``tid``, ``iat``, ``nbf``, ``exp`` = now + lifetime, plus ``claims``."""
    now = int(time.time() if now is None else now)
    body = {"aud": audience, "iss": "https://sts.windows.net/%s/" % tenant, "tid": tenant,
            "iat": now, "nbf": now, "exp": now + int(lifetime), "ver": "1.0",
            "uti": uuid.uuid4().hex}
    body.update(claims)
    header = {"typ": "JWT", "alg": "RS256", "kid": "cred-servers-test-key"}
    return ".".join([_b64url(json.dumps(header, sort_keys=True).encode("utf-8")),
                     _b64url(json.dumps(body, sort_keys=True).encode("utf-8")),
                     _b64url(b"not-a-real-signature")])


def decode_jwt(token):
    """The claims (payload) of a JWT, without any verification."""
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload.encode("ascii")).decode("utf-8"))


def _query(record):
    parts = urlsplit(record.path)
    return parts.path, dict((k, v[-1]) for k, v in
                            parse_qs(parts.query, keep_blank_values=True).items())


class _AzureTokenServer(_CredServer):
    """Token issuing common to the Azure endpoints.

    ``token``: a fixed access token string, or None (default) for a fresh
    ``make_azure_jwt`` token per request; ``expires_in``: lifetime in seconds (may
    be 0 or negative, for expired-token tests).  ``issued`` lists every
    access token handed out, in order.
    """

    def __init__(self, token=None, expires_in=3599, tenant=DEFAULT_TENANT):
        _CredServer.__init__(self, None, None, token, None)
        self.expires_in = expires_in
        self.tenant = tenant
        self.issued = []

    def set_token(self, token=None, expires_in=None):
        """Fixed token for later requests (None: back to fresh JWTs) and/or a
        new lifetime."""
        with self._lock:
            self.token = token
            if expires_in is not None:
                self.expires_in = expires_in

    def _issue(self, audience, **claims):
        now = int(time.time())
        with self._lock:
            lifetime = int(self.expires_in)
            token = self.token
            if token is None:
                token = make_azure_jwt(audience=audience, tenant=self.tenant, lifetime=lifetime,
                                 now=now, **claims)
            self.issued.append(token)
        return token, now, lifetime

    @property
    def last_token(self):
        return self.issued[-1] if self.issued else None


class AzureImdsServer(_AzureTokenServer):
    """Azure IMDS managed-identity token endpoint (``token_url``).

    ``system_assigned``: a request naming no identity gets a token (else it
    needs one of ``client_ids``; with no system identity and exactly one
    user-assigned identity, that one is used, as on a real VM).
    ``client_ids``: accepted user-assigned identities (matched against
    ``client_id``, ``object_id``, ``mi_res_id`` and ``msi_res_id``); an
    unknown one gets ``400 invalid_request`` "Identity not found".
    ``resources``: accepted ``resource`` values (others: 400 invalid_resource).
    """

    def __init__(self, token=None, expires_in=3599, system_assigned=True,
                 client_ids=(DEFAULT_MI_CLIENT_ID,), tenant=DEFAULT_TENANT,
                 resources=(STORAGE_RESOURCE, "https://storage.azure.com")):
        _AzureTokenServer.__init__(self, token, expires_in, tenant)
        self.system_assigned = system_assigned
        self.client_ids = list(client_ids)
        self.resources = list(resources)
        self.system_client_id = str(uuid.uuid4())

    @property
    def token_url(self):
        """``http://127.0.0.1:PORT/metadata/identity/oauth2/token``."""
        return self.url + AZURE_IMDS_TOKEN_PATH

    def respond(self, record):
        path, q = _query(record)
        if path != AZURE_IMDS_TOKEN_PATH:
            return 404, None, {"error": "not_found", "error_description": "no such path"}
        if record.method != "GET":
            return 405, None, {"error": "invalid_request",
                               "error_description": "method not allowed"}
        if record.header("Metadata") != "true":
            return 400, None, {"error": "bad_request_102",
                               "error_description": "Required metadata header not specified"}
        if not q.get("api-version"):
            return 400, None, {"error": "invalid_request",
                               "error_description": "Required query variable 'api-version' is missing"}
        resource = q.get("resource")
        if not resource:
            return 400, None, {"error": "invalid_request",
                               "error_description": "Required query variable 'resource' is missing"}
        if resource not in self.resources:
            return 400, None, {"error": "invalid_resource", "error_description":
                               "AADSTS500011: The resource principal named %s was not found "
                               "in the tenant named %s." % (resource, self.tenant)}
        wanted = [q[k] for k in ("client_id", "object_id", "mi_res_id", "msi_res_id") if q.get(k)]
        if wanted:
            if wanted[0] not in self.client_ids:
                return 400, None, {"error": "invalid_request",
                                   "error_description": "Identity not found"}
            client_id = wanted[0]
        elif self.system_assigned:
            client_id = self.system_client_id
        elif len(self.client_ids) == 1:
            client_id = self.client_ids[0]
        else:
            return 400, None, {"error": "invalid_request",
                               "error_description": "Identity not found"}
        token, now, lifetime = self._issue(resource.rstrip("/"), appid=client_id,
                                           oid=client_id, sub=client_id)
        return 200, None, {
            "access_token": token,
            "client_id": client_id,
            "refresh_token": "",
            "expires_in": str(lifetime),
            "expires_on": str(now + lifetime),
            "ext_expires_in": str(lifetime),
            "not_before": str(now),
            "resource": resource,
            "token_type": "Bearer",
        }


class EntraTokenServer(_AzureTokenServer):
    """Microsoft Entra ID v2.0 token endpoint, client-credentials grant.

    ``authority`` is what goes in front of ``/<tenant>/oauth2/v2.0/token``
    (``http://127.0.0.1:PORT``; ``token_url`` is the whole URL).
    ``client_secret`` / ``federated_token``: the accepted secret and client
    assertion (None disables that method).  ``scopes``: accepted scopes.
    """

    def __init__(self, tenant=DEFAULT_TENANT, client_id=DEFAULT_CLIENT_ID,
                 client_secret="entra-test-client-secret~0000",
                 federated_token="federated-token-from-AZURE_FEDERATED_TOKEN_FILE",
                 token=None, expires_in=3599, scopes=(STORAGE_SCOPE,)):
        _AzureTokenServer.__init__(self, token, expires_in, tenant)
        self.client_id = client_id
        self.client_secret = client_secret
        self.federated_token = federated_token
        self.scopes = list(scopes)

    @property
    def authority(self):
        return self.url

    @property
    def token_path(self):
        return "/%s/oauth2/v2.0/token" % self.tenant

    @property
    def token_url(self):
        return self.url + self.token_path

    def form(self, record):
        """The request's form fields (last value of each)."""
        return dict((k, v[-1]) for k, v in
                    parse_qs(record.body.decode("utf-8", "replace"),
                             keep_blank_values=True).items())

    def _error(self, status, error, code, text):
        now = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        return status, None, {
            "error": error,
            "error_description": "AADSTS%d: %s\r\nTrace ID: %s\r\nCorrelation ID: %s\r\n"
                                 "Timestamp: %s" % (code, text, trace, corr, now),
            "error_codes": [code],
            "timestamp": now,
            "trace_id": trace,
            "correlation_id": corr,
        }

    def respond(self, record):
        path = urlsplit(record.path).path
        parts = path.strip("/").split("/")
        if len(parts) != 4 or parts[1:] != ["oauth2", "v2.0", "token"]:
            return 404, None, {"error": "not_found", "error_description": "no such path"}
        if record.method != "POST":
            return 405, None, {"error": "invalid_request",
                               "error_description": "method not allowed"}
        if parts[0] != self.tenant:
            return self._error(400, "invalid_request", 90002,
                               "Tenant '%s' not found." % parts[0])
        f = self.form(record)
        for name in ("grant_type", "client_id", "scope"):
            if not f.get(name):
                return self._error(400, "invalid_request", 900144,
                                   "The request body must contain the following "
                                   "parameter: '%s'." % name)
        if f["grant_type"] != "client_credentials":
            return self._error(400, "unsupported_grant_type", 70003,
                               "The app requested an unsupported grant type '%s'."
                               % f["grant_type"])
        if f["client_id"] != self.client_id:
            return self._error(400, "unauthorized_client", 700016,
                               "Application with identifier '%s' was not found in the "
                               "directory." % f["client_id"])
        if f["scope"] not in self.scopes:
            return self._error(400, "invalid_scope", 70011,
                               "The provided value for the input parameter 'scope' is not "
                               "valid. The scope %s is not valid." % f["scope"])
        secret, assertion = f.get("client_secret"), f.get("client_assertion")
        if secret and assertion:
            return self._error(400, "invalid_request", 90014,
                               "Only one of 'client_secret' and 'client_assertion' may be "
                               "sent.")
        if secret:
            if self.client_secret is None or secret != self.client_secret:
                return self._error(401, "invalid_client", 7000215,
                                   "Invalid client secret provided.")
        elif assertion:
            if f.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
                return self._error(400, "invalid_request", 900144,
                                   "The request body must contain the following parameter: "
                                   "'client_assertion_type'.")
            if self.federated_token is None or assertion != self.federated_token:
                return self._error(400, "invalid_request", 70021,
                                   "No matching federated identity record found for "
                                   "presented assertion.")
        else:
            return self._error(401, "invalid_client", 7000218,
                               "The request body must contain the following parameter: "
                               "'client_assertion' or 'client_secret'.")
        audience = f["scope"][:-len("/.default")] if f["scope"].endswith("/.default") \
            else f["scope"]
        token, now, lifetime = self._issue(audience, appid=self.client_id,
                                           oid=self.client_id, sub=self.client_id)
        return 200, None, {"token_type": "Bearer", "expires_in": lifetime,
                           "ext_expires_in": lifetime, "access_token": token}
