"""Google's side of the agent's ``gcp`` Vault login, on loopback, and the
judge that plays Vault's gcp auth method behind login_standin.py.

* ``GceIdentityServer`` -- cred_servers.GceMetadataServer (token, email,
  project id) plus the instance identity endpoint
  ``GET /computeMetadata/v1/instance/service-accounts/default/identity
  ?audience=A[&format=full]``: a JWT signed RS256 by ``key`` (an
  rsa_keys.RsaKey, header ``kid`` = ``key_id``), as Google signs them;
* ``IamCredentialsServer`` -- the IAM Credentials API's
  ``POST /v1/projects/-/serviceAccounts/<email>:signJwt``: a Bearer token
  ``authorize(token)`` accepts, an account in ``accounts``, body
  ``{"payload": "<claims JSON>"}``; answers ``{"keyId", "signedJwt"}``
  signed by ``key`` (``kid`` = ``key_id``);
* ``VaultGcpJudge`` -- ``check(body)`` for login_standin.VaultLoginStandIn:
  what vault-plugin-auth-gcp checks (plugin/path_login.go:
  ``parseAndValidateJwt``, ``getSigningKey``, ``validateBaseJWTClaims``,
  ``pathIamLogin``), with the signature verified by ``cryptography``
  against the public keys the judge knows by ``kid`` (Vault's lookup of
  Google's certs and of the service account's own keys);
* ``LeaderOnly`` -- a Vault that answers ``sys/leader`` only (active), for
  failures that must end before any login is sent.

Every server takes ``clock`` (seconds since the epoch, default
time.time): tests that drive the agent with a FakeClock hand the servers
and the judge the same time, as Vault and Google share the real one.

Facts relied on (research note for issue 20, section 2; Google's
references for signJwt and the metadata server's identity tokens):

  - identity token claims with ``format=full``: ``iss``
    https://accounts.google.com, ``aud`` (the audience asked for), ``azp``
    and ``sub`` (the account's unique id), ``email``, ``email_verified``,
    ``iat``, ``exp`` (= iat + 3600) and ``google.compute_engine``
    (``project_id``, ``project_number``, ``zone``, ``instance_id``,
    ``instance_name``, ``instance_creation_timestamp``); no audience is
    ``400`` "non-empty audience parameter required";
  - signJwt errors are Google API errors ``{"error": {"code", "message",
    "status"}}``: 401 UNAUTHENTICATED, 403 PERMISSION_DENIED "Permission
    'iam.serviceAccounts.signJwt' denied on resource (or it may not
    exist).", 400 INVALID_ARGUMENT;
  - Vault: ``exp`` present and not more than 60 s past ("JWT is expired or
    does not have proper 'exp' claim"), at most 60 min + 60 s ahead ("JWT
    must expire in 60 minutes, expires in ..."), ``sub`` present, every
    ``aud`` ending in ``vault/<role>``, a ``kid`` whose key verifies the
    signature ("unable to get public key ..."); iam roles: ``exp`` within
    the role's ``max_jwt_exp`` (15 min by default: "role requires that
    service account JWTs expire within 900 seconds"); gce roles: the
    ``google.compute_engine`` claims ("expected JWT to have claims with GCE
    metadata").
"""

import base64
import binascii
import json
import re
import threading
import time
import urllib.parse

from support.cred_servers import GceMetadataServer, _CredServer
from support.harness import LoopbackServer

__all__ = ["GceIdentityServer", "IamCredentialsServer", "VaultGcpJudge", "LeaderOnly",
           "decode_jwt", "google_error"]

GOOGLE_ISSUER = "https://accounts.google.com"


def _b64url(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(segment):
    if not re.match(r"\A[A-Za-z0-9_-]*\Z", segment):
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def sign_jwt(key, key_id, claims):
    """``header.claims.signature``, RS256 with ``key`` (an RsaKey), ``kid`` = key_id."""
    header = {"alg": "RS256", "kid": key_id, "typ": "JWT"}
    signing_input = "%s.%s" % (_b64url(json.dumps(header, separators=(",", ":"))),
                               _b64url(json.dumps(claims, separators=(",", ":"))))
    return signing_input + "." + _b64url(key.sign(signing_input.encode("ascii")))


def decode_jwt(jwt):
    """(header, claims) of a JWT, unverified."""
    parts = jwt.split(".")
    return json.loads(_unb64url(parts[0]).decode("utf-8")), json.loads(_unb64url(parts[1]).decode("utf-8"))


def google_error(code, status, message):
    """A Google API error answer."""
    return code, None, {"error": {"code": code, "message": message, "status": status}}


class GceIdentityServer(GceMetadataServer):
    """See the module docstring.  ``lifetime``: seconds an identity token
    lives (3600; negative: already expired, a lying server).  Recorded:
    ``identities`` (the tokens handed out)."""

    IDENTITY_PATH = GceMetadataServer.PREFIX + "instance/service-accounts/default/identity"

    def __init__(self, key=None, key_id="google-test-key-1", clock=time.time, lifetime=3600,
                 unique_id="104932271846385000001", **kwargs):
        GceMetadataServer.__init__(self, **kwargs)
        self.key, self.key_id, self.clock = key, key_id, clock
        self.lifetime, self.unique_id = lifetime, unique_id
        self.identities = []

    def respond(self, record):
        path, _, query = record.path.partition("?")
        if path != self.IDENTITY_PATH or record.method != "GET" \
                or record.header("Metadata-Flavor") != "Google":
            return GceMetadataServer.respond(self, record)
        q = dict((k, v[-1]) for k, v in urllib.parse.parse_qs(query).items())
        if not q.get("audience"):
            return 400, {"Metadata-Flavor": "Google"}, "non-empty audience parameter required"
        now = int(self.clock())
        claims = {"iss": GOOGLE_ISSUER, "aud": q["audience"], "azp": self.unique_id,
                  "sub": self.unique_id, "email": self.email, "email_verified": True,
                  "iat": now, "exp": now + int(self.lifetime)}
        if q.get("format") == "full":
            claims["google"] = {"compute_engine": {
                "project_id": self.project_id, "project_number": 123456789012,
                "zone": "europe-west1-b", "instance_id": "4567890123456789012",
                "instance_name": "vault-1", "instance_creation_timestamp": now - 86400}}
        token = sign_jwt(self.key, self.key_id, claims)
        with self._lock:
            self.identities.append(token)
        return 200, {"Metadata-Flavor": "Google", "Content-Type": "text/html; charset=utf-8"}, token


class IamCredentialsServer(_CredServer):
    """See the module docstring.  Recorded: ``requests``, ``payloads``
    (the claims asked to be signed), ``bearers`` (the tokens presented),
    ``signed`` (the JWTs handed out)."""

    PATH_RE = re.compile(r"\A/v1/projects/-/serviceAccounts/([^/:]+):signJwt\Z")

    def __init__(self, key, authorize, accounts, key_id="iam-system-key-7f3a"):
        _CredServer.__init__(self, None, None, None, None)
        self.key, self.authorize, self.key_id = key, authorize, key_id
        self.accounts = set(accounts)
        self.payloads, self.bearers, self.signed = [], [], []

    def respond(self, record):
        match = self.PATH_RE.match(record.path.split("?")[0])
        if match is None or record.method != "POST":
            return google_error(404, "NOT_FOUND", "no such method")
        bearer = record.header("Authorization") or ""
        self.bearers.append(bearer)
        if not bearer.startswith("Bearer ") or not self.authorize(bearer[len("Bearer "):]):
            return google_error(401, "UNAUTHENTICATED", "Request had invalid authentication "
                                "credentials. Expected OAuth 2 access token.")
        account = urllib.parse.unquote(match.group(1))
        if account not in self.accounts:
            return google_error(403, "PERMISSION_DENIED", "Permission 'iam.serviceAccounts.signJwt' "
                                "denied on resource (or it may not exist).")
        try:
            payload = json.loads(record.body.decode("utf-8"))["payload"]
            claims = json.loads(payload)
            if not isinstance(claims, dict):
                raise ValueError("not an object")
        except (ValueError, KeyError, TypeError):
            return google_error(400, "INVALID_ARGUMENT", "Invalid JWT payload.")
        self.payloads.append(claims)
        token = sign_jwt(self.key, self.key_id, claims)
        self.signed.append(token)
        return 200, None, {"keyId": self.key_id, "signedJwt": token}


class VaultGcpJudge:
    """``check(body)`` -> None or Vault's error text; see the module
    docstring.  ``keys``: {kid: PEM} of the keys Vault would find;
    ``kind``: the role's type ("iam" or "gce"); ``max_jwt_exp``: the iam
    role's limit in seconds.  ``accepted``: (header, claims) of each login
    it let through."""

    def __init__(self, role, kind, keys, max_jwt_exp=900, clock=time.time):
        self.role, self.kind, self.max_jwt_exp, self.clock = role, kind, max_jwt_exp, clock
        self.keys = {}
        for kid, pem in keys.items():
            self.add_key(kid, pem)
        self.accepted = []
        self._lock = threading.Lock()

    def add_key(self, kid, pem):
        from cryptography.hazmat.backends import default_backend
        from cryptography.hazmat.primitives import serialization
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, None, default_backend()).public_key()
        else:
            key = serialization.load_pem_public_key(data, default_backend())
        self.keys[kid] = key

    def __call__(self, body):
        if sorted(body) != ["jwt", "role"]:
            return "unexpected login fields %s" % sorted(body)
        if body["role"] != self.role:
            return "role %r not found" % body["role"]
        jwt = body["jwt"]
        try:
            header, claims = decode_jwt(jwt)
            signature = _unb64url(jwt.split(".")[2])
        except (ValueError, IndexError, binascii.Error, UnicodeDecodeError) as exc:
            return "unable to parse signed JWT: %s" % exc
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return "unable to parse signed JWT: not objects"
        problem = self._signature(header, claims, jwt, signature) or self._claims(claims)
        if problem is None:
            with self._lock:
                self.accepted.append((header, claims))
        return problem

    def _signature(self, header, claims, jwt, signature):
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        kid = header.get("kid")
        if header.get("alg") != "RS256":
            return "unable to parse signed JWT: unexpected signature algorithm %r" % header.get("alg")
        key = self.keys.get(kid) if kid else None
        if key is None:
            return ("unable to get public key for signed JWT: unable to get public key %r for JWT "
                    "subject %r: not found" % (kid, claims.get("sub")))
        try:
            key.verify(signature, jwt.rsplit(".", 1)[0].encode("ascii"), padding.PKCS1v15(),
                       hashes.SHA256())
        except InvalidSignature:
            return "go-jose/go-jose: error in cryptographic primitive"
        return None

    def _claims(self, claims):
        now, exp = self.clock(), claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp < now - 60:
            return "JWT is expired or does not have proper 'exp' claim"
        if exp - now > 3660:
            return "JWT must expire in 60 minutes, expires in %ds" % (exp - now)
        if not claims.get("sub"):
            return "expected JWT to have 'sub' claim with service account id or email"
        audiences = claims.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences
        suffix = "vault/%s" % self.role
        if not audiences or not all(isinstance(a, str) and a.endswith(suffix) for a in audiences):
            return "at least one of the JWT claim 'aud' must end in %r" % suffix
        compute = (claims.get("google") or {}).get("compute_engine") or {}
        if self.kind == "gce" and not compute.get("instance_id"):
            return "expected JWT to have claims with GCE metadata"
        if self.kind == "iam" and not compute and exp > now + self.max_jwt_exp:
            return "role requires that service account JWTs expire within %d seconds" % self.max_jwt_exp
        return None


class LeaderOnly(LoopbackServer):
    """A Vault that is the active node and refuses every login (a test
    using it must fail before its login is sent); ``paths`` records."""

    def __init__(self):
        LoopbackServer.__init__(self)
        self.paths = []

    def answer(self, handler):
        handler.read_body()
        self.paths.append(handler.path)
        if handler.path == "/v1/sys/leader":
            return 200, None, {"ha_enabled": True, "is_self": True, "leader_address": self.url}
        return 400, None, {"errors": ["this test's Vault takes no login"]}
