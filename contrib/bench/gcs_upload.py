#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: uploading one big snapshot to Google Cloud Storage
(gcp-storage-emulator), agent vs google-cloud-storage (Python).

Builds (or reuses, --file) a valid snapshot archive of about --mb MB (the
same generator and cache file as s3_upload.py), checks it once with
vsa.verify_file (untimed), starts a throw-away gcp-storage-emulator
(tests/gcs_emulators.py: in memory, single-threaded, HTTP/1.0, no auth
checks; its resumable uploads behave like GCS's), then uploads the file
--runs times with each tool, interleaved (the order rotates per round):

  agent        python -c '... GoogleStorage.upload(SnapshotInfo(...))'
               (the agent's own code: one MD5 pass over the file, then a
                resumable upload in --chunk-size MiB chunks, one at a time,
                anonymous; the MD5 GCS reports is compared with the file's)
               With --verify the child runs vsa.verify_file first (timed
               apart), as the agent does before every upload.
  gcs-py       python gcs_up.py: google-cloud-storage Client(anonymous
               credentials, STORAGE_EMULATOR_HOST), bucket.blob(name,
               chunk_size=--chunk-size MiB).upload_from_filename(F)
               (resumable; checksum="auto" = CRC32C checked at the end)
  gcs-py-dflt  the same without chunk_size: the library's default for a
               file over 8 MiB, a resumable upload in 100 MiB chunks
               (--no-default leaves it out)

After every upload the object's size is checked (objects.get) and the object
deleted, so the in-memory emulator does not grow from run to run.

For each run: wall time of the child process, its CPU time and peak RSS
(ru_maxrss from os.wait4), and the CPU time the emulator burnt meanwhile
(/proc/PID/stat).  Children are started by the forked helper of
s3_upload.py (Spawner), so a child's ru_maxrss is not inflated by this
process.  Each child also reports its own start-up and upload time.

Mind the emulator: it keeps a resumable upload as one bytes object and
copies all of it for every chunk it appends (quadratic in the number of
chunks), and holds objects in RAM, so its CPU dominates and small chunks
cost it more than big ones.  Its peak RSS is printed.

Prints a Markdown table (medians; ratios against gcs-py, the matched
reference); --json FILE also writes the raw numbers.

Usage (from the repo root; gcp-storage-emulator in this interpreter's venv,
google-cloud-storage in its own:
python3 -m venv /tmp/gcs-ref-venv && /tmp/gcs-ref-venv/bin/pip install google-cloud-storage):

    /tmp/tv/bin/python contrib/bench/gcs_upload.py --mb 500 --runs 3

The emulator is always stopped (also on Ctrl-C / SIGTERM) and the work
directory removed; --keep keeps the work dir (logs) and caches the generated
archive in $TMPDIR for the next --keep run (shared with s3_upload.py and
azure_upload.py); --file PATH uses (or creates and keeps) an archive at PATH.
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

ALL_TOOLS = ("agent", "gcs-py", "gcs-py-dflt")
BUCKET = "snapshots"
OBJECTS = {"agent": "bench/agent.snap", "gcs-py": "bench/ref.snap", "gcs-py-dflt": "bench/ref.snap"}

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

GCS_PY_CHILD = r"""
# python gcs_up.py BUCKET NAME FILE CHUNK_MIB|default   ($STORAGE_EMULATOR_HOST set)
import json, sys, time
t0 = time.perf_counter()
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
bucket, name, path, chunk = sys.argv[1:5]
client = storage.Client(project="test-project", credentials=AnonymousCredentials())
kwargs = {} if chunk == "default" else {"chunk_size": int(chunk) * 1024 * 1024}
blob = client.bucket(bucket).blob(name, **kwargs)
t1 = time.perf_counter()
blob.upload_from_filename(path, content_type="application/octet-stream")
t2 = time.perf_counter()
print(json.dumps({"setup": t1 - t0, "upload": t2 - t1, "size": blob.size,
                  "crc32c": blob.crc32c}))
"""


def base_env(**extra):
    env = dict((k, v) for k, v in os.environ.items()
               if not (k.startswith("AWS_") or k.startswith("AZURE_") or k.startswith("VAULT_")
                       or k.startswith("BAO_") or k.startswith("GOOGLE_")
                       or k.startswith("CLOUDSDK_")
                       or k in ("BENCH_SPEC", "STORAGE_EMULATOR_HOST")))
    env.update(extra)
    return env


def find_ref_python(explicit):
    for cand in (explicit, "/tmp/gcs-ref-venv/bin/python"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise SystemExit("google-cloud-storage venv not found: python3 -m venv /tmp/gcs-ref-venv && "
                     "/tmp/gcs-ref-venv/bin/pip install google-cloud-storage (or --ref-python PATH)")


def file_sha12(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:12]


# ----------------------------------------------------------------- bench

def bench(args, workdir, spawner, tools):
    from gcs_emulators import GcsEmulator
    import vault_snapshot_agent as vsa

    ref_python = find_ref_python(args.ref_python)
    python = args.python or sys.executable
    path = prepare_archive(args, workdir)
    size = os.path.getsize(path)
    t0 = time.time()
    info = vsa.verify_file(path)
    print("archive verified in %.1fs (index %d, term %d, sha256 %s...)" % (
        time.time() - t0, info.index, info.term, info.sha256[:12]), flush=True)
    script = os.path.join(workdir, "gcs_up.py")
    with open(script, "w") as fh:
        fh.write(GCS_PY_CHILD)

    gcs = GcsEmulator(os.path.join(workdir, "gcs"), "gcp-storage-emulator")
    try:
        t0 = time.time()
        gcs.start()
        gcs.create_bucket(BUCKET)
        print("gcp-storage-emulator %s up in %.1fs (in memory)" % (gcs.endpoint, time.time() - t0),
              flush=True)
        agent_spec = {"path": path, "name": "agent.snap", "class": "GoogleStorage",
                      "verify": args.verify, "info": list(info), "config": {
                          "addr": "http://127.0.0.1:8200", "token": "unused-by-this-bench",
                          "google_storage": {"bucket": BUCKET, "endpoint": gcs.endpoint,
                                             "anonymous": True, "prefix": "bench",
                                             "chunk_size_mb": args.chunk_size}}}
        ref_versions = json.loads(subprocess.check_output(
            [ref_python, "-c", "import json, platform; from importlib.metadata import version; "
             "print(json.dumps({'python': platform.python_version(), "
             "'gcs': version('google-cloud-storage'), "
             "'resumable': version('google-resumable-media')}))"],
            universal_newlines=True))
        versions = {
            "python": subprocess.check_output([python, "-c", "import platform; "
                                               "print(platform.python_version())"],
                                              universal_newlines=True).strip(),
            "ref_python": ref_versions["python"],
            "google-cloud-storage": ref_versions["gcs"],
            "google-resumable-media": ref_versions["resumable"],
            "emulator": subprocess.check_output(
                [sys.executable, "-c", "from importlib.metadata import version; "
                 "print(version('gcp-storage-emulator'))"], universal_newlines=True).strip(),
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
                chunk = "default" if tool == "gcs-py-dflt" else str(args.chunk_size)
                argv = [ref_python, script, BUCKET, OBJECTS[tool], path, chunk]
                env = base_env(STORAGE_EMULATOR_HOST=gcs.endpoint)
            server_before = proc_cpu(gcs.pid)
            r = spawner.run(argv, env, log, args.timeout)
            r["server_cpu"] = proc_cpu(gcs.pid) - server_before
            if r["rc"] != 0:
                with open(log, "rb") as fh:
                    tail = fh.read()[-3000:].decode("utf-8", "replace")
                raise RuntimeError("%s %s after %.0fs:\n%s" % (
                    tool, "timed out" if r["timed_out"] else "exited %d" % r["rc"],
                    r["seconds"], tail))
            with open(log) as fh:
                lines = [l for l in fh.read().splitlines() if l.startswith("{")]
            r["child"] = json.loads(lines[-1])
            meta = gcs.object_metadata(BUCKET, OBJECTS[tool])
            if meta is None or int(meta.get("size", -1)) != size:
                raise RuntimeError("%s: gs://%s/%s is %s bytes, file is %d" % (
                    tool, BUCKET, OBJECTS[tool], meta and meta.get("size"), size))
            r["object_size"] = int(meta["size"])
            r["md5Hash"] = meta.get("md5Hash")
            gcs.delete_object(BUCKET, OBJECTS[tool])
            return r

        results = dict((t, []) for t in tools)
        for i in range(args.runs):
            order = tools[i % len(tools):] + tools[:i % len(tools)]
            for tool in order:
                r = take(tool)
                results[tool].append(r)
                extra = "  (upload %.2fs" % r["child"]["upload"]
                if tool == "agent" and args.verify:
                    extra += ", verify %.2fs" % r["child"]["verify"]
                extra += ")"
                print("run %d %-11s %7.2fs %7.1f MB/s  client CPU %6.2fs  emulator CPU %6.2fs  "
                      "RSS %6.1f MB  object %d B%s" % (
                          i + 1, tool, r["seconds"], size / MB / r["seconds"], r["cpu"],
                          r["server_cpu"], r["maxrss_kib"] * 1024 / MB, r["object_size"], extra),
                      flush=True)
        return {
            "date": time.strftime("%Y-%m-%d"),
            "machine": "%s %s, %d cores" % (platform.system(), platform.machine(),
                                            os.cpu_count() or 0),
            "versions": versions, "python_path": python, "ref_python_path": ref_python,
            "file_bytes": size, "runs": args.runs, "chunk_size_mib": args.chunk_size,
            "verify": args.verify, "tools": list(tools),
            "server_peak_rss": proc_status(gcs.pid, "VmHWM"),
            "results": results,
        }
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        spawner.close()     # kills a child still running
        gcs.stop()


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
    base = rows["gcs-py"]
    c = data["chunk_size_mib"]
    label = {
        "agent": "agent: %sGoogleStorage.upload (MD5 pass + resumable, %d MiB chunks)"
                 % ("verify_file + " if data["verify"] else "", c),
        "gcs-py": "google-cloud-storage `upload_from_filename`, chunk_size %d MiB" % c,
        "gcs-py-dflt": "google-cloud-storage `upload_from_filename`, default (100 MiB chunks)",
    }
    lines = [
        "| tool | wall time, median (min-max) | MB/s | peak RSS | client CPU | emulator CPU "
        "| time vs gcs-py | RSS vs gcs-py |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tool in data["tools"]:
        r = rows[tool]
        lines.append("| %s | %.2f s (%.2f-%.2f) | %.1f | %.1f MB | %.2f s | %.2f s | %.2fx | %.2fx |"
                     % (label[tool], r["seconds"], r["min"], r["max"], size / MB / r["seconds"],
                        r["rss"] / MB, r["cpu"], r["server_cpu"], r["seconds"] / base["seconds"],
                        r["rss"] / base["rss"]))
    parts = [("upload", "agent, of which GoogleStorage.upload")]
    if data["verify"]:
        parts.insert(0, ("verify", "agent, of which verify_file"))
    for part, text in parts:
        a = rows["agent"][part]
        lines.append("| %s | %.2f s | %.1f | - | - | - | %.2fx | - |" % (
            text, a, size / MB / a, a / base["seconds"]))
    lines.append("| gcs-py, of which `upload_from_filename` | %.2f s | %.1f | - | - | - | %.2fx | - |"
                 % (base["upload"], size / MB / base["upload"], base["upload"] / base["seconds"]))
    v = data["versions"]
    lines.append("")
    lines.append("%d runs each, interleaved; %.1f MB archive; gcp-storage-emulator %s in memory "
                 "(peak RSS %.0f MB); agent on Python %s, sha256 `%s`; google-cloud-storage %s "
                 "(google-resumable-media %s) on Python %s; %s; %s." % (
                     data["runs"], size / MB, v["emulator"], data["server_peak_rss"] / MB,
                     v["python"], v["agent_sha256"], v["google-cloud-storage"],
                     v["google-resumable-media"], v["ref_python"], data["machine"], data["date"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=500, help="archive size in MB (500)")
    parser.add_argument("--file", help="archive to upload: reused if it exists, else created "
                                       "there and kept")
    parser.add_argument("--runs", type=int, default=3, help="uploads per tool (3)")
    parser.add_argument("--chunk-size", type=int, default=16, metavar="MIB",
                        help="agent chunk_size_mb, and gcs-py's chunk_size (16)")
    parser.add_argument("--no-default", action="store_true",
                        help="leave out gcs-py-dflt (the library's 100 MiB chunks)")
    parser.add_argument("--verify", action="store_true",
                        help="the agent child runs verify_file before the upload (timed apart)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="kill a single upload after this many seconds (1800)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--python", help="interpreter for the agent (default: this one)")
    parser.add_argument("--ref-python", help="interpreter with google-cloud-storage "
                                             "(default: /tmp/gcs-ref-venv/bin/python)")
    parser.add_argument("--workdir", help="parent of the work dir (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (logs) and cache the archive in $TMPDIR")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.mb <= 0:
        parser.error("--runs and --mb must be positive")
    if args.chunk_size < 1:
        parser.error("--chunk-size >= 1")
    tools = tuple(t for t in ALL_TOOLS if not (args.no_default and t == "gcs-py-dflt"))

    spawner = Spawner()   # before anything big gets imported or allocated
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    workdir = tempfile.mkdtemp(prefix="gcs-upload-bench.", dir=args.workdir)
    try:
        sys.path.insert(0, REPO)
        data = bench(args, workdir, spawner, tools)
    except (KeyboardInterrupt, Interrupted) as exc:
        print("interrupted (%s); emulator stopped" % (str(exc) or "Ctrl-C"), file=sys.stderr)
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
