"""Section "S3 storage": S3 storage end to end. The real agent takes real snapshots
from the OpenBao cluster and stores them in moto's S3 server with signature
checking ON (a wrong signature fails the test); objects are downloaded and
verified, buckets are listed to prove retention and cleanup."""

import hashlib
import json
import os
import re
import signal

import pytest

import vault_snapshot_agent as vsa
from support.cred_servers import ContainerCredentialsServer, ImdsServer
from support.faultproxy import FaultProxy
from support.harness import (read, run_once, start_agent, stop, success_location, verify_download,
                             wait_for)

from support.storage_blocks import BUCKET, s3_block

pytestmark = pytest.mark.usefixtures("no_aws_env")


def run_agent(tmp_path, bao_cluster, approle, aws, local=True, **extra):
    if local:
        extra["local_storage"] = {"path": str(tmp_path / "local")}
    return run_once(tmp_path, bao_cluster.leader().addr, approle, aws_storage=aws, **extra)


def stored_key(log):
    return success_location(log, "Successfully created aws snapshot to s3://%s/" % BUCKET)


def verify_object(moto, key, tmp_path):
    return verify_download(moto.get(BUCKET, key), tmp_path)


def assert_no_aws_secrets(log, *secrets):
    for secret in secrets:
        assert secret not in log
    assert "Signature=" not in log


def test_once_stores_an_object_that_downloads_and_verifies(moto, bao_cluster, approle, tmp_path):
    moto.delete_all(BUCKET, "raft_snapshots/")
    code, log = run_agent(tmp_path, bao_cluster, approle, s3_block(moto))
    assert code == 0, log
    key = stored_key(log)
    assert key.startswith("raft_snapshots/raft_snapshot-") and key.endswith(".snap")
    info = verify_object(moto, key, tmp_path)
    local = os.listdir(str(tmp_path / "local"))
    assert len(local) == 1
    assert info.sha256 == hashlib.sha256(open(str(tmp_path / "local" / local[0]), "rb").read()).hexdigest()
    assert_no_aws_secrets(log, moto.secret_access_key)


def test_multipart_upload_with_sse_kms(moto, bao_cluster, approle, kv_data, tmp_path):
    aws = s3_block(moto, s3_bucket="snapshots-kms", part_size_mb=5, concurrency=2,
                   s3_kms_key_id=moto.kms_key_id, s3_key_prefix="mp")
    code, log = run_agent(tmp_path, bao_cluster, approle, aws, local=False)
    assert code == 0, log
    line = [ln for ln in log.splitlines() if "Successfully created aws snapshot to s3://snapshots-kms/" in ln]
    key = line[0].split("s3://snapshots-kms/", 1)[1].strip()
    head = moto.head("snapshots-kms", key)
    assert head["ContentLength"] > 5 * 1024 * 1024
    assert head["ServerSideEncryption"] == "aws:kms"
    assert moto.kms_key_id in head["SSEKMSKeyId"]
    data = moto.get("snapshots-kms", key)
    path = tmp_path / "mp.snap"
    path.write_bytes(data)
    vsa.verify_file(str(path))
    assert moto.list_multipart_uploads("snapshots-kms") == []


def test_sse_s3_header_and_storage_class(moto, bao_cluster, approle, tmp_path):
    aws = s3_block(moto, s3_server_side_encryption=True, s3_storage_class="STANDARD_IA",
                   s3_key_prefix="sse")
    code, log = run_agent(tmp_path, bao_cluster, approle, aws, local=False)
    assert code == 0, log
    head = moto.head(BUCKET, stored_key(log))
    assert head["ServerSideEncryption"] == "AES256"
    assert head.get("StorageClass") == "STANDARD_IA"


def test_static_name_overwrites_one_key_and_skips_retention(moto, bao_cluster, approle, tmp_path):
    moto.put(BUCKET, "static/raft_snapshot-1700000000000000000.snap", b"old")
    aws = s3_block(moto, s3_key_prefix="static", s3_static_snapshot_name="latest", retain=1)
    for _ in range(2):
        code, log = run_agent(tmp_path, bao_cluster, approle, aws, local=False)
        assert code == 0, log
        assert stored_key(log) == "static/latest.snap"
    assert moto.list_keys(BUCKET, "static/") == ["static/latest.snap",
                                                 "static/raft_snapshot-1700000000000000000.snap"]
    verify_object(moto, "static/latest.snap", tmp_path)


@pytest.mark.slow
def test_retention_over_more_than_1000_objects(moto, bao_cluster, approle, tmp_path):
    prefix = "many/"
    moto.delete_all(BUCKET, prefix)
    old = ["%sraft_snapshot-%d.snap" % (prefix, 1700000000000000000 + i * 10 ** 9) for i in range(1100)]
    foreign = [prefix + "notes.txt", prefix + "sub/raft_snapshot-1700000000000000000.snap",
               "many-other/raft_snapshot-1700000000000000001.snap"]
    moto.put_many(BUCKET, old + foreign)
    code, log = run_agent(tmp_path, bao_cluster, approle,
                          s3_block(moto, s3_key_prefix="many", retain=3), local=False)
    assert code == 0, log
    new = stored_key(log)
    remaining = moto.list_keys(BUCKET, prefix)
    assert sorted(remaining) == sorted([new, old[-1], old[-2]] + foreign[:2])
    assert "many-other/raft_snapshot-1700000000000000001.snap" in moto.list_keys(BUCKET, "many-other/")
    assert "deleted 1098" in log


AWKWARD_PREFIXES = ["backups/vault snap", "a+b=c~d", "caf\u00e9/\u4e2d", "x&y$z@w!", "p%20q"]


@pytest.mark.parametrize("prefix", AWKWARD_PREFIXES)
def test_keys_with_awkward_characters(moto, bao_cluster, approle, tmp_path, prefix):
    aws = s3_block(moto, s3_key_prefix=prefix, retain=1)
    for _ in range(2):
        code, log = run_agent(tmp_path, bao_cluster, approle, aws, local=False)
        assert code == 0, log
    keys = moto.list_keys(BUCKET, prefix + "/")
    assert keys == [stored_key(log)]
    verify_object(moto, keys[0], tmp_path)


def test_wrong_secret_fails_aws_but_local_still_stores(moto, bao_cluster, approle, tmp_path):
    wrong = moto.wrong_secret_access_key
    code, log = run_agent(tmp_path, bao_cluster, approle, s3_block(moto, secret_access_key=wrong))
    assert code == 1
    assert "SignatureDoesNotMatch" in log and "secret access key does not match" in log
    assert "Successfully created local snapshot" in log
    assert len(os.listdir(str(tmp_path / "local"))) == 1
    assert_no_aws_secrets(log, wrong, moto.secret_access_key)


def test_daemon_retries_only_the_failed_storage_until_a_reload_fixes_it(moto, bao_cluster, approle,
                                                                       tmp_path):
    """Hourly snapshots, S3 with a wrong secret: the daemon stores locally
    once, retries S3 alone after 1 s, 2 s, 4 s..., and once SIGHUP brings the
    right secret the next retry stores in S3, without a second local copy."""
    prefix = "retry-%s" % os.urandom(3).hex()
    config = {"addr": bao_cluster.leader().addr, "role_id": approle.role_id,
              "secret_id": approle.secret_id, "frequency": "1h", "retry_interval": "1s",
              "status_file": str(tmp_path / "status.json"),
              "metrics_textfile": str(tmp_path / "agent.prom"),
              "local_storage": {"path": str(tmp_path / "local")},
              "aws_storage": s3_block(moto, secret_access_key=moto.wrong_secret_access_key,
                                      s3_key_prefix=prefix)}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    logfile = tmp_path / "agent.log"
    proc = start_agent(str(path), logfile)
    try:
        wait_for(lambda: "(3 failed in a row)" in read(logfile), 30, "three failed S3 attempts")
        assert moto.list_keys(BUCKET, prefix + "/") == []
        failing = s3_status(tmp_path, prefix)
        assert failing["failures_in_a_row"] >= 3 and failing["successes"] == 0, failing
        assert "SignatureDoesNotMatch" in failing["last_error"]
        assert re.search(r'^vault_snapshot_storage_consecutive_failures\{storage="s3://%s/%s/",'
                         r'type="aws",name="aws"\} [3-9]' % (BUCKET, prefix),
                         read(tmp_path / "agent.prom"), re.M)
        config["aws_storage"]["secret_access_key"] = moto.secret_access_key
        path.write_text(json.dumps(config))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "Successfully created aws snapshot" in read(logfile), 30, "a stored object")
        wait_for(lambda: s3_status(tmp_path, prefix)["successes"] == 1, 10, "the status file")
    finally:
        code = stop(proc)
    fixed = s3_status(tmp_path, prefix)
    assert fixed["failures_in_a_row"] == 0 and fixed["failures"] >= 3, fixed
    assert re.search(r'^vault_snapshot_storage_consecutive_failures\{storage="s3://%s/%s/",'
                     r'type="aws",name="aws"\} 0$' % (BUCKET, prefix), read(tmp_path / "agent.prom"), re.M)
    log = read(logfile)
    assert code == 0, log
    assert log.count("Successfully created local snapshot") == 1, log
    assert len(os.listdir(str(tmp_path / "local"))) == 1
    assert "Retrying s3://%s/%s/ at " % (BUCKET, prefix) in log
    assert "local:" not in "".join(ln for ln in log.splitlines() if "Retrying" in ln)
    keys = moto.list_keys(BUCKET, prefix + "/")
    assert keys == [stored_key(log)]
    verify_object(moto, keys[0], tmp_path)
    assert_no_aws_secrets(log, moto.wrong_secret_access_key, moto.secret_access_key)


def s3_status(tmp_path, prefix):
    """The S3 storage's entry in the daemon's status file."""
    status = json.loads(read(tmp_path / "status.json"))
    entry = status["storages"]["aws"]
    assert entry["location"] == "s3://%s/%s/" % (BUCKET, prefix)
    return entry


def test_denied_user_gets_a_one_line_access_denied(moto, bao_cluster, approle, tmp_path):
    aws = s3_block(moto, access_key_id=moto.denied_access_key_id,
                   secret_access_key=moto.denied_secret_access_key)
    code, log = run_agent(tmp_path, bao_cluster, approle, aws, local=False)
    assert code == 1
    errors = [ln for ln in log.splitlines() if " ERROR " in ln]
    assert any("AccessDenied" in ln and "not allowed to PutObject" in ln for ln in errors), log
    assert_no_aws_secrets(log, moto.denied_secret_access_key)


def test_bucket_in_another_region_names_the_region(moto, bao_cluster, approle, tmp_path):
    port = int(moto.endpoint.rsplit(":", 1)[1])
    body = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>PermanentRedirect</Code>"
            b"<Message>The bucket you are attempting to access must be addressed using the "
            b"specified endpoint.</Message><Bucket>snapshots</Bucket></Error>")
    with FaultProxy("127.0.0.1", port) as proxy:
        proxy.fail_requests(None, status=301, body=body, content_type="application/xml",
                            headers={"x-amz-bucket-region": "eu-west-1"})
        code, log = run_agent(tmp_path, bao_cluster, approle, s3_block(moto, s3_endpoint=proxy.addr),
                              local=False)
    assert code == 1
    assert "the bucket is in region eu-west-1: set s3_region to it" in log


def test_slowdown_and_resets_are_retried(moto, bao_cluster, approle, kv_data, tmp_path):
    port = int(moto.endpoint.rsplit(":", 1)[1])
    slow = (b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")
    with FaultProxy("127.0.0.1", port) as proxy:
        rule = proxy.fail_requests(lambda m, p: m == "PUT", status=503, body=slow, times=3,
                                   content_type="application/xml")
        proxy.reset(times=1)
        aws = s3_block(moto, s3_endpoint=proxy.addr, part_size_mb=5, s3_key_prefix="retry")
        code, log = run_agent(tmp_path, bao_cluster, approle, aws, local=False)
        assert rule.hits == 3
    assert code == 0, log
    assert log.count("retry ") >= 4
    verify_object(moto, stored_key(log), tmp_path)


def test_permanent_failure_leaves_no_upload_and_deletes_nothing(moto, bao_cluster, approle, kv_data,
                                                                 tmp_path):
    prefix = "perm/"
    moto.delete_all(BUCKET, prefix)
    old = ["%sraft_snapshot-%d.snap" % (prefix, 1700000000000000000 + i) for i in range(3)]
    moto.put_many(BUCKET, old)
    port = int(moto.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        proxy.fail_requests(lambda m, p: m == "PUT" and "partNumber=2" in p, status=500,
                            body=b"<Error><Code>InternalError</Code></Error>",
                            content_type="application/xml")
        aws = s3_block(moto, s3_endpoint=proxy.addr, part_size_mb=5, s3_key_prefix="perm", retain=1)
        aws_block = dict(aws)
        code, log = run_agent(tmp_path, bao_cluster, approle, aws_block, local=False)
    assert code == 1
    assert "UploadPart 2" in log and "Aborted multipart upload" in log
    assert moto.list_multipart_uploads(BUCKET, prefix) == []
    assert moto.list_keys(BUCKET, prefix) == sorted(old)


# -- credentials --------------------------------------------------------------------

def run_with_chain(tmp_path, bao_cluster, approle, moto, prefix):
    """One cycle with no static keys: the chain must find credentials."""
    aws = s3_block(moto, access_key_id=None, secret_access_key=None, s3_key_prefix=prefix)
    return run_agent(tmp_path, bao_cluster, approle, aws, local=False)


def test_environment_credentials(moto, bao_cluster, approle, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret_access_key)
    code, log = run_with_chain(tmp_path, bao_cluster, approle, moto, "env")
    assert code == 0, log
    assert "AWS credentials from environment" in log


def test_shared_credentials_file_with_profile(moto, bao_cluster, approle, tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIAWRONG\naws_secret_access_key = wrong\n\n"
                     "[backup]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
                     % (moto.access_key_id, moto.secret_access_key))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "backup")
    code, log = run_with_chain(tmp_path, bao_cluster, approle, moto, "profile")
    assert code == 0, log
    assert "[backup]" in log


def test_web_identity_through_sts(moto, bao_cluster, approle, tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2ln")
    monkeypatch.setenv("AWS_ROLE_ARN", moto.role_arn)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto.endpoint)
    cfg = vsa.config_from_dict({"addr": bao_cluster.leader().addr, "role_id": "r", "secret_id": "s",
                                "aws_storage": s3_block(moto, access_key_id=None, secret_access_key=None,
                                                        s3_key_prefix="irsa")})
    storage = vsa.build_storages(cfg, vsa.Runtime.create())[0]
    moto.disable_auth()           # moto answers AssumeRoleWithWebIdentity only with auth off
    try:
        creds = storage.chain.get()
    finally:
        moto.enable_auth()
    assert creds.source.startswith("web identity") and creds.token and creds.expires
    src = tmp_path / "s.snap"
    from support.archives import write_archive
    write_archive(str(src))
    info = vsa.verify_file(str(src))
    location = storage.upload(info, "raft_snapshot-20261127T000000.000Z.snap")
    assert location == "s3://snapshots/irsa/raft_snapshot-20261127T000000.000Z.snap"
    assert moto.get(BUCKET, "irsa/raft_snapshot-20261127T000000.000Z.snap") == src.read_bytes()


def test_imdsv2_credentials_pass_the_signature_check(moto, bao_cluster, approle, tmp_path, monkeypatch):
    key, secret, session, _ = moto.web_identity
    with ImdsServer(access_key_id=key, secret_access_key=secret, token=session) as imds:
        monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url)
        code, log = run_with_chain(tmp_path, bao_cluster, approle, moto, "imds")
        assert code == 0, log
        assert "EC2 instance metadata (snapshot-instance-role)" in log
        assert imds.requests[0].method == "PUT"
        assert all(r.header("X-aws-ec2-metadata-token") for r in imds.requests[1:])
    assert_no_aws_secrets(log, secret, session)


def test_container_credentials_with_authorization_token_file(moto, bao_cluster, approle, tmp_path,
                                                             monkeypatch):
    key, secret, session, _ = moto.web_identity
    with ContainerCredentialsServer(authorization="pod-identity-token", access_key_id=key,
                                    secret_access_key=secret, token=session) as server:
        auth = tmp_path / "auth"
        auth.write_text("pod-identity-token")
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", server.full_uri)
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(auth))
        code, log = run_with_chain(tmp_path, bao_cluster, approle, moto, "container")
        assert code == 0, log
        assert "AWS credentials from container credentials" in log
    assert_no_aws_secrets(log, secret, session, "pod-identity-token")


def test_no_credentials_anywhere_is_one_clear_line(moto, bao_cluster, approle, tmp_path):
    code, log = run_with_chain(tmp_path, bao_cluster, approle, moto, "none")
    assert code == 1
    assert "no AWS credentials found" in log


def test_store_without_delete_objects_falls_back_to_single_deletes(moto, bao_cluster, approle,
                                                                  tmp_path):
    prefix = "nobatch/"
    moto.delete_all(BUCKET, prefix)
    old = ["%sraft_snapshot-%d.snap" % (prefix, 1700000000000000000 + i) for i in range(4)]
    moto.put_many(BUCKET, old)
    port = int(moto.endpoint.rsplit(":", 1)[1])
    body = b"<Error><Code>NotImplemented</Code><Message>DeleteObjects</Message></Error>"
    with FaultProxy("127.0.0.1", port) as proxy:
        rule = proxy.fail_requests(lambda m, p: m == "POST" and "delete" in p.split("?", 1)[-1],
                                   status=501, body=body, content_type="application/xml")
        aws = s3_block(moto, s3_endpoint=proxy.addr, s3_key_prefix="nobatch", retain=2)
        code, log = run_agent(tmp_path, bao_cluster, approle, aws, local=False)
        deletes = [r for r in proxy.requests if r.startswith("DELETE ")]
    assert code == 0, log
    assert rule.hits == 1 and len(deletes) == 3
    assert moto.list_keys(BUCKET, prefix) == sorted([stored_key(log), old[-1]])
