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
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o600)
    stream = io.StringIO()
    out = io.StringIO()
    old = dict(os.environ)
    try:
        for name in list(os.environ):
            if name.startswith(("VAULT_", "BAO_", "AWS_", "AZURE_", "GOOGLE_", "STORAGE_EMULATOR")):
                del os.environ[name]
        os.environ.update(env or {})
        args = vsa._parser().parse_args(["-c", str(path), "--check-config"])
        handler = vsa._configure_logging(20, "text", stream)
        try:
            code = vsa._run(args, out)
        finally:
            vsa.LOG.removeHandler(handler)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return code, out.getvalue(), stream.getvalue()


ALL_FOUR = {
    "addr": "http://127.0.0.1:8200", "role_id": "role", "secret_id": "SECRET-ID-VALUE",
    "frequency": "2h", "retain": 5,
    "local_storage": {"path": "/var/backups/vault", "retain": 3},
    "aws_storage": {"s3_bucket": "snaps", "s3_endpoint": "http://127.0.0.1:9000",
                    "access_key_id": "AKIAEXAMPLE", "secret_access_key": "AWS-SECRET-VALUE"},
    "azure_storage": {"container_name": "snaps", "account_name": "devstoreaccount1",
                      "endpoint": "http://127.0.0.1:10000/devstoreaccount1",
                      "account_key": "QVpVUkUtS0VZLVZBTFVF"},
    "google_storage": {"bucket": "snaps", "endpoint": "http://127.0.0.1:4443", "anonymous": True},
}


def test_check_config_prints_every_key_of_every_block(tmp_path):
    code, out, log = run_check(tmp_path, ALL_FOUR, env={"AWS_REGION": "eu-west-1"})
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
    # where values came from: on stderr, not as JSON keys
    assert "aws_storage.s3_region (AWS_REGION)" in log
    for secret in ("SECRET-ID-VALUE", "AWS-SECRET-VALUE", "QVpVUkUtS0VZLVZBTFVF"):
        assert secret not in out + log


def test_go_agent_kubernetes_spelling_is_accepted(tmp_path):
    config = {"addr": "http://127.0.0.1:8200", "vault_auth_method": "k8s",
              "vault_auth_role": "snapshots", "vault_auth_path": "k8s-snap",
              "local_storage": {"path": str(tmp_path / "s")}}
    code, out, log = run_check(tmp_path, config)
    assert code == 0, log
    shown = json.loads(out)
    assert shown["k8s_auth_role"] == "snapshots" and shown["k8s_auth_path"] == "k8s-snap"
    assert "unknown config key" not in log
    # the new spelling wins when both are given
    config["k8s_auth_role"] = "new-role"
    code, out, log = run_check(tmp_path, config)
    assert json.loads(out)["k8s_auth_role"] == "new-role"


@pytest.mark.parametrize("mode,warned", [(0o600, False), (0o640, True), (0o644, True)])
def test_a_config_file_with_secrets_readable_by_others_is_warned(tmp_path, mode, warned):
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(ALL_FOUR))
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
        assert names[-4:] == ["retain", "retain_days", "max_space", "frequency"], key
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
