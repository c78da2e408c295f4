"""Faults and hostile input against the real servers.

Everything here runs the real agent (``vsa.main`` in-process, or the script
as a subprocess) against the real 3-node OpenBao cluster and the real storage
emulators, with tests/faultproxy.py in between to cut, delay, reset or answer
instead of a server. What is checked is what an operator would see: exit
codes, one clear log line, files and objects that exist and verify, nothing
partial left anywhere, older snapshots never lost, no secret in any output.

Random faults are seeded (``FAULTS_SEED``, default below) and every failure
message names the trial, so a failing case can be replayed. Long variants are
marked ``slow``; the unmarked ones are the same checks with fewer trials.

Sections: helpers; the Vault stream cut at random offsets; storage faults
(5xx storms, resets, slow answers, permanent failure); a full local disk;
SIGTERM at random moments; bad config corpus and fuzz; hostile answers;
secrets in output; soak; Vault-side faults (sealed node, restart, leader
killed mid-snapshot: last, as they break the cluster and heal it).
"""

import base64
import contextlib
import gzip
import io
import json
import os
import random
import re
import resource
import signal
import socketserver
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
import zlib

import pytest

import bad_configs
import vault_snapshot_agent as vsa
from archives import build_archive
from faultproxy import FaultProxy
from harness import (error_lines, overridden, read, run_main, snapshots, start_agent, stop,
                     wait_for)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "vault_snapshot_agent.py")
SEED = int(os.environ.get("FAULTS_SEED", "20261127"))
MB = 1024 * 1024
BUCKET = CONTAINER = "snapshots"
TOKEN_RE = re.compile(r"\b(?:hvs|hvb|hvr|s|b|sb|r)\.[A-Za-z0-9_-]{20,}")
TEMP_RE = re.compile(r"^\.raft_snapshot-.*\.tmp$")


# =============================================================================
# helpers
# =============================================================================


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No credentials or endpoints from the environment leak into a test (or
    into the agents it starts as subprocesses)."""
    for name in list(os.environ):
        if name.startswith(("VAULT_", "BAO_", "AWS_", "AZURE_", "GOOGLE_", "GCE_")) or \
                name in ("STORAGE_EMULATOR_HOST", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))


def port_of(url):
    return int(url.rsplit(":", 1)[1].split("/")[0])


def write_config(path, addr, approle, snapdir=None, **extra):
    config = {"addr": addr, "role_id": approle.role_id, "secret_id": approle.secret_id,
              "approle": approle.mount, "frequency": "1h"}
    if snapdir is not None:
        config["local_storage"] = {"path": str(snapdir)}
    overridden(config, extra)
    with open(str(path), "w") as handle:
        json.dump(config, handle)
    return str(path)


def hidden(snapdir):
    if not os.path.isdir(str(snapdir)):
        return []
    return sorted(n for n in os.listdir(str(snapdir)) if n.startswith("."))


def temp_files(snapdir):
    return [n for n in hidden(snapdir) if TEMP_RE.match(n)]


def verify_all(snapdir):
    """Every snapshot file in ``snapdir`` verifies; returns their SnapshotInfos."""
    infos = []
    for name in snapshots(snapdir):
        try:
            infos.append(vsa.verify_file(os.path.join(str(snapdir), name)))
        except vsa.SnapshotError as exc:
            raise AssertionError("stored snapshot %s does not verify: %s" % (name, exc)) from None
    return infos


def verify_bytes(data, tmp_path, label="object"):
    path = tmp_path / ("verify-%s.snap" % os.urandom(4).hex())
    path.write_bytes(data)
    try:
        return vsa.verify_file(str(path))
    except vsa.SnapshotError as exc:
        raise AssertionError("%s does not verify: %s" % (label, exc)) from None
    finally:
        path.unlink()


@contextlib.contextmanager
def proxy_to(url):
    with FaultProxy("127.0.0.1", port_of(url)) as proxy:
        yield proxy


def snapshot_gets(proxy):
    return [r for r in list(proxy.requests) if r.startswith("GET " + vsa.SNAPSHOT_PATH)]


def cut_snapshot_stream(monkeypatch, proxy, plan):
    """Arm ``proxy.cut_after(*plan["cut"], times=1)`` right before the agent
    opens the snapshot stream, so login and leader checks are never cut."""
    real = vsa.Http.request

    def request(self, method, url, *args, **kwargs):
        if plan.get("cut") is not None and url.endswith(vsa.SNAPSHOT_PATH):
            nbytes, rst = plan["cut"]
            proxy.cut_after(nbytes, rst=rst, times=1)
        return real(self, method, url, *args, **kwargs)
    monkeypatch.setattr(vsa.Http, "request", request)


# =============================================================================
# the Vault stream cut at random offsets
# =============================================================================


def verify_threads():
    """The snapshot pass's verifier threads still alive (section "Snapshot stream and verification")."""
    return [t for t in threading.enumerate() if t.name == "verify" and t.is_alive()]


def _random_cuts(bao_cluster, approle, tmp_path, monkeypatch, trials, seed):
    snapdir = tmp_path / "snaps"
    with proxy_to(bao_cluster.leader().addr) as proxy:
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")          # learn the size
        assert code == 0, log
        size = os.path.getsize(str(snapdir / snapshots(snapdir)[0]))
        assert size > 4 * MB, "kv_data should make a multi-MB snapshot, got %d bytes" % size
        for name in snapshots(snapdir):
            os.unlink(str(snapdir / name))
        plan = {}
        cut_snapshot_stream(monkeypatch, proxy, plan)
        rng = random.Random(seed)
        for trial in range(trials):
            cut, rst = rng.randrange(0, size), rng.random() < 0.3
            what = "trial %d/%d (seed %d): cut after %d of %d bytes%s" % (
                trial + 1, trials, seed, cut, size, " with RST" if rst else "")
            plan["cut"] = (cut, rst)
            code, log = run_main("-c", config, "--once")
            plan["cut"] = None
            proxy.pass_through()
            assert code == 1, "%s: exit %s\n%s" % (what, code, log)
            errors = error_lines(log)
            assert len(errors) == 1, "%s: expected one ERROR line\n%s" % (what, log)
            assert "Traceback" not in log, what
            assert snapshots(snapdir) == [], "%s: something was stored: %s" % (what, snapshots(snapdir))
            assert temp_files(snapdir) == [], "%s: temp files left: %s" % (what, temp_files(snapdir))
            assert verify_threads() == [], what
            # the next cycle, without the fault, stores a verified snapshot
            code, log = run_main("-c", config, "--once")
            assert code == 0, "%s: the clean cycle after it failed\n%s" % (what, log)
            infos = verify_all(snapdir)
            assert len(infos) == 1 and temp_files(snapdir) == [], what
            os.unlink(infos[0].path)
    return size


def test_stream_cut_at_random_offsets_10_trials(bao_cluster, approle, kv_data, tmp_path,
                                                monkeypatch):
    _random_cuts(bao_cluster, approle, tmp_path, monkeypatch, 10, SEED)


@pytest.mark.slow
def test_stream_cut_at_random_offsets_100_trials(bao_cluster, approle, kv_data, tmp_path,
                                                 monkeypatch):
    _random_cuts(bao_cluster, approle, tmp_path, monkeypatch, 100, SEED + 1)


# =============================================================================
# storage faults: 5xx storms, resets, slow answers, permanent failure
# =============================================================================


class Backend:
    """One storage emulator seen through a FaultProxy, with the few
    operations the tests need (names under the test's prefix, get, put)."""

    def __init__(self, kind, server, prefix):
        self.kind, self.server, self.prefix = kind, server, prefix

    @property
    def url(self):
        return self.server.endpoint

    def block(self, proxy, **extra):
        if self.kind == "s3":
            key, block = "aws_storage", {
                "access_key_id": self.server.access_key_id,
                "secret_access_key": self.server.secret_access_key,
                "s3_endpoint": proxy.addr, "s3_region": "us-east-1", "s3_bucket": BUCKET,
                "s3_key_prefix": self.prefix, "part_size_mb": 5, "concurrency": 2}
        elif self.kind == "azure":
            key, block = "azure_storage", {
                "account_name": self.server.account, "account_key": self.server.key,
                "container_name": CONTAINER, "endpoint": proxy.addr + "/" + self.server.account,
                "prefix": self.prefix, "block_size_mb": 1}
        else:
            key, block = "google_storage", {
                "bucket": BUCKET, "endpoint": proxy.addr, "anonymous": True,
                "prefix": self.prefix, "chunk_size_mb": 1}
        block.update(extra)
        return key, block

    def names(self):
        if self.kind == "s3":
            return sorted(self.server.list_keys(BUCKET, self.prefix + "/"))
        if self.kind == "azure":
            return sorted(self.server.blob_names(CONTAINER, self.prefix + "/"))
        return sorted(self.server.list_objects(BUCKET, self.prefix + "/"))

    def get(self, name):
        if self.kind == "s3":
            return self.server.get(BUCKET, name)
        if self.kind == "azure":
            return self.server.get_blob(CONTAINER, name)
        return self.server.get_object(BUCKET, name)

    def put_many(self, names, body):
        if self.kind == "s3":
            self.server.put_many(BUCKET, names, body)
        elif self.kind == "azure":
            self.server.put_many(CONTAINER, names, body)
        else:
            self.server.put_many(BUCKET, names, body)

    def uploads_in_progress(self):
        if self.kind == "s3":
            return self.server.list_multipart_uploads(BUCKET, self.prefix + "/")
        return []

    def error(self, status):
        """(body, content type) of a server error as this store words it."""
        code = {500: "InternalError", 503: "ServiceUnavailable"}.get(status, "InternalError")
        if self.kind == "s3":
            if status == 503:
                code = "SlowDown"
            return ("<Error><Code>%s</Code><Message>injected</Message></Error>" % code).encode(), \
                "application/xml"
        if self.kind == "azure":
            if status == 503:
                code = "ServerBusy"
            return ("<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>%s</Code>"
                    "<Message>injected</Message></Error>" % code).encode(), "application/xml"
        return json.dumps({"error": {"code": status, "message": "injected",
                                     "errors": [{"reason": "backendError"}]}}).encode(), \
            "application/json"

    def data_puts(self):
        """Predicate: requests that carry snapshot bytes (parts, blocks, chunks)
        but, for GCS, never the first chunk (gcp-storage-emulator answers a
        status query before any byte with "bytes=0-0", which real GCS never
        does)."""
        seen = []

        def predicate(method, path):
            if method != "PUT":
                return False
            if self.kind == "gcs":
                if "upload_id" not in path:
                    return False
                seen.append(path)
                return len(seen) >= 2
            return True
        return predicate


BACKEND_FIXTURES = {"s3": "moto", "azure": "azurite", "gcs": "gcs"}


@pytest.fixture
def make_backend(request, tmp_path):
    def make(kind):
        server = request.getfixturevalue(BACKEND_FIXTURES[kind])
        prefix = "faults-%s-%s" % (re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-40:].strip("-"),
                                   os.urandom(3).hex())
        return Backend(kind, server, prefix)
    return make


GO_NAMES = ["raft_snapshot-%d.snap" % (1700000000000000000 + i * 10 ** 9) for i in range(3)]


def _storage_cycle(tmp_path, bao_cluster, approle, backend, proxy, **block_extra):
    key, block = backend.block(proxy, **block_extra)
    snapdir = tmp_path / "local"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                          **{key: block})
    code, log = run_main("-c", config, "--once", "--log-level", "debug")
    return code, log, snapdir


@pytest.mark.parametrize("kind", sorted(BACKEND_FIXTURES))
@pytest.mark.parametrize("fault", ["5xx-storm", "reset", "slow"])
def test_storage_transient_fault_is_retried_to_success(bao_cluster, approle, kv_data, tmp_path,
                                                       make_backend, kind, fault):
    backend = make_backend(kind)
    old = ["%s/%s" % (backend.prefix, n) for n in GO_NAMES]
    backend.put_many(old, b"old")
    with proxy_to(backend.url) as proxy:
        rule = None
        if fault == "5xx-storm":
            body, ctype = backend.error(503)
            rule = proxy.fail_requests(backend.data_puts(), status=503, body=body,
                                       content_type=ctype, times=2)
        elif fault == "reset":
            proxy.reset(times=1)
        else:
            proxy.delay(0.2)
        started = time.monotonic()
        code, log, snapdir = _storage_cycle(tmp_path, bao_cluster, approle, backend, proxy)
        elapsed = time.monotonic() - started
        if rule is not None:
            assert rule.hits == 2, log
    assert code == 0, "%s %s: exit %s\n%s" % (kind, fault, code, log)
    assert "Traceback" not in log and error_lines(log) == [], log
    if fault != "slow":
        assert re.search(r"retry|asking the session", log), log
    else:
        assert elapsed > 0.4, elapsed
    local = verify_all(snapdir)
    assert len(local) == 1 and temp_files(snapdir) == []
    new = sorted(set(backend.names()) - set(old))
    assert len(new) == 1, (new, log)
    info = verify_bytes(backend.get(new[0]), tmp_path, "%s object %s" % (kind, new[0]))
    assert info.sha256 == local[0].sha256 and info.size > 4 * MB
    assert sorted(set(backend.names()) & set(old)) == old, "an older object was deleted"
    assert backend.uploads_in_progress() == []


@pytest.mark.parametrize("kind", sorted(BACKEND_FIXTURES))
def test_storage_permanent_failure_keeps_local_and_old_objects(bao_cluster, approle, kv_data,
                                                               tmp_path, make_backend, kind):
    backend = make_backend(kind)
    old = ["%s/%s" % (backend.prefix, n) for n in GO_NAMES]
    backend.put_many(old, b"old")
    before = dict((name, backend.get(name)) for name in old)
    with proxy_to(backend.url) as proxy:
        body, ctype = backend.error(500)
        rule = proxy.fail_requests(lambda m, p: m == "PUT", status=500, body=body,
                                   content_type=ctype)
        # retain 1 would delete the old objects if retention ran after a failed upload
        code, log, snapdir = _storage_cycle(tmp_path, bao_cluster, approle, backend, proxy,
                                            retain=1)
        assert rule.hits >= 2, log
    assert code == 1, "%s: exit %s\n%s" % (kind, code, log)
    assert "Traceback" not in log
    errors = error_lines(log)
    assert len(errors) == 1 and "Storing snapshot in" in errors[0], log
    assert "Successfully created local snapshot" in log
    assert len(verify_all(snapdir)) == 1 and temp_files(snapdir) == []
    assert backend.names() == sorted(old), "%s: half-written or deleted objects: %s" % (
        kind, backend.names())
    assert dict((name, backend.get(name)) for name in old) == before
    assert backend.uploads_in_progress() == [], "S3 multipart upload left behind"


# =============================================================================
# a full local disk
# =============================================================================


def _tmpfs(path, size="1m"):
    os.makedirs(path)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs", path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % result.stdout.decode().strip())


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 * MB, 1 * MB))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.parametrize("how", ["rlimit-fsize", "tmpfs-staging", "tmpfs-copy"])
def test_full_local_disk_is_one_clear_error_and_keeps_older_snapshots(bao_cluster, approle,
                                                                       kv_data, tmp_path, how):
    snapdir = str(tmp_path / "tiny")
    mounted = how.startswith("tmpfs")
    if mounted:
        _tmpfs(snapdir)
    else:
        os.makedirs(snapdir)
    try:
        old = {name: ("old snapshot %d" % i).encode() for i, name in enumerate(
            GO_NAMES + ["raft_snapshot-20200101T000000.000Z.snap"])}
        for name, data in old.items():
            with open(os.path.join(snapdir, name), "wb") as handle:
                handle.write(data)
        extra = {"local_storage": {"path": snapdir, "retain": 1}}
        staging = tmp_path / "staging"
        if how == "tmpfs-copy":          # staged on a big disk, copied onto the full one
            staging.mkdir()
            extra["temp_dir"] = str(staging)
        config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, **extra)
        if how == "rlimit-fsize":
            proc = subprocess.run([sys.executable, "-I", AGENT, "-c", config, "--once"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  preexec_fn=_limit_file_size, timeout=120)
            code, log = proc.returncode, proc.stdout.decode("utf-8", "replace")
        else:
            code, log = run_main("-c", config, "--once")
        listing = sorted(os.listdir(snapdir))
        contents = dict((name, open(os.path.join(snapdir, name), "rb").read())
                        for name in listing if not name.startswith("."))
    finally:
        if mounted:
            subprocess.run(["umount", snapdir])
    assert code == 1, "%s: exit %s\n%s" % (how, code, log)
    assert "Traceback" not in log
    errors = error_lines(log)
    assert len(errors) == 1, "%s: expected one ERROR line\n%s" % (how, log)
    reason = "File too large" if how == "rlimit-fsize" else "No space left on device"
    assert reason in errors[0], errors[0]
    assert listing == sorted(old), "%s: partial or missing files: %s" % (how, listing)
    assert contents == old, "an older snapshot changed"
    if how == "tmpfs-copy":
        assert os.listdir(str(staging)) == []
    # an operator must be able to tell which disk is full
    assert snapdir in errors[0] or (how == "tmpfs-copy" and str(staging) in errors[0]), (
        "the error does not say where the write failed: %r" % errors[0])


# =============================================================================
# SIGTERM at random moments of a cycle
# =============================================================================


def _sigterm_trials(bao_cluster, approle, moto, tmp_path, trials, seed):
    rng = random.Random(seed)
    with proxy_to(bao_cluster.leader().addr) as proxy:
        proxy.delay(0.004)           # ~0.7 s for the download: the stream is a big target

        def trial(index, moment):
            snapdir = tmp_path / ("local-%d" % index)
            prefix = "sigterm-%s-%d" % (os.urandom(3).hex(), index)
            aws = {"access_key_id": moto.access_key_id, "secret_access_key": moto.secret_access_key,
                   "s3_endpoint": moto.endpoint, "s3_region": "us-east-1", "s3_bucket": BUCKET,
                   "s3_key_prefix": prefix, "part_size_mb": 5, "concurrency": 2}
            config = write_config(tmp_path / ("c-%d.json" % index), proxy.addr, approle, snapdir,
                                  aws_storage=aws)
            logfile = tmp_path / ("agent-%d.log" % index)
            proc = start_agent(config, logfile, sys.executable, "--log-level", "debug")
            try:
                wait_for(lambda: " starting: " in read(logfile) or proc.poll() is not None, 30,
                         "the agent to start")
                began = time.monotonic()
                if moment is None:     # calibration: let the cycle finish
                    wait_for(lambda: "Cycle stored" in read(logfile) or proc.poll() is not None,
                             60, "a whole cycle", interval=0.01)
                    duration = time.monotonic() - began
                else:
                    time.sleep(moment)
                    duration = None
                sent = time.monotonic()
                code = stop(proc, timeout=5)
                took = time.monotonic() - sent
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            log = read(logfile)
            what = "trial %d (seed %d): SIGTERM %.3fs after start" % (
                index, seed, moment if moment is not None else -1)
            assert code == 0, "%s: exit %s\n%s" % (what, code, log)
            assert took < 5, "%s: took %.1fs to stop" % (what, took)
            assert "Traceback" not in log, "%s\n%s" % (what, log)
            local = verify_all(snapdir)
            assert temp_files(snapdir) == [] and hidden(snapdir) == [], (what, hidden(snapdir))
            assert moto.list_multipart_uploads(BUCKET, prefix + "/") == [], \
                "%s: multipart upload left behind\n%s" % (what, log)
            keys = moto.list_keys(BUCKET, prefix + "/")
            assert len(keys) <= 1, (what, keys)
            for key in keys:
                verify_bytes(moto.get(BUCKET, key), tmp_path, "%s: s3 object %s" % (what, key))
            moto.delete_all(BUCKET, prefix + "/")
            for info in local:
                os.unlink(info.path)
            return duration, len(local), len(keys)

        duration, stored, uploaded = trial(0, None)
        assert (stored, uploaded) == (1, 1), "the calibration cycle did not store everywhere"
        # Stratified over 1.5 cycles: every part of the cycle gets its share of
        # moments (a third fall after a calibrated cycle's end, so a busier
        # machine's slower cycles still see some SIGTERMs after both stores).
        span = duration * 1.5
        outcomes = []
        for index in range(1, trials + 1):
            moment = span * (index - 1 + rng.random()) / trials
            outcomes.append(trial(index, moment)[1:])
    print("SIGTERM trials: cycle %.2fs; (local, s3) stored per trial: %s" % (duration, outcomes))
    return outcomes


def test_sigterm_at_random_moments_5_trials(bao_cluster, approle, kv_data, moto, tmp_path):
    _sigterm_trials(bao_cluster, approle, moto, tmp_path, 5, SEED + 2)


@pytest.mark.slow
def test_sigterm_at_random_moments_50_trials(bao_cluster, approle, kv_data, moto, tmp_path):
    outcomes = _sigterm_trials(bao_cluster, approle, moto, tmp_path, 50, SEED + 3)
    # the moments really spread over the cycle: some stopped before anything was
    # stored, some between local and S3, some after both
    assert (0, 0) in outcomes and (1, 1) in outcomes, outcomes


# =============================================================================
# bad input: a corpus of broken configs, and a fuzz
# =============================================================================


@pytest.fixture
def corpus_files(tmp_path):
    return bad_configs.make_files(str(tmp_path))


@pytest.mark.parametrize("case_id,config,key", bad_configs.CASES,
                         ids=[c[0] for c in bad_configs.CASES])
def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path, corpus_files, capsys,
                                                         case_id, config, key):
    path = bad_configs.write_case(str(tmp_path), config, corpus_files)
    stream = io.StringIO()
    try:
        code = vsa.main(["-c", path, "--check-config"], stream=stream)
    except BaseException as exc:  # the point is that nothing escapes
        raise AssertionError("%s: main() raised %s: %s (config %s)" % (
            case_id, type(exc).__name__, str(exc)[:200],
            read(path)[:120] if os.path.isfile(path) else path)) from None
    out = stream.getvalue() + capsys.readouterr().out
    lines = out.splitlines()
    assert code == 2, "%s: exit %s, output:\n%s" % (case_id, code, out)
    assert len(lines) == 1 and " ERROR " in lines[0], "%s: not one ERROR line:\n%s" % (case_id, out)
    assert key in lines[0], "%s: the line does not name %r: %s" % (case_id, key, lines[0])
    assert "Traceback" not in out


def test_bad_config_corpus_is_large_and_covers_every_storage():
    assert len(bad_configs.CASES) >= 60
    keys = " ".join(c[2] for c in bad_configs.CASES)
    for block in ("local_storage", "aws_storage", "azure_storage", "google_storage"):
        assert keys.count(block) >= 5, block


def test_unknown_keys_are_warnings_not_errors(tmp_path, corpus_files, capsys):
    config = bad_configs.materialize(dict(bad_configs.BASE, snapshot_frequency="1h",
                                          aws_storage=dict(bad_configs.S3, s3_bukket="x")),
                                     corpus_files)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code, log = run_main("-c", str(path), "--check-config")
    capsys.readouterr()
    assert code == 0, log
    assert "'snapshot_frequency'" in log and "'aws_storage.s3_bukket'" in log
    assert error_lines(log) == []


@pytest.mark.parametrize("key", ["frequency", "timeout", "snapshot_timeout", "retry_interval"])
def test_empty_duration_counts_as_unset_like_every_other_key(tmp_path, corpus_files, capsys, key):
    # README: "Empty strings and null count as "not set" (the Go agent's files use them that way)."
    config = bad_configs.materialize(dict(bad_configs.BASE, **{key: ""}), corpus_files)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code, log = run_main("-c", str(path), "--check-config")
    capsys.readouterr()
    assert code == 0, "%s \"\" should mean the default, like null; got exit %s: %s" % (key, code, log)


TOP_KEYS = ["addr", "frequency", "retain", "retain_days", "jitter", "retry_interval", "align",
            "timeout", "snapshot_timeout", "temp_dir", "status_file", "metrics_textfile", "metrics_address",
            "vault_auth_method", "approle", "role_id", "secret_id", "secret_id_file",
            "k8s_auth_role", "k8s_auth_path", "k8s_token_path", "token", "token_file", "namespace",
            "ca_cert", "ca_path", "client_cert", "client_key", "tls_server_name", "tls_skip_verify"]
COMMON_BLOCK_KEYS = ["retain", "retain_days", "frequency", "ca_cert", "tls_skip_verify"]
BLOCK_KEYS = {
    "local_storage": ["path", "retain", "retain_days", "frequency"],
    "aws_storage": COMMON_BLOCK_KEYS + [
        "s3_bucket", "s3_region", "s3_endpoint", "s3_force_path_style", "s3_key_prefix",
        "s3_server_side_encryption", "s3_kms_key_id", "s3_storage_class", "s3_static_snapshot_name",
        "s3_checksum", "access_key_id", "secret_access_key", "session_token", "profile",
        "part_size_mb", "concurrency", "imds_endpoint", "container_endpoint", "sts_endpoint"],
    "azure_storage": COMMON_BLOCK_KEYS + [
        "account_name", "container_name", "account_key", "sas_token", "connection_string",
        "auth_mode", "client_id", "tenant_id", "client_secret", "federated_token_file",
        "authority_host", "endpoint", "endpoint_suffix", "prefix", "access_tier", "block_size_mb",
        "concurrency", "imds_endpoint", "list_page_size"],
    "google_storage": COMMON_BLOCK_KEYS + [
        "bucket", "prefix", "credentials_file", "endpoint", "anonymous", "metadata_host",
        "storage_class", "chunk_size_mb", "list_page_size"],
}
VALID_BLOCKS = {"local_storage": {"path": "@SNAPDIR@"}, "aws_storage": bad_configs.S3,
                "azure_storage": bad_configs.AZ, "google_storage": bad_configs.GS}
FUZZ_STRINGS = [
    "", " ", "0", "1", "-1", "1h", "30s", "500ms", "1h30m", "1.5h", ".5s", "+1s", "-1s", "1d", "1 h",
    "9" * 40 + "h", "9" * 400 + "s", "1e9s", "NaN", "inf", "true", "false", "null", "{}", "[]",
    "http://127.0.0.1:8200", "https://127.0.0.1:8200", "http://", "http://[::1", "http://[::1]:8200",
    "http://h:0", "http://h:65536", "http://h:-1", "ftp://x", "127.0.0.1:9469", ":9469", "h:\u00b2",
    "[::1]:9469", "h:99999", "approle", "token", "k8s", "kubernetes", "ldap", "sas", "shared_key",
    "auto", "managed_identity", "AES256", "aws:kms", "aws:kms:dsse", "Hot", "Archive", "snapshots",
    "UPPER", "a", "a" * 300, "caf\u00e9/\u4e2d", "\u0000", "nul\u0000byte", "\ud800", "\u202e",
    "x" * 70000, "AccountName=a;AccountKey=a2V5", "garbage", "=", ";;", "@FILE@", "@DIR@",
    "@MISSING@", "@EMPTY@", "@UNREADABLE@", "@GARBAGE_PEM@", "@SA_NO_PEM@", "@SA_BAD_BASE64@",
    "@SA_TRUNCATED_DER@", "@SA_EC_KEY@", "@SA_NO_EMAIL@", "@SA_KEY_NOT_STRING@", "@CREDS_LIST@",
    "~", "~nosuchuser/x", "/", "/proc/self/mem", ".", "..",
]


def _fuzz_scalar(rng):
    kind = rng.randrange(10)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 5, 16, 4000, 5000, 10 ** 6, 2 ** 31, 2 ** 63, 10 ** 30, -10 ** 30])
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.5, 1.0, 5.0, 1e308, -1e308, 1e-300, float("nan"),
                           float("inf"), float("-inf")])
    if kind == 4:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(0, 12)))
    return rng.choice(FUZZ_STRINGS)


def _fuzz_value(rng, depth=0):
    roll = rng.random()
    if roll < 0.02:                               # very deep nesting, now and then
        return "@DEEP@%d" % rng.choice([50, 500, 3000])
    if depth < 4 and roll < 0.12:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if depth < 4 and roll < 0.2:
        keys = TOP_KEYS + sum(BLOCK_KEYS.values(), []) + ["", "x", "\u00e9"]
        return dict((rng.choice(keys), _fuzz_value(rng, depth + 1)) for _ in range(rng.randrange(0, 4)))
    return _fuzz_scalar(rng)


def _fuzz_config(rng):
    """Mostly a valid config with one to four known keys given random values
    (one alone most of the time, so validation reaches it), sometimes random
    keys from scratch, now and then any JSON at all."""
    roll = rng.random()
    if roll < 0.05:
        return _fuzz_value(rng)
    config = dict(bad_configs.BASE)
    if roll < 0.2:
        config = {}
        for key in rng.sample(TOP_KEYS, rng.randrange(0, 8)):
            config[key] = _fuzz_value(rng)
    blocks = rng.sample(sorted(BLOCK_KEYS), rng.randrange(0, 3))
    for block in blocks:
        config[block] = dict(VALID_BLOCKS[block]) if rng.random() < 0.9 else _fuzz_value(rng)
    for _ in range(1 if rng.random() < 0.6 else rng.randrange(2, 5)):
        target = rng.choice(["top"] + blocks)
        if target == "top":
            config[rng.choice(TOP_KEYS)] = _fuzz_value(rng)
        elif isinstance(config.get(target), dict):
            config[target][rng.choice(BLOCK_KEYS[target])] = _fuzz_value(rng)
    return config


def test_config_fuzz_never_tracebacks_and_exits_0_or_2(tmp_path, corpus_files, capsys):
    rng = random.Random(SEED + 4)
    failures = {}
    codes = {0: 0, 2: 0}
    for case in range(500):
        config = bad_configs.materialize(_fuzz_config(rng), corpus_files)
        text = json.dumps(config)                  # NaN and Infinity included, as Python writes them
        text = re.sub(r'"@DEEP@(\d+)"', lambda m: "[" * int(m.group(1)) + "0" + "]" * int(m.group(1)),
                      text)
        path = tmp_path / "fuzz.json"
        path.write_text(text)
        stream = io.StringIO()
        try:
            code = vsa.main(["-c", str(path), "--check-config"], stream=stream)
            problem = None
            if code not in (0, 2):
                problem = "exit code %r" % (code,)
            elif "Traceback" in stream.getvalue():
                problem = "a traceback in the log"
            elif code == 2 and len(stream.getvalue().splitlines()) != 1:
                problem = "exit 2 without exactly one line"
        except RecursionError as exc:
            problem = "RecursionError: %s" % str(exc)[:80]
        except BaseException as exc:
            problem = "%s: %s" % (type(exc).__name__, str(exc)[:80])
        capsys.readouterr()
        if problem is None:
            codes[code] += 1
        else:
            failures.setdefault(re.sub(r"\d+", "N", problem), (case, text[:160]))
    assert not failures, "%d distinct crash(es) in 500 fuzzed configs (seed %d):\n%s" % (
        len(failures), SEED + 4, "\n".join("  %s   e.g. case %d: %s" % (p, c, t)
                                           for p, (c, t) in sorted(failures.items())))
    assert codes[0] > 10 and codes[2] > 100, codes


# =============================================================================
# hostile answers: redirects, bodies that are not snapshots, endless streams,
# huge JSON
# =============================================================================


REDIRECTS = [
    ("307-other-port", 307, "{elsewhere}{path}"),
    ("302-other-port", 302, "{elsewhere}{path}"),
    ("301-other-port", 301, "{elsewhere}{path}"),
    ("303-other-port", 303, "{elsewhere}{path}"),
    ("308-other-port", 308, "{elsewhere}{path}"),
    ("localhost-instead-of-ip", 307, "http://localhost:{eport}{path}"),
    ("userinfo-trick", 307, "http://127.0.0.1:{pport}@127.0.0.1:{eport}{path}"),
    ("scheme-relative", 307, "//127.0.0.1:{eport}{path}"),
    ("https-same-host-and-port", 307, "https://127.0.0.1:{pport}{path}"),
]


@pytest.mark.parametrize("case_id,status,location", REDIRECTS, ids=[r[0] for r in REDIRECTS])
def test_snapshot_redirect_elsewhere_never_carries_the_token(bao_cluster, approle, tmp_path,
                                                             case_id, status, location):
    leader = bao_cluster.leader()
    snapdir = tmp_path / "snaps"
    with proxy_to(leader.addr) as elsewhere, proxy_to(leader.addr) as proxy:
        target = location.format(elsewhere=elsewhere.addr, path=vsa.SNAPSHOT_PATH,
                                 eport=elsewhere.port, pport=proxy.port)
        proxy.fail_requests(lambda m, p: p.startswith(vsa.SNAPSHOT_PATH), status=status, body=b"",
                            headers={"Location": target})
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once", "--log-level", "debug")
        assert not elsewhere.saw_header("X-Vault-Token"), "%s: token sent to %s" % (case_id, target)
        assert elsewhere.requests == [], case_id
        assert len(snapshot_gets(proxy)) == 1, (case_id, proxy.requests)
    assert code == 0, "%s: exit %s\n%s" % (case_id, code, log)
    assert "Not running on leader node, skipping." in log
    assert snapshots(snapdir) == [] and temp_files(snapdir) == []


def test_same_origin_redirect_loop_stops_after_a_few_hops(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    with proxy_to(bao_cluster.leader().addr) as proxy:
        proxy.fail_requests(lambda m, p: p.startswith(vsa.SNAPSHOT_PATH), status=307, body=b"",
                            headers={"Location": proxy.addr + vsa.SNAPSHOT_PATH})
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")
        gets = len(snapshot_gets(proxy))
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1 and "too many redirects" in errors[0], log
    assert gets == 1 + vsa.MAX_REDIRECTS, gets
    assert snapshots(snapdir) == []


@pytest.mark.parametrize("path", ["/v1/sys/leader", "/v1/auth/approle/login"])
def test_redirect_on_api_calls_is_not_followed(bao_cluster, approle, tmp_path, path):
    leader = bao_cluster.leader()
    with proxy_to(leader.addr) as elsewhere, proxy_to(leader.addr) as proxy:
        proxy.fail_requests(lambda m, p: p.startswith(path), status=307, body=b"",
                            headers={"Location": elsewhere.addr + path})
        config = write_config(tmp_path / "c.json", proxy.addr, approle, tmp_path / "snaps")
        code, log = run_main("-c", config, "--once", "--log-level", "debug")
        assert elsewhere.requests == [], "the agent followed a redirect of %s" % path
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1 and "307" in errors[0], log
    assert approle.secret_id not in log


def _gzip_tar(members):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


HOSTILE_BODIES = [
    ("html-page", b"<!DOCTYPE html><html><body><h1>Welcome to nginx!</h1></body></html>",
     "text/html", "gzip"),
    ("empty-body", b"", "application/octet-stream", "empty"),
    ("json-error", b'{"errors":["permission denied"]}', "application/json", "gzip"),
    ("gzip-of-text", gzip.compress(b"hello world\n" * 100), "application/gzip", "tar header"),
    ("tar-without-members", _gzip_tar([]), "application/gzip", "lacks"),
    ("gzip-with-trailing-junk", build_archive() + b"JUNK", "application/gzip", "after the end"),
    ("wrong-sha256sums", build_archive(sums="%s  meta.json\n%s  state.bin\n" % ("0" * 64, "0" * 64)),
     "application/gzip", "does not match"),
    ("empty-sealed-sums", build_archive(sealed=b""), "application/gzip", "SHA256SUMS.sealed"),
    ("meta-size-lies", build_archive(meta_size=1), "application/gzip", "meta.json says"),
    ("huge-meta-member", _gzip_tar([("meta.json", b"{" + b" " * (2 * MB) + b"}")]),
     "application/gzip", "implausibly large"),
]


@pytest.mark.parametrize("case_id,body,ctype,problem", HOSTILE_BODIES,
                         ids=[b[0] for b in HOSTILE_BODIES])
def test_hostile_200_answer_to_the_snapshot_request_is_rejected(bao_cluster, approle, tmp_path,
                                                                case_id, body, ctype, problem):
    snapdir = tmp_path / "snaps"
    with proxy_to(bao_cluster.leader().addr) as proxy:
        proxy.fail_requests(lambda m, p: p.startswith(vsa.SNAPSHOT_PATH), status=200, body=body,
                            content_type=ctype)
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")
    assert code == 1, "%s: exit %s\n%s" % (case_id, code, log)
    errors = error_lines(log)
    assert len(errors) == 1 and problem in errors[0], "%s:\n%s" % (case_id, log)
    assert "Traceback" not in log
    assert snapshots(snapdir) == [] and temp_files(snapdir) == []


def _tar_header(name, size, kind=b"0"):
    info = tarfile.TarInfo(name)
    info.size = 0
    info.type = kind
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    field = b"\x80" + size.to_bytes(11, "big")          # GNU base-256: any size
    header[124:136] = field
    header[148:156] = b" " * 8
    header[148:156] = ("%06o\0 " % sum(header)).encode("ascii")
    return bytes(header)


class EndlessServer:
    """An HTTP server on loopback that answers every request with 200 and a
    body that goes on for ``limit`` bytes (on the wire), then closes.

    ``mode``: "random" (bytes that are not gzip), "state" (a valid gzip stream
    of a tar whose state.bin never ends), "pax" (the same, but the endless
    member is a PAX extended header), "bomb" (state.bin of zeros at gzip level
    9: ``limit`` is then the *inflated* size)."""

    def __init__(self, mode, limit):
        self.mode, self.limit, self.sent = mode, limit, 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                sock = self.request
                sock.settimeout(30)
                try:
                    sock.recv(65536)
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\n"
                                 b"Connection: close\r\n\r\n")
                    for chunk in outer._chunks():
                        sock.sendall(chunk)
                        outer.sent += len(chunk)
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever)
        self.thread.daemon = True

    def _chunks(self):
        block = os.urandom(MB)
        if self.mode == "random":
            while self.sent < self.limit:
                yield block
            return
        if self.mode == "bomb":
            deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
            zeros = bytes(4 * MB)
            yield deflate.compress(_tar_header("state.bin", 2 ** 60))
            inflated = 0
            while inflated < self.limit:
                data = deflate.compress(zeros)
                inflated += len(zeros)
                if data:
                    yield data
            yield deflate.flush(zlib.Z_SYNC_FLUSH)
            return
        deflate = zlib.compressobj(0, zlib.DEFLATED, 31)
        header = _tar_header("state.bin", 2 ** 60) if self.mode == "state" else \
            _tar_header("././@PaxHeader", 2 ** 60, tarfile.XHDTYPE)
        yield deflate.compress(header)
        while self.sent < self.limit:
            yield deflate.compress(block)

    def __enter__(self):
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("threaded", [False, True], ids=["one thread", "two threads"])
@pytest.mark.parametrize("mode", ["random", "state", "pax", "bomb"])
def test_endless_snapshot_stream_keeps_memory_bounded(tmp_path, mode, threaded):
    limit = 200 * MB
    stage = tmp_path / "stage"
    stage.mkdir()
    with EndlessServer(mode, limit) as server:
        http = vsa.Http(timeout=30)
        tracemalloc.start()
        try:
            resp = http.request("GET", server.url + vsa.SNAPSHOT_PATH)
            try:
                with pytest.raises(vsa.SnapshotError) as failure:
                    vsa.stream_snapshot(resp, str(stage), vsa.Signals(), threaded=threaded)
            finally:
                resp.close()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        sent = server.sent
    print("%s: %d MB sent, tracemalloc peak %.1f MB, %s" % (mode, sent // MB, peak / MB, failure.value))
    assert peak < 20 * MB, "%s: %.0f MB of memory for a stream (%d MB sent) - not bounded" % (
        mode, peak / MB, sent // MB)
    assert os.listdir(str(stage)) == [], "partial file left: %s" % os.listdir(str(stage))
    assert verify_threads() == [], "the verifier thread outlived the failure"
    if mode == "random":
        assert sent < 32 * MB, "a stream that is not gzip was read on for %d MB" % (sent // MB)
    elif mode == "state":     # a long (legitimate-looking) snapshot is never cut short
        assert sent >= limit, "only %d MB flowed" % (sent // MB)


TRACED_MAIN = (
    "import sys, tracemalloc\n"
    "sys.path.insert(0, %r)\n"
    "import vault_snapshot_agent as vsa\n"
    "tracemalloc.start()\n"
    "code = vsa.main(sys.argv[1:])\n"
    "sys.stderr.write('TRACEMALLOC_PEAK %%d\\n' %% tracemalloc.get_traced_memory()[1])\n"
    "sys.exit(code)\n" % ROOT)


@pytest.mark.parametrize("path", ["/v1/sys/leader", "/v1/auth/approle/login"])
def test_huge_json_answer_is_refused_with_bounded_memory(bao_cluster, approle, tmp_path, path):
    body = b'{"is_self": true, "auth": null, "padding": "' + b"x" * (50 * MB) + b'"}'
    snapdir = tmp_path / "snaps"
    with proxy_to(bao_cluster.leader().addr) as proxy:
        rule = proxy.fail_requests(lambda m, p: p.startswith(path), status=200, body=body)
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        proc = subprocess.run([sys.executable, "-I", "-c", TRACED_MAIN, "-c", config, "--once"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        assert rule.hits >= 1
    log = proc.stderr.decode("utf-8", "replace")
    peak = int(re.search(r"TRACEMALLOC_PEAK (\d+)", log).group(1))
    log = re.sub(r"TRACEMALLOC_PEAK \d+\n", "", log)
    assert proc.returncode == 1, log
    errors = error_lines(log)
    assert len(errors) == 1 and "refused" in errors[0], log
    assert "Traceback" not in log
    assert peak < 20 * MB, "%.0f MB of memory for a refused 50 MB answer" % (peak / MB)
    assert snapshots(snapdir) == []


# =============================================================================
# no secret in any output
# =============================================================================


def test_no_credential_appears_in_any_output(bao_cluster, approle, moto, azurite, gcs, tmp_path,
                                             capsys):
    from azurite import service_sas
    from cred_servers import GoogleTokenServer
    from rsa_keys import make_rsa_key, service_account_json, write_json

    leader = bao_cluster.leader()
    private, public, _ = make_rsa_key(2048, "pkcs8")
    sas = service_sas(azurite.account, azurite.key, CONTAINER, permissions="racwdl")
    expired = service_sas(azurite.account, azurite.key, CONTAINER, start=-7200, expiry=-3600)
    token = bao_cluster.login_approle(approle.role_id, approle.secret_id, approle.mount)
    wrong_aws = moto.wrong_secret_access_key
    wrong_azure = base64.b64encode(os.urandom(64)).decode("ascii")
    wrong_secret_id = "6f1c2d3e-0000-4000-8000-0123456789ab"
    (tmp_path / "sid").write_text(approle.secret_id + "\n")
    (tmp_path / "tok").write_text(token)

    with GoogleTokenServer(public) as tokens:
        key_file = tmp_path / "sa.json"
        write_json(str(key_file), service_account_json(private, tokens.token_url))
        s3 = {"access_key_id": moto.access_key_id, "secret_access_key": moto.secret_access_key,
              "s3_endpoint": moto.endpoint, "s3_region": "us-east-1", "s3_bucket": BUCKET,
              "s3_key_prefix": "secrets"}
        azure = {"account_name": azurite.account, "account_key": azurite.key,
                 "container_name": CONTAINER, "endpoint": azurite.endpoint, "prefix": "secrets"}
        google = {"bucket": BUCKET, "endpoint": gcs.endpoint, "credentials_file": str(key_file),
                  "prefix": "secrets"}
        cases = {
            "approle-all-storages": dict(aws_storage=s3, azure_storage=azure, google_storage=google),
            "secret-id-file": dict(secret_id=None, secret_id_file=str(tmp_path / "sid")),
            "token-file": dict(role_id=None, secret_id=None, token_file=str(tmp_path / "tok")),
            "token-inline": dict(role_id=None, secret_id=None, token=token),
            "wrong-secret-id": dict(secret_id=wrong_secret_id),
            "s3-wrong-secret": dict(aws_storage=dict(s3, secret_access_key=wrong_aws)),
            "azure-sas": dict(azure_storage=dict(azure, account_key=None, sas_token="?" + sas)),
            "azure-expired-sas": dict(azure_storage=dict(azure, account_key=None, sas_token=expired)),
            "azure-wrong-key": dict(azure_storage=dict(azure, account_key=wrong_azure)),
            "azure-connection-string": dict(azure_storage={
                "container_name": CONTAINER, "prefix": "secrets",
                "connection_string": azurite.connection_string}),
        }
        outputs = []
        for name, extra in sorted(cases.items()):
            for key in ("aws_storage", "azure_storage", "google_storage"):
                if key in extra:
                    extra[key] = {k: v for k, v in extra[key].items() if v is not None}
            config = write_config(tmp_path / ("%s.json" % name), leader.addr, approle,
                                  tmp_path / "local", **extra)
            for argv in (["--once", "--log-level", "debug"],
                         ["--once", "--log-level", "debug", "--log-format", "json"],
                         ["--check-config", "--log-level", "debug"],
                         ["--log-level", "debug", "list"]):
                code, log = run_main("-c", config, *argv)
                captured = capsys.readouterr()
                outputs.append(("%s %s -> %s" % (name, " ".join(argv), code),
                                log + captured.out + captured.err))
        # and one daemon, as systemd would run it
        config = write_config(tmp_path / "daemon.json", leader.addr, approle, tmp_path / "local",
                              frequency="1s", aws_storage=s3, azure_storage=azure,
                              google_storage=google)
        logfile = tmp_path / "daemon.log"
        proc = start_agent(config, logfile, sys.executable, "--log-level", "debug")
        try:
            wait_for(lambda: read(logfile).count("Cycle stored") >= 2, 60, "two daemon cycles")
        finally:
            stop(proc)
        outputs.append(("daemon", read(logfile)))
        issued = list(tokens.issued)
        assertions = [g.get("assertion") for g in tokens.grants if g.get("assertion")]

    first = dict((label.split(" ")[0], text) for label, text in reversed(outputs))
    assert "Cycle stored" in first["approle-all-storages"], first["approle-all-storages"]
    assert all(" -> 2" not in label for label, _ in outputs), [ln for ln, _ in outputs]
    assert issued, "the GCS service-account flow was not exercised"
    secrets = {"secret_id": approle.secret_id, "wrong secret_id": wrong_secret_id,
               "vault token": token, "aws secret": moto.secret_access_key,
               "wrong aws secret": wrong_aws, "azure key": azurite.key,
               "wrong azure key": wrong_azure, "sas": sas, "expired sas": expired,
               "sas signature": sas.split("sig=")[1].split("&")[0],
               "expired sas signature": expired.split("sig=")[1].split("&")[0]}
    for i, value in enumerate(issued):
        secrets["gcs access token %d" % i] = value
    for i, value in enumerate(assertions):
        secrets["gcs jwt assertion %d" % i] = value
        secrets["gcs jwt signature %d" % i] = value.rsplit(".", 1)[1]
    pem_lines = [line for line in private.splitlines() if line and "-----" not in line]
    for i, line in enumerate(pem_lines):
        secrets["private key line %d" % i] = line
    for label, text in outputs:
        for what, value in secrets.items():
            assert value not in text, "%s appears in the output of %s" % (what, label)
            quoted = json.dumps(value)[1:-1]
            assert quoted not in text, "%s (JSON-escaped) appears in the output of %s" % (what, label)
        match = TOKEN_RE.search(text)
        assert match is None, "token-like %r in the output of %s" % (match.group(0), label)
        assert "sig=" not in text and "PRIVATE KEY" not in text, label
        for pattern in (r"Signature=[0-9a-f]{16}", r"SharedKey [^\s:]+:[A-Za-z0-9+/=]{16}",
                        r"Bearer [A-Za-z0-9._~+/=-]{16}", r"X-Amz-Security-Token"):
            assert not re.search(pattern, text), "%s in the output of %s" % (pattern, label)


# =============================================================================
# soak: memory and file descriptors stay flat
# =============================================================================


def _proc_rss_kb(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def _proc_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


@pytest.mark.slow
def test_soak_daemon_every_second_keeps_rss_and_fds_flat(bao_cluster, approle, kv_data, tmp_path):
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                          frequency="1s", retain=3)
    logfile = tmp_path / "agent.log"
    proc = start_agent(config, logfile)
    samples = []
    try:
        wait_for(lambda: "Cycle stored" in read(logfile), 30, "the first cycle")
        started = time.monotonic()
        for tick in range(1, 13):
            time.sleep(max(0.0, started + 5 * tick - time.monotonic()))
            assert proc.poll() is None, read(logfile)
            samples.append((round(time.monotonic() - started), _proc_rss_kb(proc.pid),
                            _proc_fds(proc.pid), read(logfile).count("Cycle stored")))
    finally:
        assert stop(proc) == 0
    print("soak samples (seconds, VmRSS kB, open fds, cycles stored):")
    for sample in samples:
        print("  %3ds  %7d kB  %3d fds  %3d cycles" % sample)
    log = read(logfile)
    assert "Traceback" not in log and error_lines(log) == [], log
    cycles = samples[-1][3]
    assert cycles >= 40, "only %d cycles in a minute at frequency 1s" % cycles
    warm = samples[2:]                              # the first 15 s are warm-up
    # A sample may land mid-cycle (a few MiB in flight) or between cycles, so
    # compare peaks: the late peak may not exceed the early one.
    growth = max(s[1] for s in warm[-4:]) - max(s[1] for s in warm[:4])
    assert growth < 5 * 1024, "RSS grew by %d kB over %d cycles: %s" % (growth, cycles, samples)
    fds = [s[2] for s in samples]
    assert max(fds) - min(fds) <= 2, "open fds changed: %s" % fds
    assert len(verify_all(snapdir)) == 3 and hidden(snapdir) == []


def test_soak_200_in_process_cycles_keep_fds_flat(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                          retain=3)
    agent = vsa.Agent(lambda runtime: vsa.load_all(config, runtime))
    fds = []
    try:
        for cycle in range(200):
            result = agent.run_cycle()
            assert result.outcome == "stored", "cycle %d: %s %s" % (cycle, result.outcome, result.errors)
            if cycle % 20 == 19:
                fds.append(len(os.listdir("/proc/self/fd")))
    finally:
        agent.signals.close()
    print("open fds every 20 cycles: %s" % fds)
    assert max(fds) - min(fds) <= 2, "open fds changed over 200 cycles: %s" % fds
    assert len(verify_all(snapdir)) == 3 and hidden(snapdir) == []


# =============================================================================
# Vault-side faults (last: they break the cluster, then heal it)
# =============================================================================


def test_sealed_node_is_one_clear_error(bao_cluster, approle, tmp_path):
    node = bao_cluster.standbys()[0]
    snapdir = tmp_path / "snaps"
    try:
        bao_cluster.seal(node)
        config = write_config(tmp_path / "c.json", node.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")
    finally:
        bao_cluster.heal()
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1 and "sealed" in errors[0], log
    assert "Traceback" not in log
    assert snapshots(snapdir) == [] and temp_files(snapdir) == []


def test_daemon_survives_its_vault_restarting(bao_cluster, approle, kv_data, tmp_path):
    node = bao_cluster.leader()
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", node.addr, approle, snapdir, frequency="1s")
    logfile = tmp_path / "agent.log"
    proc = start_agent(config, logfile)
    try:
        wait_for(lambda: "Cycle stored" in read(logfile), 30, "a first snapshot")
        bao_cluster.stop_node(node)
        mark = len(read(logfile))
        wait_for(lambda: read(logfile)[mark:].count("Snapshot cycle failed") >= 2, 30,
                 "failed cycles while Vault is down")
        assert proc.poll() is None, read(logfile)
        bao_cluster.start_node(node)
        bao_cluster.wait_ready()
        # The restarted node rejoins, usually as a standby (who leads after the
        # election is up to Raft): the daemon is back to normal cycles when it
        # either stores again or skips as a standby, without failing.
        mark = len(read(logfile))
        wait_for(lambda: re.search(r"Cycle stored|Not running on leader node, skipping\.",
                                   read(logfile)[mark:]), 60,
                 "a normal cycle once the node is back")
        later = len(read(logfile))
        time.sleep(3)
        assert "Snapshot cycle failed" not in read(logfile)[later:], read(logfile)[later:]
        assert proc.poll() is None
    finally:
        code = stop(proc)
        bao_cluster.heal()
    log = read(logfile)
    assert code == 0, log
    assert "Traceback" not in log
    assert len(verify_all(snapdir)) >= 1 and temp_files(snapdir) == []


def test_leader_killed_mid_snapshot_stores_nothing_then_the_new_leader_works(
        bao_cluster, approle, kv_data, tmp_path):
    old = bao_cluster.leader()
    snapdir = tmp_path / "snaps"
    try:
        with proxy_to(old.addr) as proxy:
            proxy.delay(0.05)           # ~8 s for the stream: time to kill in the middle
            config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
            logfile = tmp_path / "agent.log"
            proc = start_agent(config, logfile, sys.executable, "--once")
            try:
                wait_for(lambda: snapshot_gets(proxy), 30, "the snapshot request")
                time.sleep(0.5)
                bao_cluster.kill_node(old)
                code = proc.wait(60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        log = read(logfile)
        assert code == 1, log
        errors = error_lines(log)
        assert len(errors) == 1 and "snapshot" in errors[0].lower(), log
        assert "Traceback" not in log
        assert snapshots(snapdir) == [] and temp_files(snapdir) == []
        new = bao_cluster.wait_for_leader(exclude=old)
        config = write_config(tmp_path / "n.json", new.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")
        assert code == 0, log
        assert len(verify_all(snapdir)) == 1
    finally:
        bao_cluster.heal()
