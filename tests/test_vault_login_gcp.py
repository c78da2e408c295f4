"""Section "Vault login methods", method ``gcp``: the iam type (a JWT for
the service account, signed here with its key file or by the IAM
Credentials API's signJwt) and the gce type (the metadata server's identity
token). OpenBao has no gcp auth method, so the end-to-end tests log in at
login_standin.VaultLoginStandIn, whose check (gcp_login.VaultGcpJudge)
verifies the JWT's signature and claims as Vault's gcp plugin does, and
everything after the login is the real cluster's. Failures of Google's side
(metadata server, signJwt) are one line, bounded in time and memory."""

import contextlib
import json
import os
import time
import urllib.parse

import pytest

import vault_snapshot_agent as vsa
from support.bad_configs import FAKE_PKCS1
from support.cred_servers import GoogleTokenServer
from support.gcp_login import GceIdentityServer, IamCredentialsServer, LeaderOnly, VaultGcpJudge
from support.harness import FakeClock, clear_cloud_env, error_lines, known_secrets, run_main
from support.harness import token_lifecycle
from support.harness import snapshots as snapshot_names
from support.login_standin import VaultLoginStandIn
from support.slow_servers import EndlessServer, TrickleServer

ROLE = "snap-gcp"
ACCOUNT = "vault-snap@proj-1.iam.gserviceaccount.com"
OTHER = "ci-deployer@proj-1.iam.gserviceaccount.com"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
CASES = ["iam-key", "iam-signjwt-metadata", "iam-signjwt-key", "gce"]


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path)


def write_json(path, doc):
    path.write_text(json.dumps(doc))
    os.chmod(str(path), 0o600)
    return str(path)


def write_config(tmp_path, addr, **keys):
    config = {"addr": addr, "vault_auth_method": "gcp", "vault_auth_role": ROLE,
              "local_storage": {"path": str(tmp_path / "snaps")}}
    config.update(keys)
    return write_json(tmp_path / "snapshot.json", dict((k, v) for k, v in config.items() if v is not None))


_KEYS = {}


def session_key(name):
    """An RSA key made once per session (cryptography), by role."""
    if name not in _KEYS:
        from support import rsa_keys
        _KEYS[name] = rsa_keys.make_rsa_key()
    return _KEYS[name]



class World:
    """Google's side of one case, on loopback: the metadata server, the IAM
    Credentials API, for ``iam-signjwt-key`` the OAuth token endpoint; the
    agent's keys for it (``config``) and Vault's judge."""

    def __init__(self, case, tmp_path, stack, clock=time.time, max_jwt_exp=900):
        from support import rsa_keys
        self.case = case
        self.mds = stack.enter_context(GceIdentityServer(key=session_key("google"), clock=clock))
        self.oauth = None
        keys = {self.mds.key_id: session_key("google").public_pem}
        self.config = {"gcp_metadata_host": self.mds.host}
        authorize, signer = self.mds.is_valid_token, ACCOUNT
        if case in ("iam-key", "iam-signjwt-key"):
            self.oauth = stack.enter_context(GoogleTokenServer(session_key("account").public_pem))
            self.oauth.clock = clock
            self.key_file = rsa_keys.service_account_json(session_key("account").private_pem,
                                                          self.oauth.token_url, client_email=ACCOUNT)
            keys[self.key_file["private_key_id"]] = session_key("account").public_pem
            self.config["gcp_credentials_file"] = write_json(tmp_path / "sa.json", self.key_file)
            authorize, signer = self.oauth.is_valid_token, OTHER
        if case == "iam-signjwt-key":
            self.config["gcp_service_account"] = OTHER     # impersonated through signJwt
        if case == "iam-signjwt-metadata":
            self.config["gcp_service_account"] = ACCOUNT
        self.iam = stack.enter_context(IamCredentialsServer(session_key("iam"), authorize, [signer]))
        keys[self.iam.key_id] = session_key("iam").public_pem
        self.config["gcp_iam_endpoint"] = self.iam.url
        self.judge = VaultGcpJudge(ROLE, "gce" if case == "gce" else "iam", keys, max_jwt_exp, clock)

    def secrets(self, stand_in=None):
        values = self.mds.issued + self.mds.identities + self.iam.signed
        values += self.oauth.issued if self.oauth else []
        if stand_in is not None:
            values += stand_in.tokens + [body.get("jwt") for body in stand_in.logins]
        known_secrets(*values)
        return values


@contextlib.contextmanager
def world_and_stand_in(case, tmp_path, cluster, **options):
    with contextlib.ExitStack() as stack:
        world = World(case, tmp_path, stack, **options)
        stand_in = stack.enter_context(VaultLoginStandIn(cluster, "gcp", world.judge))
        try:
            yield world, stand_in
        finally:
            world.secrets(stand_in)


def no_secret_in(text, world, stand_in):
    for secret in world.secrets(stand_in):
        assert secret not in text
    assert "PRIVATE KEY" not in text


def stored(tmp_path):
    return [str(tmp_path / "snaps" / n) for n in snapshot_names(tmp_path / "snaps")]


# ------------------------------------------------------------ end to end


@pytest.mark.parametrize("case", CASES)
def test_each_type_logs_in_and_stores_a_verified_snapshot(case, bao_cluster, tmp_path):
    with world_and_stand_in(case, tmp_path, bao_cluster) as (world, stand_in):
        started = time.time()
        code, log = run_main("-c", write_config(tmp_path, stand_in.url, **world.config), "--once")
        assert code == 0, log
        assert "Logged in with gcp at auth/gcp" in log
        snaps = stored(tmp_path)
        assert len(snaps) == 1 and run_main("verify", snaps[0])[0] == 0
        (header, claims), = world.judge.accepted
        assert claims["aud"] == "http://vault/" + ROLE
        if case == "gce":
            identity, = [r.path for r in world.mds.requests if "/identity?" in r.path]
            query = dict(urllib.parse.parse_qsl(identity.split("?", 1)[1]))
            assert query == {"audience": "http://vault/" + ROLE, "format": "full"}
            assert header["kid"] == world.mds.key_id and claims["google"]["compute_engine"]
            assert world.iam.requests == []
        else:
            assert sorted(claims) == ["aud", "exp", "sub"]
            assert 900 - 5 <= claims["exp"] - started <= 900 + 1
        if case == "iam-key":      # signed here: no call to Google at all
            assert header == {"alg": "RS256", "typ": "JWT", "kid": world.key_file["private_key_id"]}
            assert claims["sub"] == ACCOUNT
            assert world.iam.requests == [] and world.oauth.requests == []
        if case.startswith("iam-signjwt"):
            assert header["kid"] == world.iam.key_id and world.iam.payloads == [claims]
            assert claims["sub"] == (OTHER if case == "iam-signjwt-key" else ACCOUNT)
        if case == "iam-signjwt-key":   # the key file's token, asked for the cloud-platform scope
            assert world.oauth.claims[-1]["scope"] == CLOUD_PLATFORM
            assert world.iam.bearers == ["Bearer " + world.oauth.issued[-1]]
        if case == "iam-signjwt-metadata":
            assert world.iam.bearers == ["Bearer " + world.mds.issued[-1]]
        no_secret_in(log, world, stand_in)


@pytest.mark.parametrize("case", CASES)
def test_each_type_renews_its_token_then_logs_in_again(case, bao_cluster, tmp_path):
    # Renew after 2/3 of the stand-in's 1h TTL, log in again past its end;
    # Vault and Google share the agent's (fake) time.
    clock = FakeClock()
    epoch = lambda: (clock.now() - vsa.EPOCH).total_seconds()     # noqa: E731
    env = {"CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud")}
    with world_and_stand_in(case, tmp_path, bao_cluster, clock=epoch) as (world, stand_in):
        cfg = vsa.load_config(write_config(tmp_path, stand_in.url, **world.config), env=env)
        text = token_lifecycle(cfg, clock, env)
        assert text.count("Logged in with gcp at auth/gcp") == 2, text
        assert text.count("Renewed token") == 1, text
        first, second = [claims for _, claims in world.judge.accepted]
        assert second["exp"] - first["exp"] == 9700       # a fresh JWT, not the old one again
        no_secret_in(text, world, stand_in)


@pytest.mark.parametrize("jwt_exp,max_jwt_exp,refused", [
    ("30m", 900, True), ("30m", 1800, False), ("15m", 900, False)])
def test_a_jwt_living_longer_than_the_role_allows_is_refused_in_one_line(
        jwt_exp, max_jwt_exp, refused, bao_cluster, tmp_path):
    with world_and_stand_in("iam-key", tmp_path, bao_cluster, max_jwt_exp=max_jwt_exp) as (world, stand_in):
        code, log = run_main("-c", write_config(tmp_path, stand_in.url, gcp_jwt_exp=jwt_exp,
                                                **world.config), "--once")
        if not refused:
            assert code == 0, log
            return
        assert code == 1 and stored(tmp_path) == []
        errors = error_lines(log)
        assert len(errors) == 1, log
        assert "gcp login at auth/gcp failed" in errors[0]
        assert "role requires that service account JWTs expire within 900 seconds" in errors[0]
        no_secret_in(log, world, stand_in)


def test_an_expired_identity_token_is_refused_in_one_line(bao_cluster, tmp_path):
    # A metadata server that hands out a token already 10 minutes expired.
    with world_and_stand_in("gce", tmp_path, bao_cluster) as (world, stand_in):
        world.mds.lifetime = -600
        code, log = run_main("-c", write_config(tmp_path, stand_in.url, **world.config), "--once")
        assert code == 1 and stored(tmp_path) == []
        errors = error_lines(log)
        assert len(errors) == 1 and "gcp login at auth/gcp failed" in errors[0], log
        assert "JWT is expired" in errors[0]
        no_secret_in(log, world, stand_in)


def test_a_jwt_signed_on_a_clock_two_hours_behind_is_refused(bao_cluster, tmp_path):
    clock = FakeClock()
    clock.step_wall(-7200)
    with world_and_stand_in("iam-key", tmp_path, bao_cluster) as (world, stand_in):
        cfg = vsa.load_config(write_config(tmp_path, stand_in.url, **world.config), env={})
        client = vsa.VaultClient(cfg, clock=clock, env={})
        with pytest.raises(vsa.VaultError) as info:
            client.ensure_token()
        text = str(info.value)
        assert "\n" not in text and "gcp login at auth/gcp failed" in text
        assert "JWT is expired" in text
        no_secret_in(text, world, stand_in)


# ------------------------------------------- Google's side failing (unit)


def fail_at_login(tmp_path, **keys):
    """One --once cycle against a Vault that must never see a login:
    (exit code, log, seconds taken, the Vault's paths)."""
    with LeaderOnly() as vault:
        config = write_config(tmp_path, vault.url, request_timeout="1s", **keys)
        started = time.monotonic()
        code, log = run_main("-c", config, "--once")
        return code, log, time.monotonic() - started, vault.paths


def one_failed_login_line(code, log, paths):
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1, log
    assert "Snapshot cycle failed: gcp login at auth/gcp failed: " in errors[0]
    assert not [p for p in paths if "/login" in p]
    return errors[0]


def test_a_signjwt_refusal_is_one_line(tmp_path):
    with GceIdentityServer() as mds, \
            IamCredentialsServer(None, mds.is_valid_token, accounts=[OTHER]) as iam:
        code, log, _, paths = fail_at_login(tmp_path, gcp_service_account=ACCOUNT,
                                            gcp_metadata_host=mds.host, gcp_iam_endpoint=iam.url)
        known_secrets(*mds.issued)
    line = one_failed_login_line(code, log, paths)
    assert "IAM signJwt for %s: HTTP 403 Permission 'iam.serviceAccounts.signJwt' denied" % ACCOUNT \
        in line, line
    assert iam.bearers == ["Bearer " + mds.issued[0]] and mds.issued[0] not in log


@pytest.mark.parametrize("status,answer,expected", [
    (200, {"keyId": "k"}, "the answer has no signedJwt"),
    (200, "<html>sign in</html>", "the answer has no signedJwt"),
    (200, {"signedJwt": "not.a-jwt"}, "the answer has no signedJwt"),
    (401, {"error": {"code": 401, "message": "Request had invalid authentication credentials.",
                     "status": "UNAUTHENTICATED"}}, "HTTP 401 Request had invalid authentication"),
    (503, "<html>" + "x" * 5000 + "</html>", "HTTP 503"),
])
def test_a_signjwt_answer_without_a_jwt_is_one_line(tmp_path, status, answer, expected):
    with GceIdentityServer() as mds, IamCredentialsServer(None, mds.is_valid_token, [ACCOUNT]) as iam:
        iam.fail_next(status, answer)
        code, log, _, paths = fail_at_login(tmp_path, gcp_service_account=ACCOUNT,
                                            gcp_metadata_host=mds.host, gcp_iam_endpoint=iam.url)
        known_secrets(*mds.issued)
    line = one_failed_login_line(code, log, paths)
    assert expected in line and len(line) < 600, line


def test_a_failing_token_source_for_signjwt_is_one_line(tmp_path):
    with GceIdentityServer() as mds, IamCredentialsServer(None, mds.is_valid_token, [ACCOUNT]) as iam:
        mds.fail_next(500, {"message": "metadata is restarting"})
        code, log, _, paths = fail_at_login(tmp_path, gcp_service_account=ACCOUNT,
                                            gcp_metadata_host=mds.host, gcp_iam_endpoint=iam.url)
    line = one_failed_login_line(code, log, paths)
    assert "GCE metadata server %s: HTTP 500 metadata is restarting" % mds.host in line, line
    assert iam.requests == []


@pytest.mark.parametrize("status,answer,expected", [
    (200, "<html><body>Welcome to nginx!</body></html>", "the answer is not a JWT"),
    (200, "", "the answer is not a JWT (0 bytes)"),
    (200, "eyJhbGciOiJSUzI1NiJ9.eyJ\x00zdWIiOiJ4In0.c2ln", "the answer is not a JWT"),
    (200, "a" * (8 << 20), "answer larger than 65.5 kB, refused"),
    (404, "service account not found\n\x1b[31m", "HTTP 404: service account not found"),
    (500, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", "HTTP 500"),
])
def test_a_metadata_server_answering_garbage_is_one_line(tmp_path, status, answer, expected):
    with GceIdentityServer() as mds:
        mds.fail_next(status, answer)
        code, log, seconds, paths = fail_at_login(tmp_path, gcp_metadata_host=mds.host)
    line = one_failed_login_line(code, log, paths)
    assert mds.host in line and expected in line, line
    assert "eyJ" not in line and "\x1b" not in line and len(line) < 600
    assert seconds < 5


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["silent", "headers", "body", "endless_headers", "endless_body"])
def test_a_slow_or_endless_metadata_server_is_one_line_within_the_deadline(tmp_path, mode):
    server = EndlessServer("random", 1 << 30) if mode == "endless_body" else \
        TrickleServer(mode, interval=0.05, limit=8.0)
    with server:
        host = server.url.split("//", 1)[1]
        code, log, seconds, paths = fail_at_login(tmp_path, gcp_metadata_host=host)
    line = one_failed_login_line(code, log, paths)
    assert "/computeMetadata/v1/instance/service-accounts/default/identity" in line, line
    assert seconds < 4, (seconds, line)
    if mode == "endless_body":
        assert server.sent < 64 << 20       # stopped reading: not a gigabyte later


# ----------------------------------------------------- settings (unit)


def key_file(tmp_path, **fields):
    doc = {"type": "service_account", "client_email": ACCOUNT, "private_key": FAKE_PKCS1,
           "private_key_id": "0123abcd", "token_uri": "http://127.0.0.1:9/token"}
    doc.update(fields)
    return write_json(tmp_path / "sa.json", dict((k, v) for k, v in doc.items() if v is not None))


def test_the_type_defaults_to_iam_when_a_service_account_is_known(tmp_path):
    def load(env=None, **keys):
        return vsa.load_config(write_config(tmp_path, "http://127.0.0.1:8200", **keys),
                               env=env or {})
    cfg = load()
    assert (cfg.gcp_auth_type, cfg.vault_auth_path, cfg.gcp_jwt_exp) == ("gce", "gcp", 900)
    assert cfg.gcp_metadata_host == "metadata.google.internal"
    assert cfg.gcp_iam_endpoint == "https://iamcredentials.googleapis.com"
    cfg = load(gcp_credentials_file=key_file(tmp_path))
    assert (cfg.gcp_auth_type, cfg.gcp_service_account) == ("iam", ACCOUNT)
    cfg = load(env={"GOOGLE_APPLICATION_CREDENTIALS": key_file(tmp_path), "GCE_METADATA_HOST": "10.0.0.9"})
    assert (cfg.gcp_auth_type, cfg.gcp_service_account, cfg.gcp_metadata_host) == (
        "iam", ACCOUNT, "10.0.0.9")
    cfg = load(gcp_service_account=OTHER, vault_auth_path="gcp-prod", gcp_jwt_exp="1h")
    assert (cfg.gcp_auth_type, cfg.vault_auth_path, cfg.gcp_jwt_exp) == ("iam", "gcp-prod", 3600)


def test_other_methods_ignore_a_broken_google_application_credentials(tmp_path):
    config = write_json(tmp_path / "c.json", {"addr": "http://127.0.0.1:8200", "role_id": "r",
                                              "secret_id": "s", "local_storage": {"path": "/tmp"}})
    cfg = vsa.load_config(config, env={"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"})
    assert cfg.vault_auth_method == "approle"


@pytest.mark.parametrize("keys,key", [
    ({"vault_auth_role": None}, "vault_auth_role"),
    ({"gcp_auth_type": "iam"}, "gcp_service_account"),
    ({"gcp_auth_type": "gce", "gcp_service_account": ACCOUNT}, "gcp_service_account"),
    ({"gcp_auth_type": "gke"}, "gcp_auth_type"),
    ({"gcp_service_account": ACCOUNT, "gcp_jwt_exp": "2h"}, "gcp_jwt_exp"),
    ({"gcp_service_account": ACCOUNT, "gcp_jwt_exp": "10s"}, "gcp_jwt_exp"),
    ({"gcp_service_account": ACCOUNT, "gcp_jwt_exp": 900}, "gcp_jwt_exp"),
    ({"gcp_credentials_file": "/nonexistent/sa.json"}, "gcp_credentials_file"),
    ({"gcp_credentials_file": "@NOT_JSON@"}, "gcp_credentials_file"),
    ({"gcp_credentials_file": "@BROKEN_KEY@"}, "gcp_credentials_file"),
    ({"gcp_credentials_file": "@USER@"}, "gcp_service_account"),
    ({"gcp_service_account": ACCOUNT, "gcp_iam_endpoint": "ftp://iam.test"}, "gcp_iam_endpoint"),
])
def test_bad_gcp_settings_are_one_line_at_load(tmp_path, keys, key):
    files = {
        "@NOT_JSON@": _text(tmp_path / "nj.json", "not json"),
        "@BROKEN_KEY@": key_file(tmp_path, private_key="-----BEGIN PRIVATE KEY-----\nMIIsecretkeybytes"
                                                       "AAAA\n-----END PRIVATE KEY-----\n"),
        "@USER@": write_json(tmp_path / "user.json", {"type": "authorized_user", "client_id": "c",
                                                      "client_secret": "s", "refresh_token": "r"}),
    }
    keys = dict((k, files.get(v, v) if isinstance(v, str) else v) for k, v in keys.items())
    code, log = run_main("-c", write_config(tmp_path, "http://127.0.0.1:8200", **keys), "--check-config")
    errors = error_lines(log)
    assert code == 2 and len(errors) == 1, log
    assert key in errors[0], errors[0]
    assert "MIIsecretkeybytes" not in log and "Traceback" not in log


def _text(path, text):
    path.write_text(text)
    return str(path)
