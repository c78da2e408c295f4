#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: one big snapshot uploaded to S3 (moto) through an HTTP proxy
(tinyproxy, with BasicAuth) against the same upload made directly.

Builds (or reuses, --file) a valid snapshot archive of about --mb MB (the
generator and cache file of s3_upload.py, in benchlib), checks it once with
vsa.verify_file (untimed), starts a throw-away moto_server on loopback
(tests/support/moto_s3.py; request signature and IAM checking ON) and a tinyproxy
(tests/support/tinyproxy.py; BasicAuth, LogLevel Connect), then uploads the file
--runs times each way, interleaved (the order rotates per round):

  direct   python -c '... S3Storage.upload(SnapshotInfo(...))' with
           aws_storage.proxy = "direct"
  proxy    the same with aws_storage.proxy = "http://USER:PASSWORD@127.0.0.1:PORT":
           every request in absolute form through tinyproxy
           (Proxy-Authorization on each), which opens its own connection
           to moto per request

Both use the agent's own code: SigV4 multipart upload in --part-size MiB
parts on --concurrency threads, x-amz-checksum-sha256 per part.  After
every upload the object's size is checked with HeadObject and the object
deleted; the proxy's log must show the proxied run's PUTs and none of the
direct run's.

For each run: wall time of the child process, its CPU time and peak RSS
(ru_maxrss from os.wait4; children start from benchlib.Spawner, forked
before anything big is imported), the CPU time moto and tinyproxy burnt
meanwhile (/proc/PID/stat), and the child's own start-up and upload times.

Prints a Markdown table (medians; ratios against direct) and the proxied /
direct time ratio; --json FILE also writes the raw numbers.

Usage (from the repo root, after tests/run.sh has built .venv, or any venv
with moto[server]; tinyproxy from the distribution: apt-get install
tinyproxy):

    .venv/bin/python contrib/bench/s3_proxy.py            # 100 MB, 5 rounds

moto and tinyproxy are always stopped (also on Ctrl-C / SIGTERM) and the
work directory removed; --keep keeps the work dir (logs, tinyproxy's
request log) and caches the archive in $TMPDIR; --file PATH uses (or
creates and keeps) an archive at PATH.
"""

import json
import os
import statistics
import sys
import time

import benchlib
from benchlib import MB

sys.path.insert(0, benchlib.TESTS)

TOOLS = ("direct", "proxy")
BUCKET = "snapshots"
PREFIXES = {"direct": "bench-direct", "proxy": "bench-proxy"}
PROXY_USER = "bench"
SCRUB = ("AWS_", "VAULT_", "BAO_", "BENCH_SPEC", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
         "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy")


def start_moto(workdir):
    """moto_server, set up, auth on; its big objects spool under workdir."""
    from support.moto_s3 import MotoServer
    moto_tmp = os.path.join(workdir, "moto-tmp")
    os.makedirs(moto_tmp)
    moto = MotoServer(os.path.join(workdir, "moto"))
    benchlib.start_with_tmpdir(moto, moto_tmp)
    moto.setup()
    moto.enable_auth()
    return moto


def tinyproxy_version(binary):
    import subprocess
    out = subprocess.run([binary, "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True).stdout
    return out.strip().split()[-1] if out.strip() else "?"


# ----------------------------------------------------------------- bench

def bench(args, workdir, spawner):
    from support.tinyproxy import Tinyproxy, TinyproxyError, find_tinyproxy

    try:
        tinyproxy_bin = find_tinyproxy(args.tinyproxy)
    except TinyproxyError as exc:
        raise SystemExit(str(exc)) from None
    python = args.python or sys.executable
    path = benchlib.prepare_archive(args, workdir)
    size = os.path.getsize(path)
    info = benchlib.verify_archive(path)

    proxy = Tinyproxy(os.path.join(workdir, "tinyproxy"), PROXY_USER,
                      "pw-" + os.urandom(12).hex(), binary=tinyproxy_bin)
    moto = None

    def stop_moto():
        if moto is not None:
            moto.stop()

    with benchlib.stopping(spawner.close, proxy.stop, stop_moto):
        t0 = time.time()
        moto = start_moto(workdir)
        proxy.start()
        print("moto %s (auth on) and tinyproxy %s up in %.1fs" % (
            moto.endpoint, proxy.open_url, time.time() - t0), flush=True)

        def spec(tool):
            block = {"access_key_id": moto.access_key_id,
                     "secret_access_key": moto.secret_access_key,
                     "s3_endpoint": moto.endpoint, "s3_region": moto.region,
                     "s3_bucket": BUCKET, "s3_key_prefix": PREFIXES[tool],
                     "part_size_mb": args.part_size, "concurrency": args.concurrency,
                     "proxy": proxy.url if tool == "proxy" else "direct"}
            return benchlib.agent_upload_spec(path, "S3Storage", "aws_storage", block,
                                              verify=False, info=info)

        specs = dict((tool, spec(tool)) for tool in TOOLS)
        versions = {
            "python": benchlib.python_version(python),
            "moto": __import__("moto").__version__,
            "tinyproxy": tinyproxy_version(tinyproxy_bin),
            "agent_sha256": benchlib.agent_sha12(),
        }
        uploads = benchlib.Uploads(spawner, workdir, args.timeout, moto.pid, "moto_cpu")

        def take(tool):
            key = "%s/agent.snap" % PREFIXES[tool]
            mark = proxy.mark()
            proxy_before = benchlib.proc_cpu(proxy.pid)
            r = uploads.run(tool, benchlib.agent_upload_argv(python),
                            benchlib.scrubbed_env(SCRUB, BENCH_SPEC=json.dumps(specs[tool])))
            r["proxy_cpu"] = benchlib.proc_cpu(proxy.pid) - proxy_before
            puts = [line for line in proxy.requests(mark)
                    if line.startswith("PUT %s/%s/%s" % (moto.endpoint, BUCKET, key))]
            r["proxied_puts"] = len(puts)
            if (tool == "proxy") != bool(puts):
                raise RuntimeError("%s: tinyproxy logged %d PUTs of %s" % (tool, len(puts), key))
            head = moto.head(BUCKET, key)
            if head["ContentLength"] != size:
                raise RuntimeError("%s: s3://%s/%s is %d bytes, file is %d" % (
                    tool, BUCKET, key, head["ContentLength"], size))
            moto.admin.delete_object(Bucket=BUCKET, Key=key)
            return r

        def report(i, tool, r):
            tail = "  tinyproxy CPU %5.2fs  (upload %.2fs, %d PUTs proxied)" % (
                r["proxy_cpu"], r["child"]["upload"], r["proxied_puts"])
            benchlib.upload_progress(i, tool, 6, r, size, "moto", "moto_cpu", tail)

        if args.warmup:
            take("direct")          # untimed: first-touch costs of moto and the page cache
        results = benchlib.interleave(TOOLS, args.runs, take, report)
        return dict(benchlib.stamp(), **{
            "versions": versions, "python_path": python, "tinyproxy_path": tinyproxy_bin,
            "file_bytes": size, "runs": args.runs, "part_size_mib": args.part_size,
            "concurrency": args.concurrency, "warmup": args.warmup,
            "moto_peak_rss": benchlib.proc_status(moto.pid, "VmHWM"),
            "tinyproxy_peak_rss": benchlib.proc_status(proxy.pid, "VmHWM"),
            "setup_seconds": round(time.time() - t0, 1),
            "results": results,
        })


def summarize(data):
    rows = benchlib.summarize_uploads(data["results"], "moto_cpu", every=("upload", "setup"),
                                      agent_only=())
    for tool, runs in data["results"].items():
        rows[tool]["proxy_cpu"] = statistics.median(r["proxy_cpu"] for r in runs)
    return rows


def table(data):
    rows = summarize(data)
    size = data["file_bytes"]
    base = rows["direct"]
    labels = {
        "direct": "direct (`proxy: direct`)",
        "proxy": "through tinyproxy (`proxy: http://user:***@127.0.0.1:PORT`)",
    }
    lines = [
        "| path | wall time, median (min-max) | MB/s | upload only | peak RSS | client CPU "
        "| moto CPU | tinyproxy CPU | time vs direct | RSS vs direct |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tool in TOOLS:
        r = rows[tool]
        lines.append("| %s | %.2f s (%.2f-%.2f) | %.1f | %.2f s | %.1f MB | %.2f s | %.2f s "
                     "| %.2f s | %.2fx | %.2fx |" % (
                         labels[tool], r["seconds"], r["min"], r["max"],
                         size / MB / r["seconds"], r["upload"], r["rss"] / MB, r["cpu"],
                         r["moto_cpu"], r["proxy_cpu"], r["seconds"] / base["seconds"],
                         r["rss"] / base["rss"]))
    p = rows["proxy"]
    v = data["versions"]
    lines += [
        "",
        "Through the proxy / direct: wall time %.2fx, upload alone %.2fx, peak RSS %.2fx." % (
            p["seconds"] / base["seconds"], p["upload"] / base["upload"], p["rss"] / base["rss"]),
        "",
        "%d runs each, interleaved%s; %.1f MB archive; %d MiB parts, %d threads; moto %s with "
        "auth on (peak RSS %.0f MB); tinyproxy %s with BasicAuth (peak RSS %.1f MB); Python %s; "
        "agent sha256 `%s`; %s; %s." % (
            data["runs"], " after one untimed direct upload" if data["warmup"] else "",
            size / MB, data["part_size_mib"], data["concurrency"], v["moto"],
            data["moto_peak_rss"] / MB, v["tinyproxy"], data["tinyproxy_peak_rss"] / MB,
            v["python"], v["agent_sha256"], data["machine"], data["date"]),
    ]
    return "\n".join(lines)


def add_options(parser):
    parser.add_argument("--part-size", type=int, default=16, metavar="MIB",
                        help="part_size_mb (16)")
    parser.add_argument("--concurrency", type=int, default=4, help="upload threads (4)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="no untimed direct upload before the rounds")


def add_client_options(parser):
    parser.add_argument("--tinyproxy", help="tinyproxy binary (default: $TINYPROXY_BIN, PATH)")


def main(argv=None):
    parser = benchlib.upload_parser(__doc__, add_options, add_client_options)
    parser.set_defaults(mb=100, runs=5)
    for action in parser._actions:           # the shared --help texts name the other defaults
        if action.dest == "mb":
            action.help = "archive size in MB (100)"
        elif action.dest == "runs":
            action.help = "uploads per path (5)"
    args = benchlib.parse_upload_args(parser, argv)
    if args.part_size < 5 or args.concurrency < 1:
        parser.error("--part-size >= 5 and --concurrency >= 1")
    spawner = benchlib.Spawner()   # before anything big gets imported or allocated
    return benchlib.run_bench(args, "s3-proxy-bench.", lambda wd: bench(args, wd, spawner),
                              table, "moto and tinyproxy",
                              summarize=lambda d: d.update(summary=summarize(d)),
                              spawner=spawner, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
