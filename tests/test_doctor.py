"""Command ``doctor`` against real servers: the 3-node OpenBao cluster
(AppRole), moto with signature and IAM checking, Azurite, the GCS emulator,
tinyproxy, and the TLS cluster for the certificate checks.

What a user of ``doctor`` relies on: one line per check (``info  route``,
``ok``, ``FAIL`` naming the piece and why), exit 0 only when every check
passed, the probe object gone from every storage afterwards and never shown
by ``list``, no probe written under S3 Object Lock, the route lines saying
which proxy (never its password) or direct and why, and ``--storage``
limiting the storage checks to that block.

Found while writing them: moto authorizes a listing as s3:ListObjectsV2
(AWS: s3:ListBucket), so the restricted users get both; an OpenBao standby
answers an AppRole login from its own Raft state, so the standby test waits
until it has applied the secret_id just made on the leader. The route test
needs a host name other than localhost that resolves to loopback only (the
machine's own name, usually): from the environment loopback addresses are
never proxied, so only such a name shows HTTP_PROXY and NO_PROXY at work
while every request stays on this machine; it skips where there is none.
"""

import datetime
import io
import json
import socket

import pytest

import vault_snapshot_agent as vsa
from support.harness import known_secrets, unique, wait_for
from support.moto_s3 import policy_document
from support.storage_blocks import BUCKET, CONTAINER, azure_key_block, s3_block

PROBE = ".vault-snapshot-agent-doctor-"
LEFTOVER = PROBE + "0123456789ab"          # what a doctor killed mid-probe would leave
SNAPSHOT = vsa.snapshot_name(datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=vsa.UTC))
GCS_BUCKET = "snapshots"


# ------------------------------------------------------------------ helpers


def run(tmp_path, config, *argv, env=None):
    """``doctor`` (or ``argv[0]`` when it is another command) on ``config``
    in-process: (exit code, what it printed, the log)."""
    path = tmp_path / "doctor.json"
    path.write_text(json.dumps(config))
    command = list(argv) if argv and argv[0] == "list" else ["doctor"] + list(argv)
    out, log = io.StringIO(), io.StringIO()
    code = vsa.main(command + ["-c", str(path)], stream=log, out=out, env={} if env is None else env)
    print("$ vault_snapshot_agent.py %s  -> exit %d\n%s" % (" ".join(command), code, out.getvalue()))
    return code, out.getvalue(), log.getvalue()


def line(out, status, check):
    """The one line of ``out`` with that status (``ok``, ``FAIL``, ``info``)
    for that check (``vault``, ``aws write``, ``route``...)."""
    found = [text for text in out.splitlines()
             if text.split(" ", 1)[0] == status and text[6:].startswith(check + " ")]
    assert len(found) == 1, (status, check, out)
    return found[0]


def checks(out):
    """The status word of every line, in order."""
    return [text.split(" ", 1)[0] for text in out.splitlines()]


def vault_keys(addr, approle, secret_id=None):
    return {"addr": addr, "role_id": approle.role_id,
            "secret_id": approle.secret_id if secret_id is None else secret_id}


def caught_up(bao_cluster, node):
    """Wait until ``node`` has applied the Raft log the leader has committed
    (an OpenBao standby answers logins from its own state)."""
    def index(of, field):
        return bao_cluster.api("GET", "sys/leader", token=None, node=of, expect=200)[1][field]
    committed = index(bao_cluster.leader(), "raft_committed_index")
    wait_for(lambda: index(node, "raft_applied_index") >= committed, 10, "%s catches up" % node.name)


def gcs_block(gcs, prefix, **extra):
    return dict({"bucket": GCS_BUCKET, "endpoint": gcs.endpoint, "anonymous": True, "prefix": prefix},
                **extra)


class Stores:
    """Each storage's whole content, as its owner would list it."""

    def __init__(self, tmp_path, moto, azurite, gcs):
        self.local, self.moto, self.azurite, self.gcs = tmp_path / "snaps", moto, azurite, gcs

    def seed(self, prefix):
        """One snapshot-named object and one leftover probe in each."""
        self.local.mkdir()
        for name in (SNAPSHOT, LEFTOVER):
            (self.local / name).write_bytes(b"seeded")
            self.moto.put(BUCKET, "%s/%s" % (prefix, name), b"seeded")
            self.azurite.put_blob(CONTAINER, "%s/%s" % (prefix, name), b"seeded")
            self.gcs.put_object(GCS_BUCKET, "%s/%s" % (prefix, name), b"seeded")

    def content(self):
        return {"local": sorted(p.name for p in self.local.iterdir()),
                "aws": self.moto.list_keys(BUCKET),
                "azure": sorted(self.azurite.blob_names(CONTAINER)),
                "google": self.gcs.list_objects(GCS_BUCKET)}

    def config(self, prefix):
        return {"local_storage": {"path": str(self.local)},
                "aws_storage": s3_block(self.moto, s3_key_prefix=prefix),
                "azure_storage": azure_key_block(self.azurite, prefix=prefix),
                "google_storage": gcs_block(self.gcs, prefix)}


# --------------------------------------------------------------- all good


def test_all_good_checks_every_piece_and_leaves_nothing_behind(bao_cluster, approle, moto, azurite,
                                                               gcs, tmp_path):
    stores = Stores(tmp_path, moto, azurite, gcs)
    prefix = unique("doctor")
    stores.seed(prefix)
    before = stores.content()
    config = dict(vault_keys(bao_cluster.leader().addr, approle), **stores.config(prefix))
    code, out, log = run(tmp_path, config)
    assert code == 0, out + log
    assert checks(out) == ["info"] * 4 + ["ok"] * 11, out
    routes = [text.split(None, 2)[2] for text in out.splitlines()[:4]]
    where = [("Vault", bao_cluster.leader().port), ("s3://%s/%s/" % (BUCKET, prefix), moto.port),
             ("azure:%s/%s/%s/" % (azurite.endpoint, CONTAINER, prefix), azurite.port),
             ("gs://%s/%s/" % (GCS_BUCKET, prefix), gcs.port)]
    assert routes == ["%s at http://127.0.0.1:%d: direct (no HTTP_PROXY in the environment)" % pair
                      for pair in where], out
    assert "is reachable and the active node" in line(out, "ok", "vault")
    assert "logged in; token TTL" in line(out, "ok", "login (approle)")
    assert "may read sys/storage/raft/snapshot" in line(out, "ok", "snapshot policy")
    for kind in ("local", "aws", "azure", "google"):
        assert "1 snapshot(s) in" in line(out, "ok", kind + " list"), out
        written = line(out, "ok", kind + " write")
        assert "wrote, read back and deleted" in written and PROBE in written, out
        assert LEFTOVER not in written
    assert stores.content() == before            # the probe is gone; nothing else was touched
    assert "doctor: 11 check(s), 0 failed" in log
    code, listed, _ = run(tmp_path, config, "list")
    assert code == 0 and listed.count(SNAPSHOT) == 4 and PROBE not in listed, listed


# ------------------------------------------------- each failure is named


def local_only(tmp_path):
    return {"local_storage": {"path": str(tmp_path / "snaps")}}


def test_a_wrong_secret_id_fails_the_login_and_skips_the_policy(bao_cluster, approle, tmp_path):
    wrong = approle.secret_id[:-12] + "0" * 11 + "1"
    config = dict(vault_keys(bao_cluster.leader().addr, approle, secret_id=wrong), **local_only(tmp_path))
    code, out, log = run(tmp_path, config)
    assert code == 1, out + log
    assert checks(out) == ["info", "ok", "FAIL", "ok", "ok"], out
    assert "login refused" in line(out, "FAIL", "login (approle)")
    assert "snapshot policy" not in out
    assert wrong not in out + log


def test_a_standby_fails_the_vault_check_and_still_checks_the_login(bao_cluster, approle, tmp_path):
    standby = bao_cluster.standbys()[0]
    caught_up(bao_cluster, standby)           # it knows the secret_id just made on the leader
    config = dict(vault_keys(standby.addr, approle), **local_only(tmp_path))
    code, out, log = run(tmp_path, config)
    assert code == 1, out + log
    failed = line(out, "FAIL", "vault")
    assert "%s is a standby (the active node is %s)" % (standby.addr, bao_cluster.leader().addr) in failed
    assert "logged in" in line(out, "ok", "login (approle)")
    assert "capabilities [read]" in line(out, "ok", "snapshot policy")
    assert checks(out).count("FAIL") == 1


def test_a_role_without_the_snapshot_policy_fails_the_policy_check(bao_cluster, approle, tmp_path):
    role = "doctor-no-snapshot"
    bao_cluster.api("POST", "auth/%s/role/%s" % (approle.mount, role),
                    {"token_policies": ["default"], "token_ttl": "10m"}, expect=(200, 204))
    _, body = bao_cluster.api("GET", "auth/%s/role/%s/role-id" % (approle.mount, role), expect=200)
    secret_id = bao_cluster.new_secret_id(role, approle.mount)
    known_secrets(secret_id)
    config = dict(local_only(tmp_path), addr=bao_cluster.leader().addr,
                  role_id=body["data"]["role_id"], secret_id=secret_id)
    code, out, log = run(tmp_path, config)
    assert code == 1, out + log
    assert "logged in" in line(out, "ok", "login (approle)")
    failed = line(out, "FAIL", "snapshot policy")
    assert "the token may not read sys/storage/raft/snapshot (capabilities [" in failed
    assert "contrib/snapshot-policy.hcl" in failed
    assert checks(out).count("FAIL") == 1


def s3_user(moto, *actions):
    """A new IAM user allowed only ``actions`` (and the listing) on the
    bucket: (access key id, secret). moto names the listing's action after
    the API call, s3:ListObjectsV2, where AWS checks s3:ListBucket: both are
    given."""
    key, secret = moto.create_user(unique("doctor"), {"limited": policy_document({
        "Effect": "Allow", "Action": ["s3:ListBucket", "s3:ListObjectsV2"] + list(actions),
        "Resource": ["arn:aws:s3:::%s" % BUCKET, "arn:aws:s3:::%s/*" % BUCKET]})})
    known_secrets(secret)
    return {"access_key_id": key, "secret_access_key": secret}


def bucket(moto, name, **kwargs):
    """Create bucket ``name`` unless this moto has it already."""
    from botocore.exceptions import ClientError
    try:
        moto.admin.create_bucket(Bucket=name, **kwargs)
    except ClientError as exc:
        assert exc.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")


def test_a_missing_bucket_fails_the_list_and_a_read_only_one_the_write(bao_cluster, approle, moto,
                                                                      tmp_path):
    prefix = unique("doctor")
    before = moto.list_keys(BUCKET)
    config = dict(vault_keys(bao_cluster.leader().addr, approle), aws_storage=[
        s3_block(moto, name="missing", s3_bucket="snapshots-doctor-missing", s3_key_prefix=prefix),
        s3_block(moto, name="readonly", s3_key_prefix=prefix, **s3_user(moto, "s3:GetObject"))])
    code, out, log = run(tmp_path, config)
    assert code == 1, out + log
    assert "NoSuchBucket" in line(out, "FAIL", "missing list")
    assert "missing write" not in out
    assert "0 snapshot(s) in" in line(out, "ok", "readonly list")
    failed = line(out, "FAIL", "readonly write")
    assert "write: S3 PutObject on %s/%s" % (prefix, PROBE) in failed and "AccessDenied" in failed, failed
    assert checks(out).count("FAIL") == 2
    assert moto.list_keys(BUCKET) == before


def left_behind(failed):
    """The key a ``delete (KEY is left behind)`` failure names."""
    return failed.split("delete (", 1)[1].split(" is left behind)", 1)[0]


def test_a_probe_that_cannot_be_deleted_is_named_as_left_behind(bao_cluster, approle, moto, tmp_path):
    prefix = unique("doctor")
    config = dict(vault_keys(bao_cluster.leader().addr, approle), aws_storage=s3_block(
        moto, s3_key_prefix=prefix, **s3_user(moto, "s3:GetObject", "s3:PutObject")))
    code, out, log = run(tmp_path, config)
    assert code == 1, out + log
    failed = line(out, "FAIL", "aws write")
    key = left_behind(failed)
    assert key.startswith(prefix + "/" + PROBE) and "S3 DeleteObject" in failed and "AccessDenied" in failed
    assert moto.list_keys(BUCKET, prefix) == [key]     # it is really there, as said
    moto.delete_all(BUCKET, prefix)


def test_a_failed_read_back_is_said_even_when_the_delete_fails_too(bao_cluster, approle, moto,
                                                                  tmp_path):
    prefix = unique("doctor")
    config = dict(vault_keys(bao_cluster.leader().addr, approle), aws_storage=s3_block(
        moto, s3_key_prefix=prefix, **s3_user(moto, "s3:PutObject")))
    try:
        code, out, log = run(tmp_path, config)
        assert code == 1, out + log
        failed = line(out, "FAIL", "aws write")
        assert left_behind(failed).startswith(prefix + "/" + PROBE)
        assert "read back" in failed and "GetObject" in failed, failed
    finally:
        moto.delete_all(BUCKET, prefix)


def test_a_proxy_refusing_the_credentials_fails_the_list(bao_cluster, approle, moto, proxy, tmp_path):
    wrong = "not-" + proxy.password[4:]
    known_secrets(wrong)
    config = dict(vault_keys(bao_cluster.leader().addr, approle), aws_storage=s3_block(
        moto, proxy=proxy.url_with(proxy.user, wrong), s3_key_prefix=unique("doctor")))
    mark = proxy.mark()
    code, out, log = run(tmp_path, config)
    assert code == 1, out + log
    assert "at http://127.0.0.1:%d: via http://%s:***@%s (aws_storage.proxy)\n" % (
        moto.port, proxy.user, proxy.address) in out
    failed = line(out, "FAIL", "aws list")
    assert "the proxy refused the credentials (401" in failed, failed
    # the loopback endpoint went to the proxy (an explicit proxy key takes loopback too)
    assert any(req.startswith("GET http://127.0.0.1:%d/" % moto.port) for req in proxy.requests(mark))
    assert wrong not in out + log


@pytest.mark.slow          # the TLS cluster's start
def test_a_tls_name_mismatch_fails_the_vault_check(bao_tls, tmp_path):
    tls = bao_tls.agent_tls_config()
    base = dict(local_only(tmp_path), role_id="doctor-role", secret_id="doctor-secret")
    for changes, reason in [({"tls_server_name": "wrong.test"}, "'wrong.test'"),
                            ({"tls_server_name": None}, "'127.0.0.1'")]:
        config = dict(base, **{k: v for k, v in dict(tls, **changes).items() if v is not None})
        code, out, log = run(tmp_path, config)
        assert code == 1, out + log
        failed = line(out, "FAIL", "vault")
        assert "TLS error: " in failed and "CERTIFICATE_VERIFY_FAILED" in failed, failed
        assert "mismatch, certificate is not valid for %s" % reason in failed, failed
        assert "login" not in out and "snapshot policy" not in out
        assert "TLS verified with %s" % tls["ca_cert"] in line(out, "info", "route")
        assert checks(out) == ["info", "FAIL", "ok", "ok"], out


# ------------------------------------------------------------ Object Lock


LOCKED = "snapshots-locked"          # test_object_lock's bucket; the agent user may use snapshots*


def test_under_object_lock_the_write_test_is_skipped(bao_cluster, approle, moto, tmp_path):
    bucket(moto, LOCKED, ObjectLockEnabledForBucket=True)
    prefix = unique("doctor")
    config = dict(vault_keys(bao_cluster.leader().addr, approle), aws_storage=s3_block(
        moto, s3_bucket=LOCKED, s3_key_prefix=prefix, s3_object_lock_mode="governance",
        s3_object_lock_days=2))
    code, out, log = run(tmp_path, config)
    assert code == 0, out + log
    assert line(out, "ok", "aws write").endswith(
        "write test skipped: Object Lock (GOVERNANCE, 2 days) would keep the object"), out
    page = moto.admin.list_object_versions(Bucket=LOCKED, Prefix=prefix)
    assert page.get("Versions", []) == page.get("DeleteMarkers", []) == []


def test_in_a_versioned_bucket_the_probe_leaves_no_version(bao_cluster, approle, moto, tmp_path):
    versioned = "snapshots-doctor-versioned"
    bucket(moto, versioned)
    moto.admin.put_bucket_versioning(Bucket=versioned, VersioningConfiguration={"Status": "Enabled"})
    prefix = unique("doctor")
    config = dict(vault_keys(bao_cluster.leader().addr, approle),
                  aws_storage=s3_block(moto, s3_bucket=versioned, s3_key_prefix=prefix))
    code, out, log = run(tmp_path, config)
    assert code == 0 and "wrote, read back and deleted" in line(out, "ok", "aws write"), out + log
    page = moto.admin.list_object_versions(Bucket=versioned, Prefix=prefix)
    assert [v["Key"] for v in page.get("Versions", []) + page.get("DeleteMarkers", [])] == []


# ---------------------------------------------------- routes, --storage


@pytest.fixture
def loopback_name():
    """A host name (not ``localhost``) that resolves to loopback only, e.g.
    the machine's own name in /etc/hosts: the environment's proxy and
    NO_PROXY apply to it (to a loopback address they never do) and every
    request still stays on this machine."""
    name = socket.gethostname()
    try:
        found = set(info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET))
    except OSError:
        found = set()
    if not found or name.lower() == "localhost" or not all(a.startswith("127.") for a in found):
        pytest.skip("the host name %r does not resolve to loopback only (%s)" % (name, found))
    return name


def test_route_lines_say_which_proxy_or_direct_and_why(bao_cluster, approle, moto, gcs, proxy,
                                                       open_proxy, loopback_name, tmp_path):
    moto_url = "http://%s:%d" % (loopback_name, moto.port)
    env = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": open_proxy.url,
           "NO_PROXY": "example.test,%s:%d" % (loopback_name, gcs.port)}
    config = dict(vault_keys(bao_cluster.leader().addr, approle), aws_storage=s3_block(
        moto, s3_endpoint=moto_url, s3_key_prefix=unique("doctor")), google_storage=[
        gcs_block(gcs, "doctor", endpoint="http://%s:%d" % (loopback_name, gcs.port)),
        gcs_block(gcs, "doctor", name="direct", proxy="direct"),
        gcs_block(gcs, "doctor", name="tls", endpoint="https://%s:%d" % (loopback_name, moto.port))])
    mark = proxy.mark()
    code, out, log = run(tmp_path, config, env=env)
    routes = [text.split(": ", 1)[1] for text in out.splitlines() if text.startswith("info  route")]
    assert routes == [
        "direct (loopback is never proxied from the environment)",
        "via %s (HTTP_PROXY)" % proxy.display,
        "direct (NO_PROXY matches %s)" % loopback_name.lower(),
        'direct (google_storage[2].proxy is "direct")',
        "via %s (HTTPS_PROXY), TLS verified" % open_proxy.display], out
    assert proxy.password not in out + log
    requests = proxy.requests(mark)
    assert any(req.startswith("GET %s/" % moto_url) for req in requests), requests
    assert not any(":%d/" % gcs.port in req for req in requests), requests     # NO_PROXY: direct
    # the https endpoint went through HTTPS_PROXY's proxy (to moto's http port: no TLS there)
    assert "via proxy %s: TLS error" % open_proxy.display in line(out, "FAIL", "tls list"), out
    assert checks(out).count("ok") == 9, out
    assert code == 1


def test_storage_option_limits_the_storage_checks_to_that_block(bao_cluster, approle, moto, tmp_path):
    config = dict(vault_keys(bao_cluster.leader().addr, approle), **local_only(tmp_path))
    config["aws_storage"] = s3_block(moto, s3_bucket="snapshots-doctor-missing")
    code, out, log = run(tmp_path, config, "--storage", "local")
    assert code == 0, out + log
    assert checks(out) == ["info", "ok", "ok", "ok", "ok", "ok"], out
    assert "aws" not in out and "local write" in out
    code, out, log = run(tmp_path, config, "--storage", "aws")
    assert code == 1, out + log
    assert "NoSuchBucket" in line(out, "FAIL", "aws list")
    assert "local" not in out and checks(out).count("FAIL") == 1
