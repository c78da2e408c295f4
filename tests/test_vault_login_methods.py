"""Section "Vault login methods": jwt, cert, userpass and ldap against the
real OpenBao (the TLS cluster of bao_tls.py, set up by bao_auth.py). Each
method logs in, takes a verified snapshot into local storage, renews its
token and logs in again; each bad input is one line (exit 2 at load, 1 at
login) and no credential reaches the log."""

import json
import os

import pytest

import vault_snapshot_agent as vsa
from support.harness import FakeClock, run_main, token_lifecycle

METHODS = ["jwt", "cert", "userpass", "ldap"]


def write_config(cluster, setup, tmp_path, **extra):
    config = cluster.agent_tls_config()
    config.update(setup.config)
    config["local_storage"] = {"path": str(tmp_path / "snaps")}
    config.update(extra)
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o600)
    return str(path)


def snapshots(tmp_path):
    directory = tmp_path / "snaps"
    if not directory.is_dir():
        return []
    return sorted(str(directory / n) for n in os.listdir(str(directory)) if n.endswith(".snap"))


def no_secret_in(text, setup):
    for secret in setup.secrets:
        assert secret not in text


@pytest.mark.parametrize("method", METHODS)
def test_each_method_logs_in_and_stores_a_verified_snapshot(method, request, bao_tls, tmp_path):
    setup = request.getfixturevalue(method + "_auth")
    code, log = run_main("-c", write_config(bao_tls, setup, tmp_path), "--once")
    assert code == 0, log
    mount = setup.config["vault_auth_path"]
    assert "Logged in with %s at auth/%s" % (method, mount) in log
    stored = snapshots(tmp_path)
    assert len(stored) == 1
    assert run_main("verify", stored[0])[0] == 0
    no_secret_in(log, setup)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_renews_its_token_then_logs_in_again(method, request, bao_tls, tmp_path):
    # The token lifecycle AppRole has: renew after 2/3 of the TTL (1h here),
    # log in again once it is past its end; the token works after each step.
    setup = request.getfixturevalue(method + "_auth")
    cfg = vsa.load_config(write_config(bao_tls, setup, tmp_path), env={})
    text = token_lifecycle(cfg, FakeClock())
    assert text.count("Logged in with %s" % method) == 2, text
    assert text.count("Renewed token") == 1, text
    no_secret_in(text, setup)


def test_a_jwt_for_another_audience_is_one_line_at_login(jwt_auth, bao_tls, tmp_path):
    jwt_auth.write_token(jwt_auth.mint(aud="https://someone-else.test", exp_in=300))
    code, log = run_main("-c", write_config(bao_tls, jwt_auth, tmp_path), "--once")
    assert code == 1 and snapshots(tmp_path) == []
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert errors and all("\n" not in e for e in errors)
    assert any("jwt login at auth/jwt failed" in e and "invalid audience" in e for e in errors), log
    no_secret_in(log, jwt_auth)


def test_an_expired_jwt_is_one_line_at_login(jwt_auth, bao_tls, tmp_path):
    token = jwt_auth.mint(aud=jwt_auth.extra["audience"], exp_in=-600)
    jwt_auth.write_token(token)
    code, log = run_main("-c", write_config(bao_tls, jwt_auth, tmp_path), "--once")
    assert code == 1
    assert "jwt login at auth/jwt failed" in log and "token is expired" in log, log
    assert token not in log


def test_an_expired_client_certificate_is_one_line_at_login(cert_auth, bao_tls, tmp_path):
    # OpenBao answers 500 to it: the cycle fails with its reason, once.
    config = write_config(bao_tls, cert_auth, tmp_path, client_cert=bao_tls.pki.expired_client_cert,
                          client_key=bao_tls.pki.expired_client_key)
    code, log = run_main("-c", config, "--once")
    assert code == 1
    assert "cert login at auth/cert failed" in log and "expired" in log, log


@pytest.mark.parametrize("change,key", [
    ({"vault_auth_method": "jwt", "jwt_file": None}, "jwt_file"),
    ({"vault_auth_method": "jwt", "jwt_file": "/nonexistent/jwt"}, "jwt_file"),
    ({"vault_auth_method": "jwt", "jwt_file": "@FILE@", "vault_auth_role": None}, "vault_auth_role"),
    ({"vault_auth_method": "cert"}, "client_cert"),
    ({"vault_auth_method": "userpass", "password_file": "@FILE@"}, "username"),
    ({"vault_auth_method": "ldap", "username": "u"}, "password_file"),
    ({"vault_auth_method": "userpass", "username": "u", "password": "hunter2-in-file"}, "password"),
    ({"vault_auth_method": "userpass", "username": "u", "password_file": "/nonexistent/pw"},
     "password_file"),
])
def test_bad_login_settings_are_one_line_at_load(tmp_path, change, key):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value\n")
    os.chmod(str(secret), 0o600)
    config = {"addr": "http://127.0.0.1:8200", "vault_auth_role": "r",
              "local_storage": {"path": str(tmp_path / "s")}}
    config.update((k, str(secret) if v == "@FILE@" else v) for k, v in change.items())
    config = dict((k, v) for k, v in config.items() if v is not None)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o600)
    code, log = run_main("-c", str(path), "--check-config")
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert code == 2 and len(errors) == 1, log
    assert key in errors[0], errors[0]
    assert "hunter2-in-file" not in log and "s3cr3t-value" not in log


def test_the_password_may_come_from_the_environment(tmp_path):
    config = {"addr": "http://127.0.0.1:8200", "vault_auth_method": "userpass", "username": "u",
              "local_storage": {"path": str(tmp_path / "s")}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    cfg = vsa.load_config(str(path), env={"VAULT_AUTH_PASSWORD": "from-env"})
    assert cfg.password.reveal() == "from-env" and cfg.vault_auth_path == "userpass"
    assert cfg.describe()["password"] == "***"


def test_a_key_of_another_login_method_is_warned_about_and_ignored(tmp_path):
    config = {"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s3cr3t-value",
              "username": "alice", "jwt_file": str(tmp_path / "jwt"),
              "local_storage": {"path": str(tmp_path / "s")}}
    (tmp_path / "jwt").write_text("x.y.z\n")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o600)
    code, log = run_main("-c", str(path), "--check-config")
    assert code == 0, log
    assert "username is for userpass/ldap login; ignored with vault_auth_method approle" in log
    assert "jwt_file is for jwt login; ignored" in log
