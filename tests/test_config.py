"""Sections "Config schema" and "Config": config loading, validation, environment precedence, and the
one-line errors a user sees (exit 2, no traceback)."""

import io
import json
import os

import pytest

import vault_snapshot_agent as vsa

GO_AGENT_CONFIG = {
    "addr": "https://vault.example.com:8200",
    "retain": 72,
    "frequency": "1h",
    "role_id": "a1b2c3",
    "secret_id": "SECRET-ID-VALUE",
    "approle": "approle",
    "k8s_auth_role": "",
    "k8s_auth_path": "",
    "vault_auth_method": "",
    "local_storage": {"path": "/var/backups/vault"},
}


def run_check(tmp_path, config, env=None, monkeypatch=None, raw=None):
    path = tmp_path / "snapshot.json"
    path.write_text(raw if raw is not None else json.dumps(config))
    stream = io.StringIO()
    code = vsa.main(["--config", str(path), "--check-config"], stream=stream)
    return code, stream.getvalue()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("VAULT_", "BAO_")):
            monkeypatch.delenv(name)


def test_go_agent_config_is_accepted_unchanged(tmp_path, capsys):
    code, log = run_check(tmp_path, GO_AGENT_CONFIG)
    assert code == 0, log
    out = json.loads(capsys.readouterr().out)
    assert out["addr"] == "https://vault.example.com:8200"
    assert out["retain"] == 72 and out["frequency"] == "1h"
    assert out["secret_id"] == "***"
    assert out["local_storage"]["path"] == "/var/backups/vault"
    assert "SECRET-ID-VALUE" not in log


def test_unknown_keys_are_warned_by_name(tmp_path, capsys):
    config = dict(GO_AGENT_CONFIG, retian=3, local_storage={"path": "/x", "pth": "/y"})
    code, log = run_check(tmp_path, config)
    assert code == 1            # --check-config fails on them; the daemon only warns
    assert "'retian'" in log and "'local_storage.pth'" in log


def test_environment_fills_gaps_and_config_wins(tmp_path, monkeypatch, capsys):
    config = dict(GO_AGENT_CONFIG)
    del config["addr"]
    monkeypatch.setenv("BAO_ADDR", "http://bao.example:8200")
    run_check(tmp_path, config)
    assert json.loads(capsys.readouterr().out)["addr"] == "http://bao.example:8200"
    monkeypatch.setenv("VAULT_ADDR", "http://vault.example:8200")
    run_check(tmp_path, config)
    assert json.loads(capsys.readouterr().out)["addr"] == "http://vault.example:8200"
    run_check(tmp_path, GO_AGENT_CONFIG)
    assert json.loads(capsys.readouterr().out)["addr"] == "https://vault.example.com:8200"


def test_vault_token_env_selects_token_auth(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VAULT_TOKEN", "s.tokentokentoken")
    config = {"addr": "http://127.0.0.1:8200", "local_storage": {"path": "/x"}}
    code, log = run_check(tmp_path, config)
    assert code == 0, log
    out = capsys.readouterr().out
    assert json.loads(out)["vault_auth_method"] == "token"
    assert "tokentokentoken" not in out + log


def test_skip_verify_env_and_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VAULT_SKIP_VERIFY", "true")
    code, log = run_check(tmp_path, GO_AGENT_CONFIG)
    assert code == 0
    assert json.loads(capsys.readouterr().out)["tls_skip_verify"] is True
    assert "verification towards Vault is OFF" in log


def test_secret_id_file_is_read_and_masked(tmp_path, capsys):
    secret = tmp_path / "secret_id"
    secret.write_text("FILE-SECRET\n")
    config = dict(GO_AGENT_CONFIG, secret_id_file=str(secret))
    del config["secret_id"]
    code, log = run_check(tmp_path, config)
    assert code == 0, log
    assert "FILE-SECRET" not in capsys.readouterr().out + log


BAD_CONFIGS = [
    # (description, config or raw text, key named in the error)
    ("bad frequency", dict(GO_AGENT_CONFIG, frequency="1day"), "frequency"),
    ("frequency number", dict(GO_AGENT_CONFIG, frequency=3600), "frequency"),
    ("huge frequency", dict(GO_AGENT_CONFIG, frequency="100000000h"), "frequency"),
    ("zero frequency", dict(GO_AGENT_CONFIG, frequency="0s"), "frequency"),
    ("retain string", dict(GO_AGENT_CONFIG, retain="72"), "retain"),
    ("retain negative", dict(GO_AGENT_CONFIG, retain=-1), "retain"),
    ("retain bool", dict(GO_AGENT_CONFIG, retain=True), "retain"),
    ("retain fraction", dict(GO_AGENT_CONFIG, retain=1.5), "retain"),
    ("addr not url", dict(GO_AGENT_CONFIG, addr="vault:8200"), "addr"),
    ("addr bad scheme", dict(GO_AGENT_CONFIG, addr="ftp://vault"), "addr"),
    ("addr bad port", dict(GO_AGENT_CONFIG, addr="http://vault:port"), "addr"),
    ("addr number", dict(GO_AGENT_CONFIG, addr=8200), "addr"),
    ("no role_id", dict(GO_AGENT_CONFIG, role_id=""), "role_id"),
    ("no secret_id", dict(GO_AGENT_CONFIG, secret_id=None), "secret_id"),
    ("secret_id list", dict(GO_AGENT_CONFIG, secret_id=["x"]), "secret_id"),
    ("secret_id_file missing", dict(GO_AGENT_CONFIG, secret_id_file="/nonexistent/sid"), "secret_id_file"),
    ("bad auth method", dict(GO_AGENT_CONFIG, vault_auth_method="radius"), "vault_auth_method"),
    ("k8s without role", dict(GO_AGENT_CONFIG, vault_auth_method="k8s"), "vault_auth_role"),
    ("token auth without token", dict(GO_AGENT_CONFIG, vault_auth_method="token"), "token"),
    ("token_file missing",
     dict(GO_AGENT_CONFIG, vault_auth_method="token", token_file="/nonexistent/t"), "token_file"),
    ("ca_cert missing", dict(GO_AGENT_CONFIG, ca_cert="/nonexistent/ca.pem"), "ca_cert"),
    ("ca_path missing", dict(GO_AGENT_CONFIG, ca_path="/nonexistent/"), "ca_path"),
    ("client_key alone", dict(GO_AGENT_CONFIG, client_key=__file__), "client_key"),
    ("skip verify string", dict(GO_AGENT_CONFIG, tls_skip_verify="yes"), "tls_skip_verify"),
    ("timeout bad", dict(GO_AGENT_CONFIG, timeout="fast"), "timeout"),
    ("snapshot_timeout bad", dict(GO_AGENT_CONFIG, snapshot_timeout="10"), "snapshot_timeout"),
    ("temp_dir missing", dict(GO_AGENT_CONFIG, temp_dir="/nonexistent/dir"), "temp_dir"),
    ("no storage", {k: v for k, v in GO_AGENT_CONFIG.items() if k != "local_storage"}, "storage"),
    ("local_storage list", dict(GO_AGENT_CONFIG, local_storage=["/x"]), "local_storage"),
    ("local path missing", dict(GO_AGENT_CONFIG, local_storage={}), "local_storage.path"),
    ("local path number", dict(GO_AGENT_CONFIG, local_storage={"path": 5}), "local_storage.path"),
    ("local path is a file", dict(GO_AGENT_CONFIG, local_storage={"path": __file__}), "local_storage.path"),
    ("local retain bad",
     dict(GO_AGENT_CONFIG, local_storage={"path": "/x", "retain": "all"}), "local_storage.retain"),
    ("aws without bucket",
     dict(GO_AGENT_CONFIG, aws_storage={"s3_region": "eu-west-1"}), "aws_storage.s3_bucket"),
    ("gcs not yet", dict(GO_AGENT_CONFIG, google_storage={"bucket": "b"}), "google_storage"),
    ("azure not yet", dict(GO_AGENT_CONFIG, azure_storage={"account_name": "a"}), "azure_storage"),
    ("bad json", "{\"addr\": ", "invalid JSON"),
    ("json list", "[1, 2]", "top level"),
    ("not utf8", b"\xff\xfe{}".decode("latin-1"), "config file"),
    ("empty file", "", "invalid JSON"),
]


@pytest.mark.parametrize("desc,config,key", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_gives_exit_2_and_one_line_naming_the_key(tmp_path, desc, config, key):
    raw = config if isinstance(config, str) else None
    code, log = run_check(tmp_path, config, raw=raw)
    assert code == 2, log
    lines = [line for line in log.splitlines() if "ERROR" in line]
    assert len(lines) == 1, log
    assert key in lines[0]
    assert "Traceback" not in log
    assert "SECRET-ID-VALUE" not in log


def test_missing_config_file_is_one_line(tmp_path):
    stream = io.StringIO()
    code = vsa.main(["-c", str(tmp_path / "nope.json"), "--once"], stream=stream)
    assert code == 2
    assert "cannot read" in stream.getvalue() and len(stream.getvalue().splitlines()) == 1


def test_unreadable_config_file_is_one_line(tmp_path):
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(GO_AGENT_CONFIG))
    path.chmod(0)
    if os.access(str(path), os.R_OK):
        path.chmod(0o600)
        path = tmp_path    # as root: a directory is unreadable as a file instead
    stream = io.StringIO()
    assert vsa.main(["-c", str(path), "--check-config"], stream=stream) == 2
    assert len(stream.getvalue().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--bogus"], ["--log-level", "loud"], ["--log-format", "xml"]])
def test_usage_errors_exit_2(argv, capsys):
    assert vsa.main(argv) == 2


def test_version_exits_0(capsys):
    assert vsa.main(["--version"]) == 0
    assert vsa.__version__ in capsys.readouterr().out
