"""Issue 12: S3 Object Lock, end to end against moto (signature checking on).

A bucket created with Object Lock (versioned by S3 at creation) and one
without.  The real agent takes real snapshots from the OpenBao cluster; what
is checked is what the owner of a locked bucket would check with the AWS
tools (botocore here): every version is still there after retention, each
carries the lock mode and a retain-until date ``s3_object_lock_days`` ahead,
a version cannot be deleted without bypassing governance, the old snapshot
comes back by its version id and verifies.

moto 5.2.5 quirks found while writing these tests:

* a PUT carrying ``x-amz-object-lock-*`` must also carry ``Content-MD5`` or
  ``x-amz-sdk-checksum-algorithm`` (else ``MissingUploadObjectWithObjectLockHeaders``,
  checked before the bucket's lock configuration);
* ``CreateMultipartUpload`` ignores the lock headers (the completed object
  has no lock in moto), so the multipart test checks the request on the
  wire (a recording proxy) and that the object arrives whole.

The config checks at the bottom need no server (they also run on 3.6).
"""

import base64
import datetime
import hashlib
import json
import os
import re

import pytest

import vault_snapshot_agent as vsa
from support.archives import write_archive
from support.faultproxy import FaultProxy
from support.harness import FakeSignals, error_lines, run_main, run_once, success_location, unique
from support.storage_blocks import s3_block as plain_s3_block

pytestmark = pytest.mark.usefixtures("no_aws_env")

LOCKED = "snapshots-locked"          # the agent user's policy covers snapshots*
UNLOCKED = "snapshots-nolock"
DAYS = 2
SLACK = datetime.timedelta(minutes=5)
RFC3339_UTC = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\Z")


@pytest.fixture
def buckets(moto):
    """The locked and the unlocked bucket (created once per moto server)."""
    from botocore.exceptions import ClientError
    for name, lock in ((LOCKED, True), (UNLOCKED, False)):
        kwargs = {"ObjectLockEnabledForBucket": True} if lock else {}
        try:
            moto.admin.create_bucket(Bucket=name, **kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou",
                                                     "BucketAlreadyExists"):
                raise
    config = moto.admin.get_object_lock_configuration(Bucket=LOCKED)
    assert config["ObjectLockConfiguration"]["ObjectLockEnabled"] == "Enabled"
    return moto


def s3_block(moto, **extra):
    """test_s3's block on the LOCKED bucket, governance for DAYS days;
    ``extra`` overrides (None drops a key)."""
    locked = {"s3_bucket": LOCKED, "s3_object_lock_mode": "governance",
              "s3_object_lock_days": DAYS}
    locked.update(extra)
    return plain_s3_block(moto, **locked)


def stored_key(log, bucket=LOCKED):
    return success_location(log, "Successfully created aws snapshot to s3://%s/" % bucket)


def now():
    return datetime.datetime.now(datetime.timezone.utc)


def versions(moto, bucket, prefix):
    """(versions, delete markers) under ``prefix``, as ListObjectVersions gives them."""
    page = moto.admin.list_object_versions(Bucket=bucket, Prefix=prefix)
    return page.get("Versions", []), page.get("DeleteMarkers", [])


def assert_locked(head, before, after, days=DAYS, mode="GOVERNANCE"):
    """A HEAD answer shows ``mode`` and a retain-until ``days`` after the
    upload (which happened between ``before`` and ``after``)."""
    raw = head["ResponseMetadata"]["HTTPHeaders"]
    assert raw.get("x-amz-object-lock-mode") == mode, raw
    assert RFC3339_UTC.match(raw.get("x-amz-object-lock-retain-until-date", "")), raw
    until = head["ObjectLockRetainUntilDate"]
    ahead = datetime.timedelta(days=days)
    assert before + ahead - SLACK <= until <= after + ahead + SLACK, (until, before, after)


def test_two_cycles_keep_both_locked_versions(buckets, bao_cluster, approle, tmp_path):
    """retain: 1 on a locked bucket: the second cycle's retention deletes the
    first snapshot's key (a delete marker), never a version and never with
    bypass; both versions stay, locked, and the old one restores."""
    moto = buckets
    prefix = unique("lock")
    port = int(moto.endpoint.rsplit(":", 1)[1])
    keys, times = [], []
    with FaultProxy("127.0.0.1", port) as proxy:
        aws = s3_block(moto, s3_endpoint=proxy.addr, s3_key_prefix=prefix, retain=1)
        for _ in range(2):
            before = now()
            code, log = run_once(tmp_path, bao_cluster.leader().addr, approle, aws_storage=aws)
            assert code == 0, log
            keys.append(stored_key(log))
            times.append((before, now()))
        heads = list(proxy.request_heads)
    assert keys[0] != keys[1]
    # The second cycle's retention line: one deleted by retain.
    line = [ln for ln in log.splitlines() if "Retention on s3://%s/%s/" % (LOCKED, prefix) in ln]
    assert len(line) == 1, log
    assert "kept 1; deleted 1 (1 by retain=1)" in line[0], line[0]
    # Deleted by key only: no version id, no bypass header on any request.
    assert not any(h.header("x-amz-bypass-governance-retention") is not None for h in heads)
    assert not any("versionId=" in h.path for h in heads if h.method in ("DELETE", "POST"))

    # What a user of the bucket sees: the key is gone from the listing...
    assert moto.list_keys(LOCKED, prefix + "/") == [keys[1]]
    found, markers = versions(moto, LOCKED, prefix + "/")
    # ...but both versions are there, the old key's latest entry a delete marker.
    assert sorted(v["Key"] for v in found) == sorted(keys), found
    assert [(m["Key"], m["IsLatest"]) for m in markers] == [(keys[0], True)], markers
    by_key = {v["Key"]: v for v in found}
    assert by_key[keys[1]]["IsLatest"] and not by_key[keys[0]]["IsLatest"]
    for key, (before, after) in zip(keys, times):
        head = moto.admin.head_object(Bucket=LOCKED, Key=key, VersionId=by_key[key]["VersionId"])
        assert_locked(head, before, after)

    # The old snapshot comes back by its version id and verifies.
    old = moto.admin.get_object(Bucket=LOCKED, Key=keys[0],
                                VersionId=by_key[keys[0]]["VersionId"])["Body"].read()
    path = tmp_path / "restored.snap"
    path.write_bytes(old)
    code, out = run_main("verify", str(path))
    assert code == 0, out

    # The agent's own credentials cannot delete a locked version.
    from botocore.exceptions import ClientError
    with pytest.raises(ClientError) as refused:
        moto.agent_client().delete_object(Bucket=LOCKED, Key=keys[0],
                                          VersionId=by_key[keys[0]]["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    assert sorted(v["Key"] for v in versions(moto, LOCKED, prefix + "/")[0]) == sorted(keys)


def test_compliance_mode_any_case_and_static_name_versions(buckets, bao_cluster, approle,
                                                          tmp_path):
    """The static-name mode overwrites one key: on a locked bucket every
    write is a new version, each locked (COMPLIANCE, given in lower case)."""
    moto = buckets
    prefix = unique("static-lock")
    aws = s3_block(moto, s3_key_prefix=prefix, s3_static_snapshot_name="latest",
                   s3_object_lock_mode="Compliance", s3_object_lock_days=1)
    times = []
    for _ in range(2):
        before = now()
        code, log = run_once(tmp_path, bao_cluster.leader().addr, approle, aws_storage=aws)
        assert code == 0, log
        assert stored_key(log) == prefix + "/latest.snap"
        times.append((before, now()))
    found, markers = versions(moto, LOCKED, prefix + "/")
    assert [v["Key"] for v in found] == [prefix + "/latest.snap"] * 2 and not markers
    for version in found:
        head = moto.admin.head_object(Bucket=LOCKED, Key=version["Key"],
                                      VersionId=version["VersionId"])
        assert_locked(head, times[0][0], times[1][1], days=1, mode="COMPLIANCE")


def test_multipart_upload_carries_the_lock(buckets, tmp_path):
    """A file above part_size goes through CreateMultipartUpload, which must
    carry the lock headers (moto drops them there, so they are read on the
    wire); the object is complete and verifies."""
    moto = buckets
    prefix = unique("mp-lock")
    staged = str(tmp_path / "big.snap")
    data = write_archive(staged, state=os.urandom(6 * 1024 * 1024))
    assert len(data) > 5 * 1024 * 1024
    info = vsa.verify_file(staged)
    name = vsa.snapshot_name(now())
    port = int(moto.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        config = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
                  "aws_storage": s3_block(moto, s3_endpoint=proxy.addr, s3_key_prefix=prefix,
                                          part_size_mb=5, concurrency=2)}
        path = tmp_path / "c.json"
        path.write_text(json.dumps(config))
        runtime = vsa.Runtime.create(env={}, signals=FakeSignals())
        _, storages = vsa.load_all(str(path), runtime)
        before = now()
        location = storages[0].upload(info, name)
        after = now()
        heads = list(proxy.request_heads)
    assert location == "s3://%s/%s/%s" % (LOCKED, prefix, name)
    create = [h for h in heads if h.method == "POST" and re.search(r"[?&]uploads(=|&|$)", h.path)]
    assert len(create) == 1, [h.line for h in heads]
    assert create[0].header("x-amz-object-lock-mode") == "GOVERNANCE"
    until_text = create[0].header("x-amz-object-lock-retain-until-date", "")
    assert RFC3339_UTC.match(until_text), until_text
    until = datetime.datetime.strptime(until_text[:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc)
    ahead = datetime.timedelta(days=DAYS)
    assert before + ahead - SLACK <= until <= after + ahead + SLACK
    parts = [h for h in heads if h.method == "PUT" and "partNumber=" in h.path]
    assert len(parts) == 2 and all(h.header("x-amz-checksum-sha256") for h in parts)
    assert moto.get(LOCKED, "%s/%s" % (prefix, name)) == data
    assert moto.list_multipart_uploads(LOCKED, prefix + "/") == []


def test_single_put_sends_a_checksum_s3_accepts_for_locked_writes(buckets, tmp_path):
    """The single PUT's lock headers come with the payload checksum; moto
    (like S3) refuses a locked PUT without Content-MD5 or a declared SDK
    checksum algorithm, so the object existing is the proof."""
    moto = buckets
    prefix = unique("put-lock")
    staged = str(tmp_path / "small.snap")
    data = write_archive(staged)
    info = vsa.verify_file(staged)
    name = vsa.snapshot_name(now())
    config = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
              "aws_storage": s3_block(moto, s3_key_prefix=prefix)}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    _, storages = vsa.load_all(str(path), vsa.Runtime.create(env={}, signals=FakeSignals()))
    before = now()
    storages[0].upload(info, name)
    head = moto.head(LOCKED, "%s/%s" % (prefix, name))
    assert_locked(head, before, now())
    assert head["ContentLength"] == len(data)
    assert moto.get(LOCKED, "%s/%s" % (prefix, name)) == data
    # What was sent is what S3 records: the SHA-256 checksum.
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
    attrs = moto.admin.get_object_attributes(Bucket=LOCKED, Key="%s/%s" % (prefix, name),
                                             ObjectAttributes=["Checksum"])
    assert attrs.get("Checksum", {}).get("ChecksumSHA256") == sha, attrs


def test_bucket_without_object_lock_is_one_line_and_local_still_stores(buckets, bao_cluster,
                                                                       approle, tmp_path):
    moto = buckets
    prefix = unique("nolock")
    aws = s3_block(moto, s3_bucket=UNLOCKED, s3_key_prefix=prefix)
    code, log = run_once(tmp_path, bao_cluster.leader().addr, approle, aws_storage=aws,
                         local_storage={"path": str(tmp_path / "local")})
    assert code == 1, log
    lock_errors = [ln for ln in error_lines(log) if "Object Lock" in ln]
    assert len(lock_errors) == 1, log
    # S3's own answer (moto: "Bucket is missing ObjectLockConfiguration"), not
    # a complaint about missing checksum headers.
    assert "InvalidRequest" in lock_errors[0], lock_errors[0]
    assert "MissingUploadObjectWithObjectLockHeaders" not in log
    assert "Successfully created local snapshot" in log
    local = [n for n in os.listdir(str(tmp_path / "local")) if vsa.parse_snapshot_name(n)]
    assert len(local) == 1
    assert vsa.verify_file(str(tmp_path / "local" / local[0]))
    assert moto.list_keys(UNLOCKED, prefix + "/") == []


# -- config (no server) ---------------------------------------------------------------

BASE_AWS = {"s3_bucket": "snapshots", "s3_region": "us-east-1",
            "access_key_id": "AKIAEXAMPLEEXAMPLE00", "secret_access_key": "not-a-real-secret"}


def check_config(tmp_path, aws):
    """``--check-config`` on a config with this aws_storage block: (exit
    code, log text)."""
    block = dict(BASE_AWS)
    block.update(aws)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"addr": "http://127.0.0.1:8200", "role_id": "r",
                                "secret_id": "s", "aws_storage": block}))
    return run_main("-c", str(path), "--check-config")


@pytest.mark.parametrize("aws,key", [
    ({"s3_object_lock_mode": "GOVERNANCE"}, "s3_object_lock_days"),
    ({"s3_object_lock_days": 30}, "s3_object_lock_mode"),
    ({"s3_object_lock_mode": "forever", "s3_object_lock_days": 30}, "s3_object_lock_mode"),
    ({"s3_object_lock_mode": "legal_hold", "s3_object_lock_days": 30}, "s3_object_lock_mode"),
    ({"s3_object_lock_mode": "COMPLIANCE", "s3_object_lock_days": 0}, "s3_object_lock_days"),
    ({"s3_object_lock_mode": "COMPLIANCE", "s3_object_lock_days": -3}, "s3_object_lock_days"),
    ({"s3_object_lock_mode": "COMPLIANCE", "s3_object_lock_days": 36501}, "s3_object_lock_days"),
    ({"s3_object_lock_mode": "COMPLIANCE", "s3_object_lock_days": 1.5}, "s3_object_lock_days"),
    ({"s3_object_lock_mode": "GOVERNANCE", "s3_object_lock_days": 7, "s3_checksum": False},
     "s3_checksum"),
])
def test_object_lock_config_errors_name_the_key(tmp_path, capsys, aws, key):
    code, log = check_config(tmp_path, aws)
    assert code == 2, log
    errors = error_lines(log)
    assert len(errors) == 1 and "aws_storage.%s" % key in errors[0], log


@pytest.mark.parametrize("mode,days", [("GOVERNANCE", 1), ("governance", 30),
                                       ("Compliance", 36500)])
def test_object_lock_config_accepted(tmp_path, capsys, mode, days):
    code, log = check_config(tmp_path, {"s3_object_lock_mode": mode, "s3_object_lock_days": days})
    assert code == 0, log
    assert "unknown config key" not in log, log
    shown = json.loads(capsys.readouterr().out)["aws_storage"]
    assert shown["s3_object_lock_mode"].upper() == mode.upper()
    assert shown["s3_object_lock_days"] == days
