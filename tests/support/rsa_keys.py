"""RSA keys and Google credential files for the GCS tests.

Needs the ``cryptography`` package (the test venv has it); it is imported
when a function is first called, so importing this module is stdlib-only.
``cryptography`` is the ORACLE here: keys it makes and signatures it makes
(RSASSA-PKCS1-v1_5 with SHA-256, i.e. JWT "RS256") are what the agent's
stdlib signer must reproduce byte for byte (PKCS#1 v1.5 signatures are
deterministic).

    key = make_rsa_key(2048, "pkcs8")           # or "pkcs1"
    private_pem, public_pem, sign = key         # also key.private_pem ...
    sa = service_account_json(key.private_pem, token_server.token_url)
    jwt = make_jwt(key.sign, {"iss": sa["client_email"], ...})

Service-account key file fields (Google's "Create and delete service account
keys" / google-auth ``service_account.Credentials.from_service_account_info``):
``type`` ("service_account"), ``project_id``, ``private_key_id``,
``private_key`` (PKCS#8 PEM, "BEGIN PRIVATE KEY", in files Google makes),
``client_email``, ``client_id``, ``auth_uri``, ``token_uri``,
``auth_provider_x509_cert_url``, ``client_x509_cert_url``
(``universe_domain`` in newer files).  Authorized-user files (``gcloud auth
application-default login``): ``type`` ("authorized_user"), ``client_id``,
``client_secret``, ``refresh_token`` (and optionally ``quota_project_id``).
"""

import base64
import binascii
import collections
import json
import os

from support.harness import overridden

__all__ = ["RsaKey", "make_rsa_key", "service_account_json", "authorized_user_json",
           "write_json", "make_jwt", "b64url", "public_numbers", "PKCS8", "PKCS1"]

PKCS8 = "pkcs8"      # -----BEGIN PRIVATE KEY-----
PKCS1 = "pkcs1"      # -----BEGIN RSA PRIVATE KEY-----
_FORMAT_ALIASES = {
    "pkcs8": PKCS8, "private key": PKCS8, "begin private key": PKCS8,
    "pkcs1": PKCS1, "rsa": PKCS1, "traditional": PKCS1, "traditionalopenssl": PKCS1,
    "rsa private key": PKCS1, "begin rsa private key": PKCS1,
}

DEFAULT_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"

RsaKey = collections.namedtuple("RsaKey", "private_pem public_pem sign")
RsaKey.__doc__ = """(private_pem str, public_pem str, sign(bytes) -> bytes)."""


def make_rsa_key(bits=2048, fmt=PKCS8, public_exponent=65537):
    """A fresh RSA key: ``RsaKey(private_pem, public_pem, sign)``.

    ``fmt``: "pkcs8" (``BEGIN PRIVATE KEY``, what Google's key files hold) or
    "pkcs1" (``BEGIN RSA PRIVATE KEY``).  ``public_pem`` is a
    SubjectPublicKeyInfo ``BEGIN PUBLIC KEY`` PEM.  ``sign(data)`` is
    RSASSA-PKCS1-v1_5 over SHA-256 of ``data`` (JWT RS256) done by
    ``cryptography``."""
    from cryptography.hazmat.backends import default_backend
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    kind = _FORMAT_ALIASES.get(str(fmt).strip().lower().strip("-").strip())
    if kind is None:
        raise ValueError("fmt must be 'pkcs8' or 'pkcs1', not %r" % (fmt,))
    key = rsa.generate_private_key(public_exponent=public_exponent, key_size=bits,
                                   backend=default_backend())
    private_format = (serialization.PrivateFormat.PKCS8 if kind == PKCS8
                      else serialization.PrivateFormat.TraditionalOpenSSL)
    private_pem = key.private_bytes(serialization.Encoding.PEM, private_format,
                                    serialization.NoEncryption()).decode("ascii")
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def sign(data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    return RsaKey(private_pem, public_pem, sign)


def public_numbers(pem):
    """``(n, e)`` of a public key PEM, or of the public half of a private one."""
    from cryptography.hazmat.backends import default_backend
    from cryptography.hazmat.primitives import serialization

    data = pem.encode("ascii") if isinstance(pem, str) else pem
    if b"PRIVATE KEY" in data:
        key = serialization.load_pem_private_key(data, None, default_backend()).public_key()
    else:
        key = serialization.load_pem_public_key(data, default_backend())
    nums = key.public_numbers()
    return nums.n, nums.e


def service_account_json(private_pem, token_uri, client_email=None, project_id="test-project",
                         private_key_id=None, client_id=None, **extra):
    """A service-account key file as a dict (``json.dump`` it to a file, or
    use ``write_json``).  ``extra`` adds or overrides fields (``None``
    values remove a field, for tests of broken files)."""
    if client_email is None:
        client_email = "snapshot-agent@%s.iam.gserviceaccount.com" % project_id
    doc = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": private_key_id or binascii.hexlify(os.urandom(20)).decode("ascii"),
        "private_key": private_pem,
        "client_email": client_email,
        "client_id": client_id or str(100000000000000000000 + int.from_bytes(os.urandom(8), "big")),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
                                + client_email.replace("@", "%40"),
        "universe_domain": "googleapis.com",
    }
    return overridden(doc, extra)


def authorized_user_json(client_id="123456789-test.apps.googleusercontent.com",
                         client_secret="test-client-secret", refresh_token="1//test-refresh-token",
                         **extra):
    """An ``authorized_user`` credentials file as a dict."""
    doc = {"type": "authorized_user", "client_id": client_id,
           "client_secret": client_secret, "refresh_token": refresh_token}
    return overridden(doc, extra)


def write_json(path, doc, mode=0o600):
    """Write ``doc`` as JSON to ``path`` (mode 0600); returns ``path``."""
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2)
    os.chmod(path, mode)
    return str(path)


def b64url(data):
    """base64url without padding (RFC 7515)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(sign, claims, header=None):
    """``header.claims.signature`` signed with ``sign`` (e.g. an RsaKey's).
    ``header`` defaults to ``{"alg": "RS256", "typ": "JWT"}``."""
    if header is None:
        header = {"alg": "RS256", "typ": "JWT"}
    signing_input = "%s.%s" % (b64url(json.dumps(header, separators=(",", ":"))),
                               b64url(json.dumps(claims, separators=(",", ":"))))
    return "%s.%s" % (signing_input, b64url(sign(signing_input.encode("ascii"))))
