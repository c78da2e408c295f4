"""Section "S3 storage" against moto (signatures checked): two agents that pick the
same object name in the same millisecond. The second write is refused
(If-None-Match: *) and raises NameClash, the first object stays intact;
the static name is still replaced on every run. An answer to
CompleteMultipartUpload lost after moto completed it (500, then
NoSuchUpload on the retry) is settled by comparing the stored object."""

import hashlib
import os

import pytest

import vault_snapshot_agent as vsa
from support.aws_fakes import S3Front
from support.harness import FakeClock, FakeSignals

BUCKET = "snapshots"
MiB = 1024 * 1024


@pytest.fixture
def prefix(moto):
    name = "clash-%s" % os.urandom(3).hex()
    yield name
    moto.delete_all(BUCKET, name + "/")


def storage(moto, prefix, endpoint=None, **extra):
    env = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_EC2_METADATA_DISABLED": "true"}
    block = {"access_key_id": moto.access_key_id, "secret_access_key": moto.secret_access_key,
             "s3_endpoint": endpoint or moto.endpoint, "s3_region": "us-east-1",
             "s3_bucket": BUCKET, "s3_key_prefix": prefix, "part_size_mb": 5}
    block.update(extra)
    cfg = vsa.config_from_dict({"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
                                "aws_storage": block}, env=env)
    return vsa.build_storages(cfg, vsa.Runtime(env, FakeClock(), FakeSignals()))[0]


def snapshot(tmp_path, size, name):
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return vsa.SnapshotInfo(str(path), size, hashlib.sha256(data).hexdigest(), 1, 1, size), data


NAME = "raft_snapshot-20261127T000000.000Z.snap"


@pytest.mark.parametrize("size", [4096, 6 * MiB + 7], ids=["put", "multipart"])
def test_second_writer_of_a_name_gets_name_clash_and_the_first_object_stays(moto, prefix, tmp_path,
                                                                             size):
    first, first_data = snapshot(tmp_path, size, "first.snap")
    second, _ = snapshot(tmp_path, size, "second.snap")
    storage(moto, prefix).upload(first, NAME)
    with pytest.raises(vsa.NameClash) as caught:
        storage(moto, prefix).upload(second, NAME)
    assert "%s/%s" % (prefix, NAME) in str(caught.value)
    assert moto.get(BUCKET, "%s/%s" % (prefix, NAME)) == first_data
    assert moto.list_multipart_uploads(BUCKET, prefix + "/") == []


def test_the_static_name_is_still_replaced(moto, prefix, tmp_path):
    for number in range(2):
        info, data = snapshot(tmp_path, 4096, "s%d.snap" % number)
        storage(moto, prefix, s3_static_snapshot_name="latest").upload(info, NAME)
        assert moto.get(BUCKET, prefix + "/latest.snap") == data


@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "etag"])
def test_a_lost_complete_answer_is_settled_by_the_stored_object(moto, prefix, tmp_path, checksum):
    completes = []

    def intercept(method, path):
        if method == "POST" and "uploadId=" in path:
            completes.append(path)
            return ("after", 500, "InternalError") if len(completes) == 1 else \
                ("answer", 404, "NoSuchUpload")
        return None

    with S3Front(moto.endpoint, intercept) as front:
        info, data = snapshot(tmp_path, 6 * MiB + 7, "s.snap")
        aws = storage(moto, prefix, endpoint=front.url, s3_checksum=checksum)
        location = aws.upload(info, NAME)           # before: failed, with the object stored
        assert len(completes) == 2 and ("HEAD", "/%s/%s/%s" % (BUCKET, prefix, NAME)) in front.seen
    assert location == "s3://%s/%s/%s" % (BUCKET, prefix, NAME)
    assert moto.get(BUCKET, "%s/%s" % (prefix, NAME)) == data
