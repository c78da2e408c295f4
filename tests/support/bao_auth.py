"""Configure OpenBao's ``jwt``, ``cert`` and ``userpass`` auth methods in a
test cluster (``bao_cluster.BaoCluster`` or ``bao_tls.BaoTlsCluster``) and
hand back what the agent's config needs to log in with them.

Every ``setup_*`` function writes the ``snapshot`` policy (read on
``sys/storage/raft/snapshot``, nothing else), enables the method at its mount
if missing, (re)writes one role or user, and returns an :class:`AuthSetup`:
``config`` (the agent's keys, see CONFIG_KEYS), ``login`` (the JSON body
and path a client posts, for tests that log in by hand) and the secret
material a test may need (``secrets``: add them to the session's secret
scan)::

    jwt = setup_jwt(cluster, str(tmp_path))          # key, role, audience
    token = jwt.mint(aud=jwt.audience, exp_in=300)   # RS256 via cryptography
    jwt.write_token(token)                           # into config["jwt_file"]

    cert = setup_cert(cluster, cluster.pki.ca_cert)  # needs the TLS cluster
    up = setup_userpass(cluster, str(tmp_path), mount="ldap")   # LDAP's shape

The agent's key names are a PROPOSAL for issue 20 (the lead decides): one
table, CONFIG_KEYS, maps each meaning to its name, so renaming is one edit.
Following the issue, the role and the mount are the Go agent's
``vault_auth_role``/``vault_auth_path`` for every method (today's
``k8s_auth_role``/``k8s_auth_path`` become their aliases).

Facts relied on (OpenBao ``internal/builtin/credential/jwt``, ``cert``,
``userpass``; checked against the running server by test_auth_fixtures.py):

  - jwt: ``auth/<mount>/config`` takes ``jwt_validation_pubkeys`` (PEM
    list; then no OIDC discovery is needed); a role needs ``role_type``
    ``jwt``, ``user_claim`` and, when tokens carry ``aud``,
    ``bound_audiences`` ("audience claim found in JWT but no audiences bound
    to the role" otherwise).  ``exp`` is checked with ``expiration_leeway``
    (default 150 s) on top, so an "expired" test token must be older than
    that; login is ``POST auth/<mount>/login {"role", "jwt"}``;
  - cert: ``auth/<mount>/certs/<name>`` with ``certificate`` (PEM of a CA
    or leaf the client certificate must chain to); login is
    ``POST auth/<mount>/login {"name": <name>}`` over a TLS connection that
    presents the client certificate (the listener must ask for one: OpenBao
    does by default);
  - userpass: ``auth/<mount>/users/<username> {"password", ...}``; login is
    ``POST auth/<mount>/login/<username> {"password"}``, the same shape as
    the ``ldap`` method, hence the second mount named ``ldap``.
"""

import collections
import os
import time
import uuid

from support.bao_cluster import SNAPSHOT_POLICY_HCL

__all__ = ["AuthSetup", "CONFIG_KEYS", "setup_jwt", "setup_cert", "setup_userpass",
           "write_snapshot_policy", "enable_auth", "mint_jwt", "write_secret_file",
           "JWT_AUDIENCE", "JWT_ISSUER"]

JWT_AUDIENCE = "https://vault-snapshot-agent.test"
JWT_ISSUER = "https://issuer.test"

# meaning -> the agent's config key (PROPOSED names; see the module docstring)
CONFIG_KEYS = {
    "method": "vault_auth_method",
    "role": "vault_auth_role",          # jwt role, cert role name (login "name"), ...
    "path": "vault_auth_path",          # the mount, default: the method's usual one
    "jwt_file": "jwt_file",             # re-read at each login
    "username": "username",             # userpass / ldap
    "password_file": "password_file",   # re-read at each login; never the password itself
    "client_cert": "client_cert",       # existing keys, used by cert auth
    "client_key": "client_key",
}

AuthSetup = collections.namedtuple("AuthSetup", "config login secrets extra")
AuthSetup.__doc__ = """``config``: agent keys; ``login``: (path, body) of the
login call; ``secrets``: values the secret scan must never find in a log;
``extra``: method specifics (a dict)."""


def _config(**meaning):
    return dict((CONFIG_KEYS[k], v) for k, v in meaning.items() if v is not None)


# ------------------------------------------------------------- plumbing


def write_snapshot_policy(cluster, name="snapshot"):
    cluster.api("PUT", "sys/policies/acl/" + name, {"policy": SNAPSHOT_POLICY_HCL},
                expect=(200, 204))
    return name


def enable_auth(cluster, kind, mount=None):
    """Enable auth method ``kind`` at ``mount`` (default: ``kind``) unless
    something is mounted there already; returns the mount."""
    mount = (mount or kind).strip("/")
    _, auths = cluster.api("GET", "sys/auth", expect=200)
    table = auths.get("data", auths)
    if (mount + "/") not in table:
        cluster.api("POST", "sys/auth/" + mount, {"type": kind}, expect=(200, 204))
    return mount


def write_secret_file(path, text):
    """Write ``text`` to ``path`` with mode 0600 (what the agent reads
    passwords and JWTs from); returns the path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


# ------------------------------------------------------------------ jwt


def mint_jwt(sign, aud=JWT_AUDIENCE, exp_in=300, sub="snapshot-agent", iss=JWT_ISSUER,
             now=None, **claims):
    """An RS256 JWT signed by ``sign`` (an rsa_keys.RsaKey's): ``aud`` (str or
    list; None leaves it out), ``exp`` = now + ``exp_in`` seconds (negative:
    already expired; None leaves it out), ``iat``/``nbf`` = now, ``sub``,
    ``iss``, plus ``claims``."""
    from support.rsa_keys import make_jwt

    now = int(time.time() if now is None else now)
    body = {"sub": sub, "iss": iss, "iat": now, "nbf": now, "jti": uuid.uuid4().hex}
    if aud is not None:
        body["aud"] = aud
    if exp_in is not None:
        body["exp"] = now + int(exp_in)
    body.update(claims)
    return make_jwt(sign, body)


class JwtSetup(AuthSetup):
    """AuthSetup plus ``mint(**kw)`` (see :func:`mint_jwt`) and
    ``write_token(jwt)`` (into ``config["jwt_file"]``)."""

    __slots__ = ()

    def mint(self, **kwargs):
        return mint_jwt(self.extra["key"].sign, **kwargs)

    def write_token(self, token):
        return write_secret_file(self.config[CONFIG_KEYS["jwt_file"]], token)


def setup_jwt(cluster, directory, role="snapshot-agent", mount="jwt", audience=JWT_AUDIENCE,
              key=None, token_ttl="1h", token_max_ttl="24h", exp_in=600):
    """``jwt`` auth at ``mount`` trusting a fresh RSA key (or ``key``, an
    rsa_keys.RsaKey) through ``jwt_validation_pubkeys``, with ``role``
    bound to ``audience`` and ``sub`` ``snapshot-agent``.  A valid token
    (expiring in ``exp_in`` s) is written to ``<directory>/jwt`` (the
    config's ``jwt_file``).  ``extra``: key, audience, issuer, role, mount."""
    from support import rsa_keys

    key = key or rsa_keys.make_rsa_key(2048)
    policy = write_snapshot_policy(cluster)
    mount = enable_auth(cluster, "jwt", mount)
    cluster.api("POST", "auth/%s/config" % mount,
                {"jwt_validation_pubkeys": [key.public_pem], "bound_issuer": JWT_ISSUER},
                expect=(200, 204))
    cluster.api("POST", "auth/%s/role/%s" % (mount, role), {
        "role_type": "jwt",
        "bound_audiences": [audience],
        "bound_subject": "snapshot-agent",
        "user_claim": "sub",
        "token_policies": [policy],
        "token_ttl": token_ttl,
        "token_max_ttl": token_max_ttl,
    }, expect=(200, 204))
    jwt_file = os.path.join(directory, "jwt")
    setup = JwtSetup(
        _config(method="jwt", role=role, path=mount, jwt_file=jwt_file),
        ("auth/%s/login" % mount, {"role": role, "jwt": None}),
        [],
        {"key": key, "audience": audience, "issuer": JWT_ISSUER, "role": role, "mount": mount},
    )
    token = setup.mint(aud=audience, exp_in=exp_in)
    setup.write_token(token)
    setup.secrets.extend([token, key.private_pem])
    return setup


# ----------------------------------------------------------------- cert


def setup_cert(cluster, ca_file, role="agent", mount="cert", token_ttl="1h",
               token_max_ttl="24h", client_cert=None, client_key=None):
    """``cert`` auth at ``mount`` with role ``role`` trusting the CA in
    ``ca_file``.  The config's ``client_cert``/``client_key`` default to the
    TLS cluster's ``pki.client_cert``/``client_key`` when it has a pki."""
    with open(ca_file) as fh:
        ca_pem = fh.read()
    policy = write_snapshot_policy(cluster)
    mount = enable_auth(cluster, "cert", mount)
    cluster.api("POST", "auth/%s/certs/%s" % (mount, role), {
        "certificate": ca_pem,
        "display_name": role,
        "token_policies": [policy],
        "token_ttl": token_ttl,
        "token_max_ttl": token_max_ttl,
    }, expect=(200, 204))
    pki = getattr(cluster, "pki", None)
    if pki is not None:
        client_cert = client_cert or pki.client_cert
        client_key = client_key or pki.client_key
    return AuthSetup(
        _config(method="cert", role=role, path=mount, client_cert=client_cert,
                client_key=client_key),
        ("auth/%s/login" % mount, {"name": role}),
        [],
        {"role": role, "mount": mount, "ca_file": ca_file},
    )


# ------------------------------------------------------- userpass / ldap


def setup_userpass(cluster, directory, username="snapshot-agent", mount="userpass",
                   password=None, token_ttl="1h", token_max_ttl="24h"):
    """``userpass`` at ``mount`` (use ``mount="ldap"`` for the LDAP login
    shape; the config then says ``vault_auth_method: ldap``) with one user;
    the password (random unless given) goes to ``<directory>/<mount>.password``
    (the config's ``password_file``)."""
    password = password or "pw-" + uuid.uuid4().hex
    policy = write_snapshot_policy(cluster)
    mount = enable_auth(cluster, "userpass", mount)
    cluster.api("POST", "auth/%s/users/%s" % (mount, username), {
        "password": password,
        "token_policies": [policy],
        "token_ttl": token_ttl,
        "token_max_ttl": token_max_ttl,
    }, expect=(200, 204))
    password_file = write_secret_file(os.path.join(directory, mount + ".password"), password)
    method = "ldap" if mount == "ldap" else "userpass"
    return AuthSetup(
        _config(method=method, path=mount, username=username, password_file=password_file),
        ("auth/%s/login/%s" % (mount, username), {"password": password}),
        [password],
        {"mount": mount, "username": username, "password": password},
    )
