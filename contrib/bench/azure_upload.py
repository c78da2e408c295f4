#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: uploading one big snapshot to Azure Blob (Azurite), agent vs
Microsoft's @azure/storage-blob (Node.js).

Builds (or reuses, --file) a valid snapshot archive of about --mb MB (the
same generator and cache file as s3_upload.py: gzip tar of meta.json,
state.bin, SHA256SUMS, SHA256SUMS.sealed with incompressible state), checks
it once with vsa.verify_file (untimed), starts a throw-away Azurite blob
service on loopback (tests/azurite.py; HTTP, Shared Key checked, data on
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
config) and upload took.  Children are started by the forked helper of
s3_upload.py (Spawner), forked before anything big is imported, so a
child's ru_maxrss is not inflated by this process.

Prints a Markdown table (medians; ratios against the node client with its
defaults); --json FILE also writes the raw numbers.

Usage (from the repo root; Azurite installed with
``python tests/azurite.py install .venv/azurite``; the Node client in a
scratch dir: ``mkdir -p /tmp/azblob-ref && cd /tmp/azblob-ref && npm init -y
&& npm install @azure/storage-blob``):

    /tmp/tv/bin/python contrib/bench/azure_upload.py --mb 500 --runs 3

Azurite is always stopped (also on Ctrl-C / SIGTERM) and the work directory
removed; --keep keeps the work dir (logs) and caches the generated archive
in $TMPDIR for the next --keep run (shared with s3_upload.py and
gcs_upload.py); --file PATH uses (or creates and keeps) an archive at PATH.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from s3_upload import (MB, Interrupted, Spawner, _on_term,  # noqa: E402
                       prepare_archive, proc_cpu, proc_status)

TOOLS = ("agent", "node", "node-c4")
CONTAINER = "snapshots"
BLOBS = {"agent": "bench/agent.snap", "node": "bench/ref.snap", "node-c4": "bench/ref.snap"}

AGENT_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import vault_snapshot_agent as vsa
spec = json.loads(os.environ.pop("BENCH_SPEC"))
cls = getattr(vsa, spec["class"])
cfg = vsa.config_from_dict(spec["config"])
storage = [s for s in vsa.build_storages(cfg) if isinstance(s, cls)][0]
t1 = time.perf_counter()
info = vsa.verify_file(spec["path"]) if spec["verify"] else vsa.SnapshotInfo(*spec["info"])
t2 = time.perf_counter()
url = storage.upload(info, spec["name"], vsa.Signals())
t3 = time.perf_counter()
print(json.dumps({"setup": t1 - t0, "verify": t2 - t1, "upload": t3 - t2, "url": url,
                  "size": info.size}))
"""

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


def base_env(**extra):
    env = dict((k, v) for k, v in os.environ.items()
               if not (k.startswith("AWS_") or k.startswith("AZURE_") or k.startswith("VAULT_")
                       or k.startswith("BAO_") or k.startswith("GOOGLE_")
                       or k in ("BENCH_SPEC", "STORAGE_EMULATOR_HOST", "NODE_OPTIONS")))
    env.update(extra)
    return env


def find_node(explicit):
    for cand in (explicit, shutil.which("node")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise SystemExit("node not found (--node PATH)")


def node_module_version(moddir):
    pkg = os.path.join(moddir, "node_modules", "@azure", "storage-blob", "package.json")
    try:
        with open(pkg) as fh:
            return json.load(fh)["version"]
    except (OSError, ValueError, KeyError):
        raise SystemExit("@azure/storage-blob not found under %s: mkdir -p %s && cd %s && "
                         "npm init -y && npm install @azure/storage-blob (or --node-modules DIR)"
                         % (moddir, moddir, moddir))


def file_sha12(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:12]


# ----------------------------------------------------------------- bench

def bench(args, workdir, spawner):
    from azurite import Azurite, installed_version, DEFAULT_PREFIX
    import vault_snapshot_agent as vsa

    node = find_node(args.node)
    moddir = os.path.abspath(args.node_modules)
    python = args.python or sys.executable
    path = prepare_archive(args, workdir)
    size = os.path.getsize(path)
    t0 = time.time()
    info = vsa.verify_file(path)
    print("archive verified in %.1fs (index %d, term %d, sha256 %s...)" % (
        time.time() - t0, info.index, info.term, info.sha256[:12]), flush=True)
    script = os.path.join(workdir, "up.js")
    with open(script, "w") as fh:
        fh.write(NODE_UPLOAD)

    az = Azurite(os.path.join(workdir, "azurite"), in_memory=args.azurite_in_memory)
    os.makedirs(az.workdir)
    try:
        t0 = time.time()
        az.start()
        az.create_container(CONTAINER)
        print("azurite %s up in %.1fs (%s)" % (az.endpoint, time.time() - t0,
                                               "in memory" if args.azurite_in_memory
                                               else "data on disk"), flush=True)
        agent_spec = {"path": path, "name": "agent.snap", "class": "AzureStorage",
                      "verify": args.verify, "info": list(info), "config": {
                          "addr": "http://127.0.0.1:8200", "token": "unused-by-this-bench",
                          "azure_storage": {"account_name": az.account, "account_key": az.key,
                                            "container_name": CONTAINER, "endpoint": az.endpoint,
                                            "prefix": "bench", "block_size_mb": args.block_size,
                                            "concurrency": args.concurrency}}}
        versions = {
            "python": subprocess.check_output([python, "-c", "import platform; "
                                               "print(platform.python_version())"],
                                              universal_newlines=True).strip(),
            "node": subprocess.check_output([node, "--version"],
                                            universal_newlines=True).strip(),
            "storage-blob": node_module_version(moddir),
            "azurite": installed_version(os.environ.get("AZURITE_DIR") or DEFAULT_PREFIX),
            "agent_sha256": file_sha12(os.path.join(REPO, "vault_snapshot_agent.py")),
        }
        count = [0]

        def take(tool):
            count[0] += 1
            log = os.path.join(workdir, "run%03d-%s.log" % (count[0], tool))
            if tool == "agent":
                argv = [python, "-c", AGENT_CHILD, REPO]
                env = base_env(BENCH_SPEC=json.dumps(agent_spec))
            else:
                conc, block = (("default", "default") if tool == "node"
                               else (str(args.concurrency), str(args.block_size)))
                argv = [node, script, moddir, CONTAINER, BLOBS[tool], path, conc, block]
                env = base_env(AZURE_STORAGE_CONNECTION_STRING=az.connection_string)
            server_before = proc_cpu(az.proc.pid)
            r = spawner.run(argv, env, log, args.timeout)
            r["server_cpu"] = proc_cpu(az.proc.pid) - server_before
            if r["rc"] != 0:
                with open(log, "rb") as fh:
                    tail = fh.read()[-3000:].decode("utf-8", "replace")
                raise RuntimeError("%s %s after %.0fs:\n%s" % (
                    tool, "timed out" if r["timed_out"] else "exited %d" % r["rc"],
                    r["seconds"], tail))
            with open(log) as fh:
                lines = [l for l in fh.read().splitlines() if l.startswith("{")]
            r["child"] = json.loads(lines[-1])
            props = az.blob_properties(CONTAINER, BLOBS[tool])
            if props is None or int(props.get("content-length", -1)) != size:
                raise RuntimeError("%s: %s/%s is %s bytes, file is %d" % (
                    tool, CONTAINER, BLOBS[tool], props and props.get("content-length"), size))
            r["blob_size"] = int(props["content-length"])
            az.delete_blob(CONTAINER, BLOBS[tool])
            return r

        results = dict((t, []) for t in TOOLS)
        for i in range(args.runs):
            order = TOOLS[i % len(TOOLS):] + TOOLS[:i % len(TOOLS)]
            for tool in order:
                r = take(tool)
                results[tool].append(r)
                extra = "  (upload %.2fs" % r["child"]["upload"]
                if tool == "agent" and args.verify:
                    extra += ", verify %.2fs" % r["child"]["verify"]
                extra += ")"
                print("run %d %-8s %7.2fs %7.1f MB/s  client CPU %6.2fs  azurite CPU %6.2fs  "
                      "RSS %6.1f MB  blob %d B%s" % (
                          i + 1, tool, r["seconds"], size / MB / r["seconds"], r["cpu"],
                          r["server_cpu"], r["maxrss_kib"] * 1024 / MB, r["blob_size"], extra),
                      flush=True)
        return {
            "date": time.strftime("%Y-%m-%d"),
            "machine": "%s %s, %d cores" % (platform.system(), platform.machine(),
                                            os.cpu_count() or 0),
            "versions": versions, "python_path": python, "node_path": node,
            "file_bytes": size, "runs": args.runs, "block_size_mib": args.block_size,
            "concurrency": args.concurrency, "verify": args.verify,
            "azurite_in_memory": args.azurite_in_memory,
            "server_peak_rss": proc_status(az.proc.pid, "VmHWM"),
            "results": results,
        }
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        spawner.close()     # kills a child still running
        az.stop()


def summarize(data):
    rows = {}
    for tool, runs in data["results"].items():
        rows[tool] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "min": min(r["seconds"] for r in runs),
            "max": max(r["seconds"] for r in runs),
            "cpu": statistics.median(r["cpu"] for r in runs),
            "server_cpu": statistics.median(r["server_cpu"] for r in runs),
            "rss": max(r["maxrss_kib"] for r in runs) * 1024,
            "rss_floor": max(r["floor_kib"] for r in runs) * 1024,
            "upload": statistics.median(r["child"]["upload"] for r in runs),
            "setup": statistics.median(r["child"]["setup"] for r in runs),
        }
        if tool == "agent":
            rows[tool]["verify"] = statistics.median(r["child"]["verify"] for r in runs)
    return rows


def table(data):
    rows = summarize(data)
    size = data["file_bytes"]
    base = rows["node"]
    c, b = data["concurrency"], data["block_size_mib"]
    label = {
        "agent": "agent: %sAzureStorage.upload (%d MiB blocks, %d threads, MD5 per block)"
                 % ("verify_file + " if data["verify"] else "", b, c),
        "node": "node `BlockBlobClient.uploadFile` (defaults: 4 MiB blocks, concurrency 5)",
        "node-c4": "node `uploadFile`, concurrency %d, %d MiB blocks" % (c, b),
    }
    lines = [
        "| tool | wall time, median (min-max) | MB/s | peak RSS | client CPU | Azurite CPU "
        "| time vs node | RSS vs node |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tool in TOOLS:
        r = rows[tool]
        lines.append("| %s | %.2f s (%.2f-%.2f) | %.1f | %.1f MB | %.2f s | %.2f s | %.2fx | %.2fx |"
                     % (label[tool], r["seconds"], r["min"], r["max"], size / MB / r["seconds"],
                        r["rss"] / MB, r["cpu"], r["server_cpu"], r["seconds"] / base["seconds"],
                        r["rss"] / base["rss"]))
    parts = [("upload", "agent, of which AzureStorage.upload")]
    if data["verify"]:
        parts.insert(0, ("verify", "agent, of which verify_file"))
    for part, text in parts:
        a = rows["agent"][part]
        lines.append("| %s | %.2f s | %.1f | - | - | - | %.2fx | - |" % (
            text, a, size / MB / a, a / base["seconds"]))
    v = data["versions"]
    lines.append("")
    lines.append("%d runs each, interleaved; %.1f MB archive; Azurite %s over HTTP, Shared Key, "
                 "%s (peak RSS %.0f MB); Python %s; Node %s, @azure/storage-blob %s; agent "
                 "sha256 `%s`; %s; %s." % (
                     data["runs"], size / MB, v["azurite"],
                     "in memory" if data["azurite_in_memory"] else "data on disk",
                     data["server_peak_rss"] / MB, v["python"], v["node"].lstrip("v"),
                     v["storage-blob"], v["agent_sha256"], data["machine"], data["date"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=500, help="archive size in MB (500)")
    parser.add_argument("--file", help="archive to upload: reused if it exists, else created "
                                       "there and kept")
    parser.add_argument("--runs", type=int, default=3, help="uploads per tool (3)")
    parser.add_argument("--block-size", type=int, default=16, metavar="MIB",
                        help="agent block_size_mb, and node-c4's blockSize (16)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="agent concurrency, and node-c4's (4)")
    parser.add_argument("--verify", action="store_true",
                        help="the agent child runs verify_file before the upload (timed apart)")
    parser.add_argument("--azurite-in-memory", action="store_true",
                        help="Azurite --inMemoryPersistence (default: data on disk)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="kill a single upload after this many seconds (1800)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--python", help="interpreter for the agent (default: this one)")
    parser.add_argument("--node", help="node binary (default: PATH)")
    parser.add_argument("--node-modules", default="/tmp/azblob-ref", metavar="DIR",
                        help="dir whose node_modules holds @azure/storage-blob (/tmp/azblob-ref)")
    parser.add_argument("--workdir", help="parent of the work dir (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (logs) and cache the archive in $TMPDIR")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.mb <= 0:
        parser.error("--runs and --mb must be positive")
    if args.block_size < 1 or args.block_size > 4000 or args.concurrency < 1:
        parser.error("--block-size 1..4000 and --concurrency >= 1")

    spawner = Spawner()   # before anything big gets imported or allocated
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    workdir = tempfile.mkdtemp(prefix="azure-upload-bench.", dir=args.workdir)
    try:
        sys.path.insert(0, REPO)
        data = bench(args, workdir, spawner)
    except (KeyboardInterrupt, Interrupted) as exc:
        print("interrupted (%s); Azurite stopped" % (str(exc) or "Ctrl-C"), file=sys.stderr)
        return 130
    finally:
        spawner.close()
        if args.keep:
            print("work dir kept: %s" % workdir, file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(data))
    if args.json:
        data["summary"] = summarize(data)
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
