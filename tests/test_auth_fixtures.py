"""Self-tests for the auth-method fixtures (auth_fixtures.py, bao_tls.py,
bao_auth.py): the TLS cluster trusts and is trusted only the intended way,
and each login method works by hand (plain urllib, no agent code) and
refuses bad credentials with the text OpenBao gives.  The texts pinned here
are what the agent's one-line login errors will carry, so a new OpenBao
release that changes them shows up here first."""

import json
import ssl
import urllib.error
import urllib.request

import pytest

from support import bao_auth
from support import rsa_keys
from support.bao_tls import https_context, named_opener


def _call(cluster, method, path, body=None, context=None, server_name="bao.test", node=None,
          token=None, limit=None):
    """``(status, parsed JSON or the first ``limit`` bytes)`` of one request
    to ``node`` (default: the leader) over TLS with ``context`` (default:
    trusting the cluster's CA, no client certificate)."""
    context = context or https_context(cluster.pki.ca_cert)
    node = node or cluster.leader()
    headers = {"X-Vault-Request": "true"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["X-Vault-Token"] = token
    req = urllib.request.Request(node.addr + "/v1/" + path, data=data, headers=headers,
                                 method=method)
    try:
        with named_opener(context, server_name).open(req, timeout=30) as resp:
            raw = resp.read(limit) if limit else resp.read()
            return resp.status, raw if limit else json.loads(raw.decode())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode() or "{}")


def _errors(result):
    status, body = result
    return status, body.get("errors")


def _client_context(pki, which="client"):
    return https_context(pki.ca_cert, getattr(pki, which + "_cert"), getattr(pki, which + "_key"))


def _login_and_snapshot(cluster, setup, context=None, node=None):
    """Log in with ``setup.login`` and read the first bytes of a snapshot
    with the token; returns the auth block."""
    path, body = setup.login
    status, answer = _call(cluster, "POST", path, body, context=context, node=node)
    assert status == 200, answer
    auth = answer["auth"]
    assert auth["token_policies"] == ["default", "snapshot"]
    assert auth["lease_duration"] == 3600 and auth["renewable"] is True
    # from the leader: a standby answers 307 to the leader until the new token
    # reaches it (read-enabled standbys, ~0.1 s here)
    status, head = _call(cluster, "GET", "sys/storage/raft/snapshot", token=auth["client_token"],
                         limit=2)
    assert (status, head) == (200, b"\x1f\x8b")
    return auth


# ------------------------------------------------------------ TLS cluster


def test_tls_cluster_is_three_voters_over_tls(bao_tls):
    leader = bao_tls.leader()
    assert leader.addr.startswith("https://127.0.0.1:")
    assert len(bao_tls.standbys()) == 2
    status, body = _call(bao_tls, "GET", "sys/storage/raft/configuration",
                         token=bao_tls.root_token)
    assert status == 200
    assert [s["voter"] for s in body["data"]["config"]["servers"]] == [True] * 3


def test_tls_cluster_answers_with_its_ca_and_server_name(bao_tls):
    pki = bao_tls.pki
    assert _call(bao_tls, "GET", "sys/health")[0] == 200
    assert bao_tls.agent_tls_config() == {"addr": bao_tls.leader().addr, "ca_cert": pki.ca_cert,
                                          "tls_server_name": "bao.test"}


@pytest.mark.parametrize("server_name, ca", [
    (None, "ca_cert"),              # verifies 127.0.0.1: the certificate has no IP SAN
    ("other.test", "ca_cert"),      # a name the certificate does not carry
    ("bao.test", "other_ca_cert"),  # the right name from an unrelated CA
])
def test_tls_cluster_refuses_wrong_ca_or_server_name(bao_tls, server_name, ca):
    context = https_context(getattr(bao_tls.pki, ca))
    with pytest.raises(urllib.error.URLError) as info:
        _call(bao_tls, "GET", "sys/health", context=context, server_name=server_name)
    assert isinstance(info.value.reason, ssl.SSLError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value.reason)


def test_tls_cluster_refuses_plain_http(bao_tls):
    url = bao_tls.leader().addr.replace("https://", "http://") + "/v1/sys/health"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=10)
    assert info.value.code == 400
    assert b"Client sent an HTTP request to an HTTPS server" in info.value.read()


# -------------------------------------------------------------------- jwt


def test_jwt_login_reads_snapshot(jwt_auth, bao_tls):
    assert jwt_auth.config == {"vault_auth_method": "jwt", "vault_auth_role": "snapshot-agent",
                               "vault_auth_path": "jwt",
                               "jwt_file": jwt_auth.config["jwt_file"]}
    path, body = jwt_auth.login
    with open(jwt_auth.config["jwt_file"]) as fh:
        body = dict(body, jwt=fh.read())
    _login_and_snapshot(bao_tls, jwt_auth._replace(login=(path, body)))


JWT_REFUSALS = [
    ({"aud": "https://other.test"}, "error validating token: invalid audience (aud) claim: "
                                    "audience claim does not match any expected audience"),
    ({"aud": None}, "error validating token: invalid audience (aud) claim: "
                    "audience claim does not match any expected audience"),
    ({"exp_in": -3600}, "error validating token: invalid expiration time (exp) claim: "
                        "token is expired"),
    ({"sub": "someone-else"}, "error validating token: invalid subject (sub) claim"),
]


@pytest.mark.parametrize("claims, message", JWT_REFUSALS,
                         ids=["wrong-audience", "no-audience", "expired", "wrong-subject"])
def test_jwt_login_refused(jwt_auth, bao_tls, claims, message):
    path, body = jwt_auth.login
    result = _call(bao_tls, "POST", path, dict(body, jwt=jwt_auth.mint(**claims)))
    assert _errors(result) == (400, [message])


def test_jwt_login_refuses_other_key_and_unknown_role(jwt_auth, bao_tls):
    path, body = jwt_auth.login
    stranger = bao_auth.mint_jwt(rsa_keys.make_rsa_key(2048).sign)
    assert _errors(_call(bao_tls, "POST", path, dict(body, jwt=stranger))) == (400, [
        "error validating token: error verifying token signature: "
        "no known key successfully validated the token signature"])
    good = jwt_auth.mint()
    assert _errors(_call(bao_tls, "POST", path, {"role": "nope", "jwt": good})) == (
        400, ['role "nope" could not be found'])


# ------------------------------------------------------------------- cert


def test_cert_login_reads_snapshot_on_every_node(cert_auth, bao_tls):
    pki = bao_tls.pki
    assert cert_auth.config == {"vault_auth_method": "cert", "vault_auth_role": "agent",
                                "vault_auth_path": "cert", "client_cert": pki.client_cert,
                                "client_key": pki.client_key}
    for node in bao_tls.nodes:        # standbys forward the login with the certificate
        _login_and_snapshot(bao_tls, cert_auth, context=_client_context(pki), node=node)


def test_cert_login_without_name_tries_every_role(cert_auth, bao_tls):
    path, _ = cert_auth.login
    status, body = _call(bao_tls, "POST", path, {}, context=_client_context(bao_tls.pki))
    assert status == 200 and body["auth"]["metadata"]["cert_name"] == "agent"


@pytest.mark.parametrize("which, expected", [
    ("other_client", (400, ["invalid certificate or no client certificate supplied"])),
    (None, (400, ["no client certificate found"])),
])
def test_cert_login_refused(cert_auth, bao_tls, which, expected):
    path, body = cert_auth.login
    context = _client_context(bao_tls.pki, which) if which else None
    assert _errors(_call(bao_tls, "POST", path, body, context=context)) == expected


def test_cert_login_refuses_expired_certificate_with_500(cert_auth, bao_tls):
    path, body = cert_auth.login
    status, errors = _errors(_call(bao_tls, "POST", path, body,
                                   context=_client_context(bao_tls.pki, "expired_client")))
    assert status == 500      # not 400: the agent must not read 5xx here as "try again"
    assert len(errors) == 1
    assert errors[0].startswith("failed to verify client's certificate: x509: certificate has "
                                "expired or is not yet valid: current time ")


def test_cert_login_refuses_unknown_role(cert_auth, bao_tls):
    path, _ = cert_auth.login
    assert _errors(_call(bao_tls, "POST", path, {"name": "nope"},
                         context=_client_context(bao_tls.pki))) == (
        400, ["invalid certificate or no client certificate supplied"])


# -------------------------------------------------------- userpass / ldap


def test_userpass_login_reads_snapshot(userpass_auth, bao_tls):
    assert userpass_auth.config == {
        "vault_auth_method": "userpass", "vault_auth_path": "userpass",
        "username": "snapshot-agent", "password_file": userpass_auth.config["password_file"]}
    with open(userpass_auth.config["password_file"]) as fh:
        assert fh.read() == userpass_auth.extra["password"]
    _login_and_snapshot(bao_tls, userpass_auth)


def test_ldap_shape_login_reads_snapshot(ldap_auth, bao_tls):
    assert ldap_auth.config["vault_auth_method"] == "ldap"
    assert ldap_auth.login[0] == "auth/ldap/login/snapshot-agent"
    _login_and_snapshot(bao_tls, ldap_auth)


@pytest.mark.parametrize("path", ["auth/userpass/login/snapshot-agent",
                                  "auth/userpass/login/nobody"])
def test_userpass_login_refused(userpass_auth, bao_tls, path):
    assert _errors(_call(bao_tls, "POST", path, {"password": "wrong"})) == (
        400, ["invalid username or password"])


# ----------------------------------------------- methods OpenBao lacks


@pytest.mark.parametrize("kind", ["aws", "gcp", "azure"])
def test_openbao_has_no_cloud_auth_methods(bao_tls, kind):
    status, body = bao_tls.api("POST", "sys/auth/" + kind, {"type": kind})
    assert (status, body) == (400, {"errors": ["plugin not found in the catalog: " + kind]})


def test_auth_secrets_go_to_the_session_secret_scan(userpass_auth, jwt_auth, session_secrets):
    from support import auth_fixtures
    assert session_secrets is not auth_fixtures._OWN_SECRETS     # conftest's KNOWN_SECRETS
    with open(jwt_auth.config["jwt_file"]) as fh:
        assert fh.read() in session_secrets
    assert userpass_auth.extra["password"] in session_secrets
