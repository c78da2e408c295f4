"""Section "S3 storage", the upload path against a lying or racing loopback S3
(aws_fakes.FakeS3): writes are conditional (If-None-Match: *), so a name
another agent took is NameClash and never overwritten; an answer lost after
the store acted is settled by comparing the stored object with what was
sent; an ETag or checksum that does not match the body is an error."""

import hashlib
import os

import pytest

import vault_snapshot_agent as vsa
from support.aws_fakes import FakeS3, md5_hex, multipart_etag
from support.harness import FakeClock, FakeSignals

NAME = "raft_snapshot-20261127T000000.000Z.snap"
KEY = "raft_snapshots/" + NAME
MiB = 1024 * 1024


def storage(s3, **extra):
    env = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_EC2_METADATA_DISABLED": "true"}
    cfg = vsa.config_from_dict({"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
                                "aws_storage": s3.storage_block(**extra)}, env=env)
    return vsa.build_storages(cfg, vsa.Runtime(env, FakeClock(), FakeSignals()))[0]


def snapshot(tmp_path, size, name="s.snap"):
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return vsa.SnapshotInfo(str(path), size, hashlib.sha256(data).hexdigest(), 1, 1, size), data


SMALL, LARGE = 4096, 6 * MiB + 123      # one PUT; two parts of 5 MiB


# -- conditional writes ------------------------------------------------------------


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["put", "multipart"])
def test_a_taken_name_is_name_clash_and_the_first_object_stays(tmp_path, size):
    with FakeS3() as s3:
        first, first_data = snapshot(tmp_path, size, "first.snap")
        second, _ = snapshot(tmp_path, size, "second.snap")
        storage(s3, part_size_mb=5).upload(first, NAME)
        with pytest.raises(vsa.NameClash) as caught:
            storage(s3, part_size_mb=5).upload(second, NAME)
        text = str(caught.value)
        assert KEY in text and "412" in text and "\n" not in text, text
        assert s3.objects[KEY] == first_data            # before: replaced by the second
        assert s3.uploads == {}                         # the second's parts were aborted


def test_the_static_name_is_replaced_without_a_condition(tmp_path):
    with FakeS3() as s3:
        aws = storage(s3, s3_static_snapshot_name="latest")
        for number in range(2):
            info, data = snapshot(tmp_path, SMALL, "s%d.snap" % number)
            aws.upload(info, NAME)
            assert s3.objects["raft_snapshots/latest.snap"] == data
        assert not any("if-none-match" in headers for _, _, headers in s3.requests)


def test_a_conditional_write_in_progress_is_retried(tmp_path):
    with FakeS3() as s3:
        s3.conflicts = 2
        info, data = snapshot(tmp_path, SMALL)
        storage(s3).upload(info, NAME)
        assert s3.objects[KEY] == data
        assert s3.count("PUT") == 3


# -- answers lost after the store acted ------------------------------------------------


def test_a_lost_complete_answer_then_no_such_upload_is_success_when_the_object_is_ours(tmp_path):
    with FakeS3() as s3:
        s3.complete_fault = "lost-answer"
        info, data = snapshot(tmp_path, LARGE)
        location = storage(s3, part_size_mb=5).upload(info, NAME)     # before: StorageError
        assert location == "s3://snapshots/" + KEY
        assert s3.objects[KEY] == data
        assert s3.count("POST", "uploadId") == 2 and s3.count("HEAD") == 1


def test_a_lost_complete_answer_with_other_bytes_stored_is_an_error(tmp_path):
    with FakeS3() as s3:
        s3.complete_fault = "replaced"
        info, _ = snapshot(tmp_path, LARGE)
        with pytest.raises(vsa.StorageError, match="does not hold the object sent") as caught:
            storage(s3, part_size_mb=5).upload(info, NAME)
        assert not isinstance(caught.value, vsa.NameClash)
        assert s3.objects[KEY] == b"other bytes"


def test_a_lost_put_answer_then_412_is_success_when_the_object_is_ours(tmp_path):
    with FakeS3() as s3:
        s3.put_fault = "lost-answer"
        info, data = snapshot(tmp_path, SMALL)
        storage(s3).upload(info, NAME)
        assert s3.objects[KEY] == data and s3.count("HEAD") == 1


def test_a_lost_put_answer_and_another_writer_is_still_name_clash(tmp_path):
    with FakeS3() as s3:
        s3.put_fault = "lost-answer"
        info, _ = snapshot(tmp_path, SMALL)
        s3.objects[KEY], s3.etags[KEY] = b"theirs", md5_hex(b"theirs")
        with pytest.raises(vsa.NameClash):
            storage(s3).upload(info, NAME)
        assert s3.objects[KEY] == b"theirs"


def test_a_lost_put_answer_stays_name_clash_when_head_is_refused(tmp_path):
    # Credentials that may write but not read (no s3:GetObject): the HEAD
    # that would settle the lost answer is refused. The clash stands (the
    # agent then takes the next millisecond: a second copy, never a lost
    # one); it was a failed upload.
    with FakeS3() as s3:
        s3.put_fault, s3.head_refused = "lost-answer", True
        info, data = snapshot(tmp_path, SMALL)
        with pytest.raises(vsa.NameClash):
            storage(s3).upload(info, NAME)
        assert s3.objects[KEY] == data and s3.count("HEAD") == 1


# -- what the store answers must match what was sent ---------------------------------


def test_a_put_answered_with_an_etag_that_is_not_the_md5_is_not_trusted(tmp_path):
    with FakeS3() as s3:
        s3.etag_lie = True
        info, data = snapshot(tmp_path, SMALL)
        with pytest.raises(vsa.StorageError) as caught:        # before: stored, success
            storage(s3, s3_checksum=False).upload(info, NAME)
        text = str(caught.value)
        assert ("S3 PutObject on %s: the store answered ETag %s for a body whose MD5 is %s: stored "
                "object not trusted" % (KEY, md5_hex(data + b"lie"), md5_hex(data))) == text


def test_a_put_answered_with_a_wrong_checksum_is_not_trusted(tmp_path):
    with FakeS3() as s3:
        s3.checksum_lie = True
        info, _ = snapshot(tmp_path, SMALL)
        with pytest.raises(vsa.StorageError, match="x-amz-checksum-sha256 .* stored object not "
                                                   "trusted"):
            storage(s3).upload(info, NAME)


def test_an_echoed_checksum_that_matches_is_enough(tmp_path):
    with FakeS3() as s3:
        s3.echo_checksum = s3.etag_lie = True        # SSE-KMS-like ETag, right checksum
        info, data = snapshot(tmp_path, SMALL)
        storage(s3).upload(info, NAME)
        assert s3.objects[KEY] == data


def test_sse_kms_etags_are_not_compared_with_the_md5(tmp_path):
    with FakeS3() as s3:
        s3.etag_lie = True
        info, _ = snapshot(tmp_path, SMALL)
        storage(s3, s3_checksum=False, s3_kms_key_id="alias/backup").upload(info, NAME)


@pytest.mark.parametrize("etag", ["0123456789abcdef0123456789abcdef", "abc-3", ""])
def test_a_multipart_etag_without_the_right_part_count_is_not_trusted(tmp_path, etag):
    with FakeS3() as s3:
        s3.multipart_etag = etag
        info, _ = snapshot(tmp_path, LARGE)
        with pytest.raises(vsa.StorageError, match="for an object of 2 parts: stored object not "
                                                   "trusted"):
            storage(s3, part_size_mb=5).upload(info, NAME)


def test_an_honest_multipart_answer_passes(tmp_path):
    with FakeS3() as s3:
        info, data = snapshot(tmp_path, LARGE)
        storage(s3, part_size_mb=5).upload(info, NAME)
        assert s3.etags[KEY] == multipart_etag([data[:5 * MiB], data[5 * MiB:]])
