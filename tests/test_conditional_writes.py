"""Sections "Local storage", "Azure Blob storage" and "Google Cloud Storage": two agents that
write the same snapshot name (the same millisecond, ``align: true``) never replace each other's
snapshot in a local directory, on Azure or on GCS either: the second write is a NameClash (the
agent then moves to the next millisecond) and the first object keeps its bytes. Local storage
in a temporary directory, with the other agent's file landing before, or while, the upload
links or copies; Azure against Azurite, and against a loopback Blob endpoint whose Get Blob
Properties fails; GCS against a loopback server that answers ``ifGenerationMatch=0`` as GCS
documents it (both emulators here ignore the precondition; the real gcp-storage-emulator still
has to take the requests that carry it). A retry of the very object whose answer was lost is
not a clash (same size and MD5). (S3: test_s3_name_clash.py.)"""

import base64
import datetime
import errno
import hashlib
import json
import os
import urllib.parse

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import NOW, fake_clock, one_cycle
from support.archives import write_archive
from support.fake_endpoints import Endpoint, FakeVault
from support.harness import FakeSignals, LoopbackServer, clear_cloud_env, snapshots

CONTAINER = BUCKET = "snapshots"


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path, ("AWS_", "AZURE_", "VAULT_", "BAO_", "GOOGLE_"))


def storage(tmp_path, **block):
    config = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s"}
    config.update(block)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    _, storages = vsa.load_all(str(path), vsa.Runtime.create(env={}, signals=FakeSignals()))
    return storages[0]


def staged(tmp_path, label, size):
    path = str(tmp_path / ("%s.snap" % label))
    data = write_archive(path, state=os.urandom(size))
    return vsa.verify_file(path), data


# =============================================================================
# a local directory
# =============================================================================


def local_directory(tmp_path, clock):
    """``tmp_path/snaps`` (0700) and the name a cycle at ``clock.now()`` takes."""
    directory = tmp_path / "snaps"
    directory.mkdir(mode=0o700)
    return directory, vsa.snapshot_name(clock.now())


def test_local_storage_name_taken_by_another_agent_moves_to_the_next_millisecond(tmp_path):
    # Two agents share one directory (an NFS mount, a failover pair) and wake
    # in the same millisecond. The other one stored first. The S3 storage
    # resolves this with NameClash; the local storage must too (not fail the
    # cycle, which then takes a second snapshot on the retry).
    clock = fake_clock()
    directory, taken = local_directory(tmp_path, clock)
    theirs = b"another agent's snapshot"
    (directory / taken).write_bytes(theirs)
    with FakeVault(role_id="r", secret_id="s") as vault:
        result, log = one_cycle(tmp_path, vault, clock)
    ours = vsa.snapshot_name(clock.now() + datetime.timedelta(milliseconds=1))
    assert result.outcome == "stored", (result, log)
    assert snapshots(directory) == sorted([taken, ours]), log
    assert (directory / taken).read_bytes() == theirs


def test_local_storage_never_replaces_a_name_another_agent_wrote_during_the_upload(
        tmp_path, monkeypatch):
    # The other agent's file appears after upload() checked the name and
    # before it linked (or, staged on another filesystem, while it copied):
    # os.link says EEXIST (or EXDEV), upload() fell back to a copy and
    # os.rename() silently replaced the other agent's snapshot.
    clock = fake_clock()
    directory, taken = local_directory(tmp_path, clock)
    theirs = b"another agent's snapshot, written a moment ago"
    real_link = os.link

    def racing_link(source, target, *args, **kwargs):
        if os.path.basename(str(target)) == taken and not os.path.lexists(str(target)):
            with open(str(target), "wb") as handle:       # the other agent wins the race
                handle.write(theirs)
        return real_link(source, target, *args, **kwargs)
    monkeypatch.setattr(os, "link", racing_link)
    with FakeVault(role_id="r", secret_id="s") as vault:
        result, log = one_cycle(tmp_path, vault, clock)
    assert (directory / taken).read_bytes() == theirs, (
        "the other agent's snapshot was replaced; log:\n%s" % log)


def test_local_storage_copy_fallback_never_replaces_a_name_taken_while_copying(
        tmp_path, monkeypatch):
    # Staged on another filesystem (temp_dir on tmpfs): os.link fails with
    # EXDEV and the snapshot is copied, which takes a while for gigabytes;
    # the other agent stores the same name meanwhile.
    clock = fake_clock()
    directory, taken = local_directory(tmp_path, clock)
    theirs = b"another agent's snapshot, stored while we copied"

    def cross_device_link(source, target, *args, **kwargs):
        with open(str(target), "wb") as handle:            # it lands while we copy
            handle.write(theirs)
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", cross_device_link)
    with FakeVault(role_id="r", secret_id="s") as vault:
        result, log = one_cycle(tmp_path, vault, clock)
    assert (directory / taken).read_bytes() == theirs, (
        "the other agent's snapshot was replaced; log:\n%s" % log)


# =============================================================================
# Azure
# =============================================================================


# Azure replaced a blob on Put Blob / Put Block List unless told not to
# (If-None-Match: *, answered 409 BlobAlreadyExists): two agents that woke
# in the same millisecond both logged success and one backup was lost. The
# put-blob and block-list cases came from the review of issue 18.
def second_writer_clashes(tmp_path, store, name, size):
    """Store one snapshot as ``name``, then try another one under the same
    name: that is a NameClash. Returns (the first SnapshotInfo, its bytes)."""
    first, first_data = staged(tmp_path, "first", size)
    second, _ = staged(tmp_path, "second", size)
    store.upload(first, name)
    with pytest.raises(vsa.NameClash):
        store.upload(second, name)
    return first, first_data


SIZES = [(200 * 1024, "single"), (3 * 1024 * 1024 + 12345, "blocks"),
         (4096, "put-blob"), (3 * 1024 * 1024 + 5, "block-list")]


@pytest.mark.parametrize("size,path", SIZES, ids=[p for _, p in SIZES])
def test_azure_never_replaces_another_agents_blob(azurite, tmp_path, size, path):
    prefix = "clash-%s" % os.urandom(4).hex()
    store = storage(tmp_path, azure_storage={
        "account_name": azurite.account, "account_key": azurite.key, "container_name": CONTAINER,
        "endpoint": azurite.endpoint, "prefix": prefix, "block_size_mb": 1})
    name = vsa.snapshot_name(vsa.Clock().now())
    first, first_data = second_writer_clashes(tmp_path, store, name, size)
    assert azurite.get_blob(CONTAINER, "%s/%s" % (prefix, name)) == first_data
    store.upload(first, name)        # the very blob again (a lost answer): not a clash
    for blob in azurite.blob_names(CONTAINER, prefix + "/"):
        azurite.delete_blob(CONTAINER, blob)


class ClashingBlobs(Endpoint):
    """A loopback Blob endpoint (SAS auth; signatures not checked): Put Blob
    with If-None-Match: * on an existing name is 409 BlobAlreadyExists, as
    Azure answers; Get Blob Properties answers ``head_status`` (403
    AuthorizationPermissionMismatch: a SAS with sp=cw, no read; 404: the
    blob was deleted in between)."""

    def __init__(self, head_status):
        Endpoint.__init__(self)
        self.blobs = {}
        self.head_status = head_status

    def respond(self, request):
        path = request.path.split("?", 1)[0]
        if request.method == "PUT":
            if path in self.blobs and request.headers.get("if-none-match") == "*":
                return 409, {"x-ms-error-code": "BlobAlreadyExists"}, (
                    b"<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>BlobAlreadyExists"
                    b"</Code><Message>The specified blob already exists.</Message></Error>")
            self.blobs[path] = request.body
            return 201, {"Content-MD5": request.headers.get("content-md5", "")}, b""
        if request.method == "HEAD":
            code = "AuthorizationPermissionMismatch" if self.head_status == 403 else "BlobNotFound"
            return self.head_status, {"x-ms-error-code": code}, b""
        return 404, {"x-ms-error-code": "ResourceNotFound"}, b""


@pytest.mark.parametrize("head_status", [403, 404], ids=["sas-without-read", "blob-gone"])
def test_azure_name_taken_moves_to_the_next_millisecond_whatever_the_head_answers(
        tmp_path, head_status):
    # Another agent stored <name> a moment ago (align: true, two agents). Our
    # Put Blob gets 409 BlobAlreadyExists: a NameClash, which _upload_named
    # resolves with the next millisecond. But _conditional() first asks Get
    # Blob Properties whether the blob is our own lost write, and when that
    # HEAD failed (403 for a write-only SAS, 404 when retention removed the
    # blob meanwhile) its StorageError replaced the NameClash: the upload
    # failed, the cycle was "failed" and a new snapshot was taken after the
    # back-off. GCS keeps the clash when its metadata read fails.
    name = vsa.snapshot_name(NOW)
    info, data = staged(tmp_path, "ours", 4096)
    with ClashingBlobs(head_status) as server:
        server.blobs["/snapshots/p/" + name] = b"theirs"
        store = storage(tmp_path, azure_storage={
            "account_name": "acct", "container_name": CONTAINER,
            "sas_token": "sv=2021-08-06&sp=cw&sig=abc", "endpoint": server.url, "prefix": "p"})
        # Before the fix: StorageError "Azure Get Blob Properties p/<name>:
        # HTTP 403 AuthorizationPermissionMismatch" (or "HTTP 404 BlobNotFound").
        _, stored = vsa._upload_named(store, info, name, None)
    assert stored == vsa.snapshot_name(NOW + datetime.timedelta(milliseconds=1))
    assert server.blobs["/snapshots/p/" + name] == b"theirs"
    assert server.blobs["/snapshots/p/" + stored] == data


# =============================================================================
# GCS
# =============================================================================


def multipart_upload(content_type, body):
    """(media, object name) of a GCS multipart upload body."""
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode("ascii")
    parts = body.split(b"--" + boundary)
    resource = json.loads(parts[1].split(b"\r\n\r\n", 1)[1].strip().decode("utf-8"))
    media = parts[2].split(b"\r\n\r\n", 1)[1]
    assert media.endswith(b"\r\n") and parts[3].strip() == b"--", parts[3]
    return media[:-2], resource["name"]


class PreconditionGcs(LoopbackServer):
    """GCS's simple upload and object metadata as the service documents
    them, with the one thing both emulators here ignore: ``ifGenerationMatch=0``
    fails with 412 when the object exists. Notes every upload's query. With
    ``metadata=False`` every object metadata read is 404 (a read the
    credentials may not make)."""

    def __init__(self, metadata=True):
        LoopbackServer.__init__(self)
        self.objects, self.queries = {}, []
        self.metadata = metadata

    def answer(self, handler):
        parts = urllib.parse.urlsplit(handler.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        if handler.command == "POST" and parts.path.startswith("/upload/storage/v1/b/"):
            body = handler.read_body()
            self.queries.append(query)
            if query.get("uploadType") == "multipart":      # metadata, then the media
                body, name = multipart_upload(handler.headers["Content-Type"], body)
            else:
                name = query["name"]
            if query.get("ifGenerationMatch") == "0" and name in self.objects:
                return 412, {}, {"error": {"code": 412, "message": "At least one of the pre-"
                                           "conditions you specified did not hold.",
                                           "errors": [{"reason": "conditionNotMet"}]}}
            self.objects[name] = body
            return 200, {}, self.meta(name)
        if handler.command == "GET" and "/o/" in parts.path:
            name = urllib.parse.unquote(parts.path.split("/o/", 1)[1])
            if name not in self.objects or not self.metadata:
                return 404, {}, {"error": {"code": 404, "message": "No such object"}}
            return 200, {}, self.meta(name)
        return 501, {}, {"error": {"code": 501, "message": "not in this server"}}

    def meta(self, name):
        data = self.objects[name]
        return {"name": name, "bucket": BUCKET, "size": str(len(data)),
                "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode("ascii")}


def test_gcs_never_replaces_another_agents_object(tmp_path):
    with PreconditionGcs() as server:
        store = storage(tmp_path, google_storage={"bucket": BUCKET, "endpoint": server.url,
                                                  "anonymous": True, "prefix": "p"})
        name = vsa.snapshot_name(vsa.Clock().now())
        first, first_data = second_writer_clashes(tmp_path, store, name, 4096)
        assert server.objects["p/" + name] == first_data
        store.upload(first, name)        # the very object again (a lost answer): not a clash
        assert [q.get("ifGenerationMatch") for q in server.queries] == ["0", "0", "0"]


def test_gcs_second_writer_of_a_name_gets_name_clash_and_the_first_object_stays(tmp_path):
    # GCS replaced an object on upload unless told ifGenerationMatch=0 (412
    # conditionNotMet): two agents in the same millisecond, one backup lost.
    # Here no metadata read succeeds: the clash stands without it.
    with PreconditionGcs(metadata=False) as server:
        store = storage(tmp_path, google_storage={"bucket": BUCKET, "endpoint": server.url,
                                                  "anonymous": True, "prefix": "p"})
        name = vsa.snapshot_name(NOW)
        _, first_data = second_writer_clashes(tmp_path, store, name, 4096)
    assert server.objects["p/" + name] == first_data


@pytest.mark.parametrize("size", [4096, 3 * 1024 * 1024 + 12345], ids=["simple", "resumable"])
def test_the_gcs_emulator_takes_the_precondition(gcs, tmp_path, size):
    # gcp-storage-emulator ignores ifGenerationMatch, but must still take
    # the request that carries it, simple and resumable.
    store = storage(tmp_path, google_storage={"bucket": BUCKET, "endpoint": gcs.endpoint,
                                              "anonymous": True, "prefix": "pre",
                                              "chunk_size_mb": 1})
    name = vsa.snapshot_name(vsa.Clock().now())
    first, first_data = staged(tmp_path, "first", size)
    store.upload(first, name)
    assert gcs.get_object(BUCKET, "pre/" + name) == first_data
