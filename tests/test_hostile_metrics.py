"""Issue 14, part 3: the metrics server against hostile clients.

The daemon runs against an address where no Vault listens: its cycles fail
(and are retried a minute later), but the metrics server serves all along,
which is all these tests need.  Timeouts here are safety nets, never timed
assertions."""

import json
import socket
import time

import pytest

from support.harness import free_ports, read, reaped, start_agent, stop, wait_for

SCRAPE_TIMEOUT = 5.0      # a scrape that takes longer than this is blocked
STOP_TIMEOUT = 15.0       # systemd waits 30 s before SIGKILL


def scrape(port, timeout=SCRAPE_TIMEOUT):
    """(status, body) of ``GET /metrics``; raises socket.timeout when blocked."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def _serving(port):
    try:
        return scrape(port, 2.0)[0] == 200
    except (OSError, socket.timeout):
        return False


@pytest.fixture
def daemon(tmp_path):
    """A running daemon with a metrics server: (proc, metrics port, log path)."""
    vault_port, metrics_port = free_ports(2)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({
        "addr": "http://127.0.0.1:%d" % vault_port, "role_id": "role", "secret_id": "secret",
        "local_storage": {"path": str(tmp_path / "snaps")},
        "metrics_address": "127.0.0.1:%d" % metrics_port}))
    logfile = tmp_path / "agent.log"
    with reaped(start_agent(str(config), logfile)) as proc:
        wait_for(lambda: proc.poll() is not None or _serving(metrics_port), 20,
                 "the metrics server")
        assert proc.poll() is None, read(logfile)
        yield proc, metrics_port, logfile


def idle_client(port, data=b"GET /metr"):
    """A client that sends the start of a request line and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(data)
    time.sleep(0.1)              # let the server accept it (the backlog keeps the order anyway)
    return sock


def test_an_idle_client_does_not_block_other_scrapes(daemon):
    proc, port, logfile = daemon
    slow = idle_client(port)
    try:
        try:
            status, body = scrape(port)
        except socket.timeout:
            pytest.fail("a scrape got no answer within %.0f s while one client sat idle on "
                        "the metrics port" % SCRAPE_TIMEOUT)
        assert status == 200
        assert "vault_snapshot_" in body
        assert proc.poll() is None
    finally:
        slow.close()
    assert stop(proc, timeout=STOP_TIMEOUT) == 0
    assert "Traceback" not in read(logfile)


def test_sigterm_with_an_idle_client_connected_exits_0(daemon):
    proc, port, logfile = daemon
    slow = idle_client(port)
    try:
        code = stop(proc, timeout=STOP_TIMEOUT)      # fails the test if it hangs
        assert code == 0, read(logfile)
    finally:
        slow.close()
    assert "Traceback" not in read(logfile)


def _answer_to(port, data):
    """What the server sends back to ``data`` (b"" for a plain close, None for a
    reset); socket.timeout propagates."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=SCRAPE_TIMEOUT)
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass                      # closed on us while we were still sending
        received = b""
        try:
            while b"\r\n" not in received:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            return received or None
        return received
    finally:
        sock.close()


def test_a_request_line_over_8_KiB_gets_414_or_a_close_and_the_server_lives_on(daemon):
    proc, port, logfile = daemon
    line = b"GET /metrics?x=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    try:
        answer = _answer_to(port, line)
    except socket.timeout:
        pytest.fail("no answer and no close within %.0f s to a 9 KB request line" % SCRAPE_TIMEOUT)
    if answer:
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.split()[1:2] == [b"414"], status_line
    status, body = scrape(port)
    assert status == 200 and "vault_snapshot_" in body
    assert proc.poll() is None
    assert stop(proc, timeout=STOP_TIMEOUT) == 0
    assert "Traceback" not in read(logfile)
