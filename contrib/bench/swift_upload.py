#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: uploading one big snapshot to OpenStack Swift (all in one,
tempauth), agent vs python-swiftclient's `swift upload`.

Builds (or reuses, --file) a valid snapshot archive of about --mb MB (the
same generator and cache file as s3_upload.py, in benchlib), checks it once
with vsa.verify_file (untimed: that gives the SnapshotInfo the upload
needs), starts a throw-away Swift on loopback (tests/support/swift_server.py:
account, container, object servers and a tempauth proxy, one process each,
one replica, data on disk under the work dir; from .venv-openstack), then
uploads the file --runs times with each tool, interleaved (the order
rotates per round):

  agent          python -c '... SwiftStorage.upload(SnapshotInfo(...))'
                 (the agent's own code, tempauth login, its defaults:
                  files up to segment_size_mb (1024 MiB) in one PUT, MD5
                  taken while sending and compared with the ETag,
                  If-None-Match: *, the SHA-256 as object metadata)
  agent-slo      the same with segment_size_mb = --segment-size: a Static
                 Large Object, segments --concurrency at a time (the
                 agent's default, 4), each segment's MD5 checked, then the
                 manifest
  swift-cli      swift -A AUTH -U test:tester -K KEY upload --object-name
                 bench/ref.snap CONTAINER FILE (its defaults: one PUT, MD5
                 checked against the ETag; it refuses files over 5 GiB)
  swift-cli-slo  the same with --use-slo --segment-size --segment-size MiB
                 (segments in CONTAINER_segments, 10 segment threads)
  swift-cli-slo-c  the same with --segment-threads = the agent's
                 concurrency (--no-cli-c leaves it out)

The agent runs as a script (its source compiled in the child) unless
--pyc, which imports it from a copy with its bytecode compiled once (the
installed form, as the systemd unit runs it).  After every upload the
object is checked with a HEAD (size; a Static Large Object exactly for the
segmented tools), deleted with its segments (multipart-manifest=delete)
and both containers must list empty, so every run starts from the same
Swift state.

For each run: wall time of the child process, its CPU time and peak RSS
(ru_maxrss from os.wait4), and the CPU time the four Swift servers burnt
meanwhile (/proc/PID/stat).  Children are started by benchlib.Spawner, a
helper forked before anything big is imported, so a child's ru_maxrss is
not inflated by this process.  The agent child also reports its start-up
(import + config) and upload time.  The load average before and after is
recorded (the machine may be shared).

Prints a Markdown table (medians): the agent's single PUT against the
CLI's, the agent's SLO against the CLI's SLO with the same segment size
(ratio = agent / CLI); --json FILE also writes the raw numbers.

Usage (from the repo root; the servers and the swift CLI from
.venv-openstack, which tests/run.sh makes; $OPENSTACK_VENV or
--openstack-venv points elsewhere):

    .venv/bin/python contrib/bench/swift_upload.py --mb 20 --runs 1
    .venv/bin/python contrib/bench/swift_upload.py --mb 1000 --runs 3 --segment-size 100 --pyc

Swift is always stopped (also on Ctrl-C / SIGTERM) and the work directory
removed; --keep keeps the work dir (logs, Swift's data) and caches the
generated archive in $TMPDIR for the next --keep run (shared with
s3_upload.py); --file PATH uses (or creates and keeps) an archive at PATH.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from urllib.parse import quote

import benchlib
from benchlib import MB

sys.path.insert(0, benchlib.TESTS)

ALL_TOOLS = ("agent", "agent-slo", "swift-cli", "swift-cli-slo", "swift-cli-slo-c")
REFERENCE = {"agent": "swift-cli", "swift-cli": "swift-cli", "agent-slo": "swift-cli-slo",
             "swift-cli-slo": "swift-cli-slo", "swift-cli-slo-c": "swift-cli-slo"}
SEGMENTED = ("agent-slo", "swift-cli-slo", "swift-cli-slo-c")
CONTAINER = "snapshots"
OBJECTS = {"agent": "bench/agent.snap", "agent-slo": "bench/agent.snap"}
CLI_OBJECT = "bench/ref.snap"
SCRUB = ("AWS_", "AZURE_", "VAULT_", "BAO_", "GOOGLE_", "OS_", "ST_", "SWIFTCLIENT_",
         "BENCH_SPEC")


def agent_defaults():
    """(segment_size_mb, concurrency): the agent's defaults from SwiftStorage.keys."""
    if benchlib.REPO not in sys.path:
        sys.path.insert(0, benchlib.REPO)
    import vault_snapshot_agent as vsa
    defaults = dict((k.name, k.default) for k in vsa.SwiftStorage.keys)
    return defaults["segment_size_mb"], defaults["concurrency"]


def object_name(tool):
    return OBJECTS.get(tool, CLI_OBJECT)


def venv_version(python, *dists):
    return json.loads(subprocess.check_output(
        [python, "-c", "import json, sys; from importlib.metadata import version; "
         "print(json.dumps([version(d) for d in sys.argv[1:]]))"] + list(dists),
        universal_newlines=True))


# ----------------------------------------------------------------- bench

class Checker:
    """HEAD, delete and listing checks on the Swift under test (tempauth)."""

    def __init__(self, sw):
        from support import swift_server
        self.sw = sw
        self.request = swift_server.request
        self.token = None

    def call(self, method, path, headers=None):
        if self.token is None:
            self.token = self.sw.login()[0]
        return self.request(method, self.sw.storage_url + path, headers, token=self.token,
                            timeout=300)

    def check_and_delete(self, tool, size, segmented):
        """The object's HEAD (size, SLO or not), then delete it with its
        segments; both containers must be empty afterwards."""
        name = object_name(tool)
        path = "/%s/%s" % (CONTAINER, quote(name))
        head = self.call("HEAD", path)
        got = int(head.headers.get("content-length", -1)) if head.status == 200 else None
        slo = head.headers.get("x-static-large-object", "").lower() == "true"
        if got != size or slo != segmented:
            raise RuntimeError("%s: swift://%s/%s: HEAD %d, %s bytes, SLO %s; file is %d bytes" % (
                tool, CONTAINER, name, head.status, got, slo, size))
        resp = self.call("DELETE", path + ("?multipart-manifest=delete" if slo else ""))
        if resp.status not in (200, 204):
            raise RuntimeError("%s: delete of %s: %d %s" % (tool, name, resp.status, resp.body[:300]))
        for container in (CONTAINER, CONTAINER + "_segments"):
            listing = self.call("GET", "/%s?format=json" % container)
            left = listing.json() if listing.status == 200 and listing.body.strip() else []
            if left:
                raise RuntimeError("%s: %d object(s) left in %s, e.g. %s" % (
                    tool, len(left), container, left[0].get("name")))
        return {"etag": head.headers.get("etag", ""), "slo": slo}


def bench(args, workdir, spawner, tools):
    from support import swift_server

    venv = swift_server.find_openstack_venv(args.openstack_venv)
    python = args.python or sys.executable
    path = benchlib.prepare_archive(args, workdir)
    size = os.path.getsize(path)
    info = benchlib.verify_archive(path)
    load_before = os.getloadavg()

    sw = swift_server.Swift(os.path.join(workdir, "swift"), venv, 24 * 3600)
    with benchlib.stopping(spawner.close, sw.stop):   # spawner.close kills a running child
        t0 = time.time()
        sw.start()
        checker = Checker(sw)
        for container in (CONTAINER, CONTAINER + "_segments"):
            resp = checker.call("PUT", "/" + container)
            if resp.status not in (201, 202):
                raise RuntimeError("create container %s: %d" % (container, resp.status))
        print("Swift %s up in %.1fs (tempauth, data on disk)" % (sw.proxy_url, time.time() - t0),
              flush=True)
        pids = list(sw.pids.values())
        segment_mb = args.segment_size
        storage = {"container": CONTAINER, "prefix": "bench", "auth_url": sw.auth_url,
                   "username": sw.user, "password": sw.key, "concurrency": args.concurrency}
        specs = {}
        for tool, seg in (("agent", args.defaults[0]), ("agent-slo", segment_mb)):
            specs[tool] = benchlib.agent_upload_spec(
                path, "SwiftStorage", "swift_storage", dict(storage, segment_size_mb=seg),
                verify=False, info=info, from_source=not args.pyc)
        agent_dir = benchlib.REPO
        if args.pyc:    # the installed form: a copy with its bytecode compiled once
            agent_dir = benchlib.install_agent(python, workdir)[1]["PYTHONPATH"]
        swift_v, client_v = venv_version(sw.python, "swift", "python-swiftclient")
        versions = {
            "python": benchlib.python_version(python),
            "cli_python": benchlib.python_version(sw.python),
            "swift": swift_v, "python-swiftclient": client_v,
            "agent_sha256": benchlib.agent_sha12(),
        }
        cli = [sw.cli, "-A", sw.auth_url, "-U", sw.user, "-K", sw.key, "upload"]
        uploads = benchlib.Uploads(spawner, workdir, args.timeout, sw.pids["proxy"], "proxy_cpu")

        def take(tool):
            before = sum(benchlib.proc_cpu(pid) for pid in pids)
            if tool in specs:
                r = uploads.run(tool, benchlib.agent_upload_argv(python, agent_dir),
                                benchlib.scrubbed_env(SCRUB, BENCH_SPEC=json.dumps(specs[tool])),
                                child_key="agent")
            else:
                argv = list(cli)
                if tool != "swift-cli":
                    argv += ["--use-slo", "--segment-size", str(segment_mb * benchlib.MIB)]
                if tool == "swift-cli-slo-c":
                    argv += ["--segment-threads", str(args.concurrency)]
                argv += ["--object-name", CLI_OBJECT, CONTAINER, path]
                r = uploads.run(tool, argv, benchlib.scrubbed_env(SCRUB), child_key=None)
            r["swift_cpu"] = sum(benchlib.proc_cpu(pid) for pid in pids) - before
            big = size > args.defaults[0] * benchlib.MIB    # the agent's defaults segment too
            r.update(checker.check_and_delete(tool, size, tool in SEGMENTED or (tool == "agent" and big)))
            return r

        def report(i, tool, r):
            tail = "  (upload %.2fs)" % r["agent"]["upload"] if "agent" in r else ""
            benchlib.upload_progress(i, tool, max(map(len, tools)), r, size, "Swift", "swift_cpu",
                                     tail)

        results = benchlib.interleave(tools, args.runs, take, report)
        return dict(benchlib.stamp(), **{
            "versions": versions, "python_path": python, "cli_path": sw.cli,
            "file_bytes": size, "runs": args.runs, "tools": list(tools), "pyc": args.pyc,
            "segment_size_mib": segment_mb, "concurrency": args.concurrency,
            "defaults": list(args.defaults),
            "load_before": list(load_before), "load_after": list(os.getloadavg()),
            "proxy_peak_rss": benchlib.proc_status(sw.pids["proxy"], "VmHWM"),
            "object_peak_rss": benchlib.proc_status(sw.pids["object"], "VmHWM"),
            "results": results,
        })


def summarize(data):
    rows = benchlib.summarize_uploads(data["results"], "swift_cpu", child_key="agent", every=(),
                                      agent_only=("upload", "setup"))
    for tool, row in rows.items():
        row["proxy_cpu"] = statistics.median(r["proxy_cpu"] for r in data["results"][tool])
    return rows


def labels(data):
    seg, c = data["segment_size_mib"], data["concurrency"]
    default_seg, default_c = data["defaults"]
    form = " (installed, .pyc)" if data.get("pyc") else ", script"
    return {
        "agent": "agent%s: SwiftStorage.upload, defaults (one PUT up to %d MiB)"
                 % (form, default_seg),
        "agent-slo": "agent%s: SLO, %d MiB segments, %d at a time%s"
                     % (form, seg, c, "" if c != default_c else " (the default)"),
        "swift-cli": "`swift upload` (defaults: one PUT)",
        "swift-cli-slo": "`swift upload --use-slo --segment-size %dM` (10 segment threads)" % seg,
        "swift-cli-slo-c": "`swift upload --use-slo --segment-size %dM --segment-threads %d`"
                           % (seg, c),
    }


def table(data):
    rows = summarize(data)
    size = data["file_bytes"]
    names = labels(data)
    lines = [
        "| tool | wall time, median (min-max) | MB/s | peak RSS | client CPU | Swift CPU "
        "| vs | time vs CLI | CPU vs CLI | RSS vs CLI |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tool in data["tools"]:
        r = rows[tool]
        ref = REFERENCE[tool]
        b = rows.get(ref, r)
        lines.append("| %s | %.2f s (%.2f-%.2f) | %.1f | %.1f MB | %.2f s | %.2f s | `%s` "
                     "| %.2fx | %.2fx | %.2fx |" % (
                         names[tool], r["seconds"], r["min"], r["max"], size / MB / r["seconds"],
                         r["rss"] / MB, r["cpu"], r["swift_cpu"], ref, r["seconds"] / b["seconds"],
                         r["cpu"] / b["cpu"], r["rss"] / b["rss"]))
    for tool in ("agent", "agent-slo"):
        if tool in rows:
            b = rows[REFERENCE[tool]]
            lines.append("| %s, of which SwiftStorage.upload | %.2f s | %.1f | - | - | - | `%s` "
                         "| %.2fx | - | - |" % (tool, rows[tool]["upload"],
                                                size / MB / rows[tool]["upload"],
                                                REFERENCE[tool],
                                                rows[tool]["upload"] / b["seconds"]))
    v = data["versions"]
    lines.append("")
    lines.append(
        "%d runs each, interleaved; %.1f MB archive; Swift %s all in one (tempauth, 1 replica, "
        "data on disk; proxy peak RSS %.0f MB, object server %.0f MB); agent on Python %s, "
        "sha256 `%s`; python-swiftclient %s on Python %s; load average %.2f before, %.2f after; "
        "%s; %s." % (data["runs"], size / MB, v["swift"], data["proxy_peak_rss"] / MB,
                     data["object_peak_rss"] / MB, v["python"], v["agent_sha256"],
                     v["python-swiftclient"], v["cli_python"], data["load_before"][0],
                     data["load_after"][0], data["machine"], data["date"]))
    return "\n".join(lines)


def add_options(parser):
    parser.add_argument("--segment-size", type=int, metavar="MIB",
                        help="segment size of agent-slo (segment_size_mb) and of the CLI's "
                             "--use-slo runs (100, or a quarter of a smaller file)")
    parser.add_argument("--concurrency", type=int, metavar="N",
                        help="agent concurrency (default: the agent's default), and "
                             "swift-cli-slo-c's --segment-threads")
    parser.add_argument("--no-cli-c", action="store_true",
                        help="leave out swift-cli-slo-c")
    parser.add_argument("--pyc", action="store_true",
                        help="the agent child imports the agent from a copy with compiled "
                             "bytecode (the installed form, as the systemd unit runs it) "
                             "instead of compiling it from source as a script run does")


def add_client_options(parser):
    parser.add_argument("--openstack-venv", help="venv with swift and python-swiftclient "
                                                 "(default: $OPENSTACK_VENV, .venv-openstack)")


def main(argv=None):
    parser = benchlib.upload_parser(__doc__, add_options, add_client_options)
    args = benchlib.parse_upload_args(parser, argv)
    if args.segment_size is None:
        args.segment_size = max(1, min(100, int(args.mb * MB / benchlib.MIB / 4)))
    if args.segment_size < 1 or (args.concurrency is not None and args.concurrency < 1):
        parser.error("--segment-size >= 1 and --concurrency >= 1")
    if args.segment_size * benchlib.MIB >= args.mb * MB:
        parser.error("--segment-size must be below the file size for the SLO runs to segment")
    spawner = benchlib.Spawner()   # before anything big gets imported or allocated
    args.defaults = agent_defaults()      # imports the agent: after the fork
    args.concurrency = args.concurrency or args.defaults[1]
    tools = tuple(t for t in ALL_TOOLS if not (args.no_cli_c and t == "swift-cli-slo-c"))
    return benchlib.run_bench(args, "swift-upload-bench.",
                              lambda wd: bench(args, wd, spawner, tools), table, "Swift",
                              summarize=lambda d: d.update(summary=summarize(d)),
                              spawner=spawner, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
