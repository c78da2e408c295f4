"""One face for every storage kind the re-verification (scrub) tests damage:
a local directory, S3 on moto, Azure Blob on Azurite, GCS on
gcp-storage-emulator, OpenStack Swift (tempauth; support/swift_server.py).
Stdlib only (the moto helpers import botocore when first used); Python 3.6+.

Each ``Store`` is a block of the agent's config under a prefix of its own
(``key``: the config key, ``name``: the block's name for ``--storage``,
``block``), and the hands of someone else with access to the place:

* ``read(name)`` / ``write(name, data)``: the object's bytes; a write is an
  ordinary overwrite, after which the store's own record (ETag, Content-MD5,
  md5Hash) describes the new bytes; on a local directory the file is
  rewritten in place, as ``cp`` does (its xattr stays);
* ``replace_keeping_record(name, data)``: other bytes under the checksum
  recorded for the old ones. Local: the same in-place rewrite. S3: a PUT
  carrying the old object's ``x-amz-checksum-sha256`` (moto takes it
  unchecked; S3 would refuse it: this stands for a store whose bytes no
  longer match what it recorded). Azure: Put Block List with the old
  ``x-ms-blob-content-md5``, which Azure documents as not validated. GCS:
  a new upload whose ``md5Hash`` is then PATCHed back (gcp-storage-emulator
  lets it be written; GCS would not). Swift: an ordinary PUT that carries
  the old object's ``X-Object-Meta-Vault-Snapshot-Sha256`` (anyone may set
  metadata). None where the store cannot be made
  to disagree (``can_keep_record`` False: S3 without checksums, whose ETag
  is always recomputed);
* ``delete(name)``, ``names()`` (snapshot names under the prefix, sorted);
  S3 and Azure: ``parts(name)``, the parts or blocks the object was written in;
* ``own_sha256(name)``: the SHA-256 kept with the object for this agent
  (S3 ``x-amz-meta-vault-snapshot-sha256``, Azure
  ``x-ms-meta-vault_snapshot_sha256``, GCS ``metadata``, the local xattr
  ``user.vault_snapshot_agent.sha256``), None when there is none;
* ``recorded``: the store's own checksum a read-back compares for an object
  without this agent's SHA-256 (None: a local file, the archive only);
  ``checked``: what the OK line then says was compared. ``OWN_CHECKED``:
  what it says for an object with this agent's SHA-256;
* ``LocalStore.record(name)``: the file's SHA-256 put in its xattr, as this
  agent keeps it.

``upload(tmp_path, store, name, data, own)`` stores ``data`` as snapshot
``name`` through the agent's own Storage.upload, so that its name may be
of any time: with this agent's SHA-256 (``own``) or without, as the Go
agent and older builds stored objects (an S3 single PUT then goes
directly, with the SDK: the agent's always computes one). ``taken(hours)``:
a snapshot name as taken ``hours`` before now (the servers' real time).

``Snapshots`` builds the archives: ``small()`` (a few hundred bytes),
``sized(megabytes)`` (incompressible, for multipart uploads), each a valid
snapshot archive with its own Raft index.

``run_cli(tmp_path, store, *argv, addr=NOWHERE)`` runs the agent's main() in
process with ``store``'s block and the AppRole ``r``/``s`` of a FakeVault at
``addr``: (exit code, log, stdout). ``store_snapshots(tmp_path, store,
archives)`` stores each archive with one ``--once`` cycle, as a FakeVault
serving it answers; returns the names stored, oldest first.
"""

import base64
import datetime
import hashlib
import io
import json
import os

from support.archives import build_archive
from support.storage_blocks import BUCKET, CONTAINER, azure_key_block, s3_block

__all__ = ["Store", "LocalStore", "S3Store", "AzureStore", "GcsStore", "SwiftStore", "Snapshots",
           "XATTR_OK",
           "OWN_CHECKED", "run_cli", "store_snapshots", "upload", "taken"]

OWN_CHECKED = "matches the SHA-256 this agent recorded at upload"
OWN_KEY = "vault-snapshot-sha256"
LOCAL_XATTR = "user.vault_snapshot_agent.sha256"


def _xattr_ok():
    import tempfile
    with tempfile.NamedTemporaryFile() as handle:
        try:
            os.setxattr(handle.name, "user.vault_snapshot_agent.probe", b"1")
            return True
        except (OSError, AttributeError):
            return False


XATTR_OK = _xattr_ok()


class Snapshots:
    """Valid snapshot archives, each with a Raft index of its own."""

    def __init__(self):
        self.index = 100

    def _next(self, state):
        self.index += 1
        return build_archive(state=state, index=self.index, term=3)

    def small(self):
        return self._next(os.urandom(16) + b"s" * 4096)

    def sized(self, megabytes):
        return self._next(os.urandom(int(megabytes * 1024 * 1024)))


class Store:
    key = name = recorded = ""
    can_keep_record = True

    @property
    def checked(self):
        return "matches the %s recorded at upload" % self.recorded

    def __init__(self, prefix):
        self.prefix = prefix

    def full(self, name):
        return "%s/%s" % (self.prefix, name)

    def replace_keeping_record(self, name, data):
        raise NotImplementedError

    def put_directly(self, name, data):
        """Store ``data`` without the agent (an object without its SHA-256);
        False when the agent's own upload, given no SHA-256, does that."""
        return False


class LocalStore(Store):
    key, name = "local_storage", "local"
    recorded, checked = None, "archive only: no checksum recorded at upload"

    def __init__(self, directory):
        Store.__init__(self, "")
        self.path = str(directory)

    def block(self, **extra):
        return dict({"path": self.path}, **extra)

    def file(self, name):
        return os.path.join(self.path, name)

    def read(self, name):
        with open(self.file(name), "rb") as handle:
            return handle.read()

    def write(self, name, data):
        with open(self.file(name), "r+b") as handle:      # in place, as cp does: same inode
            handle.write(data)
            handle.truncate()

    replace_keeping_record = write

    def own_sha256(self, name):
        try:
            return os.getxattr(self.file(name), LOCAL_XATTR).decode("ascii")
        except OSError:
            return None

    def record(self, name):
        with open(self.file(name), "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        os.setxattr(self.file(name), LOCAL_XATTR, digest.encode("ascii"))

    def delete(self, name):
        os.unlink(self.file(name))

    def names(self):
        import vault_snapshot_agent as vsa
        if not os.path.isdir(self.path):
            return []
        return sorted(n for n in os.listdir(self.path) if vsa.parse_snapshot_name(n))


class S3Store(Store):
    key, name = "aws_storage", "aws"

    def __init__(self, moto, prefix, checksum=True, part_size_mb=None, parts=None):
        Store.__init__(self, prefix)
        self.moto, self.checksum, self.part_size_mb = moto, checksum, part_size_mb
        self.can_keep_record = checksum
        self.recorded = "S3 x-amz-checksum-sha256" if checksum else "S3 ETag (MD5)"
        if parts:
            self.recorded += " of %d parts" % parts

    def block(self, **extra):
        block = s3_block(self.moto, s3_key_prefix=self.prefix, s3_checksum=self.checksum)
        if self.part_size_mb:
            block["part_size_mb"] = self.part_size_mb
        return dict(block, **extra)

    def read(self, name):
        return self.moto.get(BUCKET, self.full(name))

    def write(self, name, data):
        # as the SDK does where checksums are on: moto keeps the x-amz-checksum-sha256 of a
        # PUT with x-amz-sdk-checksum-algorithm (and not of the agent's PUT without it)
        self.moto.put(BUCKET, self.full(name), data,
                      **({"ChecksumAlgorithm": "SHA256"} if self.checksum else {}))

    def head(self, name):
        return self.moto.admin.head_object(Bucket=BUCKET, Key=self.full(name), ChecksumMode="ENABLED")

    def own_sha256(self, name):
        return self.head(name)["Metadata"].get(OWN_KEY)

    def put_directly(self, name, data):
        if self.part_size_mb:
            return False        # the agent's multipart upload without a SHA-256 keeps none
        self.write(name, data)
        return True

    def parts(self, name):
        """The part count in the object's ETag (None: a single PUT)."""
        etag = self.head(name)["ETag"].strip('"')
        return int(etag.rsplit("-", 1)[1]) if "-" in etag else None

    def replace_keeping_record(self, name, data):
        # moto records no checksum for a PUT without x-amz-sdk-checksum-algorithm (the
        # agent's): then the one S3 would have recorded, the SHA-256 of the old bytes
        recorded = self.head(name).get("ChecksumSHA256") or base64.b64encode(
            hashlib.sha256(self.read(name)).digest()).decode("ascii")
        self.moto.admin.put_object(Bucket=BUCKET, Key=self.full(name), Body=data,
                                   ChecksumAlgorithm="SHA256", ChecksumSHA256=recorded)

    def delete(self, name):
        self.moto.admin.delete_object(Bucket=BUCKET, Key=self.full(name))

    def names(self):
        return sorted(k.rsplit("/", 1)[1] for k in self.moto.list_keys(BUCKET, self.prefix + "/"))


class AzureStore(Store):
    key, name = "azure_storage", "azure"
    recorded = "Azure Content-MD5"

    def __init__(self, azurite, prefix, block_size_mb=None):
        Store.__init__(self, prefix)
        self.azurite, self.block_size_mb = azurite, block_size_mb

    def block(self, **extra):
        block = azure_key_block(self.azurite, prefix=self.prefix)
        if self.block_size_mb:
            block["block_size_mb"] = self.block_size_mb
        return dict(block, **extra)

    def read(self, name):
        return self.azurite.get_blob(CONTAINER, self.full(name))

    def own_sha256(self, name):
        return self.azurite.blob_properties(CONTAINER, self.full(name)).get(
            "x-ms-meta-" + OWN_KEY.replace("-", "_"))

    def parts(self, name):
        """The blob's committed blocks (None: one Put Blob)."""
        return len(self.azurite.block_list(CONTAINER, self.full(name))["committed"]) or None

    def write(self, name, data):
        self.azurite.put_blob(CONTAINER, self.full(name), data)

    def replace_keeping_record(self, name, data):
        recorded = self.azurite.blob_properties(CONTAINER, self.full(name))["content-md5"]
        ids = []
        for number, offset in enumerate(range(0, len(data), 1024 * 1024)):
            block_id = base64.b64encode(b"other-%06d" % number).decode("ascii")
            resp = self.azurite.put_block(CONTAINER, self.full(name), block_id,
                                          data[offset:offset + 1024 * 1024])
            assert resp.status == 201, resp
            ids.append(block_id)
        self.azurite.put_block_list(CONTAINER, self.full(name), ids,
                                    headers=[("x-ms-blob-content-md5", recorded)])

    def delete(self, name):
        self.azurite.delete_blob(CONTAINER, self.full(name))

    def names(self):
        return sorted(n.rsplit("/", 1)[1] for n in self.azurite.blob_names(CONTAINER, self.prefix + "/"))


class GcsStore(Store):
    key, name = "google_storage", "google"
    recorded = "GCS md5Hash"

    def __init__(self, gcs, prefix, chunk_size_mb=None):
        Store.__init__(self, prefix)
        self.gcs, self.chunk_size_mb = gcs, chunk_size_mb

    def block(self, **extra):
        block = {"bucket": BUCKET, "endpoint": self.gcs.endpoint, "anonymous": True,
                 "prefix": self.prefix}
        if self.chunk_size_mb:
            block["chunk_size_mb"] = self.chunk_size_mb
        return dict(block, **extra)

    def read(self, name):
        return self.gcs.get_object(BUCKET, self.full(name))

    def write(self, name, data):
        self.gcs.put_object(BUCKET, self.full(name), data)

    def own_sha256(self, name):
        return (self.gcs.object_metadata(BUCKET, self.full(name)).get("metadata") or {}).get(OWN_KEY)

    def replace_keeping_record(self, name, data):
        from support.gcs_emulators import quote_name
        recorded = self.gcs.object_metadata(BUCKET, self.full(name))["md5Hash"]
        self.write(name, data)
        res = self.gcs.request("PATCH", "/storage/v1/b/%s/o/%s" % (BUCKET, quote_name(self.full(name))),
                               body={"md5Hash": recorded})
        assert res.status == 200, res
        assert self.gcs.object_metadata(BUCKET, self.full(name))["md5Hash"] == recorded

    def delete(self, name):
        self.gcs.delete_object(BUCKET, self.full(name))

    def names(self):
        return sorted(n.rsplit("/", 1)[1] for n in self.gcs.list_objects(BUCKET, self.prefix + "/"))


class SwiftStore(Store):
    """A container of the ``swift`` fixture (support/swift_server.Swift),
    tempauth as ``test:tester``; ``segment_size_mb``: SLO uploads above it;
    ``extra``: more keys of the block (with ``swift`` None, the login too).
    ``segments()``: every object name under ``.segments/`` of the prefix."""

    key, name = "swift_storage", "swift"
    recorded = "Swift ETag"
    OWN_META = "x-object-meta-vault-snapshot-sha256"

    def __init__(self, swift, container, prefix, segment_size_mb=None, **extra):
        Store.__init__(self, prefix)
        self.swift, self.container, self.segment_size_mb = swift, container, segment_size_mb
        self.extra = extra          # more keys of the block
        self._token = None

    def block(self, **extra):
        block = {"container": self.container, "prefix": self.prefix}
        if self.swift is not None:          # None: the login keys are all in ``extra``
            block.update(auth_url=self.swift.auth_url, username=self.swift.user,
                         password=self.swift.key)
        if self.segment_size_mb:
            block["segment_size_mb"] = self.segment_size_mb
        return dict(block, **dict(self.extra, **extra))

    def request(self, method, name, headers=None, body=None, query=""):
        from urllib.parse import quote
        if self._token is None:
            self._token = self.swift.login()[0]
        url = "%s/%s%s%s" % (self.swift.storage_url, self.container, "/" + quote(name) if name else "",
                             query)
        return self.swift.request(method, url, headers, body, token=self._token)

    def read(self, name):
        resp = self.request("GET", self.full(name))
        assert resp.status == 200, resp
        return resp.body

    def head(self, name):
        return self.request("HEAD", self.full(name))

    def own_sha256(self, name):
        return self.head(name).headers.get(self.OWN_META)

    def write(self, name, data, headers=None):
        """An ordinary PUT over the object (an SLO manifest becomes a plain
        object; its segments stay)."""
        resp = self.request("PUT", self.full(name), headers, data)
        assert resp.status == 201, resp

    def replace_keeping_record(self, name, data):
        self.write(name, data, {self.OWN_META: self.own_sha256(name)})

    def delete(self, name):
        resp = self.request("DELETE", self.full(name))
        assert resp.status in (204, 404), resp

    def listing(self, prefix=""):
        """Every object name in the container under ``prefix``."""
        resp = self.request("GET", "", query="?format=json&prefix=" + prefix)
        assert resp.status == 200, resp
        return sorted(item["name"] for item in json.loads(resp.body.decode("utf-8")))

    def segments(self, name=""):
        return self.listing("%s/.segments/%s" % (self.prefix, name))

    def names(self):
        import vault_snapshot_agent as vsa
        return sorted(n.rsplit("/", 1)[1] for n in self.listing(self.prefix + "/")
                      if n.count("/") == self.prefix.count("/") + 1
                      and vsa.parse_snapshot_name(n.rsplit("/", 1)[1]))


NOWHERE = "http://127.0.0.1:9"      # the addr of commands that never ask Vault


def _env(tmp_path):
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(tmp_path),
            "AWS_CONFIG_FILE": os.path.join(str(tmp_path), "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(str(tmp_path), "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true"}


def _config(tmp_path, store, addr=NOWHERE):
    return {"addr": addr, "role_id": "r", "secret_id": "s", "temp_dir": str(tmp_path),
            store.key: store.block()}


def run_cli(tmp_path, store, *argv, addr=NOWHERE):
    """main() with ``store``'s block: (exit code, log text, stdout text)."""
    import vault_snapshot_agent as vsa
    path = os.path.join(str(tmp_path), "scrub.json")
    with open(path, "w") as handle:
        json.dump(_config(tmp_path, store, addr), handle)
    os.chmod(path, 0o600)
    env = _env(tmp_path)
    log, out = io.StringIO(), io.StringIO()
    code = vsa.main(["-c", path] + list(argv), stream=log, out=out, env=env)
    return code, log.getvalue(), out.getvalue()


def store_snapshots(tmp_path, store, archives):
    """Each of ``archives`` stored in ``store`` by a ``--once`` cycle; the
    names, oldest first."""
    from support.fake_endpoints import FakeVault
    before = set(store.names())
    with FakeVault(role_id="r", secret_id="s") as vault:
        for archive in archives:
            vault.archive = archive
            code, log, _ = run_cli(tmp_path, store, "--once", addr=vault.url)
            assert code == 0, log
    names = [n for n in store.names() if n not in before]
    assert len(names) == len(archives), names
    return names


def taken(hours):
    """A snapshot name as taken ``hours`` before now (real time)."""
    import vault_snapshot_agent as vsa
    return vsa.snapshot_name(datetime.datetime.now(vsa.UTC) - datetime.timedelta(hours=hours))


def upload(tmp_path, store, name, data, own=True):
    """``data`` stored as snapshot ``name``: by the agent's Storage.upload,
    with this agent's SHA-256 when ``own``, else without it (as the Go agent
    or an older build stored it)."""
    import vault_snapshot_agent as vsa
    from support.harness import FakeClock, FakeSignals
    if not own and store.put_directly(name, data):
        return
    path = os.path.join(str(tmp_path), "upload-" + name)
    with open(path, "wb") as handle:
        handle.write(data)
    info = vsa.SnapshotInfo(path, len(data), hashlib.sha256(data).hexdigest() if own else None,
                            1, 1, len(data))
    env = _env(tmp_path)
    cfg = vsa.config_from_dict(_config(tmp_path, store), env=env)
    storage, = vsa.build_storages(cfg, vsa.Runtime(env, FakeClock(), FakeSignals()))
    storage.upload(info, name)
    os.unlink(path)
