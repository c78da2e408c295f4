#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: uploading one big snapshot to S3 (moto), agent vs AWS CLI.

Builds (or reuses, --file) a valid snapshot archive of about --mb MB
(gzip tar of meta.json, state.bin, SHA256SUMS, SHA256SUMS.sealed, laid out
like tests/archives.py but streamed to disk, with incompressible state),
starts a throw-away moto_server on loopback (tests/moto_s3.py) with request
signature and IAM checking ON, then uploads the file --runs times with each
tool, interleaved (the order rotates per round):

  agent       python -c '... vsa.verify_file(F); S3Storage.upload(...)'
              (the agent's own code: streaming archive verification, then
               SigV4 multipart upload, --part-size MiB parts, --concurrency
               threads, x-amz-checksum-sha256 per part)
  aws-cli     aws s3 cp F s3://snapshots/bench/ref.snap --endpoint-url MOTO
              (AWS CLI v1 defaults: 8 MiB parts, 10 threads)
  aws-cli-c4  the same with s3.max_concurrent_requests = 4 in AWS_CONFIG_FILE
              (the agent's default concurrency; parts stay 8 MiB unless
               --aws-match-part-size)

After every upload the object's size is checked with HeadObject and the
object deleted, so every run starts from the same moto state.

For each run: wall time of the child process, its CPU time and peak RSS
(ru_maxrss from os.wait4), and the CPU time moto_server burnt meanwhile
(/proc/PID/stat), which shows whether the client or moto is the bottleneck.
The agent child also reports how long verify_file and upload took.
Children are started by a small helper process forked before anything big
is imported: on Linux a child's ru_maxrss can never be below the RSS of the
process that forked it, and this one holds botocore for the moto set-up.

Prints a Markdown table (medians; ratios against the default AWS CLI);
--json FILE also writes the raw numbers.

Usage (from the repo root; moto in this interpreter's venv, AWS CLI in its
own: python3 -m venv /tmp/awscli-venv && /tmp/awscli-venv/bin/pip install awscli):

    /tmp/tv/bin/python contrib/bench/s3_upload.py --mb 500 --runs 3

moto is always stopped (also on Ctrl-C / SIGTERM) and the work directory
removed; --keep keeps the work dir (logs) and caches the generated archive
in $TMPDIR for the next --keep run; --file PATH uses (or creates and keeps)
an archive at PATH.
"""

import argparse
import gzip
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests"))

TOOLS = ("agent", "aws-cli", "aws-cli-c4")
BUCKET = "snapshots"
KEYS = {"agent": "bench/agent.snap", "aws-cli": "bench/ref.snap", "aws-cli-c4": "bench/ref.snap"}
MB = 1000 * 1000.0
MIB = 1024 * 1024
MTIME = 1764276759

AGENT_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import vault_snapshot_agent as vsa
spec = json.loads(os.environ.pop("BENCH_SPEC"))
cfg = vsa.config_from_dict(spec["config"])
storage = [s for s in vsa.build_storages(cfg) if isinstance(s, vsa.S3Storage)][0]
t1 = time.perf_counter()
info = vsa.verify_file(spec["path"])
t2 = time.perf_counter()
url = storage.upload(info, spec["name"], vsa.Signals())
t3 = time.perf_counter()
print(json.dumps({"setup": t1 - t0, "verify": t2 - t1, "upload": t3 - t2, "url": url,
                  "size": info.size, "state_size": info.state_size}))
"""


class Interrupted(Exception):
    pass


def _on_term(signum, frame):
    raise Interrupted("signal %d" % signum)


# ----------------------------------------------------------------- spawner

class Spawner(object):
    """A forked helper that runs the measured children one at a time.

    Forked first thing, while this process is still small: Linux folds the
    forking process's RSS high-water mark into the child's ru_maxrss at
    exec, so children of the (later botocore-laden) main process would
    report at least its size.  Requests and answers are JSON lines on pipes.
    """

    def __init__(self):
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # helper
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
        self.floor_kib = None

    @staticmethod
    def _serve(req, ans):
        import resource
        current = {"pid": None}

        def term(signum, frame):
            if current["pid"]:
                try:
                    os.kill(current["pid"], signal.SIGKILL)
                except OSError:
                    pass
            os._exit(1)

        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGHUP, term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides
        for line in req:
            job = json.loads(line)
            floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            with open(job["log"], "ab") as log:
                t0 = time.perf_counter()
                proc = subprocess.Popen(job["argv"], stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=job["env"],
                                        close_fds=True)
                current["pid"] = proc.pid
                deadline = t0 + job["timeout"]
                timed_out = False
                while True:
                    done, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if done:
                        break
                    if time.perf_counter() > deadline and not timed_out:
                        timed_out = True
                        os.kill(proc.pid, signal.SIGKILL)
                    time.sleep(0.005)
                elapsed = time.perf_counter() - t0
                proc.returncode = 0  # reaped by wait4
                current["pid"] = None
            if os.WIFEXITED(status):
                rc = os.WEXITSTATUS(status)
            else:
                rc = -os.WTERMSIG(status)
            ans.write(json.dumps({"seconds": elapsed, "rc": rc, "timed_out": timed_out,
                                  "maxrss_kib": usage.ru_maxrss, "floor_kib": floor,
                                  "cpu": usage.ru_utime + usage.ru_stime,
                                  "utime": usage.ru_utime, "stime": usage.ru_stime}) + "\n")
            ans.flush()

    def run(self, argv, env, log, timeout):
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
            except (OSError, IOError):
                pass


# ----------------------------------------------------------------- archive

class _RandomState(object):
    """File-like source of ``size`` incompressible bytes (os.urandom in 1 MiB
    blocks), hashing what it hands out."""

    def __init__(self, size):
        self.left = size
        self.sha = hashlib.sha256()
        self._buf = b""

    def read(self, n=-1):
        if self.left <= 0:
            return b""
        if n is None or n < 0:
            n = self.left
        n = min(n, self.left)
        out = []
        while n > 0:
            if not self._buf:
                self._buf = os.urandom(min(MIB, self.left))
            piece, self._buf = self._buf[:n], self._buf[n:]
            out.append(piece)
            n -= len(piece)
            self.left -= len(piece)
        data = b"".join(out)
        self.sha.update(data)
        return data


def _tar_member(tar, name, size, source):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = MTIME
    tar.addfile(info, source)


def write_big_archive(path, state_size, index=4242, term=7, level=1):
    """Stream a valid snapshot archive with ``state_size`` random state bytes
    to ``path`` (via a temp name); same layout as tests/archives.py."""
    import io
    meta = json.dumps({"ID": "%d-%d-%d" % (term, index, MTIME), "Index": index, "Term": term,
                       "Size": state_size, "Version": 1,
                       "Configuration": {"Servers": []}}).encode() + b"\n"
    tmp = path + ".part"
    with open(tmp, "wb") as raw:
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=MTIME)
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            tar.copybufsize = MIB
            _tar_member(tar, "meta.json", len(meta), io.BytesIO(meta))
            state = _RandomState(state_size)
            _tar_member(tar, "state.bin", state_size, state)
            sums = ("%s  meta.json\n%s  state.bin\n" % (hashlib.sha256(meta).hexdigest(),
                                                        state.sha.hexdigest())).encode()
            _tar_member(tar, "SHA256SUMS", len(sums), io.BytesIO(sums))
            _tar_member(tar, "SHA256SUMS.sealed", 11, io.BytesIO(b"sealed-sums"))
        gz.close()
    os.rename(tmp, path)


def prepare_archive(args, workdir):
    """(path, created?, keep?) of the archive to upload."""
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


# ----------------------------------------------------------------- helpers

def proc_cpu(pid):
    """utime+stime (seconds) of a process and its reaped children, or 0."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        # fields[0] is state (field 3); utime=14, stime=15, cutime=16, cstime=17
        return sum(int(fields[i - 3]) for i in (14, 15, 16, 17)) / float(ticks)
    except (OSError, ValueError, IndexError):
        return 0.0


def proc_status(pid, key):
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def base_env(**extra):
    env = dict((k, v) for k, v in os.environ.items()
               if not (k.startswith("AWS_") or k.startswith("VAULT_") or k.startswith("BAO_")
                       or k == "BENCH_SPEC"))
    env.update(extra)
    return env


def find_aws(explicit):
    for cand in (explicit, "/tmp/awscli-venv/bin/aws", shutil.which("aws")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise SystemExit("aws CLI not found: python3 -m venv /tmp/awscli-venv && "
                     "/tmp/awscli-venv/bin/pip install awscli (or --aws PATH)")


# ----------------------------------------------------------------- bench

def bench(args, workdir, spawner):
    from moto_s3 import MotoServer

    aws = find_aws(args.aws)
    python = args.python or sys.executable
    path = prepare_archive(args, workdir)
    size = os.path.getsize(path)

    moto_tmp = os.path.join(workdir, "moto-tmp")   # moto spools big objects to temp files
    os.makedirs(moto_tmp)
    saved_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = moto_tmp
    moto = MotoServer(os.path.join(workdir, "moto"))
    try:
        t0 = time.time()
        try:
            moto.start()
        finally:
            if saved_tmp is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_tmp
        moto.setup()
        moto.enable_auth()
        print("moto %s up and set up in %.1fs (auth on)" % (moto.endpoint, time.time() - t0),
              flush=True)

        cfg_default = os.path.join(workdir, "aws-default.cfg")
        cfg_c4 = os.path.join(workdir, "aws-c4.cfg")
        creds_file = os.path.join(workdir, "aws-credentials")
        for name, lines in ((cfg_default, ["[default]"]),
                            (cfg_c4, ["[default]", "s3 =",
                                      "    max_concurrent_requests = %d" % args.concurrency] +
                             (["    multipart_chunksize = %dMB" % args.part_size]
                              if args.aws_match_part_size else [])),
                            (creds_file, [])):
            with open(name, "w") as fh:
                fh.write("\n".join(lines) + "\n")
        aws_env = base_env(AWS_ACCESS_KEY_ID=moto.access_key_id,
                           AWS_SECRET_ACCESS_KEY=moto.secret_access_key,
                           AWS_DEFAULT_REGION=moto.region, AWS_REGION=moto.region,
                           AWS_EC2_METADATA_DISABLED="true",
                           AWS_SHARED_CREDENTIALS_FILE=creds_file)
        agent_spec = {"path": path, "name": "agent.snap", "config": {
            "addr": "http://127.0.0.1:8200", "token": "unused-by-this-bench",
            "aws_storage": {"access_key_id": moto.access_key_id,
                            "secret_access_key": moto.secret_access_key,
                            "s3_endpoint": moto.endpoint, "s3_region": moto.region,
                            "s3_bucket": BUCKET, "s3_key_prefix": "bench",
                            "part_size_mb": args.part_size, "concurrency": args.concurrency}}}
        versions = {
            "python": subprocess.check_output([python, "-c", "import platform; "
                                               "print(platform.python_version())"],
                                              universal_newlines=True).strip(),
            "aws": subprocess.check_output([aws, "--version"], stderr=subprocess.STDOUT,
                                           env=aws_env, universal_newlines=True).strip(),
            "moto": subprocess.check_output([sys.executable, "-c", "import moto; "
                                             "print(moto.__version__)"],
                                            universal_newlines=True).strip(),
        }
        count = [0]

        def take(tool):
            count[0] += 1
            log = os.path.join(workdir, "run%03d-%s.log" % (count[0], tool))
            if tool == "agent":
                argv = [python, "-c", AGENT_CHILD, REPO]
                env = base_env(BENCH_SPEC=json.dumps(agent_spec))
            else:
                argv = [aws, "s3", "cp", path, "s3://%s/%s" % (BUCKET, KEYS[tool]),
                        "--endpoint-url", moto.endpoint, "--no-progress"]
                env = dict(aws_env, AWS_CONFIG_FILE=cfg_c4 if tool == "aws-cli-c4"
                           else cfg_default)
            moto_before = proc_cpu(moto.pid)
            r = spawner.run(argv, env, log, args.timeout)
            r["moto_cpu"] = proc_cpu(moto.pid) - moto_before
            if r["rc"] != 0:
                with open(log, "rb") as fh:
                    tail = fh.read()[-3000:].decode("utf-8", "replace")
                raise RuntimeError("%s %s after %.0fs:\n%s" % (
                    tool, "timed out" if r["timed_out"] else "exited %d" % r["rc"],
                    r["seconds"], tail))
            if tool == "agent":
                with open(log) as fh:
                    lines = [l for l in fh.read().splitlines() if l.startswith("{")]
                r["agent"] = json.loads(lines[-1])
            head = moto.head(BUCKET, KEYS[tool])
            if head["ContentLength"] != size:
                raise RuntimeError("%s: s3://%s/%s is %d bytes, file is %d" % (
                    tool, BUCKET, KEYS[tool], head["ContentLength"], size))
            r["etag"] = head.get("ETag", "")
            moto.admin.delete_object(Bucket=BUCKET, Key=KEYS[tool])
            return r

        results = dict((t, []) for t in TOOLS)
        for i in range(args.runs):
            order = TOOLS[i % len(TOOLS):] + TOOLS[:i % len(TOOLS)]
            for tool in order:
                r = take(tool)
                results[tool].append(r)
                extra = ""
                if "agent" in r:
                    extra = "  (verify %.2fs, upload %.2fs)" % (r["agent"]["verify"],
                                                                r["agent"]["upload"])
                print("run %d %-10s %7.2fs %7.1f MB/s  client CPU %6.2fs  moto CPU %6.2fs  "
                      "RSS %6.1f MB%s" % (i + 1, tool, r["seconds"], size / MB / r["seconds"],
                                          r["cpu"], r["moto_cpu"], r["maxrss_kib"] * 1024 / MB,
                                          extra), flush=True)
        return {
            "date": time.strftime("%Y-%m-%d"),
            "machine": "%s %s, %d cores" % (platform.system(), platform.machine(),
                                            os.cpu_count() or 0),
            "versions": versions, "python_path": python, "aws_path": aws,
            "file_bytes": size, "runs": args.runs, "part_size_mib": args.part_size,
            "concurrency": args.concurrency, "aws_match_part_size": args.aws_match_part_size,
            "moto_peak_rss": proc_status(moto.pid, "VmHWM"),
            "setup_seconds": round(time.time() - t0, 1),
            "results": results,
        }
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        spawner.close()     # kills a child still running
        moto.stop()


def summarize(data):
    rows = {}
    for tool, runs in data["results"].items():
        rows[tool] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "min": min(r["seconds"] for r in runs),
            "max": max(r["seconds"] for r in runs),
            "cpu": statistics.median(r["cpu"] for r in runs),
            "moto_cpu": statistics.median(r["moto_cpu"] for r in runs),
            "rss": max(r["maxrss_kib"] for r in runs) * 1024,
            "rss_floor": max(r["floor_kib"] for r in runs) * 1024,
        }
        if tool == "agent":
            for part in ("verify", "upload", "setup"):
                rows[tool][part] = statistics.median(r["agent"][part] for r in runs)
    return rows


def table(data):
    rows = summarize(data)
    size = data["file_bytes"]
    base = rows["aws-cli"]
    c = data["concurrency"]
    label = {
        "agent": "agent: verify_file + S3Storage.upload (%d MiB parts, %d threads)"
                 % (data["part_size_mib"], c),
        "aws-cli": "`aws s3 cp` (defaults: 8 MiB parts, 10 threads)",
        "aws-cli-c4": "`aws s3 cp`, max_concurrent_requests = %d%s" % (
            c, ", %d MiB parts" % data["part_size_mib"] if data["aws_match_part_size"]
            else " (8 MiB parts)"),
    }
    lines = [
        "| tool | wall time, median (min-max) | MB/s | peak RSS | client CPU | moto CPU "
        "| time vs aws cli | RSS vs aws cli |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tool in TOOLS:
        r = rows[tool]
        lines.append("| %s | %.2f s (%.2f-%.2f) | %.1f | %.1f MB | %.2f s | %.2f s | %.2fx | %.2fx |"
                     % (label[tool], r["seconds"], r["min"], r["max"], size / MB / r["seconds"],
                        r["rss"] / MB, r["cpu"], r["moto_cpu"], r["seconds"] / base["seconds"],
                        r["rss"] / base["rss"]))
    a = rows["agent"]
    for part, text in (("verify", "agent, of which verify_file"),
                       ("upload", "agent, of which S3Storage.upload")):
        lines.append("| %s | %.2f s | %.1f | - | - | - | %.2fx | - |" % (
            text, a[part], size / MB / a[part], a[part] / base["seconds"]))
    lines.append("")
    lines.append("%d runs each, interleaved; %.1f MB archive; moto %s with auth on "
                 "(peak RSS %.0f MB); Python %s; %s; %s; %s." % (
                     data["runs"], size / MB, data["versions"]["moto"],
                     data["moto_peak_rss"] / MB, data["versions"]["python"],
                     data["versions"]["aws"].split(" Linux")[0], data["machine"], data["date"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=500, help="archive size in MB (500)")
    parser.add_argument("--file", help="archive to upload: reused if it exists, else created "
                                       "there and kept")
    parser.add_argument("--runs", type=int, default=3, help="uploads per tool (3)")
    parser.add_argument("--part-size", type=int, default=16, metavar="MIB",
                        help="agent part_size_mb (16)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="agent concurrency, and the AWS CLI's in aws-cli-c4 (4)")
    parser.add_argument("--aws-match-part-size", action="store_true",
                        help="aws-cli-c4 also uses --part-size (multipart_chunksize)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="kill a single upload after this many seconds (1800)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--python", help="interpreter for the agent (default: this one)")
    parser.add_argument("--aws", help="aws CLI (default: /tmp/awscli-venv/bin/aws, PATH)")
    parser.add_argument("--workdir", help="parent of the work dir (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (logs) and cache the archive in $TMPDIR")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.mb <= 0:
        parser.error("--runs and --mb must be positive")
    if args.part_size < 5 or args.concurrency < 1:
        parser.error("--part-size >= 5 and --concurrency >= 1")

    spawner = Spawner()   # before anything big gets imported or allocated
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    workdir = tempfile.mkdtemp(prefix="s3-upload-bench.", dir=args.workdir)
    try:
        data = bench(args, workdir, spawner)
    except (KeyboardInterrupt, Interrupted) as exc:
        print("interrupted (%s); moto stopped" % (str(exc) or "Ctrl-C"), file=sys.stderr)
        return 130
    finally:
        spawner.close()
        if args.keep:
            print("work dir kept: %s" % workdir, file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(data))
    if args.json:
        data["summary"] = summarize(data)
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
