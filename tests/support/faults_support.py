"""Helpers for the tests that run the real agent against the real servers
with faults injected (tests/support/faultproxy.py in between to cut, delay, reset or
answer instead of a server), and check what an operator would see: exit
codes, one clear log line, files and objects that exist and verify, nothing
partial left anywhere, older snapshots never lost.

* ``SEED``: the seed of every random fault (``FAULTS_SEED``, default below);
  every failure message names the trial, so a failing case can be replayed;
* ``write_config(path, addr, approle, snapdir, **extra)``: an AppRole config
  with local storage in ``snapdir`` (``extra`` overrides, None removes);
* ``proxy_to(url)``: a FaultProxy in front of a server; ``port_of(url)``;
  ``snapshot_gets(proxy)``: the snapshot requests it passed;
* ``hidden``, ``temp_files``: what a directory holds besides snapshots;
  ``verify_all(snapdir)``, ``verify_bytes(data, tmp_path)``: every stored
  snapshot verifies;
* ``Backend``: one storage emulator (S3, Azure, GCS) seen through a
  FaultProxy; ``GO_NAMES``: the Go agent's names for older snapshots.

The fixture that keeps the environment's credentials out of these tests is
``isolated_env`` in conftest.py.
"""

import contextlib
import json
import os
import re

import vault_snapshot_agent as vsa
from support.faultproxy import FaultProxy
from support.harness import overridden, snapshots

SEED = int(os.environ.get("FAULTS_SEED", "20261127"))
MB = 1024 * 1024
BUCKET = CONTAINER = "snapshots"
TEMP_RE = re.compile(r"^\.raft_snapshot-.*\.tmp$")
GO_NAMES = ["raft_snapshot-%d.snap" % (1700000000000000000 + i * 10 ** 9) for i in range(3)]


def port_of(url):
    return int(url.rsplit(":", 1)[1].split("/")[0])


def write_config(path, addr, approle, snapdir=None, **extra):
    config = {"addr": addr, "role_id": approle.role_id, "secret_id": approle.secret_id,
              "approle": approle.mount, "frequency": "1h"}
    if snapdir is not None:
        config["local_storage"] = {"path": str(snapdir)}
    overridden(config, extra)
    with open(str(path), "w") as handle:
        json.dump(config, handle)
    return str(path)


def hidden(snapdir):
    if not os.path.isdir(str(snapdir)):
        return []
    return sorted(n for n in os.listdir(str(snapdir)) if n.startswith("."))


def temp_files(snapdir):
    return [n for n in hidden(snapdir) if TEMP_RE.match(n)]


def verify_all(snapdir):
    """Every snapshot file in ``snapdir`` verifies; returns their SnapshotInfos."""
    infos = []
    for name in snapshots(snapdir):
        try:
            infos.append(vsa.verify_file(os.path.join(str(snapdir), name)))
        except vsa.SnapshotError as exc:
            raise AssertionError("stored snapshot %s does not verify: %s" % (name, exc)) from None
    return infos


def verify_bytes(data, tmp_path, label="object"):
    path = tmp_path / ("verify-%s.snap" % os.urandom(4).hex())
    path.write_bytes(data)
    try:
        return vsa.verify_file(str(path))
    except vsa.SnapshotError as exc:
        raise AssertionError("%s does not verify: %s" % (label, exc)) from None
    finally:
        path.unlink()


@contextlib.contextmanager
def proxy_to(url):
    with FaultProxy("127.0.0.1", port_of(url)) as proxy:
        yield proxy


def snapshot_gets(proxy):
    return [r for r in list(proxy.requests) if r.startswith("GET " + vsa.SNAPSHOT_PATH)]



class Backend:
    """One storage emulator seen through a FaultProxy, with the few
    operations the tests need (names under the test's prefix, get, put)."""

    def __init__(self, kind, server, prefix):
        self.kind, self.server, self.prefix = kind, server, prefix

    @property
    def url(self):
        return self.server.endpoint

    def block(self, proxy, **extra):
        if self.kind == "s3":
            key, block = "aws_storage", {
                "access_key_id": self.server.access_key_id,
                "secret_access_key": self.server.secret_access_key,
                "s3_endpoint": proxy.addr, "s3_region": "us-east-1", "s3_bucket": BUCKET,
                "s3_key_prefix": self.prefix, "part_size_mb": 5, "concurrency": 2}
        elif self.kind == "azure":
            key, block = "azure_storage", {
                "account_name": self.server.account, "account_key": self.server.key,
                "container_name": CONTAINER, "endpoint": proxy.addr + "/" + self.server.account,
                "prefix": self.prefix, "block_size_mb": 1}
        else:
            key, block = "google_storage", {
                "bucket": BUCKET, "endpoint": proxy.addr, "anonymous": True,
                "prefix": self.prefix, "chunk_size_mb": 1}
        block.update(extra)
        return key, block

    def names(self):
        if self.kind == "s3":
            return sorted(self.server.list_keys(BUCKET, self.prefix + "/"))
        if self.kind == "azure":
            return sorted(self.server.blob_names(CONTAINER, self.prefix + "/"))
        return sorted(self.server.list_objects(BUCKET, self.prefix + "/"))

    def get(self, name):
        if self.kind == "s3":
            return self.server.get(BUCKET, name)
        if self.kind == "azure":
            return self.server.get_blob(CONTAINER, name)
        return self.server.get_object(BUCKET, name)

    def put_many(self, names, body):
        if self.kind == "s3":
            self.server.put_many(BUCKET, names, body)
        elif self.kind == "azure":
            self.server.put_many(CONTAINER, names, body)
        else:
            self.server.put_many(BUCKET, names, body)

    def uploads_in_progress(self):
        if self.kind == "s3":
            return self.server.list_multipart_uploads(BUCKET, self.prefix + "/")
        return []

    def error(self, status):
        """(body, content type) of a server error as this store words it."""
        code = {500: "InternalError", 503: "ServiceUnavailable"}.get(status, "InternalError")
        if self.kind == "s3":
            if status == 503:
                code = "SlowDown"
            return ("<Error><Code>%s</Code><Message>injected</Message></Error>" % code).encode(), \
                "application/xml"
        if self.kind == "azure":
            if status == 503:
                code = "ServerBusy"
            return ("<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>%s</Code>"
                    "<Message>injected</Message></Error>" % code).encode(), "application/xml"
        return json.dumps({"error": {"code": status, "message": "injected",
                                     "errors": [{"reason": "backendError"}]}}).encode(), \
            "application/json"

    def data_puts(self):
        """Predicate: requests that carry snapshot bytes (parts, blocks, chunks)
        but, for GCS, never the first chunk (gcp-storage-emulator answers a
        status query before any byte with "bytes=0-0", which real GCS never
        does)."""
        seen = []

        def predicate(method, path):
            if method != "PUT":
                return False
            if self.kind == "gcs":
                if "upload_id" not in path:
                    return False
                seen.append(path)
                return len(seen) >= 2
            return True
        return predicate

