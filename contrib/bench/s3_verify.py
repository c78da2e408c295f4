#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: re-verifying ("scrubbing") one big snapshot stored in S3 (moto), agent vs AWS CLI.

Builds (or reuses, --file) a valid snapshot archive of about --mb MB (see
s3_upload.py), starts a throw-away moto_server on loopback
(tests/support/moto_s3.py) with request signature and IAM checking ON, and
uploads the archive ONCE with the agent's own S3Storage.upload (its
defaults: multipart, 16 MiB parts, 4 threads, x-amz-checksum-sha256 per
part), under a name of the agent's pattern, so the object carries the
checksum and ETag exactly as the agent writes them.  Then it reads that
object back --runs times with each tool, interleaved (the order rotates
per round):

  agent            python3 vault_snapshot_agent.py -c CFG verify --storage aws NAME
                   (the real command: lists the bucket, then verify_stored
                    -> S3Storage.read_back: HEAD with x-amz-checksum-mode,
                    HEAD ?partNumber=1 for the part size, one GET If-Match
                    the ETag, streamed into StoredCheck: the archive check
                    a restore makes - inflate, tar, SHA-256 of state.bin
                    and SHA256SUMS - plus the SHA-256 of the whole object,
                    compared with the one the agent stored in its metadata
                    at upload; no disk, no copy kept)
  agent-installed  the same as the systemd unit and a pip install run it
                   (python3 -m vault_snapshot_agent, bytecode compiled
                   once): a script run compiles the agent's source first,
                   which costs about 20 MB of peak RSS
  agent-etag       the script with s3_checksum: false in CFG (only with
                   --etag): the upload sends no x-amz-checksum; the
                   read-back still compares the agent's own SHA-256
  aws-cli          aws s3 cp s3://snapshots/bench/NAME /dev/null --endpoint-url MOTO
                   (AWS CLI v1 defaults: ranged GETs of 8 MiB, 10 threads;
                    checks nothing of the archive): the issue's reference
  aws-cli-1get     the same with multipart_threshold above the object's
                   size: one GET, as the agent reads it (--no-1get leaves
                   it out).  moto reads the WHOLE object for every ranged
                   GET and then slices it, so with the defaults moto's CPU
                   grows with the square of the size (1 GB: about 120 reads
                   of 1 GB) and dominates aws-cli's time: this row shows
                   the AWS CLI without that penalty.

Every agent run must print its OK line naming what it compared ("matches
the SHA-256 this agent recorded at upload"): a run that fell back to the
archive check alone fails the benchmark.

For each run: wall time of the child process, its CPU time and peak RSS
(ru_maxrss from os.wait4; children start from a small helper forked before
anything big is imported, see benchlib.Spawner), the CPU time moto_server
burnt meanwhile and its peak RSS so far (/proc/PID).  Prints a Markdown
table (medians; ratios against aws-cli) and, per agent row, whether it
meets the requirement of issue #22: re-verifying takes no longer than `aws
s3 cp s3://bucket/key /dev/null` in the same run, at no more than a third of
its peak RSS.  --json FILE also writes the raw numbers.  --profile adds one
untimed run of the agent script under cProfile and prints where its CPU
went.

Usage (from the repo root; moto in this interpreter's venv, AWS CLI in its
own: python3 -m venv /tmp/awscli-venv && /tmp/awscli-venv/bin/pip install awscli):

    .venv/bin/python contrib/bench/s3_verify.py --mb 20 --runs 1       # quick check
    .venv/bin/python contrib/bench/s3_verify.py --mb 1000 --runs 5 [--etag] [--profile]

moto is always stopped (also on Ctrl-C / SIGTERM) and the work directory
removed; --keep keeps the work dir (logs) and caches the generated archive
in $TMPDIR for the next --keep run; --file PATH uses (or creates and keeps)
an archive at PATH.
"""

import datetime
import json
import os
import re
import subprocess
import sys
import time

import benchlib
from benchlib import AGENT, MB, MIB

sys.path.insert(0, benchlib.TESTS)

BUCKET = "snapshots"
PREFIX = "bench"
SCRUB = ("AWS_", "VAULT_", "BAO_", "BENCH_SPEC")
TAKEN = datetime.datetime(2026, 12, 1, 3, 0, tzinfo=datetime.timezone.utc)   # the name's time
OWN = "matches the SHA-256 this agent recorded at upload"    # every upload keeps it (metadata)
COMPARED = {"agent": OWN, "agent-installed": OWN, "agent-etag": OWN}
OK_LINE = re.compile(r"^OK +aws +(\S+) +.*?\((matches .*)\)$", re.M)
PROFILE_LINES = 25


def load_agent():
    if benchlib.REPO not in sys.path:
        sys.path.insert(0, benchlib.REPO)
    import vault_snapshot_agent as vsa
    return vsa


def tool_list(args):
    return (("agent", "agent-installed") + (("agent-etag",) if args.etag else ())
            + ("aws-cli",) + (() if args.no_1get else ("aws-cli-1get",)))


def storage_block(moto, checksum=True):
    return {"access_key_id": moto.access_key_id, "secret_access_key": moto.secret_access_key,
            "s3_endpoint": moto.endpoint, "s3_region": moto.region, "s3_bucket": BUCKET,
            "s3_key_prefix": PREFIX, "s3_checksum": checksum}


def agent_config(workdir, moto, checksum):
    """A config file for the agent's verify command (no Vault is asked)."""
    path = os.path.join(workdir, "agent-%s.json" % ("sha256" if checksum else "etag"))
    benchlib.write_private_json(path, {
        "addr": "http://127.0.0.1:8200", "token": "unused-by-this-bench",
        "aws_storage": storage_block(moto, checksum)})
    return path


def aws_files(workdir, size):
    """(config with the defaults, config for one GET, empty credentials file)."""
    names = [os.path.join(workdir, n) for n in ("aws-default.cfg", "aws-1get.cfg", "aws-creds")]
    texts = ["[default]\n",
             "[default]\ns3 =\n    multipart_threshold = %dMB\n" % (size // MIB + 64), ""]
    for name, text in zip(names, texts):
        with open(name, "w") as fh:
            fh.write(text)
    return names


def upload_once(uploads, python, path, info, name, moto):
    """The agent's S3Storage.upload with its defaults: the object to read back."""
    spec = benchlib.agent_upload_spec(path, "S3Storage", "aws_storage", storage_block(moto),
                                      verify=False, info=info)
    spec["name"] = name
    r = uploads.run("upload", benchlib.agent_upload_argv(python),
                    benchlib.scrubbed_env(SCRUB, BENCH_SPEC=json.dumps(spec)), child_key="agent")
    key = "%s/%s" % (PREFIX, name)
    head = moto.head(BUCKET, key)
    if head["ContentLength"] != info.size or moto.list_multipart_uploads(BUCKET, PREFIX + "/"):
        raise RuntimeError("s3://%s/%s is %d bytes (file: %d), or an upload was left open" % (
            BUCKET, key, head["ContentLength"], info.size))
    print("uploaded s3://%s/%s with the agent in %.2fs (ETag %s)" % (
        BUCKET, key, r["agent"]["upload"], head.get("ETag", "")), flush=True)
    return key, head.get("ETag", "").strip('"')


def checked_line(log, tool):
    """What the agent compared, from its OK line; RuntimeError without one
    naming the checksum this tool is meant to compare."""
    with open(log) as fh:
        found = OK_LINE.findall(fh.read())
    if len(found) != 1 or not found[0][1].startswith(COMPARED[tool]):
        raise RuntimeError("%s: no OK line comparing %s...: %s" % (tool, COMPARED[tool], found))
    return found[0][1]


def agent_part_size(vsa, size):
    """The part size (MiB) the agent's upload chose for ``size`` bytes."""
    default = dict((k.name, k.default) for k in vsa.S3Storage.keys)["part_size_mb"]
    return vsa.s3_part_size(size, default * MIB) / MIB


# ----------------------------------------------------------------- bench

def commands(args, workdir, python, aws, moto, name, key, size):
    """{tool: (argv, env)} for every tool."""
    env = benchlib.scrubbed_env(SCRUB)
    verify = ["verify", "--storage", "aws", name]
    installed, extra = benchlib.install_agent(python, workdir)
    default_cfg, one_get_cfg, creds = aws_files(workdir, size)
    aws_env = benchlib.scrubbed_env(SCRUB, AWS_ACCESS_KEY_ID=moto.access_key_id,
                                    AWS_SECRET_ACCESS_KEY=moto.secret_access_key,
                                    AWS_DEFAULT_REGION=moto.region, AWS_REGION=moto.region,
                                    AWS_EC2_METADATA_DISABLED="true",
                                    AWS_SHARED_CREDENTIALS_FILE=creds)
    aws_argv = [aws, "s3", "cp", "s3://%s/%s" % (BUCKET, key), "/dev/null",
                "--endpoint-url", moto.endpoint, "--no-progress"]
    cfg, etag_cfg = agent_config(workdir, moto, True), agent_config(workdir, moto, False)
    return {
        "agent": ([python, AGENT, "-c", cfg] + verify, env),
        "agent-installed": (installed + ["-c", cfg] + verify, dict(env, **extra)),
        "agent-etag": ([python, AGENT, "-c", etag_cfg] + verify, env),
        "aws-cli": (aws_argv, dict(aws_env, AWS_CONFIG_FILE=default_cfg)),
        "aws-cli-1get": (aws_argv, dict(aws_env, AWS_CONFIG_FILE=one_get_cfg)),
    }


def bench(args, workdir, spawner):
    from support.moto_s3 import MotoServer

    vsa = load_agent()
    aws = benchlib.find_aws(args.aws)
    python = args.python or sys.executable
    path = benchlib.prepare_archive(args, workdir)
    size = os.path.getsize(path)
    info = benchlib.verify_archive(path)
    name = vsa.snapshot_name(TAKEN)
    tools = tool_list(args)

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
        uploads = benchlib.Uploads(spawner, workdir, args.timeout, moto.pid, "moto_cpu")
        key, etag = upload_once(uploads, python, path, info, name, moto)
        moto_after_upload = benchlib.proc_status(moto.pid, "VmHWM")
        run = commands(args, workdir, python, aws, moto, name, key, size)
        versions = {
            "python": benchlib.python_version(python),
            "aws": subprocess.check_output([aws, "--version"], stderr=subprocess.STDOUT,
                                           env=run["aws-cli"][1], universal_newlines=True).strip(),
            "moto": subprocess.check_output([sys.executable, "-c", "import moto; "
                                             "print(moto.__version__)"],
                                            universal_newlines=True).strip(),
            "agent_sha256": benchlib.agent_sha12(),
        }

        def take(tool):
            r = uploads.run(tool, run[tool][0], run[tool][1], child_key=None)
            r["moto_hwm"] = benchlib.proc_status(moto.pid, "VmHWM")
            if tool in COMPARED:
                r["checked"] = checked_line(
                    os.path.join(workdir, "run%03d-%s.log" % (uploads.count, tool)), tool)
            return r

        def report(i, tool, r):
            benchlib.upload_progress(i, tool, max(map(len, tools)), r, size, "moto", "moto_cpu",
                                     "  moto peak %.0f MB%s" % (
                                         r["moto_hwm"] / MB,
                                         "  (%s)" % r["checked"] if "checked" in r else ""))

        results = benchlib.interleave(tools, args.runs, take, report)
        profile = run_profile(uploads, run["agent"], workdir) if args.profile else None
        return dict(benchlib.stamp(), **{
            "versions": versions, "python_path": python, "aws_path": aws,
            "file_bytes": size, "runs": args.runs, "tools": list(tools),
            "key": key, "etag": etag, "part_size_mib": agent_part_size(vsa, size),
            "moto_peak_rss_after_upload": moto_after_upload,
            "moto_peak_rss": benchlib.proc_status(moto.pid, "VmHWM"),
            "setup_seconds": round(time.time() - t0, 1),
            "results": results, "profile": profile,
        })


def run_profile(uploads, command, workdir):
    """One untimed run of the agent script under cProfile: the head of its
    table by own time (tottime)."""
    argv, env = command
    r = uploads.run("profile", [argv[0], "-m", "cProfile", "-s", "tottime"] + argv[1:], env,
                    child_key=None)
    with open(os.path.join(workdir, "run%03d-profile.log" % uploads.count)) as fh:
        text = fh.read()
    start = text.find("   ncalls")
    lines = text[start:].splitlines()[:PROFILE_LINES + 1] if start >= 0 else []
    total = [line.strip() for line in text.splitlines() if "function calls" in line]
    return {"seconds": r["seconds"], "cpu": r["cpu"], "moto_cpu": r["moto_cpu"],
            "lines": total[-1:] + [""] + lines}


def summarize(data):
    return benchlib.summarize_uploads(data["results"], "moto_cpu", every=(), agent_only=())


def requirement(rows, tool):
    """Issue #22's requirement for one agent row: time <= aws-cli's, peak RSS <= a third."""
    a, b = rows[tool], rows["aws-cli"]
    met = a["seconds"] <= b["seconds"] and a["rss"] * 3 <= b["rss"]
    return "* %s: %s (time %.2fx, peak RSS %.2fx of `aws s3 cp`'s)" % (
        tool, "met" if met else "NOT met", a["seconds"] / b["seconds"], a["rss"] / b["rss"])


def table(data):
    rows = summarize(data)
    size = data["file_bytes"]
    checked = dict((tool, data["results"][tool][0]["checked"])
                   for tool in data["tools"] if tool in COMPARED)
    verify = "`verify --storage aws NAME`"
    labels = {
        "agent": "agent, script: %s (s3_checksum on: %s)" % (verify, checked.get("agent")),
        "agent-installed": "agent, installed (.pyc): %s (%s)" % (
            verify, checked.get("agent-installed")),
        "agent-etag": "agent, script: %s (s3_checksum off: %s)" % (verify, checked.get("agent-etag")),
        "aws-cli": "`aws s3 cp s3://... /dev/null` (defaults: 8 MiB ranged GETs, 10 threads)",
        "aws-cli-1get": "`aws s3 cp s3://... /dev/null`, multipart_threshold > size (one GET)",
    }
    footer = ("%d runs each, interleaved; %.1f MB archive uploaded once by the agent (%g MiB "
              "parts, ETag %s); moto %s with auth on (peak RSS %.0f MB, %.0f MB after the "
              "upload); agent on Python %s, sha256 `%s`; %s; %s; %s." % (
                  data["runs"], size / MB, data["part_size_mib"], data["etag"],
                  data["versions"]["moto"], data["moto_peak_rss"] / MB,
                  data["moto_peak_rss_after_upload"] / MB, data["versions"]["python"],
                  data["versions"]["agent_sha256"], data["versions"]["aws"].split(" Linux")[0],
                  data["machine"], data["date"]))
    lines = [benchlib.upload_table(rows, data["tools"], labels, size, ("aws-cli", "aws cli"),
                                   "moto", "moto_cpu", [], footer), "",
             "Requirement: re-verifying takes no longer than `aws s3 cp ... /dev/null` (defaults), "
             "at no more than a third of its peak RSS:"]
    lines += [requirement(rows, tool) for tool in data["tools"] if tool in COMPARED]
    if data.get("profile"):
        p = data["profile"]
        lines += ["", "agent script under cProfile (untimed; main thread only): %.2f s wall, "
                      "%.2f s CPU, moto %.2f s CPU" % (p["seconds"], p["cpu"], p["moto_cpu"]), ""]
        lines += ["    " + line for line in p["lines"]]
    return "\n".join(lines)


def add_options(parser):
    parser.add_argument("--etag", action="store_true",
                        help="add agent-etag: the agent with s3_checksum off (compares the "
                             "multipart ETag, MD5 of every part)")
    parser.add_argument("--no-1get", action="store_true",
                        help="leave out aws-cli-1get (the AWS CLI reading with one GET)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed runs, one run of the agent script under cProfile; "
                             "prints the top of its table by own time")


def add_client_options(parser):
    parser.add_argument("--aws", help="aws CLI (default: /tmp/awscli-venv/bin/aws, PATH)")


def main(argv=None):
    parser = benchlib.upload_parser(__doc__, add_options, add_client_options)
    args = benchlib.parse_upload_args(parser, argv)
    spawner = benchlib.Spawner()   # before anything big gets imported or allocated
    return benchlib.run_bench(args, "s3-verify-bench.", lambda wd: bench(args, wd, spawner),
                              table, "moto", summarize=lambda d: d.update(summary=summarize(d)),
                              spawner=spawner, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
