"""A loopback stand-in for the Kubernetes TokenReview API, for end-to-end
tests of the agent's Kubernetes auth against a real OpenBao.  Stdlib only;
works on Python 3.6+.

OpenBao's ``kubernetes`` auth method does not verify a login JWT itself
(unless ``pem_keys`` are configured): it decodes the JWT's claims, checks the
role's bound service-account names and namespaces against them, then asks
the Kubernetes API whether the token is valid and compares the answer with
the claims.  ``TokenReviewServer`` answers that question for a set of tokens
it was told about::

    with TokenReviewServer(reviewer_token="reviewer-jwt") as k8s:
        k8s.add_token(jwt, name="snapshot-agent", namespace="vault", uid=uid)
        ...   # auth/kubernetes/config kubernetes_host=k8s.url,
        ...   #   token_reviewer_jwt="reviewer-jwt"
        assert k8s.reviewed_tokens() == [jwt]

It is one of cred_servers' loopback servers (``http.server`` in a daemon
thread on 127.0.0.1, port chosen by the kernel) and records every request
(``requests``, with what each review saw and answered).  ``make_sa_jwt`` builds a JWT with the
claims a Kubernetes service-account token carries.

Protocol facts relied on (OpenBao ``builtin/credential/kubernetes``,
``token_review.go``, ``path_login.go`` and ``path_config.go``, read with the
search tools; the Kubernetes API reference for TokenReview v1):

  - the plugin sends ``POST {kubernetes_host}/apis/authentication.k8s.io/v1/
    tokenreviews`` with ``Authorization: Bearer <token_reviewer_jwt>`` (the
    login JWT itself when no reviewer JWT is configured) and a TokenReview
    JSON body ``{"spec": {"token": JWT, "audiences": [...]}}`` (its ``kind``
    and ``apiVersion`` are left out; the API server defaults them from the
    URL).  ``audiences`` is the role's ``audience`` or else the JWT's own
    ``aud`` claim;
  - the API server answers ``201 Created`` with the TokenReview, ``status``
    filled: ``authenticated`` true, ``user.username``
    ``system:serviceaccount:<namespace>:<name>``, ``user.uid`` (the service
    account's UID), ``user.groups``, and ``audiences`` (those of the
    requested ones the token is valid for).  For a token it does not accept
    ``authenticated`` is left out (false) and ``status.error`` says why;
  - a request whose bearer is not a valid credential gets ``401`` with a
    ``Status`` object (``"status": "Failure"``, ``"reason": "Unauthorized"``);
    the plugin turns that into "service account unauthorized";
  - the plugin then requires username ``system:serviceaccount:NS:NAME`` with
    NS, NAME and uid equal to the JWT's claims (``kubernetes.io/
    serviceaccount/namespace``, ``.../service-account.name``,
    ``.../service-account.uid``, or for projected tokens the ``kubernetes.io``
    object: ``namespace``, ``serviceaccount.name``/``uid``), and a non-empty
    intersection of requested and returned audiences.
"""

import base64
import json
import os
import time
import uuid

from support.cred_servers import _CredServer

__all__ = ["TokenReviewServer", "ServiceAccount", "make_sa_jwt", "decode_claims",
           "TOKENREVIEW_PATH", "DEFAULT_AUDIENCE"]

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
DEFAULT_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
PROJECTED_ISSUER = DEFAULT_AUDIENCE


class ServiceAccount:
    """What the API server knows about one token."""

    def __init__(self, name, namespace, uid=None, audiences=(DEFAULT_AUDIENCE,)):
        self.name = name
        self.namespace = namespace
        self.uid = uid or str(uuid.uuid4())
        self.audiences = list(audiences)

    @property
    def username(self):
        return "system:serviceaccount:%s:%s" % (self.namespace, self.name)

    def __repr__(self):
        return "<ServiceAccount %s uid=%s>" % (self.username, self.uid)


def _status_object(code, reason, message):
    """A Kubernetes ``Status`` (the body of an API error)."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class TokenReviewServer(_CredServer):
    """The TokenReview endpoint of a Kubernetes API server, on loopback
    (lifecycle, request log and fault injection from cred_servers).

    ``reviewer_token``: the bearer token the caller must present (OpenBao's
    ``token_reviewer_jwt``); None accepts any token the server knows (the
    plugin then uses the login JWT itself as the bearer).

    Each recorded request (``requests``) also carries what the review saw
    and answered: ``bearer``, ``token`` (spec.token), ``audiences``
    (spec.audiences as sent), ``authenticated`` and ``error``."""

    def __init__(self, reviewer_token=None):
        _CredServer.__init__(self, None, None, None, None)
        self.reviewer_token = reviewer_token
        self.tokens = {}             # token -> ServiceAccount

    # -- tokens

    def add_token(self, token, name, namespace, uid=None, audiences=(DEFAULT_AUDIENCE,)):
        """Make ``token`` valid for that service account; returns the
        ServiceAccount."""
        account = ServiceAccount(name, namespace, uid, audiences)
        with self._lock:
            self.tokens[token] = account
        return account

    def revoke(self, token):
        """Forget ``token`` (as when its service account was deleted)."""
        with self._lock:
            self.tokens.pop(token, None)

    def reviewed_tokens(self):
        """``spec.token`` of every TokenReview received, in order."""
        with self._lock:
            return [r.token for r in self.requests if getattr(r, "token", None) is not None]

    # -- answers

    def respond(self, review):
        auth = review.header("Authorization") or ""
        review.bearer = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        review.token = review.audiences = review.error = None
        review.authenticated = False
        status, payload = self._review(review)
        return status, {}, payload

    def _review(self, review):
        path = review.path.split("?", 1)[0]
        if path != TOKENREVIEW_PATH:
            return 404, _status_object(404, "NotFound", "the server could not find the "
                                       "requested resource")
        if review.method != "POST":
            return 405, _status_object(405, "MethodNotAllowed", "the server does not allow "
                                       "this method on the requested resource")
        with self._lock:
            tokens = dict(self.tokens)
        bearer = review.bearer
        allowed = (bearer == self.reviewer_token if self.reviewer_token is not None
                   else bearer in tokens)
        if not bearer or not allowed:
            review.error = "Unauthorized"
            return 401, _status_object(401, "Unauthorized", "Unauthorized")
        try:
            doc = json.loads(review.body.decode("utf-8"))
            spec = doc["spec"]
            token = spec["token"]
            audiences = spec.get("audiences") or []
            if not isinstance(token, str) or not isinstance(audiences, list):
                raise TypeError("bad spec")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            review.error = "bad TokenReview body"
            return 400, _status_object(400, "BadRequest", "bad TokenReview body: %r"
                                       % review.body[:200])
        review.token = token
        review.audiences = list(audiences)
        if doc.get("kind", "TokenReview") != "TokenReview" or \
                doc.get("apiVersion", "authentication.k8s.io/v1") != "authentication.k8s.io/v1":
            review.error = "wrong kind/apiVersion"
            return 400, _status_object(400, "BadRequest", review.error)
        answer = {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                  "metadata": {"creationTimestamp": None},
                  "spec": {"token": token, "audiences": audiences} if audiences
                  else {"token": token}}
        account = tokens.get(token)
        if account is None:
            review.error = "[invalid bearer token, token lookup failed]"
            answer["status"] = {"user": {}, "error": review.error}
            return 201, answer
        valid_for = ([a for a in audiences if a in account.audiences] if audiences
                     else list(account.audiences))
        if not valid_for:
            review.error = ("[invalid bearer token, token audiences %s is invalid for the "
                            "target audiences %s]" % (account.audiences, audiences))
            answer["status"] = {"user": {}, "error": review.error}
            return 201, answer
        review.authenticated = True
        answer["status"] = {
            "authenticated": True,
            "user": {
                "username": account.username,
                "uid": account.uid,
                "groups": ["system:serviceaccounts",
                           "system:serviceaccounts:%s" % account.namespace,
                           "system:authenticated"],
            },
            "audiences": valid_for,
        }
        return 201, answer


# ------------------------------------------------------------------- JWTs


def _b64url(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_sa_jwt(account, sign=None, projected=True, lifetime=3600, extra=None):
    """A service-account JWT for ``account`` (a ServiceAccount).

    ``projected``: the claims of a projected (bound) token (``iss``, ``aud``,
    ``exp``/``iat``/``nbf`` and the ``kubernetes.io`` object), else those of a
    legacy secret-based token (``kubernetes.io/serviceaccount/...`` claims).
    ``sign(bytes) -> bytes`` makes an RS256 signature (e.g.
    ``rsa_keys.make_rsa_key().sign``); without it the signature is random
    bytes (OpenBao checks signatures only when ``pem_keys`` are set)."""
    now = int(time.time())
    if projected:
        claims = {
            "aud": list(account.audiences),
            "exp": now + lifetime, "iat": now, "nbf": now,
            "iss": PROJECTED_ISSUER,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": account.namespace,
                "pod": {"name": "snapshot-agent-0", "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": account.name, "uid": account.uid},
            },
            "sub": account.username,
        }
    else:
        claims = {
            "iss": "kubernetes/serviceaccount",
            "kubernetes.io/serviceaccount/namespace": account.namespace,
            "kubernetes.io/serviceaccount/secret.name": account.name + "-token-x1y2z",
            "kubernetes.io/serviceaccount/service-account.name": account.name,
            "kubernetes.io/serviceaccount/service-account.uid": account.uid,
            "sub": account.username,
        }
    claims.update(extra or {})
    header = {"alg": "RS256", "kid": "test-key", "typ": "JWT"}
    signing_input = "%s.%s" % (_b64url(json.dumps(header, separators=(",", ":"))),
                               _b64url(json.dumps(claims, separators=(",", ":"))))
    signature = sign(signing_input.encode("ascii")) if sign is not None else os.urandom(256)
    return "%s.%s" % (signing_input, _b64url(signature))


def decode_claims(jwt):
    """The (unverified) claims of a compact JWT."""
    payload = jwt.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload.encode("ascii")).decode("utf-8"))
