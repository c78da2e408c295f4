"""Build Raft snapshot archives shaped like Vault's (gzip tar of meta.json,
state.bin, SHA256SUMS, SHA256SUMS.sealed) for verifier tests. The layout
follows hashicorp/raft-snapshot's archive.go: USTAR members, mode 0600,
SHA256SUMS lines "<hex>  <name>\n"."""

import gzip
import hashlib
import io
import json
import os
import tarfile


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = 1764276759
    tar.addfile(info, io.BytesIO(data))


def build_archive(state=None, index=1234, term=7, sealed=b"sealed-sums", sums=None,
                  members=None, fmt=tarfile.USTAR_FORMAT, meta_size=None):
    """Return the bytes of a snapshot archive.

    ``sums`` overrides the SHA256SUMS text; ``members`` (list of names) picks
    which members to include, in order; ``meta_size`` overrides meta.json Size.
    """
    state = os.urandom(64 * 1024) if state is None else state
    meta = json.dumps({"ID": "%d-%d-1764276759" % (term, index), "Index": index, "Term": term,
                       "Size": len(state) if meta_size is None else meta_size,
                       "Version": 1, "Configuration": {"Servers": []}}).encode() + b"\n"
    if sums is None:
        sums = "%s  meta.json\n%s  state.bin\n" % (hashlib.sha256(meta).hexdigest(),
                                                   hashlib.sha256(state).hexdigest())
    content = {"meta.json": meta, "state.bin": state, "SHA256SUMS": sums.encode(),
               "SHA256SUMS.sealed": sealed}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for name in members or ["meta.json", "state.bin", "SHA256SUMS", "SHA256SUMS.sealed"]:
            _add(tar, name, content[name])
    return gzip.compress(raw.getvalue())


def write_archive(path, **kwargs):
    data = build_archive(**kwargs)
    with open(path, "wb") as handle:
        handle.write(data)
    return data
