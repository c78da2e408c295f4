#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: uploading one big snapshot to S3 (moto), agent vs AWS CLI.

Builds (or reuses, --file) a valid snapshot archive of about --mb MB
(gzip tar of meta.json, state.bin, SHA256SUMS, SHA256SUMS.sealed, laid out
like tests/support/archives.py but streamed to disk, with incompressible state),
checks it once with vsa.verify_file (untimed: that gives the SnapshotInfo
the upload needs), starts a throw-away moto_server on loopback
(tests/support/moto_s3.py) with request signature and IAM checking ON, then uploads
the file --runs times with each tool, interleaved (the order rotates per
round):

  agent       python -c '... S3Storage.upload(SnapshotInfo(...))'
              (the agent's own code, a pure upload as in an agent cycle,
               which verifies while it streams from Vault, not before the
               upload: SigV4 multipart upload, --part-size MiB parts,
               --concurrency threads, x-amz-checksum-sha256 per part; both
               default to the agent's own defaults, read from S3Storage.keys)
              With --verify the child runs vsa.verify_file first (timed
              apart; not part of a real cycle).
              --part-size and --concurrency take comma-separated lists:
              every combination is a tool of its own, agent-<P>x<C>
              (P MiB parts, C threads), all interleaved with the AWS CLI.
  aws-cli     aws s3 cp F s3://snapshots/bench/ref.snap --endpoint-url MOTO
              (AWS CLI v1 defaults: 8 MiB parts, 10 threads)
  aws-cli-c4  the same with s3.max_concurrent_requests = --concurrency in
              AWS_CONFIG_FILE (the agent's concurrency; parts stay 8 MiB
              unless --aws-match-part-size); only with a single agent
              setting, and not with --no-aws-c

After every upload the object's size is checked with HeadObject and the
object deleted, so every run starts from the same moto state.

For each run: wall time of the child process, its CPU time and peak RSS
(ru_maxrss from os.wait4), and the CPU time moto_server burnt meanwhile
(/proc/PID/stat), which shows whether the client or moto is the bottleneck.
The agent child also reports its start-up (import + config) and upload
time (and verify_file's with --verify).
Children are started by a small helper process forked before anything big
is imported: on Linux a child's ru_maxrss can never be below the RSS of the
process that forked it, and this one holds botocore for the moto set-up.

Prints a Markdown table (medians; ratios against the default AWS CLI);
--json FILE also writes the raw numbers.

Usage (from the repo root; moto in this interpreter's venv, AWS CLI in its
own: python3 -m venv /tmp/awscli-venv && /tmp/awscli-venv/bin/pip install awscli):

    .venv/bin/python contrib/bench/s3_upload.py --mb 500 --runs 3
    .venv/bin/python contrib/bench/s3_upload.py --mb 500 --runs 3 \
        --part-size 16,32 --concurrency 4,8      # four agent settings

moto is always stopped (also on Ctrl-C / SIGTERM) and the work directory
removed; --keep keeps the work dir (logs) and caches the generated archive
in $TMPDIR for the next --keep run; --file PATH uses (or creates and keeps)
an archive at PATH.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import benchlib
from benchlib import MB

sys.path.insert(0, benchlib.TESTS)

AWS_TOOLS = ("aws-cli", "aws-cli-c4")
BUCKET = "snapshots"
SCRUB = ("AWS_", "VAULT_", "BAO_", "BENCH_SPEC")


def agent_tools(args):
    """{tool name: (part size MiB, concurrency)} for the agent settings."""
    pairs = [(p, c) for p in args.part_size for c in args.concurrency]
    if len(pairs) == 1:
        return {"agent": pairs[0]}
    return dict(("agent-%dx%d" % pair, pair) for pair in pairs)


def tool_list(args):
    agents = sorted(agent_tools(args).items(), key=lambda item: item[1])
    single = len(agents) == 1
    return tuple(t for t, _ in agents) + tuple(
        t for t in AWS_TOOLS if t == "aws-cli" or (single and not args.no_aws_c))


def object_key(tool):
    return "bench/%s.snap" % ("ref" if tool.startswith("aws") else "agent")


def agent_defaults():
    """(part_size_mb, concurrency): the agent's defaults from S3Storage.keys."""
    if benchlib.REPO not in sys.path:
        sys.path.insert(0, benchlib.REPO)
    import vault_snapshot_agent as vsa
    defaults = dict((k.name, k.default) for k in vsa.S3Storage.keys)
    return defaults["part_size_mb"], defaults["concurrency"]


def write_aws_files(workdir, args):
    """(default config, config for aws-cli-c4, empty credentials file)."""
    cfg_default = os.path.join(workdir, "aws-default.cfg")
    cfg_c4 = os.path.join(workdir, "aws-c4.cfg")
    creds_file = os.path.join(workdir, "aws-credentials")
    c4 = ["[default]", "s3 =", "    max_concurrent_requests = %d" % args.concurrency[0]]
    if args.aws_match_part_size:
        c4.append("    multipart_chunksize = %dMB" % args.part_size[0])
    for name, lines in ((cfg_default, ["[default]"]), (cfg_c4, c4), (creds_file, [])):
        with open(name, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return cfg_default, cfg_c4, creds_file


# ----------------------------------------------------------------- bench

def bench(args, workdir, spawner):
    from support.moto_s3 import MotoServer

    aws = benchlib.find_aws(args.aws)
    python = args.python or sys.executable
    path = benchlib.prepare_archive(args, workdir)
    size = os.path.getsize(path)
    info = benchlib.verify_archive(path)
    tools = tool_list(args)
    settings = agent_tools(args)

    moto_tmp = os.path.join(workdir, "moto-tmp")   # moto spools big objects to temp files
    os.makedirs(moto_tmp)
    moto = MotoServer(os.path.join(workdir, "moto"))
    with benchlib.stopping(spawner.close, moto.stop):   # spawner.close kills a running child
        t0 = time.time()
        benchlib.start_with_tmpdir(moto, moto_tmp)
        moto.setup()
        moto.enable_auth()
        print("moto %s up and set up in %.1fs (auth on)" % (moto.endpoint, time.time() - t0),
              flush=True)

        cfg_default, cfg_c4, creds_file = write_aws_files(workdir, args)
        aws_env = benchlib.scrubbed_env(SCRUB, AWS_ACCESS_KEY_ID=moto.access_key_id,
                                        AWS_SECRET_ACCESS_KEY=moto.secret_access_key,
                                        AWS_DEFAULT_REGION=moto.region, AWS_REGION=moto.region,
                                        AWS_EC2_METADATA_DISABLED="true",
                                        AWS_SHARED_CREDENTIALS_FILE=creds_file)
        specs = dict((tool, benchlib.agent_upload_spec(
            path, "S3Storage", "aws_storage",
            {"access_key_id": moto.access_key_id, "secret_access_key": moto.secret_access_key,
             "s3_endpoint": moto.endpoint, "s3_region": moto.region, "s3_bucket": BUCKET,
             "s3_key_prefix": "bench", "part_size_mb": p, "concurrency": c},
            verify=args.verify, info=info, report=("size", "state_size"),
            from_source=not args.pyc))
            for tool, (p, c) in settings.items())
        agent_dir = benchlib.REPO
        if args.pyc:    # the installed form: a copy with its bytecode compiled once
            agent_dir = benchlib.install_agent(python, workdir)[1]["PYTHONPATH"]
        versions = {
            "python": benchlib.python_version(python),
            "aws": subprocess.check_output([aws, "--version"], stderr=subprocess.STDOUT,
                                           env=aws_env, universal_newlines=True).strip(),
            "moto": subprocess.check_output([sys.executable, "-c", "import moto; "
                                             "print(moto.__version__)"],
                                            universal_newlines=True).strip(),
            "agent_sha256": benchlib.agent_sha12(),
        }
        uploads = benchlib.Uploads(spawner, workdir, args.timeout, moto.pid, "moto_cpu")

        def take(tool):
            key = object_key(tool)
            if tool in specs:
                r = uploads.run(tool, benchlib.agent_upload_argv(python, agent_dir),
                                benchlib.scrubbed_env(SCRUB, BENCH_SPEC=json.dumps(specs[tool])),
                                child_key="agent")
            else:
                argv = [aws, "s3", "cp", path, "s3://%s/%s" % (BUCKET, key),
                        "--endpoint-url", moto.endpoint, "--no-progress"]
                env = dict(aws_env, AWS_CONFIG_FILE=cfg_c4 if tool == "aws-cli-c4"
                           else cfg_default)
                r = uploads.run(tool, argv, env, child_key=None)
            head = moto.head(BUCKET, key)
            if head["ContentLength"] != size:
                raise RuntimeError("%s: s3://%s/%s is %d bytes, file is %d" % (
                    tool, BUCKET, key, head["ContentLength"], size))
            r["etag"] = head.get("ETag", "")
            moto.admin.delete_object(Bucket=BUCKET, Key=key)
            return r

        def report(i, tool, r):
            tail = ""
            if "agent" in r:
                tail = "  (%supload %.2fs)" % (
                    "verify %.2fs, " % r["agent"]["verify"] if args.verify else "",
                    r["agent"]["upload"])
            benchlib.upload_progress(i, tool, max(map(len, tools)), r, size, "moto", "moto_cpu",
                                     tail)

        results = benchlib.interleave(tools, args.runs, take, report)
        return dict(benchlib.stamp(), **{
            "versions": versions, "python_path": python, "aws_path": aws,
            "file_bytes": size, "runs": args.runs, "tools": list(tools),
            "settings": dict((t, list(pc)) for t, pc in settings.items()),
            "defaults": list(args.defaults), "verify": args.verify, "pyc": args.pyc,
            "part_size_mib": args.part_size[0], "concurrency": args.concurrency[0],
            "aws_match_part_size": args.aws_match_part_size,
            "moto_peak_rss": benchlib.proc_status(moto.pid, "VmHWM"),
            "setup_seconds": round(time.time() - t0, 1),
            "results": results,
        })


def summarize(data):
    return benchlib.summarize_uploads(data["results"], "moto_cpu", child_key="agent", every=(),
                                      agent_only=("verify", "upload", "setup"))


def table(data):
    rows = summarize(data)
    size = data["file_bytes"]
    c = data["concurrency"]
    defaults = tuple(data["defaults"])
    labels = {
        "aws-cli": "`aws s3 cp` (defaults: 8 MiB parts, 10 threads)",
        "aws-cli-c4": "`aws s3 cp`, max_concurrent_requests = %d%s" % (
            c, ", %d MiB parts" % data["part_size_mib"] if data["aws_match_part_size"]
            else " (8 MiB parts)"),
    }
    for tool, (p, n) in data["settings"].items():
        labels[tool] = "agent%s: %sS3Storage.upload (%d MiB parts, %d threads%s)" % (
            " (installed, .pyc)" if data.get("pyc") else "",
            "verify_file + " if data["verify"] else "", p, n,
            "; the defaults" if (p, n) == defaults else "")
    parts = []
    if "agent" in rows:
        parts = benchlib.agent_parts(rows, "S3Storage", data["verify"])
    footer = ("%d runs each, interleaved; %.1f MB archive; moto %s with auth on "
              "(peak RSS %.0f MB); agent on Python %s, sha256 `%s`; %s; %s; %s." % (
                  data["runs"], size / MB, data["versions"]["moto"],
                  data["moto_peak_rss"] / MB, data["versions"]["python"],
                  data["versions"]["agent_sha256"],
                  data["versions"]["aws"].split(" Linux")[0], data["machine"], data["date"]))
    return benchlib.upload_table(rows, data["tools"], labels, size, ("aws-cli", "aws cli"), "moto",
                                 "moto_cpu", parts, footer)


def int_list(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("not a comma-separated list of integers: %r" % text) from None
    return sorted(set(values))


def add_options(parser):
    parser.add_argument("--part-size", type=int_list, metavar="MIB[,MIB...]",
                        help="agent part_size_mb (default: the agent's default)")
    parser.add_argument("--concurrency", type=int_list, metavar="N[,N...]",
                        help="agent concurrency (default: the agent's default), and the AWS "
                             "CLI's in aws-cli-c4")
    parser.add_argument("--aws-match-part-size", action="store_true",
                        help="aws-cli-c4 also uses --part-size (multipart_chunksize)")
    parser.add_argument("--no-aws-c", action="store_true",
                        help="leave out aws-cli-c4 (always left out with several agent settings)")
    parser.add_argument("--verify", action="store_true",
                        help="the agent child runs verify_file before the upload (timed apart)")
    parser.add_argument("--pyc", action="store_true",
                        help="the agent child imports the agent from a copy with compiled "
                             "bytecode (the installed form, as the systemd unit runs it) "
                             "instead of compiling it from source as a script run does")


def add_client_options(parser):
    parser.add_argument("--aws", help="aws CLI (default: /tmp/awscli-venv/bin/aws, PATH)")


def main(argv=None):
    parser = benchlib.upload_parser(__doc__, add_options, add_client_options)
    args = benchlib.parse_upload_args(parser, argv)
    if min(args.part_size or [5]) < 5 or min(args.concurrency or [1]) < 1:
        parser.error("--part-size >= 5 and --concurrency >= 1")
    spawner = benchlib.Spawner()   # before anything big gets imported or allocated
    args.defaults = agent_defaults()      # imports the agent: after the fork
    args.part_size = args.part_size or [args.defaults[0]]
    args.concurrency = args.concurrency or [args.defaults[1]]
    return benchlib.run_bench(args, "s3-upload-bench.", lambda wd: bench(args, wd, spawner),
                              table, "moto", summarize=lambda d: d.update(summary=summarize(d)),
                              spawner=spawner, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
