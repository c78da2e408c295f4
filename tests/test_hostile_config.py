"""Issue 14, part 5: config values checked at load.

A control character in any string value, whitespace in a value that ends up
in an HTTP header or URL path, or an absurdly large number is a config error:
``--check-config`` exits 2 with one ``Config error: <key>: <problem>`` line,
never a traceback, never the value of a secret.  The cases reuse the
builders of tests/support/bad_configs.py (BASE, and one block per storage) in a
table of their own."""

import io
import os

import pytest

from support import bad_configs
import vault_snapshot_agent as vsa
from support.bad_configs import az, cfg, gs, s3

CONTROL = "control character"
WHITESPACE = "whitespace"
AT_MOST = "at most"
K8S = {"vault_auth_method": "k8s", "k8s_auth_role": "snapshot", "role_id": None, "secret_id": None}
# Secrets in the table carry these markers: neither may appear in the output.
HEAD, TAIL = "SECRETHEAD", "SECRETTAIL"

CASES = [
    # (id, config, key named in the error line, text the line must hold)
    # -- control characters, anywhere -----------------------------------------------
    ("namespace-crlf", cfg(namespace="a\r\nb"), "namespace", CONTROL),
    ("namespace-folded-header", cfg(namespace="a\r\n\tX-Injected: 1"), "namespace", CONTROL),
    ("namespace-nul", cfg(namespace="a\x00b"), "namespace", CONTROL),
    ("addr-crlf", cfg(addr="http://127.0.0.1:8200\r\nX-Injected: 1"), "addr", CONTROL),
    ("role-id-lf", cfg(role_id="role\nid"), "role_id", CONTROL),
    ("secret-id-nul", cfg(secret_id=HEAD + "\x00" + TAIL), "secret_id", CONTROL),
    ("token-lf", cfg(role_id=None, secret_id=None, vault_auth_method="token",
                     token=HEAD + "\n" + TAIL), "token", CONTROL),
    ("k8s-role-del", cfg(**dict(K8S, k8s_auth_role="snap\x7fshot")), "k8s_auth_role", CONTROL),
    ("tls-server-name-lf", cfg(tls_server_name="vault\n.example"), "tls_server_name", CONTROL),
    ("local-path-nul", cfg(local_storage={"path": "/tmp/snap\x00shots"}), "local_storage.path",
     CONTROL),
    ("status-file-lf", cfg(status_file="/tmp/status\n.json"), "status_file", CONTROL),
    ("metrics-textfile-cr", cfg(metrics_textfile="/tmp/agent\r.prom"), "metrics_textfile",
     CONTROL),
    ("s3-prefix-lf", s3(s3_key_prefix="snap\nshots"), "aws_storage.s3_key_prefix", CONTROL),
    ("s3-key-id-lf", s3(access_key_id="AKIA\nEXAMPLE"), "aws_storage.access_key_id", CONTROL),
    ("s3-secret-lf", s3(secret_access_key=HEAD + "\n" + TAIL), "aws_storage.secret_access_key",
     CONTROL),
    ("s3-session-token-cr", s3(session_token=HEAD + "\r" + TAIL), "aws_storage.session_token",
     CONTROL),
    ("azure-prefix-esc", az(prefix="snap\x1bshots"), "azure_storage.prefix", CONTROL),
    ("azure-sas-lf", az(account_key=None, sas_token="sv=2021&sig=" + HEAD + "\n" + TAIL),
     "azure_storage.sas_token", CONTROL),
    ("azure-client-secret-lf", az(account_key=None, auth_mode="client_secret", tenant_id="t",
                                  client_id="c", client_secret=HEAD + "\n" + TAIL),
     "azure_storage.client_secret", CONTROL),
    ("gcs-prefix-cr", gs(prefix="snap\rshots"), "google_storage.prefix", CONTROL),
    # -- whitespace in header and URL-path values ---------------------------------------
    ("namespace-space", cfg(namespace="team a"), "namespace", WHITESPACE),
    ("approle-space", cfg(approle="app role"), "approle", WHITESPACE),
    ("k8s-auth-path-space", cfg(k8s_auth_path="kube rnetes", **K8S), "k8s_auth_path", WHITESPACE),
    ("k8s-auth-role-space", cfg(**dict(K8S, k8s_auth_role="snap shot")), "k8s_auth_role",
     WHITESPACE),
    ("role-id-space", cfg(role_id="role id"), "role_id", WHITESPACE),
    ("s3-storage-class-space", s3(s3_storage_class="STANDARD IA"), "aws_storage.s3_storage_class",
     WHITESPACE),
    ("s3-bucket-space", s3(s3_bucket="snap shots"), "aws_storage.s3_bucket", WHITESPACE),
    ("s3-kms-key-space", s3(s3_kms_key_id="alias/my key"), "aws_storage.s3_kms_key_id",
     WHITESPACE),
    ("s3-region-space", s3(s3_region="us east 1"), "aws_storage.s3_region", WHITESPACE),
    ("azure-container-space", az(container_name="snap shots"), "azure_storage.container_name",
     WHITESPACE),
    ("azure-account-space", az(account_name="my account"), "azure_storage.account_name",
     WHITESPACE),
    ("gcs-bucket-space", gs(bucket="snap shots"), "google_storage.bucket", WHITESPACE),
    ("gcs-storage-class-space", gs(storage_class="NEAR LINE"), "google_storage.storage_class",
     WHITESPACE),
    # -- numbers with maxima ------------------------------------------------------------
    ("retain-days-1e9", cfg(retain_days=1e9), "retain_days", "must be at most 36500"),
    ("retain-days-36501", cfg(retain_days=36501), "retain_days", "must be at most 36500"),
    ("retain-1e9", cfg(retain=10 ** 9), "retain", "must be at most 1000000"),
    ("local-retain-1e9", cfg(local_storage={"path": "@SNAPDIR@", "retain": 10 ** 9}),
     "local_storage.retain", "must be at most 1000000"),
    ("local-retain-days-1e9", cfg(local_storage={"path": "@SNAPDIR@", "retain_days": 1e9}),
     "local_storage.retain_days", "must be at most 36500"),
    ("s3-part-size-huge", s3(part_size_mb=10 ** 9), "aws_storage.part_size_mb", AT_MOST),
    ("s3-concurrency-huge", s3(concurrency=10 ** 9), "aws_storage.concurrency", AT_MOST),
    ("azure-concurrency-huge", az(concurrency=10 ** 9), "azure_storage.concurrency", AT_MOST),
    ("azure-page-size-huge", az(list_page_size=10 ** 9), "azure_storage.list_page_size", AT_MOST),
    ("gcs-chunk-size-huge", gs(chunk_size_mb=10 ** 9), "google_storage.chunk_size_mb", AT_MOST),
    ("gcs-page-size-huge", gs(list_page_size=10 ** 9), "google_storage.list_page_size", AT_MOST),
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("VAULT_", "BAO_", "AWS_", "AZURE_", "GOOGLE_")) or \
                name in ("STORAGE_EMULATOR_HOST", "GCE_METADATA_HOST"):
            monkeypatch.delenv(name)


def check_config(path, capsys):
    """(exit code, log + stdout) of ``--check-config``; a raise fails the test."""
    stream = io.StringIO()
    try:
        code = vsa.main(["-c", path, "--check-config"], stream=stream)
    except BaseException as exc:  # nothing may escape main()
        raise AssertionError("main() raised %s (a traceback for the user)"
                             % type(exc).__name__) from None
    return code, stream.getvalue() + capsys.readouterr().out


def assert_one_config_error(code, out, key, needle):
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert code == 2, "exit %s, output:\n%s" % (code, out)
    assert len(errors) == 1, "not one ERROR line:\n%s" % out
    assert "Config error: " in errors[0] and key in errors[0], errors[0]
    assert needle in errors[0], "%r not in %r" % (needle, errors[0])
    assert "Traceback" not in out
    assert HEAD not in out and TAIL not in out, "a secret value was printed:\n%s" % out


@pytest.mark.parametrize("case_id,config,key,needle", CASES, ids=[c[0] for c in CASES])
def test_hostile_value_exits_2_with_one_line_naming_the_key(tmp_path, corpus_files, capsys,
                                                           case_id, config, key, needle):
    path = bad_configs.write_case(str(tmp_path), config, corpus_files)
    code, out = check_config(path, capsys)
    assert_one_config_error(code, out, key, needle)


@pytest.mark.parametrize("var,value,key", [
    ("VAULT_NAMESPACE", "a\r\nb", "namespace"),
    ("VAULT_TOKEN", HEAD + "\n" + TAIL, "token"),
    ("BAO_TOKEN", HEAD + "\x01" + TAIL, "token"),
])
def test_control_character_in_the_environment_exits_2(tmp_path, corpus_files, capsys, monkeypatch,
                                                     var, value, key):
    monkeypatch.setenv(var, value)
    config = cfg(role_id=None, secret_id=None) if key == "token" else cfg()
    path = bad_configs.write_case(str(tmp_path), config, corpus_files)
    code, out = check_config(path, capsys)
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert code == 2, out
    assert len(errors) == 1 and CONTROL in errors[0], out
    assert key in errors[0].lower(), errors[0]
    assert HEAD not in out and TAIL not in out, out
    assert "Traceback" not in out


def test_the_limits_themselves_are_accepted(tmp_path, corpus_files, capsys):
    config = cfg(retain=1000000, retain_days=36500, namespace="team-a/sub",
                 approle="approle/nested")
    path = bad_configs.write_case(str(tmp_path), config, corpus_files)
    code, out = check_config(path, capsys)
    assert code == 0, out
