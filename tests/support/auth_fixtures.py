"""pytest fixtures for the Vault auth methods: a TLS OpenBao cluster and the
``jwt``, ``cert``, ``userpass`` and ``ldap`` (userpass-shaped) logins in it.

Registered by conftest.py as a plugin (``pytest_plugins = ["auth_fixtures"]``).
Every secret given out here goes into the secret-scan set of the conftest
that registered the plugin (its ``KNOWN_SECRETS``), so the session's logs are
searched for it.  Importing this module is stdlib-only (the unit runs under
every Python import it too).

Fixtures (the cluster is shared by the session; the logins are rewritten
for each test, with their files in the test's ``tmp_path``):

  bao_tls        bao_tls.BaoTlsCluster, 3 nodes, server name ``bao.test``
  jwt_auth       bao_auth.JwtSetup: mount ``jwt``, role ``snapshot-agent``
  cert_auth      bao_auth.AuthSetup: mount ``cert``, role ``agent``
  userpass_auth  bao_auth.AuthSetup: mount ``userpass``
  ldap_auth      bao_auth.AuthSetup: userpass mounted at ``ldap``

Every test that uses one of them is marked ``e2e``.
"""

import os

import pytest

from support import bao_auth
from support import bao_cluster

_OWN_SECRETS = set()       # used when no conftest has a KNOWN_SECRETS set

AUTH_FIXTURES = ("bao_tls", "jwt_auth", "cert_auth", "userpass_auth", "ldap_auth")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if set(AUTH_FIXTURES) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def _known_secrets(config):
    """The secret-scan set of the conftest that registered this plugin."""
    for plugin in config.pluginmanager.get_plugins():
        found = getattr(plugin, "KNOWN_SECRETS", None)
        if isinstance(found, set) and getattr(plugin, "__name__", "").endswith("conftest"):
            return found
    return _OWN_SECRETS


@pytest.fixture(scope="session")
def session_secrets(pytestconfig):
    return _known_secrets(pytestconfig)


@pytest.fixture(scope="session")
def bao_tls(tmp_path_factory, session_secrets):
    """A 3-node OpenBao Raft cluster over TLS only (private CA, DNS-only
    server certificate: see bao_tls.py), shared by the session."""
    from support import bao_tls as _bao_tls
    try:
        binary = bao_cluster.find_bao(os.environ.get("BAO_BIN"))
        import cryptography  # noqa: F401  (makes the PKI)
    except (bao_cluster.BaoClusterError, ImportError) as exc:
        pytest.fail("cannot run the TLS cluster tests: %s (tests/run.sh installs it)" % exc)
    cluster = _bao_tls.BaoTlsCluster(str(tmp_path_factory.mktemp("bao-tls")), nodes=3,
                                     bao=binary)
    try:
        cluster.start()
        session_secrets.add(cluster.root_token)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def _jwt_key(session_secrets):
    from support import rsa_keys
    key = rsa_keys.make_rsa_key(2048)
    session_secrets.add(key.private_pem)
    return key


def _registered(setup, session_secrets):
    session_secrets.update(setup.secrets)
    return setup


@pytest.fixture
def jwt_auth(bao_tls, _jwt_key, tmp_path, session_secrets):
    """``jwt`` login: ``config`` for the agent, a valid token already in
    ``config["jwt_file"]``; ``mint(aud=..., exp_in=...)`` makes others."""
    return _registered(bao_auth.setup_jwt(bao_tls, str(tmp_path), key=_jwt_key), session_secrets)


@pytest.fixture
def cert_auth(bao_tls):
    """``cert`` login trusting the cluster's CA; ``config`` holds the client
    certificate and key (``bao_tls.pki`` has expired and foreign ones)."""
    return bao_auth.setup_cert(bao_tls, bao_tls.pki.ca_cert)


@pytest.fixture
def userpass_auth(bao_tls, tmp_path, session_secrets):
    """``userpass`` login; the password is in ``config["password_file"]``."""
    return _registered(bao_auth.setup_userpass(bao_tls, str(tmp_path)), session_secrets)


@pytest.fixture
def ldap_auth(bao_tls, tmp_path, session_secrets):
    """The LDAP login shape: ``userpass`` mounted at ``ldap``."""
    return _registered(bao_auth.setup_userpass(bao_tls, str(tmp_path), mount="ldap"),
                       session_secrets)
