"""Sections "Config schema" and "Config", the config schema: one key table per block drives parsing,
--check-config, --config-reference and the README's tables."""

import io
import json
import os
import re

import pytest

import vault_snapshot_agent as vsa
from support.harness import ROOT

README = os.path.join(ROOT, "README.md")
BLOCK_RE = re.compile(r"<!-- keys: (.*?) -->\n.*?<!-- /keys -->", re.S)


def reference_blocks(text):
    return dict((m.group(1), m.group(0)) for m in BLOCK_RE.finditer(text))


def test_readme_tables_are_the_key_tables(capsys):
    # The README's tables are generated (--config-reference) and must stay so:
    # a key, default or doc changed in the agent without the README fails here.
    assert vsa.main(["--config-reference"], stream=io.StringIO()) == 0
    generated = reference_blocks(capsys.readouterr().out)
    with open(README) as handle:
        documented = reference_blocks(handle.read())
    assert sorted(generated) == sorted(["top level"] + list(vsa.STORAGE_TYPES))
    for title, block in generated.items():
        assert documented.get(title) == block, (
            "README table %r differs from the key table; regenerate it with "
            "`python3 tests/readme_tables.py`" % title)


def run_check(tmp_path, config, env=None):
    """``--check-config`` on ``config``: (exit code, stdout, log)."""
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o600)
    stream, out = io.StringIO(), io.StringIO()
    code = vsa.main(["-c", str(path), "--check-config"], stream=stream, env=dict(env or {}), out=out)
    return code, out.getvalue(), stream.getvalue()


EVERY_STORAGE = {
    "addr": "http://127.0.0.1:8200", "role_id": "role", "secret_id": "SECRET-ID-VALUE",
    "frequency": "2h", "retain": 5,
    "local_storage": {"path": "/var/backups/vault", "retain": 3},
    "aws_storage": {"s3_bucket": "snaps", "s3_endpoint": "http://127.0.0.1:9000",
                    "access_key_id": "AKIAEXAMPLE", "secret_access_key": "AWS-SECRET-VALUE"},
    "azure_storage": {"container_name": "snaps", "account_name": "devstoreaccount1",
                      "endpoint": "http://127.0.0.1:10000/devstoreaccount1",
                      "account_key": "QVpVUkUtS0VZLVZBTFVF"},
    "google_storage": {"bucket": "snaps", "endpoint": "http://127.0.0.1:4443", "anonymous": True},
    "swift_storage": {"container": "snaps", "auth_url": "http://127.0.0.1:5000/v3",
                      "username": "backup", "password": "SWIFT-PASSWORD-VALUE",
                      "project_name": "vault"},
}


def test_check_config_prints_every_key_of_every_block(tmp_path):
    code, out, log = run_check(tmp_path, EVERY_STORAGE, env={"AWS_REGION": "eu-west-1"})
    assert code == 0, log
    shown = json.loads(out)
    top = [k.name for k in vsa.TOP_KEYS]
    blocks = list(vsa.STORAGE_TYPES)
    assert list(shown) == top + blocks
    for block in blocks:
        assert list(shown[block]) == [k.name for k in vsa.STORAGE_TYPES[block].keys]
    # defaults filled in, unset as null, secrets masked, inherited policy
    assert shown["frequency"] == "2h" and shown["timeout"] == "30s" and shown["jitter"] == "0s"
    assert shown["token"] is None and shown["namespace"] is None
    assert shown["vault_auth_method"] == "approle" and shown["approle"] == "approle"
    assert shown["secret_id"] == "***"
    assert shown["local_storage"]["retain"] == 3 and shown["aws_storage"]["retain"] == 5
    assert shown["aws_storage"]["frequency"] == "2h"
    assert shown["aws_storage"]["secret_access_key"] == "***"
    assert shown["azure_storage"]["account_key"] == "***"
    assert shown["aws_storage"]["s3_region"] == "eu-west-1"
    assert shown["azure_storage"]["auth_mode"] == "shared_key"
    assert shown["swift_storage"]["password"] == "***"
    assert shown["swift_storage"]["auth_version"] == "3"
    # where values came from: on stderr, not as JSON keys
    assert "aws_storage.s3_region (AWS_REGION)" in log
    for secret in ("SECRET-ID-VALUE", "AWS-SECRET-VALUE", "QVpVUkUtS0VZLVZBTFVF", "SWIFT-PASSWORD-VALUE"):
        assert secret not in out + log


def test_go_agent_kubernetes_spelling_is_accepted(tmp_path):
    config = {"addr": "http://127.0.0.1:8200", "vault_auth_method": "k8s",
              "vault_auth_role": "snapshots", "vault_auth_path": "k8s-snap",
              "local_storage": {"path": str(tmp_path / "s")}}
    code, out, log = run_check(tmp_path, config)
    assert code == 0, log
    shown = json.loads(out)
    assert shown["vault_auth_role"] == "snapshots" and shown["vault_auth_path"] == "k8s-snap"
    assert "unknown config key" not in log
    # the older k8s_* spelling works too; both given must agree
    del config["vault_auth_role"], config["vault_auth_path"]
    config.update(k8s_auth_role="old-role", k8s_auth_path="/k8s-old/")
    code, out, log = run_check(tmp_path, config)
    shown = json.loads(out)
    assert code == 0 and shown["vault_auth_role"] == "old-role" and shown["vault_auth_path"] == "k8s-old"
    config["vault_auth_role"] = "old-role"                   # both, the same: fine
    code, out, log = run_check(tmp_path, config)
    assert code == 0 and json.loads(out)["vault_auth_role"] == "old-role"
    config["vault_auth_role"] = "new-role"                   # both, different: which one?
    code, out, log = run_check(tmp_path, config)
    assert code == 2 and "k8s_auth_role: conflicts with vault_auth_role" in log


@pytest.mark.parametrize("mode,warned", [(0o600, False), (0o640, True), (0o644, True)])
def test_a_config_file_with_secrets_readable_by_others_is_warned(tmp_path, mode, warned):
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(EVERY_STORAGE))
    os.chmod(str(path), mode)
    cfg = vsa.load_config(str(path), env={})
    lines = [w for w in cfg.warnings if "readable by others" in w]
    assert bool(lines) == warned
    if warned:
        assert str(path) in lines[0] and "chmod 600 %s" % path in lines[0]
        assert "%04o" % mode in lines[0]


def test_a_config_file_without_secrets_is_not_warned(tmp_path):
    secret = tmp_path / "secret_id"
    secret.write_text("s3cr3t\n")
    os.chmod(str(secret), 0o644)
    config = {"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id_file": str(secret),
              "local_storage": {"path": str(tmp_path / "s")}}
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o644)
    cfg = vsa.load_config(str(path), env={})
    # the file only names the secret file; the secret file itself is warned about
    assert [w for w in cfg.warnings if "config file" in w] == []
    assert any("secret_id_file %s" % secret in w and "chmod 600" in w for w in cfg.warnings)


def test_a_new_backend_is_one_class_and_one_registry_entry():
    # Everything else (block order, --storage names, keys, README tables)
    # derives from the registry and the class.
    for key, cls in vsa.STORAGE_TYPES.items():
        assert cls.config_key == key and cls.aliases and cls.keys
        names = [k.name for k in cls.keys]
        assert names[-6:] == ["retain", "retain_days", "max_space", "frequency", "verify_frequency",
                              "verify_scope"], key
        assert len(names) == len(set(names)), key


def test_storages_are_not_configured_from_outside(tmp_path):
    # Policy and runtime reach a storage only through its constructor.
    signals = vsa.Signals()
    try:
        runtime = vsa.Runtime({}, vsa.Clock(), signals)
        store = vsa.LocalStorage(str(tmp_path), vsa.Policy(4, 7, 600.0), runtime)
        assert (store.retain, store.retain_days, store.frequency) == (4, 7, 600.0)
        assert store.signals is signals and store.env == {}
    finally:
        signals.close()


def test_the_config_is_complete_and_read_only(tmp_path):
    # load_config gives every block, read and checked; nothing is attached to
    # it or set in it afterwards (a reload builds a new one).
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(dict(EVERY_STORAGE, local_storage={"path": str(tmp_path / "s"),
                                                             "typo_key": 1})))
    os.chmod(str(path), 0o600)
    cfg = vsa.load_config(str(path), env={"AWS_REGION": "eu-west-1"})
    assert [cls.config_key for cls, _ in cfg.storages] == list(vsa.STORAGE_TYPES)
    blocks = dict((cls.config_key, settings) for cls, settings in cfg.storages)
    assert blocks["aws_storage"]["s3_region"] == "eu-west-1"             # effective values
    assert blocks["aws_storage"]["sts_endpoint"] == "https://sts.eu-west-1.amazonaws.com"
    assert blocks["local_storage"]["path"] == str(tmp_path / "s")
    assert any("local_storage.typo_key" in w for w in cfg.warnings)
    for attempt in (lambda: setattr(cfg, "frequency", 1.0), lambda: setattr(cfg, "top", None),
                    lambda: setattr(cfg, "warnings", [])):
        with pytest.raises(AttributeError):
            attempt()
    with pytest.raises(TypeError):
        blocks["aws_storage"]["s3_region"] = "us-east-1"
    assert not hasattr(cfg, "top")


def test_required_and_pattern_come_from_the_key_table(tmp_path):
    # One declaration gives the error and the README's "(required)".
    for cls in vsa.STORAGE_TYPES.values():
        for key in cls.keys:
            if key.required:
                assert key.meaning().endswith("(required)")
                config = {"addr": "http://127.0.0.1:8200", "token": "t",
                          cls.config_key: dict((k.name, v) for k, v in _valid_block(cls).items()
                                               if k.name != key.name)}
                code, _, log = run_check(tmp_path, config)
                assert code == 2 and "%s.%s: required" % (cls.config_key, key.name) in log, log
    code, _, log = run_check(tmp_path, {"addr": "http://127.0.0.1:8200", "token": "t",
                                        "google_storage": {"bucket": "Bad_Bucket"}})
    assert code == 2 and "google_storage.bucket: 'Bad_Bucket' is not a valid bucket name" in log


def _valid_block(cls):
    blocks = dict(EVERY_STORAGE, local_storage={"path": "/tmp"})
    return dict((k, v) for k in cls.keys for name, v in blocks[cls.config_key].items()
                if k.name == name)


def test_secret_keys_auth_methods_and_storage_names_are_derived_from_the_tables(capsys):
    assert vsa.secret_key_names() == frozenset([
        "secret_id", "token", "secret_access_key", "session_token", "account_key", "sas_token",
        "connection_string", "client_secret", "password", "notify_url",
        "application_credential_secret"])
    method_key = [k for k in vsa.TOP_KEYS if k.name == "vault_auth_method"][0]
    names = [n for m in vsa.AUTH_METHODS.values() for n in (m.name,) + m.aliases]
    assert list(method_key.options["choices"]) == names
    for name in names:
        assert "`%s`" % name in method_key.doc
    top = [k.name for k in vsa.TOP_KEYS]
    for method in vsa.AUTH_METHODS.values():       # each method's keys are top-level keys
        assert all(key.name in top for key in method.keys)
        assert (method.login is None) != (method.token is None), method.name
    assert vsa.main(["download", "--help"], stream=io.StringIO()) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for cls in vsa.STORAGE_TYPES.values():
        assert all(alias in help_text for alias in cls.aliases)


def test_environment_fallbacks_are_only_the_declared_ones(tmp_path):
    # AWS_ENDPOINT_URL stands in for sts_endpoint as the table says (and is
    # shown as such); the credential chain reads no endpoint variable itself.
    config = {"addr": "http://127.0.0.1:8200", "token": "t",
              "aws_storage": {"s3_bucket": "snaps", "access_key_id": "AKIAEXAMPLE",
                              "secret_access_key": "AWS-SECRET-VALUE"}}
    code, out, log = run_check(tmp_path, config, env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert code == 0, log
    assert json.loads(out)["aws_storage"]["sts_endpoint"] == "http://127.0.0.1:9"
    assert "aws_storage.sts_endpoint (AWS_ENDPOINT_URL)" in log
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9",
           "AWS_ENDPOINT_URL_STS": "http://127.0.0.1:9", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    chain = vsa.AwsCredentialChain(None, env, "us-east-1", None, vsa.Http(None, 5.0), vsa.Clock())
    assert chain.imds_endpoint == vsa.DEFAULT_IMDS_ENDPOINT
    assert chain.sts_endpoint == "https://sts.us-east-1.amazonaws.com"


def test_nothing_sets_the_state_of_config_or_status_from_outside():
    # Config and Status change only through their constructors and methods.
    with open(os.path.join(ROOT, "vault_snapshot_agent.py")) as handle:
        source = handle.read()
    assert not re.findall(r"\b(?:cfg|config|status)\.\w+ = ", source)
    assert "setattr(self, name" not in source


def test_every_login_method_has_a_readme_section():
    # The table is the list: a method added there without its Vault-side
    # commands in the README fails here.
    with open(README) as handle:
        text = handle.read()
    start = text.index("### Vault / OpenBao side (AppRole)")
    section = text[start:text.index("\n## ", start)]
    for method in vsa.AUTH_METHODS.values():
        if method.name != "approle":
            assert "(`%s`" % method.name in section, method.name
        if method.path:
            assert "vault auth enable %s" % method.path in section, method.name
