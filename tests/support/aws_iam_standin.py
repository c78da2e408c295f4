"""Vault's server side of an ``aws`` (IAM type) login, for the stand-in of
login_standin.py, and loopback AWS endpoints for the aws login tests.
Stdlib only; works on Python 3.6+.

* ``VaultAwsIam(sts_endpoint, roles, server_id=None)`` -- a ``check(body)``
  that judges a login body the way Vault's ``builtin/credential/aws``
  path_login.go does (facts in /tmp/auth-research.md section 1, read from
  Vault's source and Consul's port of it, internal/iamauth/token.go):

  - the four ``iam_*`` fields all present (else "supplied some of the auth
    values for the iam auth type but not all"), the method ``POST``;
  - ``iam_request_url`` and ``iam_request_body`` standard base64;
    ``iam_request_headers`` a JSON object (base64 of it, or plain) of
    name -> string or list of strings, names canonicalised as Go does;
  - with ``server_id`` (the mount's ``iam_server_id_header_value``): the
    X-Vault-AWS-IAM-Server-ID header present, equal, and among the
    Authorization header's SignedHeaders;
  - no ``X-Amz-*`` header outside the allow-list; a body with nothing but
    ``Action=GetCallerIdentity`` and ``Version``;
  - then it REPLAYS the request to ``sts_endpoint`` (moto's STS with
    signature checking on): ``<sts_endpoint>/<RequestURI>`` with ``Host`` the
    signed URL's host, every header of the map, the body -- so STS, not this
    code, judges the signature -- and takes the ARN from its
    GetCallerIdentityResponse;
  - the role is ``role`` or the ARN's friendly name; ``roles`` maps each
    role to its bound principal ARNs (``*`` suffix globs), compared with the
    canonical ARN (an assumed-role session counts as its role).

  It returns None or Vault's error text; ``callers`` lists the ARNs STS
  named, ``replays`` the replayed requests' headers.
* ``WebIdentitySts(moto)`` -- STS ``AssumeRoleWithWebIdentity`` on
  loopback, answered with credentials moto hands out for the same token
  (moto answers that unsigned call only with its auth off, so the
  exchange is made here, around moto's switch); anything else is relayed.
* ``HostileEndpoint(mode)`` -- an IMDS or STS that misbehaves: ``silent``
  (never answers), ``endless`` (a body that never ends), ``huge`` (a
  16 MiB answer), ``no_key`` / ``expired`` / ``not_json`` credentials.
"""

import base64
import binascii
import datetime
import fnmatch
import http.client
import json
import socket
import threading
import urllib.parse
import xml.etree.ElementTree as ET

from support.harness import LoopbackServer

__all__ = ["VaultAwsIam", "WebIdentitySts", "HostileEndpoint", "go_name", "canonical_arn",
           "SERVER_ID_HEADER"]

SERVER_ID_HEADER = "X-Vault-AWS-IAM-Server-ID"
ALLOWED_AMZ = ("X-Amz-Algorithm", "X-Amz-Content-Sha256", "X-Amz-Credential", "X-Amz-Date",
               "X-Amz-Security-Token", "X-Amz-Signature", "X-Amz-SignedHeaders")
IAM_FIELDS = ("iam_http_request_method", "iam_request_url", "iam_request_body",
              "iam_request_headers")


def go_name(name):
    """textproto.CanonicalMIMEHeaderKey for plain names."""
    return "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))


def canonical_arn(arn):
    """(canonical ARN, friendly name) as Vault's parseIamArn/canonicalArn;
    raises ValueError on an ARN it does not recognise."""
    parts = arn.split(":")
    if len(parts) != 6 or parts[0] != "arn" or parts[2] not in ("iam", "sts"):
        raise ValueError("unrecognized arn")
    path = parts[5].split("/")
    if len(path) < 2:
        raise ValueError("unrecognized arn: fewer than 2 slash-separated parts")
    kind, name = path[0], path[-1]
    if kind == "assumed-role":
        kind, name = "role", path[1]
    elif kind not in ("user", "role", "instance-profile"):
        raise ValueError("unrecognized principal type: %r" % kind)
    return "arn:%s:iam::%s:%s/%s" % (parts[1], parts[4], kind, name), name


def _b64(text):
    return base64.b64decode(text.encode("ascii"), validate=True)


def _headers(value):
    """framework.TypeHeader: a JSON object, or a string holding base64 of
    one, or the JSON itself; values a string or a list of them."""
    if isinstance(value, str):
        try:
            value = _b64(value).decode("utf-8")
        except (binascii.Error, ValueError):
            pass
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    out = {}
    for name, values in value.items():
        values = values if isinstance(values, list) else [values]
        out.setdefault(go_name(name), []).extend(str(v) for v in values)
    return out


class VaultAwsIam:
    """See the module docstring."""

    def __init__(self, sts_endpoint, roles, server_id=None, timeout=15):
        self.sts_endpoint = sts_endpoint.rstrip("/")
        self.roles = roles
        self.server_id = server_id
        self.timeout = timeout
        self.callers = []
        self.replays = []

    def __call__(self, body):
        given = [f for f in IAM_FIELDS if body.get(f)]
        if not given:
            return "didn't supply required authentication values"
        if len(given) != len(IAM_FIELDS):
            return "supplied some of the auth values for the iam auth type but not all"
        if body["iam_http_request_method"] != "POST":
            return "invalid iam_http_request_method; currently only 'POST' is supported"
        try:
            url = urllib.parse.urlsplit(_b64(body["iam_request_url"]).decode("utf-8"))
        except (binascii.Error, ValueError):
            return "failed to base64 decode iam_request_url"
        try:
            request_body = _b64(body["iam_request_body"])
        except (binascii.Error, ValueError):
            return "failed to base64 decode iam_request_body"
        try:
            headers = _headers(body["iam_request_headers"])
        except ValueError:
            return "error parsing iam_request_headers"
        problem = self._validate(headers, request_body.decode("utf-8", "replace"))
        if problem:
            return problem
        try:
            arn = self._replay(url, request_body, headers)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return "error making upstream request: %s" % exc
        return self._bind(arn, body.get("role") or "")

    def _validate(self, headers, request_body):
        if self.server_id:
            problem = self._server_id(headers)
            if problem:
                return "error validating %s header: %s" % (SERVER_ID_HEADER, problem)
        for name in headers:
            if name.startswith("X-Amz-") and name not in ALLOWED_AMZ:
                return "invalid request header: %s" % name
        form = urllib.parse.parse_qs(request_body, keep_blank_values=True)
        for key, values in form.items():
            if key == "Action":
                if values != ["GetCallerIdentity"]:
                    return "iam_request_body must have 'Action=GetCallerIdentity'"
            elif key != "Version":
                return "iam_request_body contains unexpected values"
        return None

    def _server_id(self, headers):
        provided = ",".join(next((v for k, v in headers.items()
                                  if k.lower() == SERVER_ID_HEADER.lower()), []))
        if not provided:
            return "missing header %s" % json.dumps(SERVER_ID_HEADER)
        if provided != self.server_id:
            return "expected %s but got %s" % (json.dumps(self.server_id), json.dumps(provided))
        if "Authorization" not in headers:
            return "missing Authorization header"
        authz = ",".join(headers["Authorization"])
        if "SignedHeaders=" not in authz:
            return "vault header wasn't signed"
        signed = authz.split("SignedHeaders=", 1)[1].split(",", 1)[0].split(";")
        if SERVER_ID_HEADER.lower() not in signed:
            return "vault header wasn't signed"
        return None

    def _replay(self, url, request_body, headers):
        """The request as Vault rebuilds it, to the configured STS; the ARN."""
        target = urllib.parse.urlsplit(self.sts_endpoint)
        request_uri = (url.path or "/") + ("?" + url.query if url.query else "")
        path = (target.path or "") + "/" + request_uri          # Vault: "%s/%s"
        send = [("Host", url.netloc)] + [(k, v) for k, vs in headers.items() for v in vs
                                         if k != "Host"]
        self.replays.append(send)
        conn_class = (http.client.HTTPSConnection if target.scheme == "https"
                      else http.client.HTTPConnection)
        conn = conn_class(target.hostname, target.port, timeout=self.timeout)
        try:
            conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
            for name, value in send:
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(request_body)))
            conn.endheaders(request_body)
            resp = conn.getresponse()
            data = resp.read(1 << 20)
        finally:
            conn.close()
        if resp.status != 200:
            raise ValueError("received error code %d from STS: %s"
                             % (resp.status, data.decode("utf-8", "replace")))
        root = ET.fromstring(data)
        arn = next((e.text for e in root.iter() if e.tag.endswith("}Arn") or e.tag == "Arn"), None)
        if not arn:
            raise ValueError("error parsing STS response")
        return arn.strip()

    def _bind(self, arn, role):
        try:
            canonical, friendly = canonical_arn(arn)
        except ValueError as exc:
            return "error parsing arn %s: %s" % (json.dumps(arn), exc)
        self.callers.append(arn)
        role = role or friendly
        if role not in self.roles:
            return "entry for role %s not found" % role
        bound = self.roles[role]
        if bound and canonical not in bound and not any(
                b.endswith("*") and fnmatch.fnmatchcase(arn, b) for b in bound):
            return "IAM Principal %s does not belong to the role %s" % (json.dumps(arn),
                                                                         json.dumps(role))
        return None


class WebIdentitySts(LoopbackServer):
    """STS AssumeRoleWithWebIdentity on loopback, answered with moto's
    credentials for the same role and token (see the module docstring).
    ``calls`` records each call's form."""

    def __init__(self, moto):
        LoopbackServer.__init__(self)
        self.moto = moto
        self.calls = []
        self._lock = threading.Lock()

    def answer(self, handler):
        form = dict((k, v[-1]) for k, v in urllib.parse.parse_qs(
            handler.read_body().decode("utf-8", "replace")).items())
        self.calls.append(form)
        if form.get("Action") != "AssumeRoleWithWebIdentity" or form.get("RoleArn") != self.moto.role_arn:
            return 400, {"Content-Type": "text/xml"}, (
                "<ErrorResponse><Error><Code>InvalidAction</Code><Message>unexpected</Message>"
                "</Error></ErrorResponse>")
        with self._lock:
            key, secret, token, expires = self.moto.assume_role_with_web_identity(
                token=form.get("WebIdentityToken", ""), session_name=form["RoleSessionName"])
        return 200, {"Content-Type": "text/xml"}, (
            "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>"
            "<AccessKeyId>%s</AccessKeyId><SecretAccessKey>%s</SecretAccessKey>"
            "<SessionToken>%s</SessionToken><Expiration>%s</Expiration></Credentials>"
            "</AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
            % (key, secret, token, expires.strftime("%Y-%m-%dT%H:%M:%SZ")))


class HostileEndpoint:
    """An IMDSv2 (token, role, credentials) or STS endpoint on loopback that
    answers the credentials request (or every request, for ``silent``)
    badly; ``mode``: silent, endless, huge, no_key, expired, not_json.
    ``sent`` counts the bytes it wrote; ``stop()`` closes every connection."""

    ROLE = "hostile-role"

    def __init__(self, mode):
        self.mode = mode
        self.sent = 0
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.url = "http://127.0.0.1:%d" % self._sock.getsockname()[1]
        # Built now, so a test tracing the agent's memory does not count it.
        self._huge = (b'{"Code": "Success", "AccessKeyId": "ASIAHOSTILE", "Padding": "'
                      + b"z" * (16 << 20) + b'"}') if mode == "huge" else b""
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        conn.settimeout(0.2)
        try:
            while not self._stop.is_set():
                head = self._head(conn)
                if head is None:
                    return
                if not self._answer(conn, head):
                    return
        except OSError:
            pass
        finally:
            conn.close()

    def _head(self, conn):
        data = b""
        while b"\r\n\r\n" not in data:
            if self._stop.is_set():
                return None
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return None
            data += chunk
        return data.split(b"\r\n", 1)[0].decode("latin-1")

    def _send(self, conn, status, body, length=True):
        head = "HTTP/1.1 %d X\r\n%sContent-Type: text/plain\r\n\r\n" % (
            status, "Content-Length: %d\r\n" % len(body) if length else "Connection: close\r\n")
        conn.sendall(head.encode("ascii"))
        conn.sendall(body)
        self.sent += len(body)

    def _answer(self, conn, request_line):
        method, path = request_line.split(" ")[:2]
        if self.mode == "silent":
            self._stop.wait(60)
            return False
        if method == "PUT":
            self._send(conn, 200, b"hostile-imds-token")
            return True
        if path.rstrip("/").endswith("security-credentials"):
            self._send(conn, 200, self.ROLE.encode("ascii"))
            return True
        return self._credentials(conn)

    def _credentials(self, conn):
        if self.mode == "endless":
            self._send(conn, 200, b"{", length=False)
            while not self._stop.is_set():
                conn.sendall(b'"x": "' + b"y" * 65530 + b'", ')
                self.sent += 65536
            return False
        now = datetime.datetime.now(datetime.timezone.utc)
        doc = {"Code": "Success", "AccessKeyId": "ASIAHOSTILE", "SecretAccessKey": "hostile-secret",
               "Token": "hostile-token",
               "Expiration": (now + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}
        if self.mode == "no_key":
            del doc["AccessKeyId"]
        elif self.mode == "expired":
            doc["Expiration"] = (now - datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = b"<html>no</html>" if self.mode == "not_json" else json.dumps(doc).encode("ascii")
        if self.mode == "huge":
            body = self._huge
        self._send(conn, 200, body)
        return True

