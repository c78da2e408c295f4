"""Section "HTTP transport and retry": every request has a total deadline, a stop
cuts any request in progress, and headers are bounded on every answer.

A deadline thread that could not start is started by the next request.  A
SIGTERM during a retention retry, while ``list``, ``download`` or
``restore`` lists, or during a multipart upload whose abort hangs, exits 0
within seconds: the clean-up requests after a stop get a short grace, not
the whole deadline.

A server that trickles one byte a second stays under any per-read socket
timeout for ever; the deadline (``request_timeout``) ends it.  Snapshot
data (a streamed answer, a file uploaded as the request body) is only held
to the idle timeout.  The servers are raw loopback sockets
(slow_servers.py) whose connections end on their own after a few seconds:
an agent without the fix fails the time checks instead of hanging.
"""

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import write_config
from support.archives import build_archive
from support.fake_endpoints import Endpoint, FakeVault
from support.fake_s3 import FakeS3
from support.harness import (AGENT, FakeSignals, child_env, error_lines, read, reaped, run_main,
                             start_agent, stop, wait_for)
from support.slow_servers import RecordingProxy, TrickleServer

DEADLINE = 0.25            # the Http's own deadline (the config's request_timeout is 1s at least)
WITHIN = "no complete answer within %s (request_timeout)" % vsa.format_duration(DEADLINE)


def http(**kwargs):
    kwargs.setdefault("deadline", DEADLINE)
    return vsa.Http(None, 5.0, **kwargs)


def timed(call):
    """(exception raised by ``call()``, seconds it took)."""
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        call()
    return info.value, time.monotonic() - start


def agent_env():
    """The environment of an agent run as a subprocess: no cloud or Vault
    variables of this machine, no EC2 metadata."""
    return child_env(drop_prefixes=("AWS_", "AZURE_", "VAULT_", "BAO_", "GOOGLE_"),
                     AWS_EC2_METADATA_DISABLED="true")


# -- the deadline --------------------------------------------------------------


def test_trickled_headers_fail_at_the_deadline():
    with TrickleServer("headers") as server:
        error, took = timed(lambda: http().request("GET", server.url + "/v1/sys/leader"))
    assert isinstance(error, vsa.TransportError) and error.retryable
    assert str(error) == "GET %s/v1/sys/leader: %s" % (server.url, WITHIN)
    assert took < DEADLINE + 1.0


def test_trickled_small_body_fails_at_the_deadline():
    with TrickleServer("body") as server:
        client = http()

        def call():
            with client.request("GET", server.url + "/v1/auth/token/lookup-self") as resp:
                resp.json()
        error, took = timed(call)
    assert isinstance(error, vsa.TransportError)
    assert WITHIN in str(error)
    assert took < DEADLINE + 1.0


def test_a_tls_handshake_that_never_comes_fails_at_the_deadline():
    with TrickleServer("silent") as server:
        url = "https://127.0.0.1:%d/v1/sys/leader" % server.port
        error, took = timed(lambda: http().request("GET", url))
    assert WITHIN in str(error)
    assert took < DEADLINE + 1.0


def test_a_streamed_answer_is_held_to_the_idle_timeout_not_the_deadline():
    # 8 bytes, one every 0.05 s: 0.4 s in all, longer than the deadline.
    with TrickleServer("stream", length=8) as server:
        with http().request("GET", server.url + vsa.SNAPSHOT_PATH) as resp:
            data = b""
            while True:
                chunk = resp.read(1)
                if not chunk:
                    break
                data += chunk
    assert data == b" " * 8


@pytest.mark.slow
def test_an_upload_body_is_held_to_the_idle_timeout_and_its_answer_to_the_deadline():
    def slow_body():
        for _ in range(6):
            time.sleep(0.07)          # 0.42 s of upload, longer than the deadline
            yield b"x" * 1000
    with TrickleServer("slow_answer") as server:
        resp = http().request("PUT", server.url + "/bucket/object", {"Content-Length": "6000"},
                              slow_body())
        with resp:
            assert resp.status == 200 and resp.body() == b""


def test_request_timeout_is_a_top_level_key_shown_by_check_config(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"addr": "http://127.0.0.1:1", "token": "t",
                                "request_timeout": "45s",
                                "local_storage": {"path": str(tmp_path / "snaps")}}))
    path.chmod(0o600)
    code, log = run_main("-c", str(path), "--check-config")
    assert code == 0, log
    assert json.loads(capsys.readouterr().out)["request_timeout"] == "45s"
    assert "unknown config key" not in log


@pytest.mark.slow
def test_a_trickling_leader_check_fails_the_cycle_at_the_deadline(tmp_path):
    with TrickleServer("headers") as server:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"addr": server.url, "token": "t", "request_timeout": "1s",
                                    "local_storage": {"path": str(tmp_path / "snaps")}}))
        path.chmod(0o600)
        start = time.monotonic()
        code, log = run_main("-c", str(path), "--once")
        took = time.monotonic() - start
    assert code == 1, log
    assert any("no complete answer within 1s (request_timeout)" in line for line in error_lines(log)), log
    assert took < 3.0, log


def test_a_deadline_thread_that_failed_to_start_is_started_by_the_next_request(monkeypatch):
    """Watchdog.arm() set ``_thread`` before ``start()``: when the start
    failed once (RuntimeError: can't start new thread; a container at its
    pids limit, RLIMIT_NPROC), ``_thread`` stayed a thread that never ran,
    no later arm() started one, and no deadline ever fired again for the
    life of that Http. Before the fix: the next request against a server
    trickling its headers ran 6.0 s (the server's own limit) under a 1 s
    deadline."""
    real_start = threading.Thread.start
    failed = []

    def start(self):
        if self.name == "http-deadlines" and not failed:
            failed.append(self)
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    http = vsa.Http(timeout=10.0, deadline=DEADLINE)
    with TrickleServer("headers", limit=4.0) as server:
        with pytest.raises((vsa.TransportError, RuntimeError)):
            http.request("GET", server.url + "/first").close()
        assert failed, "the deadline thread was never asked to start"
        began = time.monotonic()
        try:
            http.request("GET", server.url + "/second").close()
            outcome = "an answer (headers cut by the server's own close)"
        except vsa.TransportError as exc:
            outcome = str(exc)
        took = time.monotonic() - began
    assert took < 1.5, ("the second request ran %.1fs under a %s deadline (no deadline thread), "
                        "ending with %s" % (took, vsa.format_duration(DEADLINE), outcome))
    assert "request_timeout" in outcome


# -- a stop --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["headers", "body", "silent"])
def test_a_stop_ends_a_request_in_progress_at_once(mode):
    signals = FakeSignals()
    with TrickleServer(mode) as server:
        scheme = "https" if mode == "silent" else "http"
        url = "%s://127.0.0.1:%d/v1/auth/approle/login" % (scheme, server.port)
        client = http(deadline=30.0, signals=signals)
        threading.Timer(0.1, signals.request_stop).start()

        def call():
            with client.request("POST", url, {}, b"{}") as resp:
                resp.json()
        error, took = timed(call)
    assert isinstance(error, vsa.Stopped), error
    assert took < 2.0           # the stop at 0.1 s; the deadline is 30 s (busy CI cores: slack)
    assert signals._abort_hooks == []


def test_a_stop_ends_the_requests_of_every_worker_thread():
    signals = FakeSignals()
    client = http(deadline=30.0, signals=signals)
    results = []
    with TrickleServer("headers") as server:
        def worker():
            start = time.monotonic()
            try:
                client.request("PUT", server.url + "/bucket/part", {}, b"x")
            except Exception as exc:      # recorded for the assertion
                results.append((type(exc), time.monotonic() - start))
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: server.connections == 4, 5, "four requests in progress")
        signals.request_stop()
        for thread in threads:
            thread.join(5)
    assert [kind for kind, _ in results] == [vsa.Stopped] * 4
    assert max(took for _, took in results) < 2.0      # the deadline is 30 s


def test_a_request_started_after_the_stop_still_runs_under_its_deadline():
    # A cleanup after a stop (aborting a multipart upload) must still go out.
    signals = FakeSignals()
    signals.request_stop()
    with TrickleServer("stream", length=2) as server:
        with http(signals=signals).request("DELETE", server.url + "/bucket/o?uploadId=1") as resp:
            assert resp.status == 200


@pytest.mark.slow
def test_sigterm_during_a_trickling_leader_check_exits_0_at_once(tmp_path):
    with TrickleServer("headers", limit=15.0) as server:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"addr": server.url, "token": "t",
                                    "local_storage": {"path": str(tmp_path / "snaps")}}))
        path.chmod(0o600)
        proc = subprocess.Popen([sys.executable, "-I", AGENT, "-c", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=child_env(drop_prefixes=("VAULT_", "BAO_")))
        try:
            deadline = time.monotonic() + 10
            while server.connections == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            code = proc.wait(5)
            took = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log = proc.stdout.read().decode("utf-8", "replace")
    assert code == 0, log
    assert took < 1.5, log
    assert "Traceback" not in log


class RetentionHangS3(FakeS3):
    """DeleteObjects refused (AccessDenied); once a delete was refused,
    every listing hangs (up to 8 s), so a retention retry is stuck in it."""

    def __init__(self, objects):
        FakeS3.__init__(self, objects)
        self.hanging = threading.Event()
        self.release = threading.Event()

    def respond(self, request):
        if request.method == "POST" and "delete" in request.path:
            return 403, {}, b"<Error><Code>AccessDenied</Code><Message>no delete</Message></Error>"
        if request.method == "GET" and "list-type=2" in request.path and self.deletes():
            self.hanging.set()
            self.release.wait(8)
        return FakeS3.respond(self, request)


@pytest.mark.slow
def test_sigterm_during_a_retention_retry_exits_0_without_a_traceback(tmp_path):
    # A SIGTERM during a retention retry escaped the daemon loop as a
    # traceback (issue 18's review).
    now = datetime.datetime.now(vsa.UTC)
    old = dict(("p/" + vsa.snapshot_name(now - datetime.timedelta(days=d)), b"x" * 10)
               for d in (2, 3, 4))
    with RetentionHangS3(old) as s3, FakeVault(role_id="r", secret_id="s") as vault:
        config = write_config(tmp_path, {
            "addr": vault.url, "role_id": "r", "secret_id": "s", "frequency": "1h",
            "retry_interval": "1s", "leader_poll": "0s",
            "aws_storage": s3.storage_block(s3_key_prefix="p", retain=1)})
        try:
            with reaped(start_agent(config, tmp_path / "agent.log", sys.executable,
                                    env=agent_env())) as proc:
                wait_for(s3.hanging.is_set, 15, "the retention retry's listing")
                began = time.monotonic()
                code = stop(proc, timeout=4)
                took = time.monotonic() - began
        finally:
            s3.release.set()
    log = read(tmp_path / "agent.log")
    # Before the fix: exit 1 within 0.1 s, "Traceback ... Stopped: stop requested".
    assert "Traceback" not in log, log[-2500:]
    assert code == 0 and took < 2.0, (code, took, log[-1500:])


class HangingList(FakeS3):
    """Every listing hangs (up to 8 s) until released."""

    def __init__(self):
        FakeS3.__init__(self)
        self.hanging = threading.Event()
        self.release = threading.Event()

    def respond(self, request):
        if request.method == "GET" and "list-type=2" in request.path:
            self.hanging.set()
            self.release.wait(8)
        return FakeS3.respond(self, request)


@pytest.mark.parametrize("command", [["list"], ["download", "latest"],
                                     ["restore", "--yes", "latest"]])
def test_sigterm_while_a_command_lists_exits_0_and_reports_no_failure(tmp_path, command):
    # Stopped is an AgentError: list_snapshots() took it for a failed
    # listing of this storage and went on with the next one.
    with HangingList() as s3:
        config = write_config(tmp_path, {
            "addr": "http://127.0.0.1:9", "token": "t",
            "aws_storage": s3.storage_block(s3_key_prefix="p")})
        try:
            with open(str(tmp_path / "cmd.log"), "wb") as log_file:
                proc = subprocess.Popen([sys.executable, "-I", AGENT, "-c", config] + command,
                                        stdout=log_file, stderr=subprocess.STDOUT,
                                        env=agent_env(), cwd=str(tmp_path))
            with reaped(proc):
                wait_for(s3.hanging.is_set, 15, "the listing")
                code = stop(proc, timeout=4)
        finally:
            s3.release.set()
    log = read(tmp_path / "cmd.log")
    # Before the fix: exit 1; "ERROR Listing failed: s3://snapshots/p/: stop
    # requested" (and for download/restore "snapshot latest not found").
    assert code == 0, (code, log)
    assert " ERROR " not in log, log


class StuckMultipartS3(Endpoint):
    """CreateMultipartUpload works; every UploadPart and the
    AbortMultipartUpload then get no answer (up to 10 s each)."""

    def __init__(self):
        Endpoint.__init__(self)
        self.parts = threading.Event()
        self.aborts = threading.Event()
        self.release = threading.Event()

    def respond(self, request):
        if request.method == "POST" and request.path.endswith("?uploads="):
            return 200, {"Content-Type": "application/xml"}, (
                "<InitiateMultipartUploadResult><Bucket>snapshots</Bucket><Key>k</Key>"
                "<UploadId>stuck-upload</UploadId></InitiateMultipartUploadResult>")
        if request.method == "PUT" and "uploadId=" in request.path:
            self.parts.set()
        elif request.method == "DELETE" and "uploadId=" in request.path:
            self.aborts.set()
        else:
            return 200, {"Content-Type": "application/xml"}, (
                "<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>")
        self.release.wait(10)
        return 500, {}, b"<Error><Code>InternalError</Code></Error>"


@pytest.mark.slow
def test_sigterm_during_a_multipart_upload_whose_abort_hangs_exits_within_seconds(tmp_path):
    # A stop cuts the parts in flight; the AbortMultipartUpload that
    # follows started after the stop, so nothing cut it: it ran to the
    # request deadline (request_timeout, 60 s by default; here 30 s), past
    # Kubernetes' 30 s grace period and Docker's 10 s.
    archive = build_archive(state=os.urandom(6 * 1024 * 1024))
    with StuckMultipartS3() as s3, FakeVault(role_id="r", secret_id="s", archive=archive) as vault:
        block = {"access_key_id": "AKIDFAKES3TEST", "secret_access_key": "fake-s3-test-secret",
                 "s3_endpoint": s3.url, "s3_region": "us-east-1", "s3_bucket": "snapshots",
                 "part_size_mb": 5}
        config = write_config(tmp_path, {
            "addr": vault.url, "role_id": "r", "secret_id": "s", "frequency": "1h",
            "leader_poll": "0s", "request_timeout": "30s", "temp_dir": str(tmp_path),
            "aws_storage": block})
        try:
            with reaped(start_agent(config, tmp_path / "agent.log", sys.executable,
                                    env=agent_env())) as proc:
                wait_for(s3.parts.is_set, 15, "an UploadPart")
                proc.send_signal(15)
                wait_for(s3.aborts.is_set, 5, "the AbortMultipartUpload")
                began = time.monotonic()
                try:                # one SIGTERM only: a second one does cut the abort
                    code = proc.wait(3)
                except subprocess.TimeoutExpired:
                    code = "still running"
                took = time.monotonic() - began
        finally:
            s3.release.set()
    # Before the fix: still running 3 s after the abort began (killed by the
    # test); it exited only at the 30 s deadline.
    assert code == 0 and took < 2.0, (code, took, read(tmp_path / "agent.log")[-1500:])


# -- bounded headers -----------------------------------------------------------


def test_an_endless_header_stream_is_one_clear_error():
    with TrickleServer("endless_headers") as server:
        error, took = timed(lambda: http(deadline=5.0).request("GET", server.url + "/v1/sys/leader"))
    assert isinstance(error, vsa.TransportError)
    assert "\n" not in str(error) and "100" in str(error)


def test_a_proxy_streaming_connect_headers_without_end_is_one_clear_error():
    with RecordingProxy("endless_headers") as proxy:
        client = http(proxy=vsa.ProxyPolicy(proxy.url, {}), deadline=5.0)
        error, took = timed(lambda: client.request("GET", "https://vault.example:8200/v1/sys/leader"))
    assert isinstance(error, vsa.TransportError)
    assert "the proxy's answer to CONNECT has more than 100 header lines" in str(error)
    assert took < 2.0


def test_a_proxy_trickling_connect_headers_fails_at_the_deadline():
    with RecordingProxy("trickle_headers") as proxy:
        client = http(proxy=vsa.ProxyPolicy(proxy.url, {}))
        error, took = timed(lambda: client.request("GET", "https://vault.example:8200/v1/sys/leader"))
    assert WITHIN in str(error)
    assert took < DEADLINE + 1.0
    assert proxy.received[0].startswith(
        b"CONNECT vault.example:8200 HTTP/1.1\r\nHost: vault.example:8200\r\n")


def test_a_proxy_refusing_connect_is_one_line_naming_its_status():
    with RecordingProxy("refuse") as proxy:
        client = http(proxy=vsa.ProxyPolicy("http://ops:hunter2@127.0.0.1:%d" % proxy.port, {}))
        error, _ = timed(lambda: client.request("GET", "https://vault.example:8200/v1/sys/leader"))
    assert "Tunnel connection failed: 502 Bad Gateway" in str(error)
    assert b"Proxy-Authorization: Basic " in proxy.received[0]
    assert "hunter2" not in str(error)
