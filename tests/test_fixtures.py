"""Self-tests for the test infrastructure: the OpenBao cluster fixture and
the fault proxy."""

import http.client
import http.server
import socketserver
import threading
import urllib.error
import urllib.request

import pytest

from support.faultproxy import FaultProxy


# ------------------------------------------------------- cluster fixture


def test_cluster_has_one_leader_two_standbys(bao_cluster):
    leader = bao_cluster.leader()
    assert leader is not None
    standbys = bao_cluster.standbys()
    assert len(standbys) == 2
    assert leader not in standbys
    for node in standbys:
        status, body = bao_cluster.api("GET", "sys/leader", token=None, node=node)
        assert status == 200
        assert body["is_self"] is False
        assert body["leader_address"] == leader.addr
    status, body = bao_cluster.api("GET", "sys/storage/raft/configuration", expect=200)
    servers = body["data"]["config"]["servers"]
    assert len(servers) == 3
    assert all(s["voter"] for s in servers)


def test_snapshot_with_approle_token(bao_cluster, approle):
    auth = bao_cluster.login_approle_auth(approle.role_id, approle.secret_id, mount=approle.mount)
    assert "snapshot" in auth["token_policies"]
    assert auth["lease_duration"] == 3600
    leader = bao_cluster.leader()
    status, headers, data = bao_cluster.api_raw(
        "GET", "sys/storage/raft/snapshot", token=auth["client_token"], node=leader, timeout=60
    )
    assert status == 200
    assert headers.get("Content-Type") == "application/gzip"
    assert data[:2] == b"\x1f\x8b"


def test_snapshot_policy_is_read_only(bao_cluster, approle):
    token = bao_cluster.login_approle(approle.role_id, approle.secret_id)
    status, _ = bao_cluster.api("GET", "sys/storage/raft/configuration", token=token)
    assert status == 403


# ------------------------------------------------------------ fault proxy

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def http_target():
    server = _ThreadingServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _get(url, headers=None, timeout=10):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def test_proxy_passes_through_and_records(http_target):
    with FaultProxy("127.0.0.1", http_target) as proxy:
        status, data = _get(proxy.addr + "/a?x=1", headers={"X-Secret": "s3"})
        assert status == 200 and data == PAYLOAD
        status, data = _get(proxy.addr + "/b")
        assert data == PAYLOAD
        assert proxy.requests == ["GET /a?x=1 HTTP/1.1", "GET /b HTTP/1.1"]
        assert proxy.request_heads[0].header("x-secret") == "s3"
        assert proxy.saw_header("X-Secret")
        assert not proxy.request_heads[1].has_header("X-Secret")


def test_proxy_cuts_stream_after_n_bytes(http_target):
    with FaultProxy("127.0.0.1", http_target) as proxy:
        proxy.cut_after(5000, times=1)
        req = urllib.request.Request(proxy.addr + "/big")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
            with pytest.raises(http.client.IncompleteRead) as info:
                resp.read()
        assert 0 < len(info.value.partial) < 5000
        # only one connection was affected
        assert _get(proxy.addr + "/again")[1] == PAYLOAD


def test_proxy_fail_requests_and_reset(http_target):
    with FaultProxy("127.0.0.1", http_target) as proxy:
        rule = proxy.fail_requests(lambda m, p: p.startswith("/v1/"), status=503, times=1)
        with pytest.raises(urllib.error.HTTPError) as info:
            _get(proxy.addr + "/v1/x")
        assert info.value.code == 503
        assert rule.hits == 1
        assert _get(proxy.addr + "/v1/x")[1] == PAYLOAD  # times exhausted
        assert [h.action for h in proxy.request_heads] == ["failed", "forwarded"]

        proxy.reset(times=1)
        with pytest.raises((ConnectionResetError, urllib.error.URLError, http.client.HTTPException)):
            _get(proxy.addr + "/r")
        assert _get(proxy.addr + "/r")[1] == PAYLOAD

        proxy.delay(0.05)
        assert _get(proxy.addr + "/slow")[1] == PAYLOAD
        proxy.pass_through()
        assert _get(proxy.addr + "/ok")[1] == PAYLOAD
