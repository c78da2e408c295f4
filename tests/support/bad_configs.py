"""A corpus of broken config files for tests/test_config_corpus.py.

Every case must make ``vault_snapshot_agent.py -c FILE --check-config`` exit
2 with exactly one ERROR line that names the offending key (``KEY`` below,
``aws_storage.s3_bucket`` for nested ones), and never a traceback.

Cases are ``(id, config, key)``. ``config`` is a dict (written as JSON), or
bytes (written as they are), or one of the markers ``MISSING_FILE`` /
``DIRECTORY`` / ``UNREADABLE`` for the config path itself. Strings of the
form ``@NAME@`` anywhere inside a dict are replaced by the path of a helper
file made by ``make_files`` (an empty file, a directory, a broken PEM...).
Unknown keys are only warnings, so they are not part of this corpus.
"""

import base64
import json
import os
import sys

from support.harness import overridden

MISSING_FILE, DIRECTORY, UNREADABLE = "<missing>", "<directory>", "<unreadable>"

# Readable by stat, unreadable by read(): EIO at offset 0, even for root
# (chmod 000 does not stop root).
UNREADABLE_PATH = "/proc/self/mem"

BASE = {"addr": "http://127.0.0.1:8200", "role_id": "role", "secret_id": "secret",
        "local_storage": {"path": "@SNAPDIR@"}}
HTTPS = "https://127.0.0.1:8200"


def _der(tag, body):
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_int(value):
    return _der(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big"))


def _pem(kind, der):
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (kind, "\n".join(lines), kind)


# Structurally a two-prime RSA key (9 INTEGERs, version 0): enough for the
# parser, so the *next* check (client_email) is the one that fails.
FAKE_PKCS1 = _pem("RSA PRIVATE KEY", _der(0x30, b"".join(_der_int(i) for i in range(9))))
EC_PKCS8 = _pem("PRIVATE KEY", _der(0x30, _der_int(0) + _der(0x30, _der(
    0x06, bytes.fromhex("2a8648ce3d0201"))) + _der(0x04, _der(0x30, _der_int(1)))))
THREE_INTS_PKCS1 = _pem("RSA PRIVATE KEY", _der(0x30, _der_int(0) + _der_int(1) + _der_int(2)))
TRUNCATED_DER = _pem("PRIVATE KEY", b"\x30\x82\x04\xa4\x02\x01\x00")


def _sa(**fields):
    doc = {"type": "service_account", "client_email": "agent@p.iam.gserviceaccount.com",
           "private_key": FAKE_PKCS1, "token_uri": "http://127.0.0.1:9/token"}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not None})


HELPER_FILES = {
    "EMPTY": "",
    "FILE": "some text\n",
    "GARBAGE_PEM": "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    "CREDS_NOT_JSON": "not json",
    "CREDS_LIST": "[1, 2]",
    "CREDS_EXTERNAL": json.dumps({"type": "external_account"}),
    "CREDS_NO_TYPE": json.dumps({"client_email": "a@b"}),
    "CREDS_USER_PARTIAL": json.dumps({"type": "authorized_user", "client_id": "x"}),
    "SA_NO_PEM": _sa(private_key="nope"),
    "SA_EMPTY_KEY": _sa(private_key=""),
    "SA_BAD_BASE64": _sa(private_key="-----BEGIN PRIVATE KEY-----\n!!not*base64!!\n"
                                     "-----END PRIVATE KEY-----\n"),
    "SA_TRUNCATED_DER": _sa(private_key=TRUNCATED_DER),
    "SA_EC_KEY": _sa(private_key=EC_PKCS8),
    "SA_THREE_INTS": _sa(private_key=THREE_INTS_PKCS1),
    "SA_PUBLIC_KEY": _sa(private_key=_pem("PUBLIC KEY", _der(0x30, _der_int(5)))),
    "SA_NO_EMAIL": _sa(client_email=None),
    "SA_KEY_NOT_STRING": json.dumps({"type": "service_account", "client_email": "a@b",
                                     "private_key": 12345}),
}


def make_files(directory):
    """Create the helper files in ``directory``; returns {NAME: path}."""
    paths = {}
    for name, text in HELPER_FILES.items():
        path = os.path.join(directory, name.lower() + ".txt")
        with open(path, "w") as handle:
            handle.write(text)
        paths[name] = path
    paths["DIR"] = os.path.join(directory, "a-directory")
    os.mkdir(paths["DIR"])
    paths["MISSING"] = os.path.join(directory, "does", "not", "exist")
    paths["UNREADABLE"] = UNREADABLE_PATH
    paths["SNAPDIR"] = os.path.join(directory, "snaps")
    return paths


def materialize(value, paths):
    """``value`` with every "@NAME@" string replaced by ``paths[NAME]``."""
    if isinstance(value, dict):
        return {k: materialize(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v, paths) for v in value]
    if isinstance(value, str) and value.startswith("@") and value.endswith("@") and len(value) > 2:
        return paths[value[1:-1]]
    return value


def cfg(**changes):
    """BASE with top-level changes; a value of None removes the key."""
    return overridden(dict(BASE), changes)


def store(key, block):
    """BASE without local_storage, with one storage block."""
    return cfg(local_storage=None, **{key: block})


S3 = {"s3_bucket": "snapshots", "access_key_id": "AKIAEXAMPLE", "secret_access_key": "secret",
      "s3_endpoint": "http://127.0.0.1:9000"}
AZ = {"account_name": "acct", "container_name": "snapshots",
      "account_key": base64.b64encode(b"k" * 64).decode("ascii")}
GS = {"bucket": "snapshots", "anonymous": True, "endpoint": "http://127.0.0.1:9023"}


def s3(**changes):
    block = dict(S3)
    block.update(changes)
    return store("aws_storage", {k: v for k, v in block.items() if v is not None})


def az(**changes):
    block = dict(AZ)
    block.update(changes)
    return store("azure_storage", {k: v for k, v in block.items() if v is not None})


def gs(**changes):
    block = dict(GS)
    block.update(changes)
    return store("google_storage", {k: v for k, v in block.items() if v is not None})


CASES = [
    # -- the file itself ---------------------------------------------------------
    ("file-missing", MISSING_FILE, "config file"),
    ("file-is-directory", DIRECTORY, "config file"),
    ("file-unreadable", UNREADABLE, "config file"),
    ("file-empty", b"", "config file"),
    ("file-bad-json", b'{"addr": "http://x", "frequency": "1h"', "invalid JSON"),
    ("file-trailing-comma", b'{"addr": "http://x",}', "invalid JSON"),
    ("file-not-utf8", b'{"addr": "http://\xff\xfe"}', "config file"),
    ("file-top-level-list", b'[{"addr": "http://x"}]', "top level"),
    ("file-top-level-string", b'"just a string"', "top level"),
    ("file-top-level-null", b"null", "top level"),
    ("file-deeply-nested", b"[" * 100000 + b"]" * 100000, "config file"),
    ("file-deeply-nested-value", b'{"addr": ' + b"[" * 100000 + b"]" * 100000 + b"}",
     "config file"),
    # Past 16 MiB the file was cut and reported as "invalid JSON: Unterminated string".
    ("file-larger-than-16-mib", b'{"addr": "http://127.0.0.1:8200", "x": "' + b"a" * (16 * 1024 * 1024)
     + b'"}', "larger than"),
    # A key given twice: Python's json keeps the last silently (retain 100, then 1).
    ("file-duplicate-key", b'{"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s", '
     b'"retain": 100, "local_storage": {"path": "/tmp"}, "retain": 1}', "retain"),
    ("file-duplicate-block", b'{"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s", '
     b'"local_storage": {"path": "/tmp/a"}, "local_storage": {"path": "/tmp/b"}}', "local_storage"),
    ("file-duplicate-nested-key", b'{"addr": "http://127.0.0.1:8200", "role_id": "r", '
     b'"secret_id": "s", "local_storage": {"path": "/tmp/a", "path": "/tmp/b"}}', "path"),
    # Values no check foresaw: each once escaped as a traceback (or killed a reload).
    ("file-lone-surrogate-path", b'{"addr": "http://127.0.0.1:8200", "role_id": "r", '
     b'"secret_id": "s", "local_storage": {"path": "/tmp/\\ud800x"}}', "config file"),
] + ([
    # Python's json refuses 1,200 levels before 3.12 (one clean line); 3.12+
    # parses them, and the unknown key is then only a warning.
    ("file-unknown-key-nested-deep", b'{"addr": "http://127.0.0.1:8200", "role_id": "r", '
     b'"secret_id": "s", "local_storage": {"path": "/tmp"}, "x": ' + b'{"a": ' * 1200 + b'1'
     + b'}' * 1200 + b'}', "config file"),
] if sys.version_info < (3, 12) else []) + [
    # -- addr ------------------------------------------------------------------------
    ("addr-number", cfg(addr=8200), "addr"),
    ("addr-list", cfg(addr=["http://127.0.0.1:8200"]), "addr"),
    ("addr-bool", cfg(addr=True), "addr"),
    ("addr-ftp", cfg(addr="ftp://127.0.0.1:8200"), "addr"),
    ("addr-no-scheme", cfg(addr="127.0.0.1:8200"), "addr"),
    ("addr-no-host", cfg(addr="http://"), "addr"),
    ("addr-port-too-big", cfg(addr="http://127.0.0.1:99999"), "addr"),
    ("addr-port-not-number", cfg(addr="http://127.0.0.1:port"), "addr"),
    ("addr-broken-ipv6", cfg(addr="http://[::1"), "addr"),
    # -- numbers and durations ---------------------------------------------------------
    ("retain-string", cfg(retain="3"), "retain"),
    ("retain-negative", cfg(retain=-1), "retain"),
    ("retain-fraction", cfg(retain=1.5), "retain"),
    ("retain-bool", cfg(retain=True), "retain"),
    ("retain-object", cfg(retain={"count": 3}), "retain"),
    ("frequency-word", cfg(frequency="often"), "frequency"),
    ("frequency-number", cfg(frequency=3600), "frequency"),
    ("frequency-zero", cfg(frequency="0s"), "frequency"),
    ("frequency-negative", cfg(frequency="-1h"), "frequency"),
    ("frequency-below-minimum", cfg(frequency="500ms"), "frequency"),
    ("frequency-missing-unit", cfg(frequency="1h30"), "frequency"),
    ("frequency-space", cfg(frequency="1 h"), "frequency"),
    ("frequency-list", cfg(frequency=["1h"]), "frequency"),
    ("frequency-days", cfg(frequency="1d"), "frequency"),
    ("frequency-overflow", cfg(frequency="9" * 400 + "h"), "frequency"),
    ("timeout-word", cfg(timeout="fast"), "timeout"),
    ("timeout-below-minimum", cfg(timeout="100ms"), "timeout"),
    ("timeout-overflow", cfg(timeout="9" * 400 + "s"), "timeout"),
    ("snapshot-timeout-number", cfg(snapshot_timeout=120), "snapshot_timeout"),
    ("snapshot-timeout-bad", cfg(snapshot_timeout="2 minutes"), "snapshot_timeout"),
    ("retry-interval-word", cfg(retry_interval="soon"), "retry_interval"),
    ("retry-interval-number", cfg(retry_interval=60), "retry_interval"),
    ("retry-interval-negative", cfg(retry_interval="-1m"), "retry_interval"),
    ("retry-interval-1ms", cfg(retry_interval="1ms"), "retry_interval"),
    ("leader-poll-1ms", cfg(leader_poll="1ms"), "leader_poll"),
    ("metrics-address-superscript-port", cfg(metrics_address="127.0.0.1:\u00b2"), "metrics_address"),
    ("temp-dir-missing", cfg(temp_dir="@MISSING@"), "temp_dir"),
    ("temp-dir-is-file", cfg(temp_dir="@FILE@"), "temp_dir"),
    ("temp-dir-number", cfg(temp_dir=5), "temp_dir"),
    # -- authentication ------------------------------------------------------------------
    ("role-id-missing", cfg(role_id=None), "role_id"),
    ("role-id-empty", cfg(role_id=""), "role_id"),
    ("role-id-number", cfg(role_id=12345), "role_id"),
    ("secret-id-missing", cfg(secret_id=None), "secret_id"),
    ("secret-id-object", cfg(secret_id={"value": "s"}), "secret_id"),
    ("secret-id-and-file", cfg(secret_id_file="@FILE@"), "secret_id_file"),
    ("secret-id-file-missing", cfg(secret_id=None, secret_id_file="@MISSING@"), "secret_id_file"),
    ("secret-id-file-empty", cfg(secret_id=None, secret_id_file="@EMPTY@"), "secret_id_file"),
    ("secret-id-file-directory", cfg(secret_id=None, secret_id_file="@DIR@"), "secret_id_file"),
    ("secret-id-file-unreadable", cfg(secret_id=None, secret_id_file="@UNREADABLE@"),
     "secret_id_file"),
    ("approle-mount-number", cfg(approle=5), "approle"),
    ("auth-method-unknown", cfg(vault_auth_method="radius"), "vault_auth_method"),
    ("auth-method-number", cfg(vault_auth_method=1), "vault_auth_method"),
    ("token-and-token-file", cfg(role_id=None, secret_id=None, token="hvs.x",
                                 token_file="@FILE@"), "token_file"),
    ("token-method-without-token", cfg(vault_auth_method="token"), "token"),
    ("token-file-missing", cfg(role_id=None, secret_id=None, token_file="@MISSING@"), "token_file"),
    ("token-file-empty", cfg(role_id=None, secret_id=None, token_file="@EMPTY@"), "token_file"),
    ("token-file-unreadable", cfg(role_id=None, secret_id=None, token_file="@UNREADABLE@"),
     "token_file"),
    ("token-number", cfg(role_id=None, secret_id=None, vault_auth_method="token", token=42),
     "token"),
    ("k8s-without-role", cfg(vault_auth_method="k8s"), "vault_auth_role"),
    ("kubernetes-role-list", cfg(vault_auth_method="kubernetes", k8s_auth_role=["r"]),
     "k8s_auth_role"),
    ("namespace-list", cfg(namespace=[]), "namespace"),
    # -- TLS -----------------------------------------------------------------------------
    ("ca-cert-missing", cfg(ca_cert="@MISSING@"), "ca_cert"),
    ("ca-cert-garbage", cfg(addr=HTTPS, ca_cert="@GARBAGE_PEM@"), "ca_cert"),
    ("ca-cert-unreadable", cfg(addr=HTTPS, ca_cert="@UNREADABLE@"), "ca_cert"),
    ("ca-path-missing", cfg(ca_path="@MISSING@"), "ca_path"),
    ("ca-path-is-file", cfg(ca_path="@FILE@"), "ca_path"),
    ("client-cert-missing", cfg(client_cert="@MISSING@"), "client_cert"),
    ("client-cert-garbage", cfg(addr=HTTPS, client_cert="@GARBAGE_PEM@"), "client_cert"),
    ("client-key-without-cert", cfg(client_key="@FILE@"), "client_key"),
    ("tls-skip-verify-string", cfg(tls_skip_verify="yes"), "tls_skip_verify"),
    ("tls-skip-verify-number", cfg(tls_skip_verify=1), "tls_skip_verify"),
    ("tls-server-name-number", cfg(tls_server_name=5), "tls_server_name"),
    # -- storages in general and local_storage ---------------------------------------------
    ("no-storage", cfg(local_storage=None), "storage"),
    ("local-string", cfg(local_storage="/var/backups"), "local_storage"),
    ("local-list-empty", cfg(local_storage=[]), "local_storage"),
    ("local-list-of-strings", cfg(local_storage=["/var/backups"]), "local_storage[1]"),
    ("local-list-block-without-path", cfg(local_storage=[{"path": "@SNAPDIR@"}, {}]),
     "local_storage[2].path"),
    ("storage-name-twice", cfg(local_storage=[{"path": "@SNAPDIR@", "name": "disk"},
                                              {"path": "@DIR@", "name": "disk"}]),
     "local_storage[1].name and local_storage[2].name"),
    ("storage-name-charset", cfg(local_storage={"path": "@SNAPDIR@", "name": "my disk"}),
     "local_storage.name"),
    ("storage-name-too-long", cfg(local_storage={"path": "@SNAPDIR@", "name": "x" * 65}),
     "local_storage.name"),
    ("storage-name-is-another-kind", cfg(local_storage={"path": "@SNAPDIR@", "name": "s3"}),
     "local_storage.name"),
    ("storage-name-is-the-kind-in-a-list", cfg(local_storage=[{"path": "@SNAPDIR@", "name": "local"},
                                                              {"path": "@DIR@"}]),
     "local_storage[1].name"),
    ("file-prefix-slash", cfg(file_prefix="team/raft"), "file_prefix"),
    ("file-prefix-empty-after-dash", cfg(file_prefix="raft-"), "file_prefix"),
    ("file-prefix-hidden", cfg(file_prefix=".raft"), "file_prefix"),
    ("file-prefix-number", cfg(file_prefix=5), "file_prefix"),
    ("block-file-prefix-charset", cfg(local_storage={"path": "@SNAPDIR@", "file_prefix": "a b"}),
     "local_storage.file_prefix"),
    ("same-directory-twice", cfg(local_storage=[{"path": "@SNAPDIR@"}, {"path": "@SNAPDIR@"}]),
     "local_storage[1] and local_storage[2]"),
    ("same-bucket-prefix-twice", store("aws_storage", [
        {"s3_bucket": "backups", "s3_region": "eu-west-1"},
        {"s3_bucket": "backups", "s3_region": "eu-west-1", "s3_key_prefix": "/raft_snapshots/",
         "retain": 2}]), "aws_storage[1] and aws_storage[2]"),
    ("local-empty-block", cfg(local_storage={}), "local_storage.path"),
    ("local-path-empty", cfg(local_storage={"path": ""}), "local_storage.path"),
    ("local-path-number", cfg(local_storage={"path": 5}), "local_storage.path"),
    ("local-path-is-file", cfg(local_storage={"path": "@FILE@"}), "local_storage.path"),
    ("local-path-nul", cfg(local_storage={"path": "/tmp/snap\u0000shots"}), "local_storage.path"),
    ("local-retain-negative", cfg(local_storage={"path": "@SNAPDIR@", "retain": -2}),
     "local_storage.retain"),
    ("local-retain-word", cfg(local_storage={"path": "@SNAPDIR@", "retain": "all"}),
     "local_storage.retain"),
    # -- aws_storage ---------------------------------------------------------------------
    ("s3-block-list", store("aws_storage", []), "aws_storage"),
    ("s3-list-block-without-bucket",
     store("aws_storage", [{"s3_bucket": "backups"}, {"s3_region": "eu-west-1"}]),
     "aws_storage[2].s3_bucket"),
    ("s3-no-bucket", s3(s3_bucket=None), "aws_storage.s3_bucket"),
    ("s3-bucket-too-short", s3(s3_bucket="a"), "aws_storage.s3_bucket"),
    ("s3-bucket-spaces", s3(s3_bucket="my bucket!"), "aws_storage.s3_bucket"),
    ("s3-bucket-number", s3(s3_bucket=5), "aws_storage.s3_bucket"),
    ("s3-endpoint-ftp", s3(s3_endpoint="ftp://minio:9000"), "aws_storage.s3_endpoint"),
    ("s3-endpoint-number", s3(s3_endpoint=9000), "aws_storage.s3_endpoint"),
    ("s3-endpoint-broken-ipv6", s3(s3_endpoint="http://[fe80::1"), "aws_storage.s3_endpoint"),
    ("s3-sse-aes-and-kms-key", s3(s3_server_side_encryption="AES256", s3_kms_key_id="alias/k"),
     "aws_storage.s3_kms_key_id"),
    ("s3-sse-unknown", s3(s3_server_side_encryption="rot13"),
     "aws_storage.s3_server_side_encryption"),
    ("s3-sse-number", s3(s3_server_side_encryption=1), "aws_storage.s3_server_side_encryption"),
    ("s3-part-size-too-small", s3(part_size_mb=4), "aws_storage.part_size_mb"),
    ("s3-part-size-string", s3(part_size_mb="16"), "aws_storage.part_size_mb"),
    ("s3-concurrency-zero", s3(concurrency=0), "aws_storage.concurrency"),
    ("s3-key-without-secret", s3(secret_access_key=None), "aws_storage.secret_access_key"),
    ("s3-secret-without-key", s3(access_key_id=None), "aws_storage.access_key_id"),
    ("s3-path-style-string", s3(s3_force_path_style="true"), "aws_storage.s3_force_path_style"),
    ("s3-checksum-string", s3(s3_checksum="no"), "aws_storage.s3_checksum"),
    ("s3-ca-cert-missing", s3(ca_cert="@MISSING@"), "aws_storage.ca_cert"),
    ("s3-retain-negative", s3(retain=-1), "aws_storage.retain"),
    ("s3-region-number", s3(s3_region=5), "aws_storage.s3_region"),
    ("s3-prefix-list", s3(s3_key_prefix=["a"]), "aws_storage.s3_key_prefix"),
    # -- azure_storage ---------------------------------------------------------------------
    ("azure-block-string", store("azure_storage", "acct"), "azure_storage"),
    ("azure-no-container", az(container_name=None), "azure_storage.container_name"),
    ("azure-container-uppercase", az(container_name="Bad_Name"), "azure_storage.container_name"),
    ("azure-key-not-base64", az(account_key="not base64!"), "azure_storage.account_key"),
    ("azure-sas-mode-without-sas", az(account_key=None, auth_mode="sas"),
     "azure_storage.sas_token"),
    ("azure-client-secret-mode-bare", az(account_key=None, auth_mode="client_secret"),
     "azure_storage.client_id"),
    ("azure-workload-identity-bare", az(account_key=None, auth_mode="workload_identity"),
     "azure_storage.client_id"),
    ("azure-auth-mode-unknown", az(auth_mode="magic"), "azure_storage.auth_mode"),
    ("azure-no-account", az(account_name=None), "azure_storage.account_name"),
    ("azure-connection-string-garbage", az(connection_string="garbage"),
     "azure_storage.connection_string"),
    ("azure-block-size-too-big", az(block_size_mb=5000), "azure_storage.block_size_mb"),
    ("azure-block-size-zero", az(block_size_mb=0), "azure_storage.block_size_mb"),
    ("azure-endpoint-ftp", az(endpoint="ftp://127.0.0.1:10000/acct"), "azure_storage.endpoint"),
    ("azure-endpoint-broken-ipv6", az(endpoint="http://[::1/acct"), "azure_storage.endpoint"),
    ("azure-access-tier-unknown", az(access_tier="Frozen"), "azure_storage.access_tier"),
    ("azure-page-size-zero", az(list_page_size=0), "azure_storage.list_page_size"),
    ("azure-concurrency-string", az(concurrency="4"), "azure_storage.concurrency"),
    ("azure-ca-cert-missing", az(ca_cert="@MISSING@"), "azure_storage.ca_cert"),
    # -- google_storage --------------------------------------------------------------------
    ("gcs-block-number", store("google_storage", 1), "google_storage"),
    ("gcs-no-bucket", gs(bucket=None), "google_storage.bucket"),
    ("gcs-bucket-uppercase", gs(bucket="UPPER"), "google_storage.bucket"),
    ("gcs-bucket-too-short", gs(bucket="a"), "google_storage.bucket"),
    ("gcs-endpoint-ftp", gs(endpoint="ftp://127.0.0.1:9023"), "google_storage.endpoint"),
    ("gcs-endpoint-broken-ipv6", gs(endpoint="http://[::1"), "google_storage.endpoint"),
    ("gcs-chunk-size-zero", gs(chunk_size_mb=0), "google_storage.chunk_size_mb"),
    ("gcs-anonymous-string", gs(anonymous="yes"), "google_storage.anonymous"),
    ("gcs-storage-class-number", gs(storage_class=5), "google_storage.storage_class"),
    ("gcs-page-size-negative", gs(list_page_size=-1), "google_storage.list_page_size"),
    ("gcs-credentials-missing", gs(anonymous=None, credentials_file="@MISSING@"),
     "google_storage.credentials_file"),
    ("gcs-credentials-directory", gs(anonymous=None, credentials_file="@DIR@"),
     "google_storage.credentials_file"),
    ("gcs-credentials-unreadable", gs(anonymous=None, credentials_file="@UNREADABLE@"),
     "google_storage.credentials_file"),
    ("gcs-credentials-empty", gs(anonymous=None, credentials_file="@EMPTY@"),
     "google_storage.credentials_file"),
    ("gcs-credentials-not-json", gs(anonymous=None, credentials_file="@CREDS_NOT_JSON@"),
     "google_storage.credentials_file"),
    ("gcs-credentials-list", gs(anonymous=None, credentials_file="@CREDS_LIST@"),
     "google_storage.credentials_file"),
    ("gcs-credentials-external-account", gs(anonymous=None, credentials_file="@CREDS_EXTERNAL@"),
     "google_storage.credentials_file"),
    ("gcs-credentials-no-type", gs(anonymous=None, credentials_file="@CREDS_NO_TYPE@"),
     "google_storage.credentials_file"),
    ("gcs-authorized-user-partial", gs(anonymous=None, credentials_file="@CREDS_USER_PARTIAL@"),
     "google_storage.credentials_file"),
    ("gcs-pem-missing", gs(anonymous=None, credentials_file="@SA_NO_PEM@"),
     "google_storage.credentials_file"),
    ("gcs-pem-empty", gs(anonymous=None, credentials_file="@SA_EMPTY_KEY@"),
     "google_storage.credentials_file"),
    ("gcs-pem-bad-base64", gs(anonymous=None, credentials_file="@SA_BAD_BASE64@"),
     "google_storage.credentials_file"),
    ("gcs-pem-truncated-der", gs(anonymous=None, credentials_file="@SA_TRUNCATED_DER@"),
     "google_storage.credentials_file"),
    ("gcs-pem-ec-key", gs(anonymous=None, credentials_file="@SA_EC_KEY@"),
     "google_storage.credentials_file"),
    ("gcs-pem-three-integers", gs(anonymous=None, credentials_file="@SA_THREE_INTS@"),
     "google_storage.credentials_file"),
    ("gcs-pem-public-key", gs(anonymous=None, credentials_file="@SA_PUBLIC_KEY@"),
     "google_storage.credentials_file"),
    ("gcs-pem-key-not-string", gs(anonymous=None, credentials_file="@SA_KEY_NOT_STRING@"),
     "google_storage.credentials_file"),
    ("gcs-sa-without-email", gs(anonymous=None, credentials_file="@SA_NO_EMAIL@"),
     "google_storage.credentials_file"),
]


def write_case(directory, config, paths):
    """Write one case's config into ``directory``; returns the path to pass to -c."""
    if config == MISSING_FILE:
        return os.path.join(directory, "no-such-config.json")
    if config == DIRECTORY:
        return paths["DIR"]
    if config == UNREADABLE:
        return UNREADABLE_PATH
    path = os.path.join(directory, "config.json")
    if isinstance(config, bytes):
        data = config
    else:
        data = json.dumps(materialize(config, paths)).encode("utf-8")
    with open(path, "wb") as handle:
        handle.write(data)
    return path
