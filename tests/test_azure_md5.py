"""Issue 12: every Azure blob the agent writes carries its whole-blob MD5.

A blob written in blocks (Put Block + Put Block List) has no Content-MD5
unless Put Block List sends ``x-ms-blob-content-md5``; the official client
then finds ``content_md5`` empty.  Against Azurite (Shared Key checked): a
snapshot bigger than ``block_size_mb`` and one that fits a single Put Blob,
each read back with Get Blob Properties and List Blobs.
"""

import base64
import hashlib
import json
import os

import pytest

import vault_snapshot_agent as vsa
from support.archives import write_archive
from support.harness import FakeSignals
from support.storage_blocks import CONTAINER, azure_key_block as key_block

pytestmark = pytest.mark.usefixtures("no_azure_env")


def azure_storage(azurite, tmp_path, prefix):
    config = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
              "azure_storage": key_block(azurite, prefix=prefix, block_size_mb=1)}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    _, storages = vsa.load_all(str(path), vsa.Runtime.create(env={}, signals=FakeSignals()))
    return storages[0]


@pytest.mark.parametrize("state_size,blocks", [(3 * 1024 * 1024 + 12345, True),
                                               (200 * 1024, False)])
def test_content_md5_is_the_whole_blobs(azurite, tmp_path, state_size, blocks):
    prefix = "md5-%s" % os.urandom(4).hex()
    staged = str(tmp_path / "staged.snap")
    data = write_archive(staged, state=os.urandom(state_size))
    assert (len(data) > 1024 * 1024) == blocks
    storage = azure_storage(azurite, tmp_path, prefix)
    name = vsa.snapshot_name(vsa.Clock().now())
    storage.upload(vsa.verify_file(staged), name)
    blob = "%s/%s" % (prefix, name)
    expected = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")

    committed = azurite.block_list(CONTAINER, blob)["committed"]
    assert (len(committed) > 1) == blocks, committed           # the path under test was taken
    props = azurite.blob_properties(CONTAINER, blob)
    assert props.get("content-md5") == expected, props
    listed = [b for b in azurite.list_blobs(CONTAINER, prefix + "/") if b["name"] == blob]
    assert listed[0]["properties"].get("Content-MD5") == expected, listed
    assert azurite.get_blob(CONTAINER, blob) == data
