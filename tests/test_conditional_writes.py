"""Sections 16 and 17: two agents that write the same snapshot name (the same
millisecond, ``align: true``) never replace each other's object on Azure or
GCS either: the second write is a NameClash (the agent then moves to the next
millisecond) and the first object keeps its bytes. Azure against Azurite;
GCS against a loopback server that answers ``ifGenerationMatch=0`` as GCS
documents it (both emulators here ignore the precondition; the real
gcp-storage-emulator still has to take the requests that carry it). A retry of the very object whose answer
was lost is not a clash (same size and MD5)."""

import base64
import hashlib
import json
import os
import urllib.parse

import pytest

import vault_snapshot_agent as vsa
from archives import write_archive
from harness import FakeSignals, LoopbackServer

CONTAINER = BUCKET = "snapshots"


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("AZURE_") or name in ("GOOGLE_APPLICATION_CREDENTIALS",
                                                  "STORAGE_EMULATOR_HOST", "GCE_METADATA_HOST"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))


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


SIZES = [(200 * 1024, "single"), (3 * 1024 * 1024 + 12345, "blocks")]


@pytest.mark.parametrize("size,path", SIZES, ids=[p for _, p in SIZES])
def test_azure_never_replaces_another_agents_blob(azurite, tmp_path, size, path):
    prefix = "clash-%s" % os.urandom(4).hex()
    store = storage(tmp_path, azure_storage={
        "account_name": azurite.account, "account_key": azurite.key, "container_name": CONTAINER,
        "endpoint": azurite.endpoint, "prefix": prefix, "block_size_mb": 1})
    name = vsa.snapshot_name(vsa.Clock().now())
    first, first_data = staged(tmp_path, "first", size)
    second, _ = staged(tmp_path, "second", size)
    store.upload(first, name)
    with pytest.raises(vsa.NameClash):
        store.upload(second, name)
    assert azurite.get_blob(CONTAINER, "%s/%s" % (prefix, name)) == first_data
    store.upload(first, name)        # the very blob again (a lost answer): not a clash


class PreconditionGcs(LoopbackServer):
    """GCS's simple upload and object metadata as the service documents
    them, with the one thing both emulators here ignore: ``ifGenerationMatch=0``
    fails with 412 when the object exists. Notes every upload's query."""

    def __init__(self):
        LoopbackServer.__init__(self)
        self.objects, self.queries = {}, []

    def answer(self, handler):
        parts = urllib.parse.urlsplit(handler.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        if handler.command == "POST" and parts.path.startswith("/upload/storage/v1/b/"):
            body = handler.read_body()
            self.queries.append(query)
            name = query["name"]
            if query.get("ifGenerationMatch") == "0" and name in self.objects:
                return 412, {}, {"error": {"code": 412, "message": "At least one of the pre-"
                                           "conditions you specified did not hold.",
                                           "errors": [{"reason": "conditionNotMet"}]}}
            self.objects[name] = body
            return 200, {}, self.meta(name)
        if handler.command == "GET" and "/o/" in parts.path:
            name = urllib.parse.unquote(parts.path.split("/o/", 1)[1])
            if name not in self.objects:
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
        first, first_data = staged(tmp_path, "first", 4096)
        second, _ = staged(tmp_path, "second", 4096)
        store.upload(first, name)
        with pytest.raises(vsa.NameClash):
            store.upload(second, name)
        assert server.objects["p/" + name] == first_data
        store.upload(first, name)        # the very object again (a lost answer): not a clash
        assert [q.get("ifGenerationMatch") for q in server.queries] == ["0", "0", "0"]


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
