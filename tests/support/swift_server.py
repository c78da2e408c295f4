"""Run a real OpenStack Swift (all in one) and a real Keystone on loopback
for the Swift storage tests, and talk to them over plain HTTP (stdlib).

Stdlib only; importable on Python 3.6+.  The servers themselves run from a
venv of their own, ``.venv-openstack`` (PyPI ``swift``, ``keystone``,
``keystonemiddleware``, ``python-swiftclient``; tests/run.sh makes it), so
they do not disturb the test venv; they run from it whatever Python runs
the tests, as Azurite runs from node.

Typical use::

    sw = start_swift("/tmp/somewhere", token_life=3600)  # tempauth proxy
    token, url, expires = sw.login()       # GET /auth/v1.0 as test:tester
    sw.new_container()                     # "c-<hex>", created
    sw.request("PUT", url + "/c/o", body=b"x", token=token)  # -> Response
    ks = start_keystone("/tmp/else", token_expiration=3600)
    ksw = start_keystone_swift(sw, ks)     # 2nd proxy: authtoken + keystoneauth
    ...
    ksw.stop(); ks.stop(); sw.stop()        # by PID (process group); idempotent

Swift (``start_swift``): account, container and object servers and a proxy,
each one process (``workers = 0``), on free 127.0.0.1 ports; one-replica
rings (part power 8) built with swift's RingBuilder, devices under
``<tmpdir>/node``, ``mount_check = false``; every config has ``swift_dir =
<tmpdir>`` whose swift.conf holds the hash path prefix/suffix (the servers
call ``set_swift_dir`` with it; there is no environment variable for it).
Proxy pipeline: catch_errors gatekeeper healthcheck proxy-logging
listing_formats bulk tempauth copy slo dlo versioned_writes proxy-logging
proxy-server, ``allow_account_management`` and ``account_autocreate`` on.
No ``cache`` filter and no memcached: tempauth is given a Fernet key
(``fernet_key_1`` + ``active_fernet_key_id = 1``), so its tokens carry
their groups themselves (``AUTH_ftk...``/``AUTH_zftk...``) and are checked
against ``token_life`` by Fernet's own ``ttl`` (whole seconds); without
memcache and without a Fernet key tempauth raises "Memcache required" (a
500).  Each login still logs "swift.cache could not be found in env!"
(harmless).  Logs: ``-v`` copies them to ``<tmpdir>/<server>.log``; with
no /dev/log swift also sends them to syslog on UDP 127.0.0.1:514.

Tempauth users (key ``KEY``): ``test:tester`` (``.admin`` of
account ``AUTH_test``), ``test:reader`` (no groups: 403 on everything of
AUTH_test), ``test2:tester2`` (``.admin`` of ``AUTH_test2``).

Keystone (``start_keystone``): SQLite, ``db_sync``, fernet and credential
keys, ``bootstrap`` (admin/admin project, roles admin, member, reader,
manager, service; region ``REGION``; the identity service's endpoints),
served by werkzeug's threaded server from the same venv; then, over its
API: a domain ``DOMAIN`` with project ``PROJECT`` and user ``USER``
(role member), a ``swift`` service user (role service on project
``service``), an application credential of ``USER``, and (by
``start_keystone_swift``) the ``object-store`` service with public,
internal and admin endpoints ``<proxy>/v1/AUTH_%(project_id)s`` in region
``REGION``.
"""

import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from urllib.parse import quote, urlsplit

from support.harness import ServerError, ServerProcess, child_env, free_ports

__all__ = ["start_swift", "start_keystone", "start_keystone_swift", "find_openstack_venv",
           "Swift", "Keystone", "KeystoneSwift", "Response", "request", "OpenStackError",
           "KEY", "REGION", "DOMAIN", "PROJECT", "USER", "PASSWORD", "APP_CRED_NAME"]

KEY = "swift-tempauth-key-7Qm2"     # every tempauth user's key (distinct: the secret scan looks for it)
REGION = "RegionTest"
DOMAIN = "snapdomain"
PROJECT = "snapproject"
USER = "snapuser"
PASSWORD = "snap-user-password"
ADMIN_PASSWORD = "keystone-admin-password"
SERVICE_PASSWORD = "swift-service-password"
APP_CRED_NAME = "snapshot-agent"
START_TIMEOUT = 60.0

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_DIR = os.path.dirname(TESTS_DIR)


class OpenStackError(ServerError):
    """The OpenStack venv is missing, a server did not start, or a setup
    request failed."""


# ------------------------------------------------------------- the venv


def find_openstack_venv(path=None):
    """The venv with swift and keystone: explicit, ``$OPENSTACK_VENV``,
    ``<repo>/.venv-openstack``, then ``.venv-openstack`` beside the venv
    running the tests (a git worktree's tests use the main checkout's)."""
    candidates = [path] if path else [
        os.environ.get("OPENSTACK_VENV"),
        os.path.join(ROOT_DIR, ".venv-openstack"),
        os.path.join(os.path.dirname(os.path.abspath(sys.prefix)), ".venv-openstack")]
    for cand in candidates:
        if cand and os.access(os.path.join(cand, "bin", "swift-proxy-server"), os.X_OK) \
                and os.access(os.path.join(cand, "bin", "keystone-manage"), os.X_OK):
            return os.path.abspath(cand)
    raise OpenStackError("no venv with swift and keystone found (%s); tests/run.sh makes "
                         ".venv-openstack" % ", ".join(c for c in candidates if c))


# ------------------------------------------------------------ HTTP client


class Response:
    """``status``, ``reason``, ``headers`` (name lower-cased -> value; a
    repeated header joined by ", "), ``body`` (bytes); ``json()``."""

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<Response %d %s %r>" % (self.status, self.reason, self.body[:200])


def request(method, url, headers=None, body=None, token=None, timeout=30):
    """One HTTP request over a fresh connection; never raises for a status."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["X-Auth-Token"] = token
        if isinstance(body, str):
            body = body.encode("utf-8")
        if body is None and method in ("PUT", "POST"):
            body = b""
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        got = {}
        for name, value in resp.getheaders():
            name = name.lower()
            got[name] = got[name] + ", " + value if name in got else value
        return Response(resp.status, resp.reason, got, data)
    finally:
        conn.close()


def _check(resp, what, *ok):
    if resp.status not in (ok or (200, 201, 202, 204)):
        raise OpenStackError("%s: %d %s %s" % (what, resp.status, resp.reason, resp.body[:300]))
    return resp


# -------------------------------------------------------------- processes


class _Server(ServerProcess):
    """One OpenStack server process on a port chosen beforehand (the rings
    and the catalog name it); ready when ``ready_path`` answers < 500."""

    error = OpenStackError
    start_timeout = START_TIMEOUT
    port_attempts = 0

    def __init__(self, label, log_path, argv, port, ready_path, env=None, cwd=None):
        ServerProcess.__init__(self, log_path, argv=argv, env=env, cwd=cwd, port=port)
        self.label = label
        self.ready_path = ready_path

    def ready(self):
        return request("GET", self.endpoint + self.ready_path, timeout=5).status < 500


def _write(path, text):
    with open(path, "w") as handle:
        handle.write(text)
    return path


def _ini(sections):
    """paste.deploy / oslo.config text from [(section, [(key, value), ...]), ...]."""
    out = []
    for section, items in sections:
        out.append("[%s]" % section)
        out.extend("%s = %s" % (key, value) for key, value in items)
        out.append("")
    return "\n".join(out)


def _run(argv, log_path, env=None, cwd=None):
    with open(log_path, "ab") as log:
        log.write(("\n==== %s ====\n" % " ".join(argv)).encode())
        log.flush()
        rc = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             env=env, cwd=cwd)
    if rc != 0:
        raise OpenStackError("%s exited %d; log %s" % (" ".join(argv[:3]), rc, log_path))


def _stop_all(servers):
    for server in reversed(servers):
        server.stop()


# ------------------------------------------------------------------ Swift


_RING_SCRIPT = """
import sys
from swift.common.ring import RingBuilder
swift_dir = sys.argv[1]
for kind, port in zip(("account", "container", "object"), sys.argv[2:5]):
    builder = RingBuilder(8, 1, 1)
    builder.add_dev({"region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port),
                     "device": "d1", "weight": 100})
    builder.rebalance()
    builder.save("%s/%s.builder" % (swift_dir, kind))
    builder.get_ring().save("%s/%s.ring.gz" % (swift_dir, kind))
"""

_STORAGE_APPS = {"account": "account", "container": "container", "object": "object"}


class Swift:
    """An all-in-one Swift with a tempauth proxy (see the module docstring).

    ``proxy_url`` (``http://127.0.0.1:PORT``), ``cli`` (the swift CLI), ``auth_url``
    (``<proxy_url>/auth/v1.0``), ``user`` (``test:tester``), ``key``,
    ``account`` (``AUTH_test``), ``storage_url`` (``<proxy_url>/v1/AUTH_test``),
    ``reader`` (``test:reader``, no rights), ``other_user`` / ``other_storage_url``
    (``test2:tester2``, ``AUTH_test2``), ``token_life``; ``servers`` (name ->
    process: ``pid``, ``log_path``), ``swift_dir``, ``startup_seconds``."""

    def __init__(self, tmpdir, venv, token_life):
        self.tmpdir = os.path.abspath(tmpdir)
        self.swift_dir = self.tmpdir
        self.venv = venv
        self.token_life = token_life
        self.servers = {}
        self.startup_seconds = None
        self.proxy_url = self.auth_url = self.storage_url = self.other_storage_url = None
        self.user = "test:tester"
        self.reader = "test:reader"
        self.other_user = "test2:tester2"
        self.key = KEY
        self.account = "AUTH_test"
        self.other_account = "AUTH_test2"
        self.fernet_key = base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")
        self.ports = {}

    # -- configuration

    def _common(self, port):
        return [("bind_ip", "127.0.0.1"), ("bind_port", port), ("workers", 0),
                ("swift_dir", self.swift_dir), ("devices", os.path.join(self.tmpdir, "node")),
                ("mount_check", "false"), ("log_level", "INFO")]

    def _storage_conf(self, kind):
        return _ini([
            ("DEFAULT", self._common(self.ports[kind])),
            ("pipeline:main", [("pipeline", "healthcheck %s-server" % kind)]),
            ("app:%s-server" % kind, [("use", "egg:swift#%s" % _STORAGE_APPS[kind])]),
            ("filter:healthcheck", [("use", "egg:swift#healthcheck")]),
        ])

    def proxy_conf(self, port, auth_filters, extra_sections=()):
        """A proxy config on ``port`` with ``auth_filters`` (names, in
        pipeline order) and their ``extra_sections``."""
        pipeline = ("catch_errors gatekeeper healthcheck proxy-logging listing_formats bulk %s "
                    "copy slo dlo versioned_writes proxy-logging proxy-server"
                    % " ".join(auth_filters))
        sections = [("DEFAULT", self._common(port)), ("pipeline:main", [("pipeline", pipeline)]),
                    ("app:proxy-server", [("use", "egg:swift#proxy"),
                                          ("allow_account_management", "true"),
                                          ("account_autocreate", "true")])]
        for name in ("catch_errors", "gatekeeper", "healthcheck", "proxy-logging",
                     "listing_formats", "bulk", "copy", "slo", "dlo", "versioned_writes"):
            sections.append(("filter:" + name, [("use", "egg:swift#" + name.replace("-", "_"))]))
        sections.extend(extra_sections)
        return _ini(sections)

    def _tempauth(self):
        return ("filter:tempauth", [
            ("use", "egg:swift#tempauth"),
            ("user_test_tester", "%s .admin" % KEY),
            ("user_test_reader", KEY),
            ("user_test2_tester2", "%s .admin" % KEY),
            ("token_life", self.token_life),
            ("fernet_key_1", self.fernet_key),
            ("active_fernet_key_id", "1"),
        ])

    def _configure(self):
        for sub in ("node/d1", "run"):
            os.makedirs(os.path.join(self.tmpdir, sub), exist_ok=True)
        _write(os.path.join(self.swift_dir, "swift.conf"), _ini([
            ("swift-hash", [("swift_hash_path_prefix", uuid.uuid4().hex),
                            ("swift_hash_path_suffix", uuid.uuid4().hex)]),
            ("storage-policy:0", [("name", "Policy-0"), ("default", "yes")]),
        ]))
        ports = free_ports(4)
        self.ports = dict(zip(("account", "container", "object", "proxy"), ports))
        _run([self.python, "-c", _RING_SCRIPT, self.swift_dir] + [str(p) for p in ports[:3]],
             os.path.join(self.tmpdir, "rings.log"))
        for kind in ("account", "container", "object"):
            _write(os.path.join(self.swift_dir, "%s-server.conf" % kind), self._storage_conf(kind))
        _write(os.path.join(self.swift_dir, "proxy-server.conf"),
               self.proxy_conf(self.ports["proxy"], ["tempauth"], [self._tempauth()]))

    @property
    def python(self):
        return os.path.join(self.venv, "bin", "python")

    @property
    def cli(self):
        """python-swiftclient's ``swift`` command (in the OpenStack venv)."""
        return os.path.join(self.venv, "bin", "swift")

    def env(self):
        return child_env(drop_prefixes=("OS_", "SWIFT_", "PYTHON"), PYTHONUNBUFFERED="1")

    # -- lifecycle

    def start_server(self, name, script, conf, port):
        """Start ``script conf -v`` (logs to its stdout too) as ``name``."""
        server = _Server(name, os.path.join(self.tmpdir, "%s.log" % name),
                         [os.path.join(self.venv, "bin", script), conf, "-v"], port,
                         "/healthcheck", env=self.env(), cwd=self.tmpdir)
        self.servers[name] = server
        return server.start()

    def start(self):
        began = time.monotonic()
        try:
            self._configure()
            for kind in ("account", "container", "object", "proxy"):
                self.start_server(kind, "swift-%s-server" % kind,
                                  os.path.join(self.swift_dir, "%s-server.conf" % kind),
                                  self.ports[kind])
        except BaseException:
            self.stop()
            raise
        self.proxy_url = "http://127.0.0.1:%d" % self.ports["proxy"]
        self.auth_url = self.proxy_url + "/auth/v1.0"
        self.storage_url = self.proxy_url + "/v1/" + self.account
        self.other_storage_url = self.proxy_url + "/v1/" + self.other_account
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self):
        _stop_all(list(self.servers.values()))

    @property
    def pids(self):
        return dict((name, s.pid) for name, s in self.servers.items())

    def log_tails(self, lines=20):
        """The end of each server's log, for a failure report."""
        return "\n".join("---- %s (%s)\n%s" % (name, s.log_path, s.log_tail(lines))
                         for name, s in self.servers.items())

    # -- client helpers

    def login(self, user=None, key=None):
        """Tempauth v1 login: (token, storage URL, X-Auth-Token-Expires)."""
        resp = _check(request("GET", self.auth_url, {"X-Auth-User": user or self.user,
                                                     "X-Auth-Key": key or self.key}),
                      "tempauth login", 200)
        return (resp.headers["x-auth-token"], resp.headers["x-storage-url"],
                resp.headers.get("x-auth-token-expires"))

    def request(self, method, path_or_url, headers=None, body=None, token=None):
        """A request as ``test:tester`` (a fresh token unless given);
        a path is taken below ``storage_url``."""
        url = path_or_url if "://" in path_or_url else self.storage_url + path_or_url
        if token is None:
            token = self.login()[0]
        return request(method, url, headers, body, token)

    def new_container(self, prefix="c", headers=None, storage_url=None, token=None):
        """A new, empty container named ``<prefix>-<hex>``; returns its name."""
        name = "%s-%s" % (prefix, uuid.uuid4().hex[:12])
        url = (storage_url or self.storage_url) + "/" + quote(name)
        _check(self.request("PUT", url, headers, token=token), "create container " + name, 201)
        return name


def start_swift(tmpdir, token_life=3600, venv=None):
    """An all-in-one Swift with a tempauth proxy, everything under
    ``tmpdir``; returns the started ``Swift``."""
    return Swift(tmpdir, find_openstack_venv(venv), token_life).start()


# --------------------------------------------------------------- Keystone


_WSGI_SCRIPT = """
import sys
from werkzeug.serving import run_simple
from keystone.server import wsgi
port = int(sys.argv.pop(1))      # oslo.config parses sys.argv
run_simple("127.0.0.1", port, wsgi.initialize_public_application(),
           threaded=True, use_reloader=False)
"""


class Keystone:
    """Keystone v3 on loopback (see the module docstring).

    ``url`` (``http://127.0.0.1:PORT``), ``auth_url`` (``<url>/v3``),
    ``region``; ``admin_user``/``admin_password``/``admin_project``;
    ``user``/``user_id``, ``password``, ``project``/``project_id``,
    ``domain``/``domain_id``; ``app_cred_id``, ``app_cred_name``,
    ``app_cred_secret``; ``service_user``/``service_password``
    (project ``service``, domain ``Default``); ``token_expiration``;
    ``server`` (``pid``, ``log_path``), ``startup_seconds``."""

    def __init__(self, tmpdir, venv, token_expiration):
        self.tmpdir = os.path.abspath(tmpdir)
        self.venv = venv
        self.token_expiration = token_expiration
        self.region = REGION
        self.admin_user, self.admin_password, self.admin_project = "admin", ADMIN_PASSWORD, "admin"
        self.user, self.password, self.project, self.domain = USER, PASSWORD, PROJECT, DOMAIN
        self.user_id = self.project_id = self.domain_id = None
        self.app_cred_name = APP_CRED_NAME
        self.app_cred_id = self.app_cred_secret = None
        self.service_user, self.service_password = "swift", SERVICE_PASSWORD
        self.server = None
        self.startup_seconds = None
        self.conf = os.path.join(self.tmpdir, "keystone.conf")
        self.port = free_ports(1)[0]
        self.url = "http://127.0.0.1:%d" % self.port
        self.auth_url = self.url + "/v3"

    def env(self, conf=None):
        return child_env(drop_prefixes=("OS_", "PYTHON"), OS_KEYSTONE_CONFIG_FILES=conf or self.conf,
                         PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")

    def _write_conf(self, directory, conf):
        for sub in ("fernet-keys", "credential-keys"):
            os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
        _write(conf, _ini([
            ("DEFAULT", [("log_file", os.path.join(directory, "keystone-app.log"))]),
            ("database", [("connection", "sqlite:///" + os.path.join(directory, "keystone.db"))]),
            ("identity", [("password_hash_rounds", 4)]),     # bcrypt's least: fast logins
            ("token", [("provider", "fernet"), ("expiration", self.token_expiration)]),
            ("fernet_tokens", [("key_repository", os.path.join(directory, "fernet-keys"))]),
            ("credential", [("key_repository", os.path.join(directory, "credential-keys"))]),
            ("cache", [("enabled", "false")]),
        ]))

    FACTS = ("domain_id", "project_id", "user_id", "app_cred_id", "app_cred_secret")

    def template(self):
        """A keystone.db after db_sync, bootstrap and ``_populate`` (the
        users, projects, roles and application credential), its fernet and
        credential keys and ``facts.json`` (ids, the credential's secret):
        made once per venv and keystone version (about 15 s) under
        ``<venv>/var/``, then copied by every start.  Nothing in it names a
        port: the catalog's endpoints are added by each start."""
        versions = [name[len("keystone-"):-len(".dist-info")] for sub in
                    os.listdir(os.path.join(self.venv, "lib"))
                    for name in os.listdir(os.path.join(self.venv, "lib", sub, "site-packages"))
                    if name.startswith("keystone-") and name.endswith(".dist-info")]
        target = os.path.join(self.venv, "var", "keystone-template-%s" % "-".join(versions))
        if os.path.isfile(os.path.join(target, "facts.json")):
            return target
        work = "%s.%d.tmp" % (target, os.getpid())
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        builder = Keystone(work, self.venv, 3600)
        builder._write_conf(work, builder.conf)
        manage = [os.path.join(self.venv, "bin", "keystone-manage"), "--config-file", builder.conf]
        for args in (["db_sync"],
                     ["fernet_setup", "--keystone-user", "root", "--keystone-group", "root"],
                     ["credential_setup", "--keystone-user", "root", "--keystone-group", "root"],
                     ["bootstrap", "--bootstrap-password", ADMIN_PASSWORD,
                      "--bootstrap-region-id", REGION]):
            _run(manage + args, os.path.join(work, "keystone-manage.log"), env=builder.env())
        try:
            builder._serve()
            builder._populate()
        finally:
            builder.stop()
        _write(os.path.join(work, "facts.json"),
               json.dumps(dict((name, getattr(builder, name)) for name in self.FACTS)))
        if not os.path.isfile(os.path.join(target, "facts.json")):
            shutil.rmtree(target, ignore_errors=True)      # an unfinished one
        try:
            os.rename(work, target)
        except OSError:           # another run made it meanwhile
            shutil.rmtree(work, ignore_errors=True)
        return target

    def _serve(self):
        self.server = _Server("keystone", os.path.join(self.tmpdir, "keystone.log"),
                              [os.path.join(self.venv, "bin", "python"), "-c", _WSGI_SCRIPT,
                               str(self.port)], self.port, "/v3", env=self.env(), cwd=self.tmpdir)
        self.server.start()

    def start(self):
        began = time.monotonic()
        os.makedirs(self.tmpdir, exist_ok=True)
        template = self.template()
        self._write_conf(self.tmpdir, self.conf)
        shutil.copy(os.path.join(template, "keystone.db"), self.tmpdir)
        for sub in ("fernet-keys", "credential-keys"):
            for name in os.listdir(os.path.join(template, sub)):
                shutil.copy(os.path.join(template, sub, name), os.path.join(self.tmpdir, sub))
        with open(os.path.join(template, "facts.json")) as handle:
            for name, value in json.load(handle).items():
                setattr(self, name, value)
        try:
            self._serve()
            self.add_service("identity", "keystone", self.auth_url)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self):
        if self.server is not None:
            self.server.stop()

    # -- API helpers

    def password_auth(self, user, password, scope=None, user_domain=None):
        """``POST /v3/auth/tokens`` with a password: the Response (token in
        ``x-subject-token``). ``user`` and ``scope`` are dicts as in the API."""
        ident = dict(user)
        ident["password"] = password
        if user_domain is not None:
            ident["domain"] = user_domain
        body = {"auth": {"identity": {"methods": ["password"], "password": {"user": ident}}}}
        if scope is not None:
            body["auth"]["scope"] = scope
        return request("POST", self.auth_url + "/auth/tokens",
                       {"Content-Type": "application/json"}, json.dumps(body))

    def app_cred_auth(self, credential):
        """``POST /v3/auth/tokens`` with an application credential dict."""
        body = {"auth": {"identity": {"methods": ["application_credential"],
                                      "application_credential": credential}}}
        return request("POST", self.auth_url + "/auth/tokens",
                       {"Content-Type": "application/json"}, json.dumps(body))

    def user_token(self):
        """A project-scoped token of ``user`` (names), and the token JSON."""
        resp = _check(self.password_auth({"name": self.user, "domain": {"name": self.domain}},
                                         self.password,
                                         {"project": {"name": self.project,
                                                      "domain": {"name": self.domain}}}),
                      "user login", 201)
        return resp.headers["x-subject-token"], resp.json()

    def admin_token(self):
        resp = _check(self.password_auth({"name": self.admin_user, "domain": {"id": "default"}},
                                         self.admin_password,
                                         {"project": {"name": self.admin_project,
                                                      "domain": {"id": "default"}}}),
                      "admin login", 201)
        return resp.headers["x-subject-token"]

    def api(self, method, path, body=None, token=None, ok=(200, 201, 204)):
        resp = request(method, self.auth_url + path, {"Content-Type": "application/json"},
                       None if body is None else json.dumps(body),
                       token=token or self.admin_token())
        return _check(resp, "%s %s" % (method, path), *ok)

    def _role_id(self, token, name):
        return self.api("GET", "/roles?name=" + name, token=token).json()["roles"][0]["id"]

    def _populate(self):
        token = self.admin_token()
        api = self.api
        self.domain_id = api("POST", "/domains", {"domain": {"name": self.domain}},
                             token).json()["domain"]["id"]
        self.project_id = api("POST", "/projects", {"project": {
            "name": self.project, "domain_id": self.domain_id}}, token).json()["project"]["id"]
        self.user_id = api("POST", "/users", {"user": {
            "name": self.user, "domain_id": self.domain_id, "password": self.password,
            "default_project_id": self.project_id}}, token).json()["user"]["id"]
        api("PUT", "/projects/%s/users/%s/roles/%s"
            % (self.project_id, self.user_id, self._role_id(token, "member")), token=token)
        service_project = api("POST", "/projects", {"project": {
            "name": "service", "domain_id": "default"}}, token).json()["project"]["id"]
        service_user = api("POST", "/users", {"user": {
            "name": self.service_user, "domain_id": "default",
            "password": self.service_password}}, token).json()["user"]["id"]
        api("PUT", "/projects/%s/users/%s/roles/%s"
            % (service_project, service_user, self._role_id(token, "service")), token=token)
        user_token = self.user_token()[0]
        cred = api("POST", "/users/%s/application_credentials" % self.user_id, {
            "application_credential": {"name": self.app_cred_name}},
            user_token).json()["application_credential"]
        self.app_cred_id, self.app_cred_secret = cred["id"], cred["secret"]

    def add_service(self, kind, name, url, token=None):
        """A service of type ``kind`` with public, internal and admin
        endpoints ``url`` in ``region``; returns the service id."""
        token = token or self.admin_token()
        service = self.api("POST", "/services", {"service": {
            "type": kind, "name": name, "enabled": True}}, token).json()["service"]["id"]
        for interface in ("public", "internal", "admin"):
            self.api("POST", "/endpoints", {"endpoint": {
                "service_id": service, "interface": interface, "region_id": self.region,
                "url": url, "enabled": True}}, token)
        return service


def start_keystone(tmpdir, token_expiration=3600, venv=None):
    """Keystone v3 (SQLite, Fernet tokens that live ``token_expiration``
    seconds) with the users of the module docstring; returns it started."""
    return Keystone(tmpdir, find_openstack_venv(venv), token_expiration).start()


# ---------------------------------------------- Swift proxy behind Keystone


class KeystoneSwift:
    """A second proxy of ``swift``'s cluster whose pipeline authenticates
    with keystonemiddleware ``authtoken`` + swift ``keystoneauth``
    (operator roles admin, member; reseller prefix ``AUTH_``).
    ``proxy_url``, ``storage_url`` (of ``keystone.project_id``),
    ``server``, ``startup_seconds``."""

    def __init__(self, swift, keystone):
        self.swift = swift
        self.keystone = keystone
        self.port = free_ports(1)[0]
        self.proxy_url = "http://127.0.0.1:%d" % self.port
        self.storage_url = None
        self.server = None
        self.startup_seconds = None

    def start(self):
        began = time.monotonic()
        ks = self.keystone
        conf = os.path.join(self.swift.swift_dir, "proxy-server-keystone.conf")
        _write(conf, self.swift.proxy_conf(self.port, ["authtoken", "keystoneauth"], [
            ("filter:authtoken", [
                ("paste.filter_factory", "keystonemiddleware.auth_token:filter_factory"),
                ("www_authenticate_uri", ks.auth_url), ("auth_url", ks.url),
                ("auth_type", "password"), ("username", ks.service_user),
                ("password", ks.service_password), ("project_name", "service"),
                ("user_domain_id", "default"), ("project_domain_id", "default"),
                ("region_name", ks.region), ("delay_auth_decision", "true"),
                ("include_service_catalog", "false")]),
            ("filter:keystoneauth", [("use", "egg:swift#keystoneauth"),
                                     ("operator_roles", "admin, member"),
                                     ("reseller_prefix", "AUTH_")]),
        ]))
        self.server = self.swift.start_server("proxy-keystone", "swift-proxy-server", conf, self.port)
        ks.add_service("object-store", "swift", self.proxy_url + "/v1/AUTH_%(project_id)s")
        self.storage_url = "%s/v1/AUTH_%s" % (self.proxy_url, ks.project_id)
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self):
        if self.server is not None:
            self.server.stop()

    def log_tails(self, lines=20):
        """The end of every Swift server's log and of Keystone's."""
        server = self.keystone.server
        return "%s\n---- keystone (%s)\n%s" % (self.swift.log_tails(lines), server.log_path,
                                               server.log_tail(lines))

    def new_container(self, token, prefix="k"):
        """A new, empty container of the project's account; its name."""
        return self.swift.new_container(prefix, storage_url=self.storage_url, token=token)


def start_keystone_swift(swift, keystone):
    """A keystone-authenticated proxy for ``swift``'s cluster, registered
    as ``keystone``'s object-store; returns it started."""
    return KeystoneSwift(swift, keystone).start()
