#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: the whole "snapshot a real cluster into S3" job, agent vs bao + aws CLI.

Starts a throw-away 3-node OpenBao cluster on loopback (tests/support/bao_cluster.py)
and moto's S3 server with signature and IAM checking ON (tests/support/moto_s3.py),
writes about --mb MiB of incompressible KV data, then runs each job --runs
times, interleaved (the order rotates per round), after one untimed round:

  agent    python3 vault_snapshot_agent.py -c CFG --once
           CFG: addr (the leader), AppRole role_id/secret_id and one
           aws_storage block (moto endpoint - path-style is automatic for
           127.0.0.1 -, the moto user's access keys, bucket `snapshots`,
           prefix `bench`).  Logs in, checks it is on the leader, streams
           and verifies the snapshot into a temporary file, uploads it
           (multipart, 16 MiB parts, 4 threads) and removes the file.
  bao+aws  what a user would otherwise script, timed as one job:
             bao operator raft snapshot save FILE     (BAO_ADDR, BAO_TOKEN)
             aws s3 cp FILE s3://snapshots/bench-ref/x.snap --endpoint-url MOTO
           wall time and CPU are the sum of the two steps, peak RSS the
           larger of the two.  The token comes from one AppRole login done
           beforehand (not timed); FILE is removed after each run (not timed).

After every run the uploaded object is checked (exactly one object under
the job's prefix, no multipart upload left, HeadObject size equal to FILE's
for bao+aws, within 1 % of the bao snapshot of the same round for the agent,
whose temporary file is gone by then) and deleted, so every run starts from
the same state.  --mb also takes an increasing list (`--mb 100,1000`): the
cluster is topped up to each size in turn and every size is measured in the
same run.

Measured per child process: wall time from spawn to exit, CPU (user+sys)
and peak RSS (ru_maxrss from os.wait4; the children start from a small
helper process forked before anything big is imported, so the harness's
memory does not count - see benchlib.Spawner), plus the CPU moto_server and
the leader burnt during each job (/proc/PID/stat).  Prints a Markdown table
with ratios against the bao+aws pipeline; --json FILE also writes the raw
numbers.

Usage (from the repo root; `bao` and moto in this interpreter's venv, the
AWS CLI in its own: python3 -m venv /tmp/awscli-venv &&
/tmp/awscli-venv/bin/pip install awscli):

    .venv/bin/python contrib/bench/s3_pipeline.py --mb 100 --runs 3

Stdlib only (moto's botocore is used by tests/support/moto_s3.py for the set-up and
the checks).  The cluster and moto are always stopped (also on Ctrl-C /
SIGTERM) and the work directory removed unless --keep.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import benchlib
from benchlib import AGENT, MB, MIB

sys.path.insert(0, benchlib.TESTS)

from support.bao_cluster import BaoCluster, find_bao
from local_snapshot import mib_list, settle
from support.moto_s3 import MotoServer

JOBS = ("agent", "bao+aws")
BUCKET = "snapshots"
AGENT_PREFIX = "bench/"
REF_KEY = "bench-ref/x.snap"
SCRUB = ("AWS_", "VAULT_", "BAO_", "BENCH_SPEC")
SIZE_TOLERANCE = 0.01   # agent object vs the bao snapshot of the same round


class Jobs:
    """Runs the two jobs through the Spawner and checks what they left in S3."""

    def __init__(self, spawner, workdir, timeout, moto, cluster, leader, argv, envs):
        self.spawner = spawner
        self.workdir = workdir
        self.timeout = timeout
        self.moto = moto
        self.cluster = cluster
        self.leader = leader
        self.argv = argv
        self.envs = envs
        self.count = 0
        self.ref_size = None      # size of the last bao snapshot, for the agent's check
        self.ref_file = os.path.join(workdir, "out", "x.snap")
        self.agent_tmp = os.path.join(workdir, "agent-tmp")

    def _child(self, tool, argv, env):
        self.count += 1
        log = os.path.join(self.workdir, "run%03d-%s.log" % (self.count, tool))
        r = self.spawner.run(argv, env, log, self.timeout)
        benchlib.check_child(tool, r, log)
        r["log"] = log
        if r["maxrss_kib"] <= r["floor_kib"]:
            print("warning: %s ru_maxrss %d KiB is not above the helper's %d KiB" % (
                tool, r["maxrss_kib"], r["floor_kib"]), file=sys.stderr)
        return r

    def _object(self, job, prefix):
        """(key, size) of the one object the job left under prefix; deletes it."""
        keys = self.moto.list_keys(BUCKET, prefix)
        pending = self.moto.list_multipart_uploads(BUCKET, prefix)
        if len(keys) != 1 or pending:
            raise RuntimeError("%s left %d objects and %d multipart uploads under s3://%s/%s" % (
                job, len(keys), len(pending), BUCKET, prefix))
        size = self.moto.head(BUCKET, keys[0])["ContentLength"]
        self.moto.delete_all(BUCKET, prefix)
        return keys[0], size

    def take(self, job):
        moto0 = benchlib.proc_cpu(self.moto.pid)
        leader0 = benchlib.proc_cpu(self.leader.pid)
        if job == "agent":
            r = self._child("agent", self.argv["agent"], self.envs["agent"])
            steps = {"agent": r}
            key, size = self._object(job, AGENT_PREFIX)
            with open(r["log"]) as fh:
                if ("to s3://%s/%s" % (BUCKET, key)) not in fh.read():
                    raise RuntimeError("agent log does not name s3://%s/%s" % (BUCKET, key))
            if self.ref_size and abs(size - self.ref_size) > SIZE_TOLERANCE * self.ref_size:
                raise RuntimeError("agent uploaded %d bytes, bao's snapshot was %d" % (
                    size, self.ref_size))
            left = os.listdir(self.agent_tmp)
            if left:
                raise RuntimeError("agent left %s in its temporary directory" % left)
        else:
            save = self._child("bao", self.argv["bao"], self.envs["bao"])
            file_size = os.path.getsize(self.ref_file)
            cp = self._child("aws", self.argv["aws"], self.envs["aws"])
            steps = {"bao": save, "aws": cp}
            key, size = self._object(job, REF_KEY)
            if size != file_size:
                raise RuntimeError("s3://%s/%s is %d bytes, %s is %d" % (
                    BUCKET, key, size, self.ref_file, file_size))
            os.remove(self.ref_file)
            self.ref_size = file_size
        return {
            "seconds": sum(s["seconds"] for s in steps.values()),
            "cpu": sum(s["cpu"] for s in steps.values()),
            "rss": max(s["maxrss_kib"] for s in steps.values()) * 1024,
            "floor": max(s["floor_kib"] for s in steps.values()) * 1024,
            "moto_cpu": benchlib.proc_cpu(self.moto.pid) - moto0,
            "leader_cpu": benchlib.proc_cpu(self.leader.pid) - leader0,
            "size": size, "key": key,
            "steps": dict((name, {"seconds": s["seconds"], "cpu": s["cpu"],
                                  "rss": s["maxrss_kib"] * 1024})
                          for name, s in steps.items()),
        }


def bench(args, workdir, spawner):
    aws = benchlib.find_aws(args.aws)
    bao = benchlib.real_bao(find_bao(args.bao))
    python = args.python or sys.executable

    cluster = BaoCluster(os.path.join(workdir, "cluster"), bao=bao)
    moto = MotoServer(os.path.join(workdir, "moto"))
    for sub in ("out", "agent-tmp", "moto-tmp"):
        os.makedirs(os.path.join(workdir, sub))
    with benchlib.stopping(spawner.close, moto.stop, cluster.stop):
        t0 = time.time()
        benchlib.start_with_tmpdir(moto, os.path.join(workdir, "moto-tmp"))
        moto.setup()
        moto.enable_auth()
        print("moto %s up (auth on)" % moto.endpoint, flush=True)
        cluster.start()
        print("cluster up in %.1fs (bao %s)" % (cluster.startup_seconds, bao), flush=True)
        role_id, secret_id = cluster.setup_snapshot_approle()
        token = cluster.login_approle(role_id, secret_id)
        leader = cluster.leader()

        cfg_path = os.path.join(workdir, "agent.json")
        benchlib.write_private_json(cfg_path, {
            "addr": leader.addr, "role_id": role_id, "secret_id": secret_id,
            "aws_storage": {"s3_endpoint": moto.endpoint, "s3_region": moto.region,
                            "s3_bucket": BUCKET, "s3_key_prefix": AGENT_PREFIX.rstrip("/"),
                            "access_key_id": moto.access_key_id,
                            "secret_access_key": moto.secret_access_key}})
        aws_config = os.path.join(workdir, "aws-config")
        aws_creds = os.path.join(workdir, "aws-credentials")
        with open(aws_config, "w") as fh:
            fh.write("[default]\n")
        with open(aws_creds, "w") as fh:
            fh.write("")
        aws_env = benchlib.scrubbed_env(
            SCRUB, AWS_ACCESS_KEY_ID=moto.access_key_id,
            AWS_SECRET_ACCESS_KEY=moto.secret_access_key, AWS_DEFAULT_REGION=moto.region,
            AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=aws_config,
            AWS_SHARED_CREDENTIALS_FILE=aws_creds)
        jobs = Jobs(spawner, workdir, args.timeout, moto, cluster, leader, argv={
            "agent": [python, AGENT, "-c", cfg_path, "--once"],
            "bao": [bao, "operator", "raft", "snapshot", "save",
                    os.path.join(workdir, "out", "x.snap")],
            "aws": [aws, "s3", "cp", os.path.join(workdir, "out", "x.snap"),
                    "s3://%s/%s" % (BUCKET, REF_KEY), "--endpoint-url", moto.endpoint],
        }, envs={
            # the agent spools the snapshot under TMPDIR, as bao writes FILE: same disk
            "agent": benchlib.scrubbed_env(SCRUB, TMPDIR=os.path.join(workdir, "agent-tmp")),
            "bao": benchlib.scrubbed_env(SCRUB, BAO_ADDR=leader.addr, BAO_TOKEN=token),
            "aws": aws_env,
        })
        moto.delete_all(BUCKET)
        versions = {
            "python": benchlib.python_version(python),
            "bao": subprocess.check_output([bao, "version"], universal_newlines=True).strip(),
            "aws": subprocess.check_output([aws, "--version"], stderr=subprocess.STDOUT,
                                           env=aws_env, universal_newlines=True).strip(),
            "moto": subprocess.check_output([sys.executable, "-c", "import moto; "
                                             "print(moto.__version__)"],
                                            universal_newlines=True).strip(),
        }

        steps = []
        written = 0
        for step, mib in enumerate(args.mb):
            t1 = time.time()
            written += cluster.fill_kv(mib - written / MIB, prefix="fill%d" % step)
            fill_seconds = time.time() - t1
            waited = settle(cluster, leader)
            print("wrote %.0f MiB of KV data in total (this step %.1fs, settled in %.1fs)" % (
                written / MIB, fill_seconds, waited), flush=True)
            if cluster.leader() is not leader:
                raise RuntimeError("the leader changed; the agent's addr is stale")
            for job in reversed(JOBS):   # untimed: warm caches, and bao's size for the agent
                jobs.take(job)

            def report(i, job, r, mib=mib):
                parts = "  ".join("%s %.2fs %.1f MB" % (name, s["seconds"], s["rss"] / MB)
                                  for name, s in sorted(r["steps"].items()) if len(r["steps"]) > 1)
                print("%g MiB run %d %-7s %6.2fs  CPU %5.2fs  moto %5.2fs  leader %5.2fs  "
                      "RSS %6.1f MB  %7.1f MB  %s" % (
                          mib, i + 1, job, r["seconds"], r["cpu"], r["moto_cpu"],
                          r["leader_cpu"], r["rss"] / MB, r["size"] / MB, parts), flush=True)

            results = benchlib.interleave(JOBS, args.runs, jobs.take, report)
            steps.append({"kv_mib": mib, "kv_bytes_written": written,
                          "fill_seconds": round(fill_seconds, 1), "results": results})
        return dict(benchlib.stamp(), **{
            "versions": versions, "python_path": python, "bao_path": bao, "aws_path": aws,
            "agent_sha256": benchlib.agent_sha12(), "kv_mib": args.mb, "runs": args.runs,
            "moto_peak_rss": benchlib.proc_status(moto.pid, "VmHWM"),
            "total_seconds": round(time.time() - t0, 1), "steps": steps,
        })


def summarize(step):
    rows = {}
    for job, runs in step["results"].items():
        row = benchlib.wall_stats(runs)
        for key in ("cpu", "moto_cpu", "leader_cpu", "size"):
            row[key] = statistics.median(r[key] for r in runs)
        row["rss"] = max(r["rss"] for r in runs)
        row["floor"] = max(r["floor"] for r in runs)
        names = sorted(runs[0]["steps"])
        if len(names) > 1:
            row["steps"] = dict((name, {
                "seconds": statistics.median(r["steps"][name]["seconds"] for r in runs),
                "cpu": statistics.median(r["steps"][name]["cpu"] for r in runs),
                "rss": max(r["steps"][name]["rss"] for r in runs)}) for name in names)
        rows[job] = row
    return rows


LABEL = {
    "agent": "`vault_snapshot_agent.py --once` (aws_storage)",
    "bao+aws": "`bao operator raft snapshot save` + `aws s3 cp`",
    "bao": "of which `bao operator raft snapshot save`",
    "aws": "of which `aws s3 cp`",
}


def table(data):
    head = ["snapshot", "job", "wall time, median (min-max)", "vs bao+aws", "MB/s",
            "CPU (user+sys)", "moto CPU", "peak RSS", "vs bao+aws"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in data["steps"]:
        rows = summarize(step)
        base = rows["bao+aws"]
        size = base["size"]
        for job in JOBS:
            r = rows[job]
            lines.append("| " + " | ".join([
                "%.1f MB" % (size / MB), LABEL[job],
                "%.2f s (%.2f-%.2f)" % (r["seconds"], r["min"], r["max"]),
                "%.2fx" % (r["seconds"] / base["seconds"]),
                "%.0f" % (size / MB / r["seconds"]), "%.2f s" % r["cpu"],
                "%.2f s" % r["moto_cpu"], "%.1f MB" % (r["rss"] / MB),
                "%.2fx" % (r["rss"] / base["rss"])]) + " |")
        for name in ("bao", "aws"):
            s = base["steps"][name]
            lines.append("| " + " | ".join([
                "%.1f MB" % (size / MB), LABEL[name], "%.2f s" % s["seconds"],
                "%.2fx" % (s["seconds"] / base["seconds"]), "%.0f" % (size / MB / s["seconds"]),
                "%.2f s" % s["cpu"], "-", "%.1f MB" % (s["rss"] / MB),
                "%.2fx" % (s["rss"] / base["rss"])]) + " |")
    v = data["versions"]
    lines.append("")
    lines.append(
        "%d runs per job and size, interleaved, after one untimed round; %s MiB of KV data; "
        "agent sha256 %s on Python %s; %s; %s; moto %s with auth on (peak RSS %.0f MB); "
        "\"of which\" rows are medians of each step on its own; %s; %s." % (
            data["runs"], ", ".join("%g" % m for m in data["kv_mib"]), data["agent_sha256"],
            v["python"], v["bao"].split(" (")[0], v["aws"].split(" Linux")[0], v["moto"],
            data["moto_peak_rss"] / MB, data["machine"], data["date"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=mib_list, default=[100.0], metavar="MIB[,MIB...]",
                        help="MiB of KV data to write (100); an increasing list measures "
                             "each size in turn on the same cluster")
    parser.add_argument("--runs", type=int, default=3, help="runs per job (3)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="kill a single child after this many seconds (1800)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--python", help="interpreter for the agent (default: this one)")
    parser.add_argument("--bao", help="bao binary (default: $BAO_BIN, PATH, next to python)")
    parser.add_argument("--aws", help="aws CLI (default: /tmp/awscli-venv/bin/aws, PATH)")
    parser.add_argument("--workdir", help="parent of the work dir (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    spawner = benchlib.Spawner()   # before anything big gets imported or allocated

    def add_summaries(data):
        for step in data["steps"]:
            step["summary"] = summarize(step)

    return benchlib.run_bench(args, "s3-pipeline-bench.", lambda wd: bench(args, wd, spawner),
                              table, "cluster and moto", summarize=add_summaries,
                              spawner=spawner, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
