"""Adversarial review of the request deadlines (section 5) and the metrics
server (section 19), after issue 18's fixes: new shapes, each a failing
test until fixed.

* a request-deadline thread that could not start (a container at its pids
  limit, RLIMIT_NPROC) is never started again: every later request of that
  Http runs without a deadline, for the life of the process;
* the metrics server's one thread spins a whole core while accept() fails
  (out of descriptors) and a connection waits in the backlog;
* a 401 with ``WWW-Authenticate: Basic`` from the origin, inside a CONNECT
  tunnel the proxy already opened, is reported as the proxy refusing the
  credentials, and the origin's answer is lost;
* a proxy URL with port 0 silently becomes port 80.

Loopback only: every server listens on 127.0.0.1.
"""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import vault_snapshot_agent as vsa
from fake_endpoints import Endpoint, self_signed_cert
from slow_servers import TrickleServer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# =============================================================================
# the request deadline's thread
# =============================================================================


def test_a_deadline_thread_that_failed_to_start_is_started_by_the_next_request(monkeypatch):
    """Watchdog.arm() sets ``_thread`` before ``start()``: when the start
    fails once (RuntimeError: can't start new thread), ``_thread`` stays a
    thread that never ran, no later arm() starts one, and no deadline ever
    fires again. Measured: the next request against a server trickling its
    headers ran 6.0 s (the server's own limit) under a 1 s deadline."""
    real_start = threading.Thread.start
    failed = []

    def start(self):
        if self.name == "http-deadlines" and not failed:
            failed.append(self)
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    http = vsa.Http(timeout=10.0, deadline=1.0)
    with TrickleServer("headers", limit=4.0) as server:
        with pytest.raises(Exception):
            http.request("GET", server.url + "/first").close()
        assert failed, "the deadline thread was never asked to start"
        began = time.monotonic()
        try:
            http.request("GET", server.url + "/second").close()
            outcome = "an answer (headers cut by the server's own close)"
        except vsa.TransportError as exc:
            outcome = str(exc)
        took = time.monotonic() - began
    assert took < 2.5, ("the second request ran %.1fs under a 1s deadline (no deadline thread), "
                        "ending with %s" % (took, outcome))
    assert "request_timeout" in outcome


# =============================================================================
# the metrics server out of descriptors
# =============================================================================


EMFILE_CHILD = r"""
import os, resource, socket, sys, time
sys.path.insert(0, %(root)r)
import vault_snapshot_agent as vsa
server = vsa.MetricsServer(("127.0.0.1", 0), vsa.Status(vsa.Clock()))
port = server.address[1]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
os.close(held.pop())
client = socket.create_connection(("127.0.0.1", port))     # waits in the backlog
client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
time.sleep(0.2)
before = time.process_time()
time.sleep(1.0)
spent = time.process_time() - before
for fd in held[:8]:
    os.close(fd)
client.settimeout(3.0)
answer = client.recv(20)
server.close()
print("%%.3f %%r" %% (spent, answer))
"""


def test_the_metrics_thread_does_not_spin_while_accept_fails_for_lack_of_descriptors():
    """_MetricsLoop._accept returns on EMFILE with the connection still in
    the backlog, so select() reports the listener ready at once, again and
    again. Measured: 0.98 s of CPU per second of wall time (one core, with
    the GIL taken from the agent's own threads) for as long as descriptors
    are short; Go's http.Server sleeps 5 ms to 1 s between failed accepts."""
    out = subprocess.run([sys.executable, "-c", EMFILE_CHILD % {"root": ROOT}],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    spent, answer = out.stdout.decode().split(" ", 1)
    assert answer.startswith("b'HTTP/1.1 200"), "no answer once descriptors were free: %s" % answer
    assert float(spent) < 0.3, "the metrics thread burned %ss of CPU in 1s while out of descriptors" % spent


# =============================================================================
# answers inside a CONNECT tunnel
# =============================================================================


class TunnelProxy(object):
    """A CONNECT proxy on 127.0.0.1 that answers ``200`` and splices the
    connection to ``target`` (host, port)."""

    def __init__(self, target):
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.connects = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
            self.connects.append(head.split(b"\r\n", 1)[0])
            upstream = socket.create_connection(self.target)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def test_a_basic_auth_401_from_the_origin_inside_a_tunnel_is_the_origins_answer(tmp_path):
    """Http.request treats any 401 with ``WWW-Authenticate: Basic`` as the
    proxy refusing its credentials, even for https, where the proxy has
    already answered the CONNECT with 200 and the 401 came through TLS from
    the origin (a Vault behind nginx ``auth_basic``): the error blames the
    proxy and the caller never sees the origin's answer."""
    cert, key = self_signed_cert(tmp_path)
    origin = Endpoint(lambda request: (401, {"WWW-Authenticate": 'Basic realm="vault"'},
                                       {"errors": ["origin wants a password"]}), tls=(cert, key))
    with origin:
        port = int(origin.url.rsplit(":", 1)[1])
        proxy = TunnelProxy(("127.0.0.1", port))
        try:
            http = vsa.Http(vsa.TlsOptions(cert, None, None, None, None, False), timeout=5.0,
                            deadline=5.0,
                            proxy=vsa.ProxyPolicy("http://user:pw@127.0.0.1:%d" % proxy.port))
            try:
                with http.request("GET", "https://127.0.0.1:%d/v1/sys/leader" % port) as resp:
                    status, body = resp.status, resp.json()
            except vsa.TransportError as exc:
                pytest.fail("the origin's 401 was reported as: %s" % exc)
        finally:
            proxy.close()
    assert proxy.connects and proxy.connects[0].startswith(b"CONNECT ")
    assert status == 401 and body["errors"] == ["origin wants a password"]


# =============================================================================
# proxy URLs
# =============================================================================


@pytest.mark.parametrize("where", ["setting", "environment"])
def test_a_proxy_url_with_port_0_is_not_taken_for_port_80(where):
    """parse_proxy_url writes ``parts.port or 80``: an explicit ``:0``
    (a templating slip) silently becomes port 80 of the proxy host, a
    different service; Go dials :0 and fails. Expected: refused (an explicit
    key: one ConfigError line; the environment: a warning)."""
    url = "http://127.0.0.1:0"
    if where == "setting":
        with pytest.raises(vsa.ConfigError):
            vsa.ProxyPolicy(url)
    else:
        env = {"HTTPS_PROXY": url}
        proxy = vsa.ProxyPolicy(None, env).for_url("https://vault.example:8200/")
        assert proxy is None or proxy.port != 80, "port 0 became %s" % (proxy,)
        assert vsa.env_proxy_warnings(env), "no warning for a proxy on port 0"
