"""Section 5 (HTTP transport): every request has a total deadline, a stop
cuts any request in progress, and headers are bounded on every answer.

A server that trickles one byte a second stays under any per-read socket
timeout for ever; the deadline (``request_timeout``) ends it.  Snapshot
data (a streamed answer, a file uploaded as the request body) is only held
to the idle timeout.  The servers are raw loopback sockets
(slow_servers.py) whose connections end on their own after a few seconds:
an agent without the fix fails the time checks instead of hanging.
"""

import json
import signal
import sys
import threading
import time

import pytest

import vault_snapshot_agent as vsa
from harness import AGENT, FakeSignals, child_env, error_lines, run_main
from slow_servers import RecordingProxy, TrickleServer

DEADLINE = 1.0


def http(**kwargs):
    kwargs.setdefault("deadline", DEADLINE)
    return vsa.Http(None, 5.0, **kwargs)


def timed(call):
    """(exception raised by ``call()``, seconds it took)."""
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        call()
    return info.value, time.monotonic() - start


# -- the deadline --------------------------------------------------------------


def test_trickled_headers_fail_at_the_deadline():
    with TrickleServer("headers") as server:
        error, took = timed(lambda: http().request("GET", server.url + "/v1/sys/leader"))
    assert isinstance(error, vsa.TransportError) and error.retryable
    assert str(error) == ("GET %s/v1/sys/leader: no complete answer within 1s (request_timeout)"
                          % server.url)
    assert took < DEADLINE + 1.0


def test_trickled_small_body_fails_at_the_deadline():
    with TrickleServer("body") as server:
        client = http()

        def call():
            with client.request("GET", server.url + "/v1/auth/token/lookup-self") as resp:
                resp.json()
        error, took = timed(call)
    assert isinstance(error, vsa.TransportError)
    assert "no complete answer within 1s (request_timeout)" in str(error)
    assert took < DEADLINE + 1.0


def test_a_tls_handshake_that_never_comes_fails_at_the_deadline():
    with TrickleServer("silent") as server:
        url = "https://127.0.0.1:%d/v1/sys/leader" % server.port
        error, took = timed(lambda: http().request("GET", url))
    assert "no complete answer within 1s (request_timeout)" in str(error)
    assert took < DEADLINE + 1.0


def test_a_streamed_answer_is_held_to_the_idle_timeout_not_the_deadline():
    # 30 bytes, one every 0.05 s: 1.5 s in all, longer than the deadline.
    with TrickleServer("stream", length=30) as server:
        with http().request("GET", server.url + vsa.SNAPSHOT_PATH) as resp:
            data = b""
            while True:
                chunk = resp.read(1)
                if not chunk:
                    break
                data += chunk
    assert data == b" " * 30


def test_an_upload_body_is_held_to_the_idle_timeout_and_its_answer_to_the_deadline():
    def slow_body():
        for _ in range(6):
            time.sleep(0.25)          # 1.5 s of upload, longer than the deadline
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


# -- a stop --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["headers", "body", "silent"])
def test_a_stop_ends_a_request_in_progress_at_once(mode):
    signals = FakeSignals()
    with TrickleServer(mode) as server:
        scheme = "https" if mode == "silent" else "http"
        url = "%s://127.0.0.1:%d/v1/auth/approle/login" % (scheme, server.port)
        client = http(deadline=30.0, signals=signals)
        threading.Timer(0.3, signals.request_stop).start()

        def call():
            with client.request("POST", url, {}, b"{}") as resp:
                resp.json()
        error, took = timed(call)
    assert isinstance(error, vsa.Stopped), error
    assert took < 1.3
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
        time.sleep(0.3)
        signals.request_stop()
        for thread in threads:
            thread.join(5)
    assert [kind for kind, _ in results] == [vsa.Stopped] * 4
    assert max(took for _, took in results) < 1.3


def test_a_request_started_after_the_stop_still_runs_under_its_deadline():
    # A cleanup after a stop (aborting a multipart upload) must still go out.
    signals = FakeSignals()
    signals.request_stop()
    with TrickleServer("stream", length=2) as server:
        with http(signals=signals).request("DELETE", server.url + "/bucket/o?uploadId=1") as resp:
            assert resp.status == 200


def test_sigterm_during_a_trickling_leader_check_exits_0_at_once(tmp_path):
    with TrickleServer("headers", limit=15.0) as server:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"addr": server.url, "token": "t",
                                    "local_storage": {"path": str(tmp_path / "snaps")}}))
        path.chmod(0o600)
        import subprocess
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


# -- bounded headers -----------------------------------------------------------


def test_an_endless_header_stream_is_one_clear_error():
    with TrickleServer("endless_headers") as server:
        error, took = timed(lambda: http().request("GET", server.url + "/v1/sys/leader"))
    assert isinstance(error, vsa.TransportError)
    assert "\n" not in str(error) and "100" in str(error)


def test_a_proxy_streaming_connect_headers_without_end_is_one_clear_error():
    with RecordingProxy("endless_headers") as proxy:
        client = http(proxy=vsa.ProxyPolicy(proxy.url, {}))
        error, took = timed(lambda: client.request("GET", "https://vault.example:8200/v1/sys/leader"))
    assert isinstance(error, vsa.TransportError)
    assert "the proxy's answer to CONNECT has more than 100 header lines" in str(error)
    assert took < DEADLINE


def test_a_proxy_trickling_connect_headers_fails_at_the_deadline():
    with RecordingProxy("trickle_headers") as proxy:
        client = http(proxy=vsa.ProxyPolicy(proxy.url, {}))
        error, took = timed(lambda: client.request("GET", "https://vault.example:8200/v1/sys/leader"))
    assert "no complete answer within 1s (request_timeout)" in str(error)
    assert took < DEADLINE + 1.0
    assert proxy.received[0].startswith(b"CONNECT vault.example:8200 HTTP/1.1\r\nHost: vault.example:8200\r\n")


def test_a_proxy_refusing_connect_is_one_line_naming_its_status():
    with RecordingProxy("refuse") as proxy:
        client = http(proxy=vsa.ProxyPolicy("http://ops:hunter2@127.0.0.1:%d" % proxy.port, {}))
        error, _ = timed(lambda: client.request("GET", "https://vault.example:8200/v1/sys/leader"))
    assert "Tunnel connection failed: 502 Bad Gateway" in str(error)
    assert b"Proxy-Authorization: Basic " in proxy.received[0]
    assert "hunter2" not in str(error)
