"""Shared pytest fixtures.

Sections: markers, the OpenBao cluster, AppRole credentials, the
environment, the real servers, the storage blocks, a real browser and HTTP
client (Chromium, curl), the secret scan.  Helpers
live in the package support/ next to this file (support.bao_cluster,
support.faultproxy, ...) so tests, scripts and contrib/bench can import them;
no test file imports another.
"""

import io
import logging
import os
import re
import sys
import types

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.dirname(TESTS_DIR)
for _path in (TESTS_DIR, ROOT_DIR):      # helpers, and the agent module itself
    if _path not in sys.path:
        sys.path.insert(0, _path)

from support import bao_cluster as _bao  # noqa: E402
import vault_snapshot_agent as _vsa  # noqa: E402
from support import moto_s3 as _moto  # noqa: E402
from support import gcs_emulators as _gcs  # noqa: E402
from support import azurite as _azurite  # noqa: E402
from support import swift_server as _swift  # noqa: E402
from support import tinyproxy as _tinyproxy  # noqa: E402
from support import browser as _browser  # noqa: E402
from support import harness as _harness  # noqa: E402
from support import bad_configs as _bad_configs  # noqa: E402


# ---------------------------------------------------------------- markers


try:
    import yaml  # noqa: F401  (PyYAML comes with moto in the test venv)
except ImportError:
    # The bare per-Python unit runs have no PyYAML: leave the contrib checks
    # (an oracle module) out of those runs rather than reporting skips.
    collect_ignore = ["test_contrib.py", "test_helm_chart.py"]

SERVER_FIXTURES = ("bao_cluster", "moto", "gcs", "gcs_paging", "azurite", "azurite_oauth",
                   "swift", "swift_keystone", "swift_container", "proxy", "open_proxy", "chromium")


def pytest_collection_modifyitems(config, items):
    """Every test that needs the real cluster is an ``e2e`` test, so the unit
    tests can run alone under each Python (``-m "not e2e"``)."""
    for item in items:
        if set(SERVER_FIXTURES) & set(getattr(item, "fixturenames", ())) or \
                item.fspath.basename.endswith("_fixtures.py"):
            # Server tests, and the self-tests of the server fixtures (they need
            # the emulators and botocore/cryptography from the test venv).
            item.add_marker(pytest.mark.e2e)


# ------------------------------------------------------- OpenBao cluster


@pytest.fixture(scope="session")
def bao_cluster(tmp_path_factory):
    """A running 3-node OpenBao Raft cluster (bao_cluster.BaoCluster), shared
    by the whole session.  A test that kills, stops or seals nodes should
    call ``bao_cluster.heal()`` when done so later tests find it whole."""
    try:
        binary = _bao.find_bao(os.environ.get("BAO_BIN"))
    except _bao.BaoClusterError as exc:
        pytest.fail("cannot run the end-to-end tests: %s (tests/run.sh installs it)" % exc)
    cluster = _bao.BaoCluster(str(tmp_path_factory.mktemp("bao")), nodes=3, bao=binary)
    try:
        cluster.start()
        KNOWN_SECRETS.add(cluster.root_token)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kv_data(bao_cluster):
    """About 8 MB of KV data in the cluster, so snapshots take a while to stream."""
    return bao_cluster.fill_kv(8, prefix="kv-data")


# --------------------------------------------------- AppRole credentials


@pytest.fixture
def approle(bao_cluster):
    """AppRole credentials for the read-only snapshot role (token_ttl 1h):
    ``role_id``, ``secret_id`` (fresh for each test), ``mount``, ``role``."""
    role, mount = "snapshot-agent", "approle"
    role_id, secret_id = bao_cluster.setup_snapshot_approle(
        role=role, token_ttl="1h", token_max_ttl="24h", mount=mount
    )
    KNOWN_SECRETS.add(secret_id)
    return types.SimpleNamespace(role_id=role_id, secret_id=secret_id, mount=mount, role=role)


# --------------------------------------- the environment, the config corpus


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No credentials or endpoints from the environment leak into a test (or
    into the agents it starts as subprocesses)."""
    _harness.clear_cloud_env(monkeypatch, tmp_path,
                             ("VAULT_", "BAO_", "AWS_", "AZURE_", "GOOGLE_", "GCE_"))
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_aws_env(monkeypatch, tmp_path):
    """No AWS variable from the environment, and no shared credentials or
    config file nor instance metadata behind the S3 tests' back."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def no_azure_env(monkeypatch):
    """No AZURE_ variable from the environment."""
    for name in list(os.environ):
        if name.startswith("AZURE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def corpus_files(tmp_path):
    """The files the bad-config corpus points at (bad_configs.make_files)."""
    return _bad_configs.make_files(str(tmp_path))


# ------------------------------------------------------------ S3 (moto)


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """moto_server (S3, IAM, STS, KMS) on loopback with signature checking ON
    (moto_s3.MotoServer: users, buckets, KMS key, web-identity credentials)."""
    try:
        _moto.find_moto_server()
        import botocore  # noqa: F401  (the inspection helpers need it)
    except (_moto.MotoServerError, ImportError) as exc:
        pytest.fail("cannot run the S3 tests: %s (tests/run.sh installs moto[server])" % exc)
    server = _moto.MotoServer(str(tmp_path_factory.mktemp("moto")))
    try:
        server.start()
        server.setup()
        server.enable_auth()
        KNOWN_SECRETS.update([server.secret_access_key, server.denied_secret_access_key,
                              server.web_identity[1], server.web_identity[2]])
        yield server
    finally:
        server.stop()


# ------------------------------------------------------ GCS emulators


def _gcs_emulator(tmp_path_factory, kind):
    try:
        _gcs.find_emulator(kind)
    except _gcs.GcsEmulatorError as exc:
        pytest.fail("cannot run the GCS tests: %s (tests/run.sh installs it)" % exc)
    server = _gcs.GcsEmulator(str(tmp_path_factory.mktemp(kind)), kind)
    server.start()
    return server


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """gcp-storage-emulator: correct resumable uploads and status queries
    (but no list pagination). Bucket ``snapshots`` exists."""
    server = _gcs_emulator(tmp_path_factory, "gcp-storage-emulator")
    try:
        server.create_bucket("snapshots")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_paging(tmp_path_factory):
    """fake-gcs-server: paginates lists (but corrupts resumable status
    queries, so only simple uploads go to it). Bucket ``snapshots`` exists."""
    server = _gcs_emulator(tmp_path_factory, "fake-gcs-server")
    try:
        server.create_bucket("snapshots")
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------- Azurite


def _azurite_server(tmp_path_factory, name, **kwargs):
    try:
        _azurite.find_azurite()
    except _azurite.AzuriteError as exc:
        pytest.fail("cannot run the Azure tests: %s (tests/run.sh installs it)" % exc)
    server = _azurite.Azurite(str(tmp_path_factory.mktemp(name)), **kwargs)
    server.start()
    server.create_container("snapshots")
    KNOWN_SECRETS.add(server.key)
    return server


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azurite's blob service over HTTP; Shared Key and SAS signatures are
    checked. Container ``snapshots`` exists."""
    server = _azurite_server(tmp_path_factory, "azurite")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azurite_oauth(tmp_path_factory):
    """Azurite over HTTPS (self-signed ``.cert``) accepting Bearer tokens
    (``--oauth basic``: claims checked, signature not)."""
    server = _azurite_server(tmp_path_factory, "azurite-oauth", https=True, oauth="basic")
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------- OpenStack Swift and Keystone
#
# The servers run from .venv-openstack (support.swift_server), whatever
# Python runs the tests: the tests that use them are e2e (SERVER_FIXTURES).


def _openstack_dir(tmp_path_factory, name):
    try:
        _swift.find_openstack_venv()
    except _swift.OpenStackError as exc:
        pytest.fail("cannot run the Swift tests: %s" % exc)
    return str(tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def swift(tmp_path_factory):
    """Swift all in one (swift_server.Swift: account, container, object
    servers and a tempauth proxy, tokens valid an hour): ``auth_url``,
    ``user``, ``key``, ``storage_url``, ``login()``, ``new_container()``,
    ``request()``; ``reader`` (no rights), ``other_user``; logs in its dir."""
    server = _swift.start_swift(_openstack_dir(tmp_path_factory, "swift"), token_life=3600)
    KNOWN_SECRETS.add(server.key)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def swift_keystone(swift, tmp_path_factory):
    """A second proxy of the ``swift`` cluster behind Keystone
    (swift_server.KeystoneSwift: authtoken + keystoneauth): ``proxy_url``,
    ``storage_url``, ``keystone`` (swift_server.Keystone: ``auth_url`` .../v3,
    user/project/domain names and ids, ``password``, ``app_cred_*``,
    ``region``; tokens valid an hour), ``new_container(token)``."""
    keystone = _swift.start_keystone(_openstack_dir(tmp_path_factory, "keystone"),
                                     token_expiration=3600)
    KNOWN_SECRETS.update([keystone.password, keystone.admin_password,
                          keystone.service_password, keystone.app_cred_secret])
    try:
        proxy = _swift.start_keystone_swift(swift, keystone)
        try:
            yield proxy
        finally:
            proxy.stop()
    finally:
        keystone.stop()


@pytest.fixture
def swift_container(swift):
    """A new, empty container of ``swift``'s ``test`` account (its name)."""
    return swift.new_container("t")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the Swift fixtures shows their logs' tails."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        funcargs = getattr(item, "funcargs", {})
        server = funcargs.get("swift_keystone") or funcargs.get("swift")
        if server is not None:
            report.sections.append(("Swift and Keystone logs", server.log_tails()))


# ------------------------------------------------- forward proxies


PROXY_USER = "vsa-proxy"


def _proxy_server(tmp_path_factory, name, **kwargs):
    try:
        _tinyproxy.find_tinyproxy()
    except _tinyproxy.TinyproxyError as exc:
        pytest.fail("cannot run the proxy tests: %s (tests/run.sh installs it)" % exc)
    return _tinyproxy.Tinyproxy(str(tmp_path_factory.mktemp(name)), **kwargs).start()


@pytest.fixture(scope="session")
def proxy(tmp_path_factory):
    """tinyproxy with BasicAuth (tinyproxy.Tinyproxy): ``url`` holds the
    credentials, ``display`` is how the agent must show it, ``mark()`` and
    ``requests(mark)`` give the request lines it logged since."""
    password = "pw-" + os.urandom(12).hex()        # tinyproxy: [A-Za-z0-9._-] only
    server = _proxy_server(tmp_path_factory, "proxy", user=PROXY_USER, password=password)
    KNOWN_SECRETS.add(password)
    KNOWN_SECRETS.add(_b64("%s:%s" % (PROXY_USER, password)))   # the Proxy-Authorization value
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def open_proxy(tmp_path_factory):
    """tinyproxy without authentication."""
    server = _proxy_server(tmp_path_factory, "open-proxy")
    try:
        yield server
    finally:
        server.stop()


def _b64(text):
    import base64
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# ------------------------------------------- a real browser, a real client


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """Debian's headless Chromium (browser.Chromium: ``dump_dom(url)``,
    ``screenshot(url, path, width, height)``), a fresh profile per run."""
    try:
        binary = _browser.find_chromium()
    except _browser.BrowserError as exc:
        pytest.fail("cannot run the status page tests: %s (tests/run.sh installs it)" % exc)
    return _browser.Chromium(binary, str(tmp_path_factory.mktemp("chromium")))


@pytest.fixture(scope="session")
def curl():
    """browser.curl(url, *args): (status, headers, body) of one request by curl."""
    try:
        _browser.find_curl()
    except _browser.BrowserError as exc:
        pytest.fail("cannot run the HTTP client tests: %s (tests/run.sh installs it)" % exc)
    return _browser.curl


# ----------------------------------------------- no secret in any log line
#
# Every in-process run of the agent during the session also logs (at debug
# level) into one buffer; at the end it must hold none of the credentials
# the fixtures handed out, no Vault token, no SigV4 signature, no SAS
# signature and no private key. Subprocess runs check their own logs.

KNOWN_SECRETS = set()
LEAK_PATTERNS = [
    re.compile(r"\b(?:hvs|hvb|hvr|s|b|r|sb)\.[A-Za-z0-9_-]{20,}"),   # Vault/OpenBao tokens
    re.compile(r"Signature=[0-9a-f]{64}"),                          # SigV4
    re.compile(r"[?&]sig=[A-Za-z0-9%+/=]{10,}"),                    # Azure SAS
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
_SESSION_LOG = io.StringIO()
_CAPTURE = logging.StreamHandler(_SESSION_LOG)
_CAPTURE.setLevel(logging.DEBUG)
_CAPTURE.setFormatter(logging.Formatter("%(message)s"))
_real_configure_logging = _vsa._configure_logging


def _configure_logging_and_capture(level, fmt, stream):
    handler = _real_configure_logging(level, fmt, stream)
    _vsa.LOG.setLevel(min(level, logging.DEBUG))
    handler.setLevel(level)
    _vsa.LOG.addHandler(_CAPTURE)
    return handler


_vsa._configure_logging = _configure_logging_and_capture


def pytest_sessionfinish(session, exitstatus):
    text = _SESSION_LOG.getvalue()
    leaks = sorted(set(secret for secret in KNOWN_SECRETS if secret and secret in text))
    leaks += sorted(set(m.group(0)[:12] + "..." for p in LEAK_PATTERNS for m in p.finditer(text)))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = len(text.splitlines())
    if reporter is not None:
        reporter.write_line("secret scan: %d log lines of in-process agent runs, %d known secrets, "
                            "%d leaks" % (lines, len(KNOWN_SECRETS), len(leaks)))
    if leaks:
        if reporter is not None:
            reporter.write_line("SECRET LEAKED INTO LOGS: %s" % ", ".join(leaks[:10]), red=True)
        session.exitstatus = 1


# ------------- auth methods: TLS cluster, jwt, cert, userpass (auth_fixtures.py)
pytest_plugins = ["support.auth_fixtures"]      # adds to KNOWN_SECRETS above
