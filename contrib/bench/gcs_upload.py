#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: uploading one big snapshot to Google Cloud Storage
(gcp-storage-emulator), agent vs google-cloud-storage (Python).

Builds (or reuses, --file) a valid snapshot archive of about --mb MB (the
same generator and cache file as s3_upload.py, in benchlib), checks it once with
vsa.verify_file (untimed), starts a throw-away gcp-storage-emulator
(tests/support/gcs_emulators.py: in memory, single-threaded, HTTP/1.0, no auth
checks; its resumable uploads behave like GCS's), then uploads the file
--runs times with each tool, interleaved (the order rotates per round):

  agent        python -c '... GoogleStorage.upload(SnapshotInfo(...))'
               (the agent's own code: a resumable upload in --chunk-size
                MiB chunks, one at a time, anonymous; the MD5 of the chunks
                as they are read is compared with the one GCS reports)
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
(/proc/PID/stat).  Children are started by benchlib.Spawner, a helper
forked before anything big is imported, so a child's ru_maxrss is not
inflated by this process.  Each child also reports its own start-up and upload time.

Mind the emulator: it keeps a resumable upload as one bytes object and
copies all of it for every chunk it appends (quadratic in the number of
chunks), and holds objects in RAM, so its CPU dominates and small chunks
cost it more than big ones.  Its peak RSS is printed.

Prints a Markdown table (medians; ratios against gcs-py, the matched
reference); --json FILE also writes the raw numbers.

Usage (from the repo root; gcp-storage-emulator in this interpreter's venv,
google-cloud-storage in its own:
python3 -m venv /tmp/gcs-ref-venv && /tmp/gcs-ref-venv/bin/pip install google-cloud-storage):

    .venv/bin/python contrib/bench/gcs_upload.py --mb 500 --runs 3

The emulator is always stopped (also on Ctrl-C / SIGTERM) and the work
directory removed; --keep keeps the work dir (logs) and caches the generated
archive in $TMPDIR for the next --keep run (shared with s3_upload.py and
azure_upload.py); --file PATH uses (or creates and keeps) an archive at PATH.
"""

import json
import os
import subprocess
import sys
import time

import benchlib
from benchlib import MB

sys.path.insert(0, benchlib.TESTS)

ALL_TOOLS = ("agent", "gcs-py", "gcs-py-dflt")
BUCKET = "snapshots"
OBJECTS = {"agent": "bench/agent.snap", "gcs-py": "bench/ref.snap", "gcs-py-dflt": "bench/ref.snap"}
SCRUB = ("AWS_", "AZURE_", "VAULT_", "BAO_", "GOOGLE_", "CLOUDSDK_", "BENCH_SPEC",
         "STORAGE_EMULATOR_HOST")

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


def find_ref_python(explicit):
    return benchlib.find_executable(
        (explicit, "/tmp/gcs-ref-venv/bin/python"),
        "google-cloud-storage venv not found: python3 -m venv /tmp/gcs-ref-venv && "
        "/tmp/gcs-ref-venv/bin/pip install google-cloud-storage (or --ref-python PATH)")


# ----------------------------------------------------------------- bench

def ref_versions(ref_python):
    """Python, google-cloud-storage and google-resumable-media of the reference venv."""
    return json.loads(subprocess.check_output(
        [ref_python, "-c", "import json, platform; from importlib.metadata import version; "
         "print(json.dumps({'python': platform.python_version(), "
         "'gcs': version('google-cloud-storage'), "
         "'resumable': version('google-resumable-media')}))"],
        universal_newlines=True))


def bench(args, workdir, spawner, tools):
    from support.gcs_emulators import GcsEmulator

    ref_python = find_ref_python(args.ref_python)
    python = args.python or sys.executable
    path = benchlib.prepare_archive(args, workdir)
    size = os.path.getsize(path)
    info = benchlib.verify_archive(path)
    script = os.path.join(workdir, "gcs_up.py")
    with open(script, "w") as fh:
        fh.write(GCS_PY_CHILD)

    gcs = GcsEmulator(os.path.join(workdir, "gcs"), "gcp-storage-emulator")
    with benchlib.stopping(spawner.close, gcs.stop):   # spawner.close kills a running child
        t0 = time.time()
        gcs.start()
        gcs.create_bucket(BUCKET)
        print("gcp-storage-emulator %s up in %.1fs (in memory)" % (gcs.endpoint, time.time() - t0),
              flush=True)
        agent_spec = benchlib.agent_upload_spec(
            path, "GoogleStorage", "google_storage",
            {"bucket": BUCKET, "endpoint": gcs.endpoint, "anonymous": True, "prefix": "bench",
             "chunk_size_mb": args.chunk_size},
            verify=args.verify, info=info)
        ref = ref_versions(ref_python)
        versions = {
            "python": benchlib.python_version(python),
            "ref_python": ref["python"],
            "google-cloud-storage": ref["gcs"],
            "google-resumable-media": ref["resumable"],
            "emulator": subprocess.check_output(
                [sys.executable, "-c", "from importlib.metadata import version; "
                 "print(version('gcp-storage-emulator'))"], universal_newlines=True).strip(),
            "agent_sha256": benchlib.agent_sha12(),
        }
        uploads = benchlib.Uploads(spawner, workdir, args.timeout, gcs.pid)

        def take(tool):
            if tool == "agent":
                argv = benchlib.agent_upload_argv(python)
                env = benchlib.scrubbed_env(SCRUB, BENCH_SPEC=json.dumps(agent_spec))
            else:
                chunk = "default" if tool == "gcs-py-dflt" else str(args.chunk_size)
                argv = [ref_python, script, BUCKET, OBJECTS[tool], path, chunk]
                env = benchlib.scrubbed_env(SCRUB, STORAGE_EMULATOR_HOST=gcs.endpoint)
            r = uploads.run(tool, argv, env)
            meta = gcs.object_metadata(BUCKET, OBJECTS[tool])
            if meta is None or int(meta.get("size", -1)) != size:
                raise RuntimeError("%s: gs://%s/%s is %s bytes, file is %d" % (
                    tool, BUCKET, OBJECTS[tool], meta and meta.get("size"), size))
            r["object_size"] = int(meta["size"])
            r["md5Hash"] = meta.get("md5Hash")
            gcs.delete_object(BUCKET, OBJECTS[tool])
            return r

        def report(i, tool, r):
            tail = "  object %d B%s" % (r["object_size"],
                                     benchlib.child_times(r, tool, args.verify))
            benchlib.upload_progress(i, tool, 11, r, size, "emulator", "server_cpu", tail)

        results = benchlib.interleave(tools, args.runs, take, report)
        return dict(benchlib.stamp(), **{
            "versions": versions, "python_path": python, "ref_python_path": ref_python,
            "file_bytes": size, "runs": args.runs, "chunk_size_mib": args.chunk_size,
            "verify": args.verify, "tools": list(tools),
            "server_peak_rss": benchlib.proc_status(gcs.pid, "VmHWM"),
            "results": results,
        })


def summarize(data):
    return benchlib.summarize_uploads(data["results"], "server_cpu")


def table(data):
    rows = summarize(data)
    size = data["file_bytes"]
    c = data["chunk_size_mib"]
    labels = {
        "agent": "agent: %sGoogleStorage.upload (resumable, MD5 while sending, %d MiB chunks)"
                 % ("verify_file + " if data["verify"] else "", c),
        "gcs-py": "google-cloud-storage `upload_from_filename`, chunk_size %d MiB" % c,
        "gcs-py-dflt": "google-cloud-storage `upload_from_filename`, default (100 MiB chunks)",
    }
    parts = benchlib.agent_parts(rows, "GoogleStorage", data["verify"])
    parts.append(("gcs-py, of which `upload_from_filename`", rows["gcs-py"]["upload"]))
    v = data["versions"]
    footer = ("%d runs each, interleaved; %.1f MB archive; gcp-storage-emulator %s in memory "
              "(peak RSS %.0f MB); agent on Python %s, sha256 `%s`; google-cloud-storage %s "
              "(google-resumable-media %s) on Python %s; %s; %s." % (
                  data["runs"], size / MB, v["emulator"], data["server_peak_rss"] / MB,
                  v["python"], v["agent_sha256"], v["google-cloud-storage"],
                  v["google-resumable-media"], v["ref_python"], data["machine"], data["date"]))
    return benchlib.upload_table(rows, data["tools"], labels, size, ("gcs-py", "gcs-py"),
                                 "emulator", "server_cpu", parts, footer)


def add_options(parser):
    parser.add_argument("--chunk-size", type=int, default=16, metavar="MIB",
                        help="agent chunk_size_mb, and gcs-py's chunk_size (16)")
    parser.add_argument("--no-default", action="store_true",
                        help="leave out gcs-py-dflt (the library's 100 MiB chunks)")
    parser.add_argument("--verify", action="store_true",
                        help="the agent child runs verify_file before the upload (timed apart)")


def add_client_options(parser):
    parser.add_argument("--ref-python", help="interpreter with google-cloud-storage "
                                             "(default: /tmp/gcs-ref-venv/bin/python)")


def main(argv=None):
    parser = benchlib.upload_parser(__doc__, add_options, add_client_options)
    args = benchlib.parse_upload_args(parser, argv)
    if args.chunk_size < 1:
        parser.error("--chunk-size >= 1")
    tools = tuple(t for t in ALL_TOOLS if not (args.no_default and t == "gcs-py-dflt"))
    spawner = benchlib.Spawner()   # before anything big gets imported or allocated
    return benchlib.run_bench(args, "gcs-upload-bench.",
                              lambda wd: bench(args, wd, spawner, tools), table, "emulator",
                              summarize=lambda d: d.update(summary=summarize(d)),
                              spawner=spawner, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
