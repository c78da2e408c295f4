"""Self-tests for the S3 test infrastructure: moto_server with signature
checking on (moto_s3.py) and the credential endpoints (cred_servers.py).

The moto tests need botocore and moto_server (the test venv); under the bare
unit-test interpreters they skip.  The credential-server tests are stdlib."""

import datetime
import json
import os
import urllib.error
import urllib.request

import pytest

from support import cred_servers
from support import moto_s3


# ------------------------------------------------------------------ moto


def _error(call):
    """Run a botocore call expected to fail: (code, http status)."""
    import botocore.exceptions

    with pytest.raises(botocore.exceptions.ClientError) as info:
        call()
    resp = info.value.response
    return resp["Error"].get("Code"), resp["ResponseMetadata"]["HTTPStatusCode"]


def test_moto_right_key_succeeds(moto):
    assert moto.auth_enabled
    agent = moto.agent_client()
    agent.put_object(Bucket="snapshots", Key="fx/ok.snap", Body=b"payload")
    assert moto.get("snapshots", "fx/ok.snap") == b"payload"
    assert moto.endpoint.startswith("http://127.0.0.1:")


def test_moto_rejects_bad_credentials(moto):
    wrong = moto.client(moto.access_key_id, moto.wrong_secret_access_key)
    assert _error(lambda: wrong.list_objects_v2(Bucket="snapshots")) == ("SignatureDoesNotMatch", 403)
    unknown = moto.client("AKIAUNKNOWN000000000", moto.secret_access_key)
    assert _error(lambda: unknown.list_objects_v2(Bucket="snapshots")) == ("InvalidAccessKeyId", 403)
    root = moto.client(moto_s3.ROOT_ACCESS_KEY, moto_s3.ROOT_SECRET_KEY)
    assert _error(lambda: root.list_buckets())[0] == "InvalidAccessKeyId"


def test_moto_enforces_iam_policy(moto):
    denied = moto.client(moto.denied_access_key_id, moto.denied_secret_access_key)
    assert _error(lambda: denied.put_object(Bucket="snapshots", Key="fx/d", Body=b"x")) == (
        "AccessDenied", 403)
    agent = moto.agent_client()
    # agent user: only snapshots* buckets
    assert _error(lambda: agent.create_bucket(Bucket="elsewhere"))[0] == "AccessDenied"


def test_moto_web_identity_session_credentials(moto):
    key, secret, token, expiration = moto.web_identity
    assert key.startswith("ASIA") and token
    assert expiration > datetime.datetime.now(datetime.timezone.utc)
    sts = moto.client(key, secret, token)
    sts.put_object(Bucket="snapshots", Key="fx/sts.snap", Body=b"sts")
    assert moto.get("snapshots", "fx/sts.snap") == b"sts"
    bad = moto.client(key, secret, "not-the-token")
    assert _error(lambda: bad.head_bucket(Bucket="snapshots"))[1] in (400, 403)
    assert _error(lambda: sts.list_objects_v2(Bucket="not-a-snapshot-bucket"))[0] in (
        "AccessDenied", "NoSuchBucket")


def test_moto_sse_kms_and_helpers(moto):
    agent = moto.agent_client()
    agent.put_object(Bucket="snapshots-kms", Key="fx/kms.snap", Body=b"k",
                     ServerSideEncryption="aws:kms", SSEKMSKeyId=moto.kms_key_id)
    head = moto.head("snapshots-kms", "fx/kms.snap")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == moto.kms_key_id
    assert head["ContentLength"] == 1

    up = agent.create_multipart_upload(Bucket="snapshots", Key="fx/mpu.snap")
    assert [u["Key"] for u in moto.list_multipart_uploads("snapshots", "fx/")] == ["fx/mpu.snap"]
    agent.abort_multipart_upload(Bucket="snapshots", Key="fx/mpu.snap", UploadId=up["UploadId"])
    assert moto.list_multipart_uploads("snapshots", "fx/") == []


def test_moto_put_many_and_paged_listing(moto):
    keys = ["fx-many/%05d.snap" % i for i in range(1100)]
    assert moto.put_many("snapshots", keys) == 1100
    assert moto.list_keys("snapshots", "fx-many/") == keys          # > 1000: two pages
    assert moto.delete_all("snapshots", "fx-many/") == 1100
    assert moto.list_keys("snapshots", "fx-many/") == []


def test_moto_other_region_bucket(moto):
    agent = moto.agent_client()
    resp = agent.head_bucket(Bucket=moto.other_region_bucket)
    assert resp["ResponseMetadata"]["HTTPHeaders"]["x-amz-bucket-region"] == moto_s3.OTHER_REGION


def test_moto_lifecycle(tmp_path):
    pytest.importorskip("botocore")
    try:
        moto_s3.find_moto_server()
    except moto_s3.MotoServerError as exc:
        pytest.skip(str(exc))
    server = moto_s3.MotoServer(str(tmp_path))
    server.start()
    pid = server.pid
    assert server.running and os.path.exists(server.log_path)
    server.stop()
    server.stop()                       # idempotent
    assert not server.running and server.pid is None
    with pytest.raises(OSError):
        os.kill(pid, 0)


# ------------------------------------------------------- credential servers


def _req(url, method="GET", headers=None, data=None):
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.getheaders()), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read().decode()


CREDS = cred_servers.IMDS_CREDS_PATH


def test_imds_v2_flow():
    exp = datetime.datetime(2031, 1, 2, 3, 4, 5)
    with cred_servers.ImdsServer(role="snap-role", access_key_id="ASIAIMDS1",
                                 secret_access_key="s1", token="t1", expiration=exp) as imds:
        status, headers, token = _req(imds.url + "/latest/api/token", "PUT",
                                      {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        assert status == 200 and token
        assert headers["X-aws-ec2-metadata-token-ttl-seconds"] == "300"
        auth = {"X-aws-ec2-metadata-token": token}
        assert _req(imds.url + CREDS, headers=auth)[::2] == (200, "snap-role")
        status, _, body = _req(imds.url + CREDS + "snap-role", headers=auth)
        doc = json.loads(body)
        assert status == 200
        assert doc["Code"] == "Success" and doc["Type"] == "AWS-HMAC"
        assert (doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"]) == ("ASIAIMDS1", "s1", "t1")
        assert doc["Expiration"] == "2031-01-02T03:04:05Z"
        assert _req(imds.url + CREDS + "other-role", headers=auth)[0] == 404

        imds.set_credentials("ASIAIMDS2", "s2", "t2")
        assert json.loads(_req(imds.url + CREDS + "snap-role", headers=auth)[2])["AccessKeyId"] == "ASIAIMDS2"

        assert [(r.method, r.path, r.status) for r in imds.requests] == [
            ("PUT", "/latest/api/token", 200),
            ("GET", CREDS, 200),
            ("GET", CREDS + "snap-role", 200),
            ("GET", CREDS + "other-role", 404),
            ("GET", CREDS + "snap-role", 200),
        ]
        assert imds.requests[1].header("x-aws-ec2-metadata-token") == token

        imds.expire_tokens()
        assert _req(imds.url + CREDS, headers=auth)[0] == 401


def test_imds_rejects_v1_and_bad_token_requests():
    with cred_servers.ImdsServer() as imds:
        assert _req(imds.url + CREDS)[0] == 401                          # no token: v2 required
        assert _req(imds.url + CREDS, headers={"X-aws-ec2-metadata-token": "forged"})[0] == 401
        assert _req(imds.url + "/latest/api/token", "PUT")[0] == 400     # TTL header missing
        assert _req(imds.url + "/latest/api/token", "PUT",
                    {"X-aws-ec2-metadata-token-ttl-seconds": "21601"})[0] == 400
        assert _req(imds.url + "/latest/api/token")[0] == 405            # GET on token path
        imds.fail_next(500)
        assert _req(imds.url + "/latest/api/token", "PUT",
                    {"X-aws-ec2-metadata-token-ttl-seconds": "60"})[0] == 500
    with cred_servers.ImdsServer(role="r", imdsv1=True, token_status=405) as imds:
        assert _req(imds.url + "/latest/api/token", "PUT",
                    {"X-aws-ec2-metadata-token-ttl-seconds": "60"})[0] == 405
        assert _req(imds.url + CREDS)[::2] == (200, "r")                 # IMDSv1 allowed
    with cred_servers.ImdsServer(role=None, imdsv1=True) as imds:
        assert _req(imds.url + CREDS)[0] == 404                          # no instance profile


def test_container_credentials_server():
    with cred_servers.ContainerCredentialsServer(authorization="Bearer-abc",
                                                 role_arn="arn:aws:iam::1:role/r") as ecs:
        assert ecs.full_uri == ecs.url + ecs.relative_uri
        assert ecs.relative_uri.startswith("/v2/credentials/")
        status, _, body = _req(ecs.full_uri)
        assert status == 401 and json.loads(body)["code"] == "AccessDenied"
        assert _req(ecs.full_uri, headers={"Authorization": "wrong"})[0] == 401
        status, headers, body = _req(ecs.full_uri, headers={"Authorization": "Bearer-abc"})
        doc = json.loads(body)
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert set(doc) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "RoleArn"}
        assert doc["Expiration"].endswith("Z")
        assert _req(ecs.url + "/elsewhere")[0] == 404
        assert [r.status for r in ecs.requests] == [401, 401, 200, 404]
        assert ecs.requests[2].header("authorization") == "Bearer-abc"
    ecs.stop()                                                           # idempotent
    with cred_servers.ContainerCredentialsServer(path="/v1/credentials") as pod:
        assert json.loads(_req(pod.url + "/v1/credentials")[2])["AccessKeyId"] == "ASIACONTAINEREXAMPLE"


def test_cred_servers_satisfy_botocore_providers():
    """Cross-check: botocore's own IMDS and container fetchers accept them."""
    utils = pytest.importorskip("botocore.utils")
    with cred_servers.ImdsServer(role="snap-role", access_key_id="ASIAX", secret_access_key="sx",
                                 token="tx") as imds:
        fetcher = utils.InstanceMetadataFetcher(timeout=5, num_attempts=1,
                                                base_url=imds.url + "/", env={})
        creds = fetcher.retrieve_iam_role_credentials()
        assert (creds["role_name"], creds["access_key"], creds["token"]) == ("snap-role", "ASIAX", "tx")
        assert imds.requests[0].method == "PUT"
        assert all(r.status == 200 for r in imds.requests)
    with cred_servers.ContainerCredentialsServer(authorization="tok") as ecs:
        doc = utils.ContainerMetadataFetcher().retrieve_full_uri(
            ecs.full_uri, headers={"Authorization": "tok"})
        assert doc["AccessKeyId"] == "ASIACONTAINEREXAMPLE"
