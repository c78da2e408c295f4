"""Shared plumbing for the server fixtures and the tests that run the agent.

Stdlib only; works on Python 3.6+.

For the server modules (moto_s3, gcs_emulators, azurite, bao_cluster):

* ``free_port()`` / ``free_ports(count)``: unused TCP ports on 127.0.0.1;
* ``tail(path, lines)``: the end of a log file, for error messages;
* ``child_env(drop=..., drop_prefixes=..., **extra)``: ``os.environ`` minus
  some names, plus some;
* ``pid_alive(pid)``: whether a process runs (a zombie does not);
* ``spawn(argv, log_path, ...)``: a command in its own session (process
  group = its PID) with stdout and stderr appended to a log file;
* ``ServerProcess``: one such process with a readiness check, a port chosen
  (and re-chosen if the server died at once, e.g. the port was taken), an
  error carrying the log tail when it does not come up, and an idempotent
  ``stop()`` (SIGTERM to the process group, SIGKILL after a timeout) that
  also runs at exit.  Subclass it (override ``command()``, ``ready()``,
  ``environment()``) or give it ``argv`` and ``ready`` directly.

For in-process loopback HTTP servers (cred_servers, fake_endpoints,
hostile_servers): ``LoopbackServer``, whose subclasses only say how to
answer a request (``answer(handler)``; ``LoopbackHandler.read_body``).

For the tests that run the agent as a daemon: ``wait_for``, ``read``,
``start_agent``, ``reaped`` and ``stop``; in process: ``run_main``,
``run_once``.
For documents built from a base: ``overridden``.
Pieces test modules share: ``clear_cloud_env`` (for their autouse
fixtures), ``captured_log``, ``go_snapshot_name`` and ``unique``.
For unit tests of the agent's time-driven parts: ``FakeClock`` (wall and
monotonic time that move only when told) and ``FakeSignals`` (stop/reload
flags whose ``wait`` advances a FakeClock instead of sleeping).
"""

import atexit
import contextlib
import datetime
import http.client
import http.server
import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGENT = os.path.join(ROOT, "vault_snapshot_agent.py")

__all__ = ["free_port", "free_ports", "tail", "child_env", "pid_alive", "spawn", "ServerError",
           "ServerProcess", "LoopbackServer", "LoopbackHandler", "wait_for", "read",
           "start_agent", "reaped", "stop", "AGENT", "FakeClock", "FakeSignals", "thread_ids"]


# ------------------------------------------------------------ ports and logs


def overridden(doc, changes):
    """``doc`` with ``changes`` applied in place (a value of None removes
    the key); returns ``doc``."""
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def free_ports(count):
    """``count`` distinct TCP ports on 127.0.0.1 that were free just now
    (all bound at once, so they differ)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port():
    """One TCP port on 127.0.0.1 that was free just now."""
    return free_ports(1)[0]


def tail(path, lines=30):
    """The last ``lines`` lines of a (log) file, from its last 16 KiB; a
    placeholder text when it cannot be read."""
    try:
        with open(str(path), "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            data = handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return "<cannot read %s: %s>" % (path, exc)
    return "\n".join(data.splitlines()[-lines:])


# -------------------------------------------------------------- processes


def child_env(drop=(), drop_prefixes=(), **extra):
    """A copy of ``os.environ`` without the names in ``drop`` or starting
    with one of ``drop_prefixes``, updated with ``extra``."""
    env = dict((name, value) for name, value in os.environ.items()
               if name not in drop and not name.startswith(tuple(drop_prefixes)))
    env.update(extra)
    return env


def spawn(argv, log_path, cwd=None, env=None, banner=None):
    """Start ``argv`` in a new session (its process group id is its PID),
    stdin from /dev/null, stdout and stderr appended to ``log_path`` (after
    a ``==== banner ====`` line if given).  Returns the ``Popen``."""
    log = open(str(log_path), "ab")
    try:
        if banner:
            log.write(("\n==== %s ====\n" % banner).encode("utf-8", "replace"))
            log.flush()
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True, close_fds=True)
    finally:
        log.close()


def thread_ids(pid):
    """The thread ids of process ``pid`` (its main thread's is ``pid``), sorted."""
    return sorted(int(t) for t in os.listdir("/proc/%d/task" % pid))


def pid_alive(pid):
    """True while process ``pid`` runs; a zombie (it answers kill(0)) is dead."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # a zombie still answers kill(0); treat it as dead
    try:
        with open("/proc/%d/stat" % pid) as fh:
            if fh.read().split(")")[-1].split()[0] == "Z":
                return False
    except (IOError, OSError, IndexError):
        pass
    return True


def _signal_group(proc, sig):
    """``sig`` to the process group ``spawn`` gave ``proc`` (to ``proc``
    alone if that fails)."""
    try:
        os.killpg(proc.pid, sig)
    except OSError:
        try:
            proc.send_signal(sig)
        except OSError:
            pass


class ServerError(RuntimeError):
    """A server process did not come up."""


class ServerProcess:
    """One server process on 127.0.0.1, started with ``spawn``.

    ``start()`` launches ``command()`` and polls ``ready()`` (errors from the
    socket or HTTP layer count as "not yet") every ``poll_interval`` seconds.
    If the process exits first it is tried again on another port
    (``port_attempts`` in all, when ``port_attempts`` is not 0 and no port
    was given); if it stays up but not ready for ``timeout`` seconds, or
    every attempt fails, it is stopped and ``error`` is raised with the log
    tail.  ``port`` is chosen before ``command()`` is called.
    """

    label = "server"
    error = ServerError
    start_timeout = 30.0
    poll_interval = 0.1
    port_attempts = 3          # 0: do not choose a port

    def __init__(self, log_path, argv=None, ready=None, cwd=None, env=None, port=None):
        self.log_path = log_path
        self.argv = argv
        self.ready_check = ready
        self.cwd = cwd
        self.env = env
        self.port = port
        self.proc = None
        self._stop_lock = threading.Lock()
        atexit.register(self.stop)

    # -- what to run (override in subclasses)

    def command(self):
        """argv to run (``self.port`` is already chosen)."""
        return list(self.argv)

    def environment(self):
        """Environment for the process (None: inherit ours)."""
        return self.env

    def ready(self):
        """True once the server serves."""
        return self.ready_check() if self.ready_check is not None else True

    # -- lifecycle

    @property
    def endpoint(self):
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return "http://127.0.0.1:%d" % self.port

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=None):
        """Launch and wait until ready (see the class docstring); returns self."""
        if self.running:
            return self
        timeout = self.start_timeout if timeout is None else timeout
        fixed_port = self.port
        attempts = 1 if fixed_port or not self.port_attempts else self.port_attempts
        for _ in range(attempts):
            if self.port_attempts:
                self.port = fixed_port or free_port()
            argv = self.command()
            self.proc = spawn(argv, self.log_path, self.cwd, self.environment(),
                              "%s on port %s at %s: %s"
                              % (self.label, self.port, time.ctime(), " ".join(argv)))
            problem = self._wait_ready(time.monotonic() + timeout, timeout)
            if problem is None:
                return self
            gave_up = self.running
            self.stop()
            if gave_up:
                break
        raise self.error("%s did not start on port %s (%s); log %s:\n%s"
                         % (self.label, self.port, problem, self.log_path,
                            self.log_tail()))

    def _wait_ready(self, deadline, timeout):
        """None once ready, else why not."""
        while True:
            if self.proc.poll() is not None:
                return "exited with status %s" % self.proc.returncode
            try:
                if self.ready():
                    return None
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                return "not ready after %.0fs" % timeout
            time.sleep(self.poll_interval)

    def stop(self, timeout=10.0):
        """SIGTERM the process group, SIGKILL it after ``timeout`` seconds,
        reap the process.  Idempotent; also runs at exit."""
        with self._stop_lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self, lines=30):
        return tail(self.log_path, lines)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


# ------------------------------------------- in-process loopback HTTP servers


class _ThreadingHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class LoopbackHandler(http.server.BaseHTTPRequestHandler):
    """Hands every request to the ``LoopbackServer`` that owns the server
    (``owner.answer(handler)``) and sends what it returns."""

    protocol_version = "HTTP/1.1"
    sys_version = ""

    def setup(self):
        self.timeout = self.server.owner.handler_timeout
        http.server.BaseHTTPRequestHandler.setup(self)

    def version_string(self):
        return "%s %s" % (self.server.owner.server_version, self.sys_version)

    def read_body(self, keep=None):
        """The request body (``Content-Length`` bytes, read 1 MiB at a
        time).  With ``keep``, only its first ``keep`` bytes are kept: the
        rest is read and dropped, so a large upload never sits in memory."""
        remaining = int(self.headers.get("Content-Length") or 0)
        body = b""
        while remaining > 0:
            data = self.rfile.read(min(remaining, 1 << 20))
            if not data:
                break
            if keep is None:
                body += data
            elif len(body) < keep:
                body += data[:keep - len(body)]
            remaining -= len(data)
        return body

    def _handle(self):
        owner = self.server.owner
        status, headers, payload = owner.answer(self)
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode("utf-8")
            headers = dict(headers or {})
            headers.setdefault("Content-Type", "application/json")
        elif isinstance(payload, str):
            payload = payload.encode("utf-8")
        payload = payload or b""
        if owner.close_connections:
            self.close_connection = True
        self.send_response(status)
        for key, value in sorted((headers or {}).items()):
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        if owner.close_connections:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def handle(self):
        try:
            http.server.BaseHTTPRequestHandler.handle(self)
        except (BrokenPipeError, ConnectionResetError):
            pass            # the client gave up (or was killed) mid-request

    def log_message(self, *args):
        pass


class LoopbackServer:
    """An HTTP server in this process, on 127.0.0.1:<free port>, served from
    a daemon thread: ``start()`` (returns self; again: no-op), ``stop()``
    (idempotent), a context manager, ``url`` and ``port``.

    Subclasses implement ``answer(handler)`` -> ``(status, headers dict,
    payload)``: the handler is a ``LoopbackHandler`` (``command``, ``path``,
    ``headers``, ``read_body()``); the payload is bytes, str, or a dict/list
    sent as JSON (``Content-Type: application/json`` unless the headers name
    one).  Class settings: ``server_version`` (the Server header),
    ``handler_timeout`` (socket timeout of a connection, None: none),
    ``close_connections`` (one request per connection, ``Connection:
    close``), ``tls`` (``(certfile, keyfile)``: HTTPS)."""

    server_version = "loopback-test-server"
    handler_timeout = None
    close_connections = False
    tls = None

    def __init__(self):
        self._server = None
        self._thread = None
        self.port = None

    @property
    def url(self):
        """``http://127.0.0.1:PORT`` (https with ``tls``; no trailing slash)."""
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.port)

    def start(self):
        if self._server is not None:
            return self
        server = _ThreadingHTTPServer(("127.0.0.1", 0), LoopbackHandler)
        server.owner = self
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls[0], self.tls[1])
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Shut the server down (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def answer(self, handler):  # pragma: no cover - overridden
        raise NotImplementedError


# ------------------------------------------------------- the agent daemon


def wait_for(predicate, timeout, what, interval=0.02):
    """Poll ``predicate`` until it returns something true (returned), or
    fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


def read(path):
    """A text file's content (undecodable bytes replaced)."""
    with open(str(path), "r", errors="replace") as handle:
        return handle.read()


def start_agent(config, logfile, python=sys.executable, *extra, env=None):
    """The agent script as a subprocess: ``python -I AGENT -c config *extra``
    with stdout and stderr written to ``logfile``, in environment ``env``
    (default: ours)."""
    handle = open(str(logfile), "wb")
    try:
        return subprocess.Popen([python, "-I", AGENT, "-c", config] + list(extra),
                                stdout=handle, stderr=subprocess.STDOUT, env=env)
    finally:
        handle.close()


@contextlib.contextmanager
def reaped(proc):
    """``with reaped(start_agent(...)) as proc:``: on the way out, however
    the block ends, ``proc`` is killed if it still runs, and waited for."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc, sig=signal.SIGTERM, timeout=10):
    """Send ``sig`` (if still running) and return the exit status; fail the
    test (after killing it) if it does not exit within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("agent pid %d did not exit within %ss of %s"
                             % (proc.pid, timeout, signal.Signals(sig).name)) from None


# ------------------------------------------------ fake time and signals


def _seconds(value):
    """A number of seconds, from a number or a ``timedelta``."""
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return value


def parse_dockerfile(path):
    """[(INSTRUCTION, arguments)] of a Dockerfile, continuation lines joined."""
    out, pending = [], ""
    with open(path) as handle:
        for line in handle:
            stripped = line.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            full = pending + stripped
            pending = ""
            instruction, _, args = full.partition(" ")
            out.append((instruction.upper(), args.strip()))
    assert not pending, "%s ends in a continuation line" % path
    return out


def parse_unit(path):
    """[(section, key, value)] of a unit file (keys may repeat)."""
    items, section = [], None
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            items.append((section, key.strip(), value.strip()))
    return items


class FakeClock:
    """The agent's clock (``now()``: an aware UTC datetime; ``monotonic()``:
    seconds) with time standing still until ``advance()`` moves both.

    ``FakeClock(at, monotonic)`` starts at the aware datetime ``at`` (default:
    the real time now, in UTC) with ``monotonic()`` reading ``monotonic``
    (default 0.0).  Wall time is ``at`` plus the monotonic seconds elapsed
    since then, so the two move together, unless ``step_wall()`` steps the
    wall clock alone (as NTP or an operator does).
    """

    def __init__(self, at=None, monotonic=0.0):
        if at is None:
            at = datetime.datetime.now(datetime.timezone.utc)
        if at.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime, not %r" % (at,))
        self._mono = float(monotonic)
        self._epoch = at.astimezone(datetime.timezone.utc) - datetime.timedelta(seconds=self._mono)

    def now(self):
        return self._epoch + datetime.timedelta(seconds=self._mono)

    def monotonic(self):
        return self._mono

    def advance(self, seconds):
        """Move both clocks forward by ``seconds`` (a number or a timedelta;
        never backwards).  Returns the new ``monotonic()``."""
        seconds = _seconds(seconds)
        if seconds < 0:
            raise ValueError("a FakeClock does not go backwards (%r)" % (seconds,))
        self._mono += seconds
        return self._mono

    def step_wall(self, seconds):
        """Step the wall clock alone by ``seconds`` (a number or a timedelta;
        negative: back), as an NTP correction does; ``monotonic()`` does not
        move.  Returns the new ``now()``."""
        self._epoch += datetime.timedelta(seconds=_seconds(seconds))
        return self.now()

    sleep = advance


class FakeSignals:
    """The agent's signals (``stop_requested``, ``reload_requested``,
    ``stop_signal``, ``check()``, ``wait()``, ``aborting()``) without OS
    signals or a pipe.

    ``wait(seconds)`` does not sleep: with a ``clock`` (a FakeClock) it
    advances that clock by ``seconds``, or only up to the first scripted
    event due in that time; without one it returns at once (retry back-offs
    cost nothing).  ``events`` are ``(monotonic time, attribute)`` pairs,
    e.g. ``(1600, "reload_requested")``: the wait that reaches the time sets
    the attribute to True and ends there.  Once the clock reaches ``until``
    (a ``monotonic()`` value) a stop is requested, as by SIGTERM.  Tests may
    also set ``stop_requested`` themselves or call ``request_stop()``.
    """

    def __init__(self, clock=None, until=None, events=()):
        self.clock, self.until = clock, until
        self.events = sorted(events)
        self.stop_requested = self.reload_requested = False
        self.stop_signal = None
        self._abort_hooks = []

    def request_stop(self, signum=signal.SIGTERM):
        self.stop_requested = True
        self.stop_signal = signum
        for hook in list(self._abort_hooks):
            hook()

    def check(self):
        if self.stop_requested:
            import vault_snapshot_agent as vsa
            raise vsa.Stopped("stop requested")

    def wait(self, seconds, wake_on_reload=True):
        if self.clock is None:
            return
        target = self.clock.monotonic() + seconds
        if self.events and self.events[0][0] <= target:
            at, what = self.events.pop(0)
            self.clock.advance(max(0.0, at - self.clock.monotonic()))
            setattr(self, what, True)
            return
        self.clock.advance(seconds)
        if self.until is not None and self.clock.monotonic() >= self.until:
            self.request_stop()

    def aborting(self, hook):
        import vault_snapshot_agent as vsa
        return vsa._AbortHook(self, hook)       # it needs only _abort_hooks, stop_requested


# ---------------------------------------------------- one in-process cycle

def run_main(*argv):
    """The agent's main() in-process: (exit code, log text)."""
    import io
    import vault_snapshot_agent as vsa
    stream = io.StringIO()
    code = vsa.main(list(argv), stream=stream)
    return code, stream.getvalue()


def run_once(tmp_path, addr, approle, **config):
    """Write a config (the fixture's AppRole plus ``config``) and run one
    in-process ``--once`` cycle at debug level: (exit code, log text)."""
    import json
    full = {"addr": addr, "role_id": approle.role_id, "secret_id": approle.secret_id}
    full.update(config)
    path = os.path.join(str(tmp_path), "c.json")
    with open(path, "w") as handle:
        json.dump(full, handle)
    return run_main("-c", path, "--once", "--log-level", "debug")


def snapshots(directory):
    """Names of the snapshots (ours and the Go agent's) in a directory, sorted."""
    import vault_snapshot_agent as vsa
    if not os.path.isdir(str(directory)):
        return []
    return sorted(n for n in os.listdir(str(directory)) if vsa.parse_snapshot_name(n))


def error_lines(log):
    """The ERROR lines of a text or JSON log."""
    return [line for line in log.splitlines() if " ERROR " in line or '"level": "error"' in line]


def success_location(log, marker):
    """What follows ``marker`` on the one line of ``log`` that holds it."""
    lines = [line for line in log.splitlines() if marker in line]
    assert len(lines) == 1, log
    return lines[0].split(marker, 1)[1].strip()


def verify_download(data, tmp_path):
    """Write downloaded bytes to a file and verify them as a snapshot."""
    import vault_snapshot_agent as vsa
    path = os.path.join(str(tmp_path), "downloaded.snap")
    with open(path, "wb") as handle:
        handle.write(data)
    return vsa.verify_file(path)


# ------------------------------------------- shared pieces of test modules

CLOUD_ENV_PREFIXES = ("AWS_", "AZURE_")


def clear_cloud_env(monkeypatch, tmp_path, prefixes=CLOUD_ENV_PREFIXES):
    """For an autouse fixture: no variable starting with one of ``prefixes``,
    no GCS credentials or emulator hosts, and the AWS and gcloud files
    pointed at names under ``tmp_path`` that do not exist (EC2 metadata off)."""
    for name in list(os.environ):
        if name.startswith(tuple(prefixes)):
            monkeypatch.delenv(name)
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "GCE_METADATA_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))


@contextlib.contextmanager
def captured_log(level=None):
    """``with captured_log() as stream:``: the agent's log at debug level
    (or ``level``), as text, in ``stream`` (a StringIO) while the block runs."""
    import io
    import logging
    import vault_snapshot_agent as vsa
    stream = io.StringIO()
    handler = vsa._configure_logging(logging.DEBUG if level is None else level, "text", stream)
    try:
        yield stream
    finally:
        vsa.LOG.removeHandler(handler)


def go_snapshot_name(when):
    """The Go agent's name for the aware datetime ``when`` (nanoseconds
    since the epoch)."""
    import vault_snapshot_agent as vsa
    nanoseconds = (when - vsa.EPOCH) // datetime.timedelta(microseconds=1) * 1000
    return "raft_snapshot-%d.snap" % nanoseconds


def unique(prefix):
    """``prefix`` and 8 random hex digits: a key prefix of its own."""
    return "%s-%s" % (prefix, os.urandom(4).hex())


def token_lifecycle(cfg, clock, env=None):
    """A VaultClient for ``cfg`` on ``clock`` (a FakeClock) through the token
    lifecycle AppRole has, against a 1 h TTL: log in, renew after 2/3 of it,
    log in again once past its end, then open the snapshot with the token.
    Returns the log text."""
    import vault_snapshot_agent as vsa
    client = vsa.VaultClient(cfg, clock=clock, env={} if env is None else env)
    with captured_log() as log:
        client.ensure_token()
        clock.advance(2500)
        client.ensure_token()
        clock.advance(7200)
        client.ensure_token()
        client.open_snapshot().close()
    return log.getvalue()


def known_secrets(*values):
    """Add ``values`` to the session's secret scan (conftest.KNOWN_SECRETS),
    when the conftest is loaded."""
    import sys
    conftest = sys.modules.get("conftest")
    if conftest is not None and hasattr(conftest, "KNOWN_SECRETS"):
        conftest.KNOWN_SECRETS.update(v for v in values if v)


class RawListener:
    """A loopback listening socket with an accept thread, for servers that
    write their answers byte by byte (slow, lying, endless): a subclass
    sets up its state, calls ``RawListener.__init__`` and has ``_accept``
    (it loops while ``self._stopped`` is clear)."""

    backlog = 16

    def __init__(self):
        self._stopped = threading.Event()
        self._listener = None
        self.port = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(self.backlog)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self):
        self._stopped.set()
        try:
            self._listener.close()
        except OSError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def loopback_alias():
    """A host name (not "localhost", not an IP) this machine resolves only
    to 127.0.0.1, where the test servers listen: not loopback to the
    agent's eyes, so the environment's proxy applies to it. The machine's
    own name usually is one; else 0.0.0.0, which Linux connects to the
    local host."""
    for name in (socket.gethostname(), socket.getfqdn()):
        if not name or name.lower() == "localhost" or name.lower().endswith(".localhost"):
            continue
        try:
            infos = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        if infos and all(info[4][0] == "127.0.0.1" for info in infos):
            return name
    return "0.0.0.0"
