"""Run Debian's ``tinyproxy`` (a real HTTP forward proxy) on loopback for the
proxy tests, and read back the request lines it logged.

Stdlib only; works on Python 3.6+.  The ``tinyproxy`` binary comes from the
distribution (``apt-get install tinyproxy``; tests/run.sh does it).

Typical use::

    proxy = Tinyproxy("/tmp/somewhere", user="u", password="p").start()
    proxy.url                 # "http://u:p@127.0.0.1:<port>"
    proxy.open_url            # "http://127.0.0.1:<port>" (no credentials)
    mark = proxy.mark()
    ...                       # something talks through the proxy
    proxy.requests(mark)      # ["GET http://127.0.0.1:9000/bucket?list-type=2",
                              #  "CONNECT 127.0.0.1:10000", ...]
    proxy.stop()              # by PID (process group); idempotent; at exit

Facts relied on (tinyproxy 1.11.1, Debian 12; checked by the fixture
self-tests in tests/test_proxy.py):

  - ``tinyproxy -d -c CONF`` stays in the foreground; SIGTERM stops it.  A
    syntax error in CONF is printed on stderr and it exits 1 at once.
  - No ``ConnectPort`` line means CONNECT to *any* port (the packaged
    config's ``ConnectPort 443`` / ``563`` lines would refuse the emulators'
    random ports with 403).
  - ``LogLevel Connect`` logs one line per request,
    ``Request (file descriptor N): <request line>``: ``GET http://host:port/path
    HTTP/1.1`` for absolute-form requests, ``CONNECT host:port HTTP/1.1`` for
    tunnels.  Request lines are logged before the credentials are checked,
    and headers (``Proxy-Authorization`` included) never are.
  - ``BasicAuth user password``: user and password may only hold letters,
    digits, ``.``, ``-`` and ``_`` (anything else is a syntax error).  No
    credentials get ``407 Proxy Authentication Required`` (with
    ``Proxy-Authenticate``); *wrong* credentials get ``401 Unauthorized``
    with ``WWW-Authenticate: Basic realm="Tinyproxy"`` -- for absolute-form
    requests and for CONNECT alike, and the connection is closed.
  - An origin it cannot reach: ``500 Unable to connect`` (absolute form and
    CONNECT alike).
  - It adds ``Via: 1.1 tinyproxy (tinyproxy/1.11.1)`` to forwarded requests
    and answers every client request with ``Connection: close`` semantics
    (one request per client connection).
"""

import os
import re
import shutil
import socket
import sys

if not __package__:      # run as a script (python tests/support/tinyproxy.py): tests/ on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support.harness import ServerProcess, child_env

__all__ = ["Tinyproxy", "TinyproxyError", "find_tinyproxy", "request_lines"]

_TOKEN = re.compile(r"\A[A-Za-z0-9._-]+\Z")
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+ \S+)(?: HTTP/\d\.\d)?\s*$")


class TinyproxyError(RuntimeError):
    """tinyproxy missing / did not start, or a bad fixture argument."""


def find_tinyproxy(path=None):
    """Path of ``tinyproxy``: explicit, ``$TINYPROXY_BIN``, PATH, then
    /usr/bin and /usr/sbin (root's PATH is not everyone's)."""
    candidates = [path] if path else [os.environ.get("TINYPROXY_BIN"), shutil.which("tinyproxy"),
                                      "/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise TinyproxyError("tinyproxy not found%s (Debian/Ubuntu: apt-get install tinyproxy)"
                         % (": %s" % path if path else ""))


def request_lines(text):
    """The request lines (``METHOD target``, without the HTTP version) in
    tinyproxy log text, in order."""
    out = []
    for line in text.splitlines():
        match = _REQUEST.search(line)
        if match:
            out.append(match.group(1))
    return out


class Tinyproxy(ServerProcess):
    """``tinyproxy -d -c CONF`` in its own process group on 127.0.0.1:<free
    port> (harness.ServerProcess: ``stop()`` by PID, SIGTERM then SIGKILL,
    idempotent, also at exit).

    ``user`` and ``password``: BasicAuth (both or neither); ``max_clients``:
    tinyproxy's MaxClients; ``timeout``: its idle Timeout in seconds.
    ``log_file`` is tinyproxy's own log (request lines); ``log_path`` (the
    ServerProcess log) gets its stdout and stderr.
    """

    label = "tinyproxy"
    error = TinyproxyError
    start_timeout = 15.0
    poll_interval = 0.05

    def __init__(self, workdir, user=None, password=None, binary=None, max_clients=32,
                 timeout=600, port=None):
        if (user is None) != (password is None):
            raise TinyproxyError("give both user and password, or neither")
        for what, value in (("user", user), ("password", password)):
            if value is not None and not _TOKEN.match(value):
                raise TinyproxyError("tinyproxy accepts only letters, digits, '.', '-' and '_' "
                                     "in a BasicAuth %s" % what)
        self.workdir = os.path.abspath(workdir)
        if not os.path.isdir(self.workdir):
            os.makedirs(self.workdir)
        ServerProcess.__init__(self, os.path.join(self.workdir, "tinyproxy.out"),
                               cwd=self.workdir, port=port)
        self.binary = binary
        self.user = user
        self.password = password
        self.max_clients = max_clients
        self.timeout = timeout
        self.conf_path = os.path.join(self.workdir, "tinyproxy.conf")
        self.log_file = os.path.join(self.workdir, "tinyproxy.log")

    # ---------------------------------------------------------- addresses

    @property
    def address(self):
        """``127.0.0.1:PORT``."""
        return "127.0.0.1:%d" % self.port

    @property
    def open_url(self):
        """``http://127.0.0.1:PORT``: no credentials."""
        return "http://%s" % self.address

    @property
    def url(self):
        """``http://user:password@127.0.0.1:PORT`` (no user info without auth)."""
        return self.url_with(self.user, self.password) if self.user else self.open_url

    def url_with(self, user, password):
        """The proxy URL with other credentials (percent-encode them yourself)."""
        return "http://%s:%s@%s" % (user, password, self.address)

    @property
    def display(self):
        """How the agent should show ``url``: the password as ``***``."""
        return ("http://%s:***@%s" % (self.user, self.address)) if self.user else self.open_url

    # ---------------------------------------------------------- lifecycle

    def config_text(self):
        lines = [
            "# written by tests/support/tinyproxy.py",
            "Listen 127.0.0.1",
            "Port %d" % self.port,
            "Timeout %d" % self.timeout,
            'LogFile "%s"' % self.log_file,
            "LogLevel Connect",
            "MaxClients %d" % self.max_clients,
            "Allow 127.0.0.1",
            # no ConnectPort line: CONNECT to any port (the emulators' random ones)
            # no Upstream: straight to the origin
        ]
        if self.user:
            lines.append("BasicAuth %s %s" % (self.user, self.password))
        return "\n".join(lines) + "\n"

    def command(self):
        binary = find_tinyproxy(self.binary)
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.config_text())
        return [binary, "-d", "-c", self.conf_path]

    def environment(self):
        return child_env(drop=("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                               "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"))

    def ready(self):
        socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        return True

    # ---------------------------------------------------------- its log

    def log_text(self, since=0):
        """tinyproxy's own log from byte offset ``since`` ("" if none yet)."""
        try:
            with open(self.log_file, "rb") as handle:
                handle.seek(since)
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def mark(self):
        """The log's current end: pass it to ``requests`` to see only what
        came after (the proxy is shared by a whole session)."""
        try:
            return os.path.getsize(self.log_file)
        except OSError:
            return 0

    def requests(self, since=0):
        """Request lines logged from byte offset ``since``: ``GET
        http://host:port/path``, ``CONNECT host:port``..."""
        return request_lines(self.log_text(since))

    def describe(self):
        return "tinyproxy %s%s (conf %s, log %s)" % (
            self.open_url, " with BasicAuth" if self.user else "", self.conf_path, self.log_file)


def _main(argv):
    """``python tests/support/tinyproxy.py [--auth USER PASSWORD]``: run one in the
    foreground until Ctrl-C (for trying a client by hand)."""
    import tempfile
    import time
    user = password = None
    if argv[:1] == ["--auth"] and len(argv) == 3:
        user, password = argv[1], argv[2]
    elif argv:
        print("usage: tinyproxy.py [--auth USER PASSWORD]", file=sys.stderr)
        return 2
    proxy = Tinyproxy(tempfile.mkdtemp(prefix="tinyproxy."), user, password).start()
    print("%s\nproxy URL: %s" % (proxy.describe(), proxy.url), flush=True)
    try:
        while proxy.running:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
