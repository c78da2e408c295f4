"""Sections "Config schema" and "Config": the corpus of broken config files
(tests/support/bad_configs.py), each an exit 2 with one line naming the key, and a
fuzz of random configs that never ends in a traceback.

Random configs are seeded (``FAULTS_SEED``, faults_support.SEED): a failure
names the case, so it can be replayed."""

import io
import json
import os
import random
import re

import pytest

from support import bad_configs
import vault_snapshot_agent as vsa
from support.faults_support import SEED
from support.harness import error_lines, read, run_main

pytestmark = pytest.mark.usefixtures("isolated_env")


@pytest.mark.parametrize("case_id,config,key", bad_configs.CASES,
                         ids=[c[0] for c in bad_configs.CASES])
def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path, corpus_files, capsys,
                                                         case_id, config, key):
    path = bad_configs.write_case(str(tmp_path), config, corpus_files)
    stream = io.StringIO()
    try:
        code = vsa.main(["-c", path, "--check-config"], stream=stream)
    except BaseException as exc:  # the point is that nothing escapes
        raise AssertionError("%s: main() raised %s: %s (config %s)" % (
            case_id, type(exc).__name__, str(exc)[:200],
            read(path)[:120] if os.path.isfile(path) else path)) from None
    out = stream.getvalue() + capsys.readouterr().out
    lines = out.splitlines()
    assert code == 2, "%s: exit %s, output:\n%s" % (case_id, code, out)
    assert len(lines) == 1 and " ERROR " in lines[0], "%s: not one ERROR line:\n%s" % (case_id, out)
    assert key in lines[0], "%s: the line does not name %r: %s" % (case_id, key, lines[0])
    assert "Traceback" not in out


def test_bad_config_corpus_is_large_and_covers_every_storage():
    assert len(bad_configs.CASES) >= 60
    keys = " ".join(c[2] for c in bad_configs.CASES)
    for block in ("local_storage", "aws_storage", "azure_storage", "google_storage"):
        assert keys.count(block) >= 5, block


def test_unknown_keys_are_warnings_not_errors(tmp_path, corpus_files, capsys):
    config = bad_configs.materialize(dict(bad_configs.BASE, snapshot_frequency="1h",
                                          aws_storage=dict(bad_configs.S3, s3_bukket="x")),
                                     corpus_files)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code, log = run_main("-c", str(path), "--check-config")
    capsys.readouterr()
    assert code == 1, log                   # the check fails; loading does not (warnings)
    assert "'snapshot_frequency'" in log and "did you mean 'aws_storage.s3_bucket'?" in log
    assert [line.split(" ", 2)[2] for line in error_lines(log)] == [
        "--check-config: 2 unknown key(s): the agent would run, ignoring them; fix or remove them"]
    cfg = vsa.load_config(str(path), env={})
    assert len([w for w in cfg.warnings if w.startswith("unknown config key")]) == 2


@pytest.mark.parametrize("key", ["frequency", "timeout", "snapshot_timeout", "retry_interval"])
def test_empty_duration_counts_as_unset_like_every_other_key(tmp_path, corpus_files, capsys, key):
    # README: "Empty strings and null count as "not set" (the Go agent's files use them that way)."
    config = bad_configs.materialize(dict(bad_configs.BASE, **{key: ""}), corpus_files)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code, log = run_main("-c", str(path), "--check-config")
    capsys.readouterr()
    assert code == 0, "%s \"\" should mean the default, like null; got exit %s: %s" % (key, code, log)


TOP_KEYS = ["addr", "frequency", "retain", "retain_days", "jitter", "retry_interval", "align",
            "timeout", "snapshot_timeout", "temp_dir", "status_file", "metrics_textfile", "metrics_address",
            "vault_auth_method", "approle", "role_id", "secret_id", "secret_id_file",
            "k8s_auth_role", "k8s_auth_path", "k8s_token_path", "token", "token_file", "namespace",
            "ca_cert", "ca_path", "client_cert", "client_key", "tls_server_name", "tls_skip_verify"]
COMMON_BLOCK_KEYS = ["retain", "retain_days", "frequency", "ca_cert", "tls_skip_verify"]
BLOCK_KEYS = {
    "local_storage": ["path", "retain", "retain_days", "frequency"],
    "aws_storage": COMMON_BLOCK_KEYS + [
        "s3_bucket", "s3_region", "s3_endpoint", "s3_force_path_style", "s3_key_prefix",
        "s3_server_side_encryption", "s3_kms_key_id", "s3_storage_class", "s3_static_snapshot_name",
        "s3_checksum", "access_key_id", "secret_access_key", "session_token", "profile",
        "part_size_mb", "concurrency", "imds_endpoint", "container_endpoint", "sts_endpoint"],
    "azure_storage": COMMON_BLOCK_KEYS + [
        "account_name", "container_name", "account_key", "sas_token", "connection_string",
        "auth_mode", "client_id", "tenant_id", "client_secret", "federated_token_file",
        "authority_host", "endpoint", "endpoint_suffix", "prefix", "access_tier", "block_size_mb",
        "concurrency", "imds_endpoint", "list_page_size"],
    "google_storage": COMMON_BLOCK_KEYS + [
        "bucket", "prefix", "credentials_file", "endpoint", "anonymous", "metadata_host",
        "storage_class", "chunk_size_mb", "list_page_size"],
}
VALID_BLOCKS = {"local_storage": {"path": "@SNAPDIR@"}, "aws_storage": bad_configs.S3,
                "azure_storage": bad_configs.AZ, "google_storage": bad_configs.GS}
FUZZ_STRINGS = [
    "", " ", "0", "1", "-1", "1h", "30s", "500ms", "1h30m", "1.5h", ".5s", "+1s", "-1s", "1d", "1 h",
    "9" * 40 + "h", "9" * 400 + "s", "1e9s", "NaN", "inf", "true", "false", "null", "{}", "[]",
    "http://127.0.0.1:8200", "https://127.0.0.1:8200", "http://", "http://[::1", "http://[::1]:8200",
    "http://h:0", "http://h:65536", "http://h:-1", "ftp://x", "127.0.0.1:9469", ":9469", "h:\u00b2",
    "[::1]:9469", "h:99999", "approle", "token", "k8s", "kubernetes", "ldap", "sas", "shared_key",
    "auto", "managed_identity", "AES256", "aws:kms", "aws:kms:dsse", "Hot", "Archive", "snapshots",
    "UPPER", "a", "a" * 300, "caf\u00e9/\u4e2d", "\u0000", "nul\u0000byte", "\ud800", "\u202e",
    "x" * 70000, "AccountName=a;AccountKey=a2V5", "garbage", "=", ";;", "@FILE@", "@DIR@",
    "@MISSING@", "@EMPTY@", "@UNREADABLE@", "@GARBAGE_PEM@", "@SA_NO_PEM@", "@SA_BAD_BASE64@",
    "@SA_TRUNCATED_DER@", "@SA_EC_KEY@", "@SA_NO_EMAIL@", "@SA_KEY_NOT_STRING@", "@CREDS_LIST@",
    "~", "~nosuchuser/x", "/", "/proc/self/mem", ".", "..",
]


def _fuzz_scalar(rng):
    kind = rng.randrange(10)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 5, 16, 4000, 5000, 10 ** 6, 2 ** 31, 2 ** 63, 10 ** 30, -10 ** 30])
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.5, 1.0, 5.0, 1e308, -1e308, 1e-300, float("nan"),
                           float("inf"), float("-inf")])
    if kind == 4:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(0, 12)))
    return rng.choice(FUZZ_STRINGS)


def _fuzz_value(rng, depth=0):
    roll = rng.random()
    if roll < 0.02:                               # very deep nesting, now and then
        return "@DEEP@%d" % rng.choice([50, 500, 3000])
    if depth < 4 and roll < 0.12:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if depth < 4 and roll < 0.2:
        keys = TOP_KEYS + sum(BLOCK_KEYS.values(), []) + ["", "x", "\u00e9"]
        return dict((rng.choice(keys), _fuzz_value(rng, depth + 1)) for _ in range(rng.randrange(0, 4)))
    return _fuzz_scalar(rng)


def _fuzz_config(rng):
    """Mostly a valid config with one to four known keys given random values
    (one alone most of the time, so validation reaches it), sometimes random
    keys from scratch, now and then any JSON at all."""
    roll = rng.random()
    if roll < 0.05:
        return _fuzz_value(rng)
    config = dict(bad_configs.BASE)
    if roll < 0.2:
        config = {}
        for key in rng.sample(TOP_KEYS, rng.randrange(0, 8)):
            config[key] = _fuzz_value(rng)
    blocks = rng.sample(sorted(BLOCK_KEYS), rng.randrange(0, 3))
    for block in blocks:
        config[block] = dict(VALID_BLOCKS[block]) if rng.random() < 0.9 else _fuzz_value(rng)
    for _ in range(1 if rng.random() < 0.6 else rng.randrange(2, 5)):
        target = rng.choice(["top"] + blocks)
        if target == "top":
            config[rng.choice(TOP_KEYS)] = _fuzz_value(rng)
        elif isinstance(config.get(target), dict):
            config[target][rng.choice(BLOCK_KEYS[target])] = _fuzz_value(rng)
    return config


@pytest.mark.slow
def test_config_fuzz_never_tracebacks_and_exits_0_or_2(tmp_path, corpus_files, capsys):
    rng = random.Random(SEED + 4)
    failures = {}
    codes = {0: 0, 2: 0}
    for case in range(500):
        config = bad_configs.materialize(_fuzz_config(rng), corpus_files)
        text = json.dumps(config)                  # NaN and Infinity included, as Python writes them
        text = re.sub(r'"@DEEP@(\d+)"', lambda m: "[" * int(m.group(1)) + "0" + "]" * int(m.group(1)),
                      text)
        path = tmp_path / "fuzz.json"
        path.write_text(text)
        stream = io.StringIO()
        try:
            code = vsa.main(["-c", str(path), "--check-config"], stream=stream)
            problem = None
            if code not in (0, 2):
                problem = "exit code %r" % (code,)
            elif "Traceback" in stream.getvalue():
                problem = "a traceback in the log"
            elif code == 2 and len(stream.getvalue().splitlines()) != 1:
                problem = "exit 2 without exactly one line"
        except RecursionError as exc:
            problem = "RecursionError: %s" % str(exc)[:80]
        except BaseException as exc:
            problem = "%s: %s" % (type(exc).__name__, str(exc)[:80])
        capsys.readouterr()
        if problem is None:
            codes[code] += 1
        else:
            failures.setdefault(re.sub(r"\d+", "N", problem), (case, text[:160]))
    assert not failures, "%d distinct crash(es) in 500 fuzzed configs (seed %d):\n%s" % (
        len(failures), SEED + 4, "\n".join("  %s   e.g. case %d: %s" % (p, c, t)
                                           for p, (c, t) in sorted(failures.items())))
    assert codes[0] > 10 and codes[2] > 100, codes
