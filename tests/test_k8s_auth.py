"""Kubernetes auth (``"vault_auth_method": "k8s"``) end to end: the agent logs
in to the real OpenBao cluster's ``kubernetes`` auth method, which checks the
service-account JWT with a loopback Kubernetes TokenReview API
(k8s_tokenreview.TokenReviewServer).

OpenBao does not verify the JWT's signature here (no ``pem_keys``): it reads
the claims, checks the role's bound service account and namespace, and asks
the TokenReview API, which is the authority -- a token it does not know is
refused.  ``kubernetes_ca_cert`` must be given with ``disable_local_ca_jwt``
(OpenBao refuses the config otherwise), although the API is plain http on
loopback here, so a throw-away CA certificate is configured.
"""

import datetime
import json
import os
import re
import sys
import types
import uuid

import pytest

import conftest
from support import rsa_keys
import vault_snapshot_agent as vsa
from support.harness import (child_env, error_lines, read, run_main, snapshots, start_agent, stop,
                             wait_for)
from support.k8s_tokenreview import DEFAULT_AUDIENCE, ServiceAccount, TokenReviewServer, make_sa_jwt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY_FILE = os.path.join(ROOT, "contrib", "snapshot-policy.hcl")
TOKEN_RE = re.compile(r"\b(?:hvs|hvb|hvr|s|b|r|sb)\.[A-Za-z0-9_-]{20,}")

# as in contrib/deploy/kubernetes/cronjob.yaml
ROLE = "vault-snapshot-agent"
SA_NAME, SA_NAMESPACE = "vault-snapshot-agent", "vault"
POLICY = "k8s-snapshot"
MOUNT = "kubernetes"                       # the agent's default k8s_auth_path
SHORT_ROLE = "short-ttl"                   # on MOUNT, tokens live 2 s
CUSTOM_MOUNT = "k8s-snap"
CUSTOM_ROLE, CUSTOM_SA = "custom-role", "snapshot-custom"    # exist only on CUSTOM_MOUNT


# -- fixtures and helpers ---------------------------------------------------------

def _throwaway_ca_pem():
    """A self-signed CA certificate (PEM) for ``kubernetes_ca_cert``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, u"test-kubernetes-ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@pytest.fixture(scope="module")
def k8s(bao_cluster):
    """The kubernetes auth method at ``kubernetes`` and ``k8s-snap``, both
    pointed at one TokenReviewServer; the snapshot policy; roles ROLE and
    SHORT_ROLE (default mount) and CUSTOM_ROLE (custom mount)."""
    reviewer = "reviewer-" + uuid.uuid4().hex
    conftest.KNOWN_SECRETS.add(reviewer)
    server = TokenReviewServer(reviewer_token=reviewer).start()
    enabled = []
    try:
        with open(POLICY_FILE) as handle:
            bao_cluster.api("PUT", "sys/policies/acl/" + POLICY, {"policy": handle.read()},
                            expect=(200, 204))
        ca_pem = _throwaway_ca_pem()
        _, auths = bao_cluster.api("GET", "sys/auth", expect=200)
        for mount in (MOUNT, CUSTOM_MOUNT):
            if (mount + "/") not in auths.get("data", auths):
                bao_cluster.api("POST", "sys/auth/" + mount, {"type": "kubernetes"},
                                expect=(200, 204))
                enabled.append(mount)
            bao_cluster.api("POST", "auth/%s/config" % mount,
                            {"kubernetes_host": server.url, "kubernetes_ca_cert": ca_pem,
                             "disable_local_ca_jwt": True, "token_reviewer_jwt": reviewer},
                            expect=(200, 204))
        roles = [(MOUNT, ROLE, SA_NAME, "1h", "24h"), (MOUNT, SHORT_ROLE, SA_NAME, "2s", "2s"),
                 (CUSTOM_MOUNT, CUSTOM_ROLE, CUSTOM_SA, "1h", "24h")]
        for mount, role, account, ttl, max_ttl in roles:
            bao_cluster.api("POST", "auth/%s/role/%s" % (mount, role),
                            {"bound_service_account_names": [account],
                             "bound_service_account_namespaces": [SA_NAMESPACE],
                             "token_policies": [POLICY], "token_ttl": ttl,
                             "token_max_ttl": max_ttl},
                            expect=(200, 204))
        yield types.SimpleNamespace(server=server, reviewer=reviewer,
                                    key=rsa_keys.make_rsa_key())
    finally:
        server.stop()
        for mount in enabled:
            bao_cluster.api("DELETE", "sys/auth/" + mount)


def new_jwt(k8s, name=SA_NAME, namespace=SA_NAMESPACE, known=True, projected=True):
    """A fresh service-account JWT (RS256-signed), valid for the TokenReview
    server when ``known``."""
    account = ServiceAccount(name, namespace)
    jwt = make_sa_jwt(account, sign=k8s.key.sign, projected=projected)
    conftest.KNOWN_SECRETS.add(jwt)
    if known:
        k8s.server.add_token(jwt, account.name, account.namespace, account.uid,
                             account.audiences)
    return jwt


def write_token(path, jwt):
    path = str(path)
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    with open(path, "w") as handle:
        handle.write(jwt)          # kubelet writes no trailing newline
    os.chmod(path, 0o600)
    return path


def write_config(path, addr, token_path, snapdir, **extra):
    config = {"addr": addr, "vault_auth_method": "k8s", "k8s_auth_role": ROLE,
              "k8s_token_path": str(token_path), "frequency": "1h", "retain": 0,
              "local_storage": {"path": str(snapdir)}}
    config.update(extra)
    with open(str(path), "w") as handle:
        json.dump(config, handle)
    return str(path)


def once_with(bao_cluster, k8s, tmp_path, jwt, **extra):
    """Write ``jwt`` as the token file and run one in-process ``--once`` at
    debug level with k8s auth (plus ``extra`` config): (code, log, snapdir)."""
    snapdir = tmp_path / "snaps"
    token_path = write_token(tmp_path / "sa" / "token", jwt) if jwt is not None \
        else tmp_path / "sa" / "token"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, token_path, snapdir,
                          **extra)
    k8s.server.clear()
    code, log = run_main("-c", config, "--once", "--log-level", "debug")
    return code, log, snapdir


def assert_no_secrets(log, *jwts, reviewer=None):
    for jwt in jwts:
        assert jwt not in log
        assert jwt.rsplit(".", 1)[1] not in log        # not even the signature alone
    if reviewer:
        assert reviewer not in log
    match = TOKEN_RE.search(log)
    assert match is None, match.group(0)


# -- 1. one cycle --------------------------------------------------------------------

def test_once_with_k8s_auth_stores_a_verified_snapshot(bao_cluster, k8s, tmp_path):
    jwt = new_jwt(k8s)
    code, log, snapdir = once_with(bao_cluster, k8s, tmp_path, jwt)
    assert code == 0, log
    names = snapshots(snapdir)
    assert len(names) == 1, log
    path = os.path.join(str(snapdir), names[0])
    info = vsa.verify_file(path)
    assert info.size > 0 and info.index > 0 and info.term > 0
    assert "Successfully created local snapshot to %s" % path in log
    assert "Logged in with k8s at auth/%s, token TTL 1h, renewable" % MOUNT in log, log
    # OpenBao really asked the (fake) Kubernetes API, with the reviewer JWT as bearer
    reviews = k8s.server.requests
    assert [r.token for r in reviews] == [jwt]
    assert reviews[0].bearer == k8s.reviewer and reviews[0].audiences == [DEFAULT_AUDIENCE]
    assert reviews[0].status == 201 and reviews[0].authenticated
    assert_no_secrets(log, jwt, reviewer=k8s.reviewer)


# -- 2. refused logins ------------------------------------------------------------------

@pytest.mark.parametrize("case", ["unknown-to-kubernetes", "other-service-account",
                                  "other-namespace"])
def test_refused_k8s_login_fails_once_with_one_error_line(bao_cluster, k8s, tmp_path, case):
    if case == "unknown-to-kubernetes":
        jwt = new_jwt(k8s, known=False)           # claims fit the role; the API says no
        vault_says = "permission denied"
    elif case == "other-service-account":
        jwt = new_jwt(k8s, name="default")        # valid in "Kubernetes", not bound to the role
        vault_says = "service account name not authorized"
    else:
        jwt = new_jwt(k8s, namespace="kube-system")
        vault_says = "namespace not authorized"
    code, log, snapdir = once_with(bao_cluster, k8s, tmp_path, jwt)
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1, log
    assert "k8s login at auth/%s failed" % MOUNT in errors[0], log
    assert "HTTP 403" in errors[0] and vault_says in errors[0], errors[0]
    assert "login refused: check the credentials and the role" in errors[0], errors[0]
    assert "Traceback" not in log
    assert "Logged in" not in log
    assert snapshots(snapdir) == []
    assert not os.path.isdir(str(snapdir)) or os.listdir(str(snapdir)) == []
    reviewed = k8s.server.reviewed_tokens()
    if case == "unknown-to-kubernetes":
        # refused by the TokenReview API, not by OpenBao's own claim checks
        assert reviewed == [jwt] and not k8s.server.requests[0].authenticated
    else:
        assert reviewed == []       # OpenBao refused the claims before asking
    assert_no_secrets(log, jwt, reviewer=k8s.reviewer)


# -- 3. the token file is re-read at each login ----------------------------------------

class ProjectedTokenDir:
    """A service-account token volume as kubelet writes it: ``token`` ->
    ``..data/token``, ``..data`` -> a timestamped directory; a rotation
    writes a new directory and swaps ``..data`` atomically."""

    def __init__(self, root):
        self.root = str(root)
        os.makedirs(self.root)
        self.generation = 0
        os.symlink(os.path.join("..data", "token"), os.path.join(self.root, "token"))

    @property
    def token_path(self):
        return os.path.join(self.root, "token")

    def write(self, jwt):
        self.generation += 1
        name = "..2030_01_01_00_00_%02d.%d" % (self.generation, os.getpid())
        os.mkdir(os.path.join(self.root, name))
        write_token(os.path.join(self.root, name, "token"), jwt)
        tmp_link = os.path.join(self.root, "..data_tmp")
        os.symlink(name, tmp_link)
        data = os.path.join(self.root, "..data")
        old = os.readlink(data) if os.path.islink(data) else None
        os.rename(tmp_link, data)
        if old:
            os.remove(os.path.join(self.root, old, "token"))
            os.rmdir(os.path.join(self.root, old))


def test_rotated_token_file_is_read_again_at_the_next_login(bao_cluster, k8s, tmp_path):
    first, second = new_jwt(k8s), new_jwt(k8s)
    volume = ProjectedTokenDir(tmp_path / "sa")
    volume.write(first)
    snapdir = tmp_path / "snaps"
    # Tokens of SHORT_ROLE live 2 s: the daemon (one snapshot a second) has to
    # log in again every other cycle, in the same process.
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, volume.token_path,
                          snapdir, k8s_auth_role=SHORT_ROLE, frequency="1s")
    logfile = tmp_path / "agent.log"
    k8s.server.clear()
    server = k8s.server
    proc = start_agent(config, logfile, sys.executable, "--log-level", "debug",
                       env=child_env(drop_prefixes=("VAULT_", "BAO_")))
    try:
        wait_for(lambda: "Successfully created local snapshot" in read(logfile), 20,
                 "a first snapshot")
        # Rotate right after a login, so no login is under way with the old JWT
        # when it is revoked ("Kubernetes" forgets it: a stale re-use would fail).
        seen = len(server.requests)
        wait_for(lambda: len(server.requests) > seen, 10, "a second login")
        rotated_at = len(server.requests)
        volume.write(second)
        server.revoke(first)
        wait_for(lambda: second in server.reviewed_tokens(), 10, "a login with the new JWT")
        done = read(logfile).count("Successfully created local snapshot")
        wait_for(lambda: read(logfile).count("Successfully created local snapshot") > done, 10,
                 "a snapshot after the new login")
    finally:
        code = stop(proc)
    log = read(logfile)
    assert code == 0, log
    reviewed = server.reviewed_tokens()
    assert reviewed[:rotated_at] == [first] * rotated_at, reviewed
    assert reviewed[rotated_at:] and set(reviewed[rotated_at:]) == {second}
    assert all(r.authenticated for r in server.requests), server.requests
    assert log.count("Logged in with k8s at auth/%s" % MOUNT) == len(reviewed) >= 3, log
    assert "ERROR" not in log and "failed" not in log.lower(), log
    assert len(snapshots(snapdir)) >= 3
    vsa.verify_file(os.path.join(str(snapdir), snapshots(snapdir)[-1]))
    assert_no_secrets(log, first, second, reviewer=k8s.reviewer)


# -- 4. a custom mount path --------------------------------------------------------------

def test_custom_k8s_auth_path(bao_cluster, k8s, tmp_path):
    # a legacy (secret-based) token this time: its claims are the
    # kubernetes.io/serviceaccount/* ones, and it has no audience
    jwt = new_jwt(k8s, name=CUSTOM_SA, projected=False)
    # CUSTOM_ROLE exists only at k8s-snap: a login at the default mount would fail
    code, log, snapdir = once_with(bao_cluster, k8s, tmp_path, jwt, k8s_auth_path=CUSTOM_MOUNT,
                                   k8s_auth_role=CUSTOM_ROLE)
    assert code == 0, log
    assert "Logged in with k8s at auth/%s, token TTL 1h" % CUSTOM_MOUNT in log, log
    names = snapshots(snapdir)
    assert len(names) == 1, log
    vsa.verify_file(os.path.join(str(snapdir), names[0]))
    assert k8s.server.reviewed_tokens() == [jwt]
    assert k8s.server.requests[0].audiences == []
    assert_no_secrets(log, jwt, reviewer=k8s.reviewer)


def test_custom_path_role_is_not_found_at_the_default_mount(bao_cluster, k8s, tmp_path):
    """The counter-check of the test above: the same config without
    ``k8s_auth_path`` goes to auth/kubernetes, where CUSTOM_ROLE does not exist."""
    jwt = new_jwt(k8s, name=CUSTOM_SA)
    code, log, _ = once_with(bao_cluster, k8s, tmp_path, jwt, k8s_auth_role=CUSTOM_ROLE)
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1 and "k8s login at auth/%s failed" % MOUNT in errors[0], log
    assert 'invalid role name "%s"' % CUSTOM_ROLE in errors[0], errors[0]
    assert k8s.server.requests == []
    assert_no_secrets(log, jwt, reviewer=k8s.reviewer)


# -- the token file itself -----------------------------------------------------------

@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_unreadable_token_file_fails_the_cycle_with_one_line(bao_cluster, k8s, tmp_path,
                                                              problem):
    token_path = tmp_path / "sa" / "token"
    code, log, snapdir = once_with(bao_cluster, k8s, tmp_path, "\n" if problem == "empty" else None)
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1, log
    assert "k8s_token_path %s" % token_path in errors[0], errors[0]
    assert ("cannot read" if problem == "missing" else "file is empty") in errors[0], errors[0]
    assert "Traceback" not in log
    assert k8s.server.requests == [] and snapshots(snapdir) == []
