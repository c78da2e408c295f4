#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: uploading one big snapshot to Azure Blob (Azurite), agent vs
Microsoft's @azure/storage-blob (Node.js).

Builds (or reuses, --file) a valid snapshot archive of about --mb MB (the
same generator and cache file as s3_upload.py, in benchlib: gzip tar of meta.json,
state.bin, SHA256SUMS, SHA256SUMS.sealed with incompressible state), checks
it once with vsa.verify_file (untimed), starts a throw-away Azurite blob
service on loopback (tests/support/azurite.py; HTTP, Shared Key checked, data on
disk unless --azurite-in-memory), then uploads the file --runs times with
each tool, interleaved (the order rotates per round):

  agent       python -c '... AzureStorage.upload(SnapshotInfo(...))'
              (the agent's own code: Put Block of --block-size MiB blocks,
               --concurrency threads, Content-MD5 on every block (one extra
               read pass per block), then Put Block List; Shared Key)
              With --verify the child runs vsa.verify_file first, as the
              agent does before every upload; it is timed separately.
  node        node up.js: BlockBlobClient(connection string).uploadFile(F)
              with the client's defaults (files over 256 MiB: 4 MiB blocks,
              concurrency 5; no per-block checksum)
  node-c4     the same with {concurrency: --concurrency, blockSize:
              --block-size MiB}, i.e. the agent's settings

After every upload the blob's size is checked (Get Blob Properties) and the
blob deleted, so every run starts from the same Azurite state.

For each run: wall time of the child process, its CPU time and peak RSS
(ru_maxrss from os.wait4), and the CPU time Azurite burnt meanwhile
(/proc/PID/stat), which shows whether the client or Azurite is the
bottleneck.  The agent child also reports how long start-up (import +
config) and upload took.  Children are started by benchlib.Spawner, a
helper forked before anything big is imported, so a child's ru_maxrss is
not inflated by this process.

Prints a Markdown table (medians; ratios against the node client with its
defaults); --json FILE also writes the raw numbers.

Usage (from the repo root; Azurite installed with
``python tests/support/azurite.py install .venv/azurite``; the Node client in a
scratch dir: ``mkdir -p /tmp/azblob-ref && cd /tmp/azblob-ref && npm init -y
&& npm install @azure/storage-blob``):

    .venv/bin/python contrib/bench/azure_upload.py --mb 500 --runs 3

Azurite is always stopped (also on Ctrl-C / SIGTERM) and the work directory
removed; --keep keeps the work dir (logs) and caches the generated archive
in $TMPDIR for the next --keep run (shared with s3_upload.py and
gcs_upload.py); --file PATH uses (or creates and keeps) an archive at PATH.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import benchlib
from benchlib import MB

sys.path.insert(0, benchlib.TESTS)

TOOLS = ("agent", "node", "node-c4")
CONTAINER = "snapshots"
BLOBS = {"agent": "bench/agent.snap", "node": "bench/ref.snap", "node-c4": "bench/ref.snap"}
SCRUB = ("AWS_", "AZURE_", "VAULT_", "BAO_", "GOOGLE_", "BENCH_SPEC", "STORAGE_EMULATOR_HOST",
         "NODE_OPTIONS")

NODE_UPLOAD = r"""
// node up.js MODULE_DIR CONTAINER BLOB FILE CONCURRENCY|default BLOCK_MIB|default
// (connection string in $AZURE_STORAGE_CONNECTION_STRING)
const path = require("path");
const t0 = process.hrtime.bigint();
const [, , modDir, container, blobName, file, conc, blockMiB] = process.argv;
const { BlockBlobClient } = require(path.join(modDir, "node_modules", "@azure", "storage-blob"));
(async () => {
  const client = new BlockBlobClient(process.env.AZURE_STORAGE_CONNECTION_STRING, container,
                                     blobName);
  const opts = {};
  if (conc !== "default") opts.concurrency = parseInt(conc, 10);
  if (blockMiB !== "default") opts.blockSize = parseInt(blockMiB, 10) * 1024 * 1024;
  const t1 = process.hrtime.bigint();
  const r = await client.uploadFile(file, opts);
  const t2 = process.hrtime.bigint();
  console.log(JSON.stringify({setup: Number(t1 - t0) / 1e9, upload: Number(t2 - t1) / 1e9,
                              etag: r.etag}));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def find_node(explicit):
    return benchlib.find_executable((explicit, shutil.which("node")),
                                    "node not found (--node PATH)")


def node_module_version(moddir):
    pkg = os.path.join(moddir, "node_modules", "@azure", "storage-blob", "package.json")
    try:
        with open(pkg) as fh:
            return json.load(fh)["version"]
    except (OSError, ValueError, KeyError):
        raise SystemExit("@azure/storage-blob not found under %s: mkdir -p %s && cd %s && "
                         "npm init -y && npm install @azure/storage-blob (or --node-modules DIR)"
                         % (moddir, moddir, moddir)) from None


# ----------------------------------------------------------------- bench

def bench(args, workdir, spawner):
    from support.azurite import Azurite, installed_version, DEFAULT_PREFIX

    node = find_node(args.node)
    moddir = os.path.abspath(args.node_modules)
    python = args.python or sys.executable
    path = benchlib.prepare_archive(args, workdir)
    size = os.path.getsize(path)
    info = benchlib.verify_archive(path)
    script = os.path.join(workdir, "up.js")
    with open(script, "w") as fh:
        fh.write(NODE_UPLOAD)

    az = Azurite(os.path.join(workdir, "azurite"), in_memory=args.azurite_in_memory)
    os.makedirs(az.workdir)
    with benchlib.stopping(spawner.close, az.stop):   # spawner.close kills a running child
        t0 = time.time()
        az.start()
        az.create_container(CONTAINER)
        print("azurite %s up in %.1fs (%s)" % (az.endpoint, time.time() - t0,
                                               "in memory" if args.azurite_in_memory
                                               else "data on disk"), flush=True)
        agent_spec = benchlib.agent_upload_spec(
            path, "AzureStorage", "azure_storage",
            {"account_name": az.account, "account_key": az.key, "container_name": CONTAINER,
             "endpoint": az.endpoint, "prefix": "bench", "block_size_mb": args.block_size,
             "concurrency": args.concurrency},
            verify=args.verify, info=info)
        versions = {
            "python": benchlib.python_version(python),
            "node": subprocess.check_output([node, "--version"],
                                            universal_newlines=True).strip(),
            "storage-blob": node_module_version(moddir),
            "azurite": installed_version(os.environ.get("AZURITE_DIR") or DEFAULT_PREFIX),
            "agent_sha256": benchlib.agent_sha12(),
        }
        uploads = benchlib.Uploads(spawner, workdir, args.timeout, az.proc.pid)

        def take(tool):
            if tool == "agent":
                argv = benchlib.agent_upload_argv(python)
                env = benchlib.scrubbed_env(SCRUB, BENCH_SPEC=json.dumps(agent_spec))
            else:
                conc, block = (("default", "default") if tool == "node"
                               else (str(args.concurrency), str(args.block_size)))
                argv = [node, script, moddir, CONTAINER, BLOBS[tool], path, conc, block]
                env = benchlib.scrubbed_env(
                    SCRUB, AZURE_STORAGE_CONNECTION_STRING=az.connection_string)
            r = uploads.run(tool, argv, env)
            props = az.blob_properties(CONTAINER, BLOBS[tool])
            if props is None or int(props.get("content-length", -1)) != size:
                raise RuntimeError("%s: %s/%s is %s bytes, file is %d" % (
                    tool, CONTAINER, BLOBS[tool], props and props.get("content-length"), size))
            r["blob_size"] = int(props["content-length"])
            az.delete_blob(CONTAINER, BLOBS[tool])
            return r

        def report(i, tool, r):
            tail = "  blob %d B%s" % (r["blob_size"], benchlib.child_times(r, tool, args.verify))
            benchlib.upload_progress(i, tool, 8, r, size, "azurite", "server_cpu", tail)

        results = benchlib.interleave(TOOLS, args.runs, take, report)
        return dict(benchlib.stamp(), **{
            "versions": versions, "python_path": python, "node_path": node,
            "file_bytes": size, "runs": args.runs, "block_size_mib": args.block_size,
            "concurrency": args.concurrency, "verify": args.verify,
            "azurite_in_memory": args.azurite_in_memory,
            "server_peak_rss": benchlib.proc_status(az.proc.pid, "VmHWM"),
            "results": results,
        })


def summarize(data):
    return benchlib.summarize_uploads(data["results"], "server_cpu")


def table(data):
    rows = summarize(data)
    size = data["file_bytes"]
    c, b = data["concurrency"], data["block_size_mib"]
    labels = {
        "agent": "agent: %sAzureStorage.upload (%d MiB blocks, %d threads, MD5 per block)"
                 % ("verify_file + " if data["verify"] else "", b, c),
        "node": "node `BlockBlobClient.uploadFile` (defaults: 4 MiB blocks, concurrency 5)",
        "node-c4": "node `uploadFile`, concurrency %d, %d MiB blocks" % (c, b),
    }
    parts = benchlib.agent_parts(rows, "AzureStorage", data["verify"])
    v = data["versions"]
    footer = ("%d runs each, interleaved; %.1f MB archive; Azurite %s over HTTP, Shared Key, "
              "%s (peak RSS %.0f MB); Python %s; Node %s, @azure/storage-blob %s; agent "
              "sha256 `%s`; %s; %s." % (
                  data["runs"], size / MB, v["azurite"],
                  "in memory" if data["azurite_in_memory"] else "data on disk",
                  data["server_peak_rss"] / MB, v["python"], v["node"].lstrip("v"),
                  v["storage-blob"], v["agent_sha256"], data["machine"], data["date"]))
    return benchlib.upload_table(rows, TOOLS, labels, size, ("node", "node"), "Azurite",
                                 "server_cpu", parts, footer)


def add_options(parser):
    parser.add_argument("--block-size", type=int, default=16, metavar="MIB",
                        help="agent block_size_mb, and node-c4's blockSize (16)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="agent concurrency, and node-c4's (4)")
    parser.add_argument("--verify", action="store_true",
                        help="the agent child runs verify_file before the upload (timed apart)")
    parser.add_argument("--azurite-in-memory", action="store_true",
                        help="Azurite --inMemoryPersistence (default: data on disk)")


def add_client_options(parser):
    parser.add_argument("--node", help="node binary (default: PATH)")
    parser.add_argument("--node-modules", default="/tmp/azblob-ref", metavar="DIR",
                        help="dir whose node_modules holds @azure/storage-blob (/tmp/azblob-ref)")


def main(argv=None):
    parser = benchlib.upload_parser(__doc__, add_options, add_client_options)
    args = benchlib.parse_upload_args(parser, argv)
    if args.block_size < 1 or args.block_size > 4000 or args.concurrency < 1:
        parser.error("--block-size 1..4000 and --concurrency >= 1")
    spawner = benchlib.Spawner()   # before anything big gets imported or allocated
    return benchlib.run_bench(args, "azure-upload-bench.", lambda wd: bench(args, wd, spawner),
                              table, "Azurite", summarize=lambda d: d.update(summary=summarize(d)),
                              spawner=spawner, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
