"""An OpenBao Raft cluster on loopback that speaks only TLS, for tests of the
agent's ``ca_cert``, ``tls_server_name``, client certificates and the
``cert`` auth method.

Typical use::

    cluster = BaoTlsCluster("/tmp/somewhere")     # makes the PKI in <dir>/tls
    cluster.start()                               # ~same time as BaoCluster
    pki = cluster.pki                             # file paths, see make_pki
    status, body = cluster.api("GET", "sys/leader")
    ctx = https_context(pki.ca_cert, pki.client_cert, pki.client_key)
    opener = urllib.request.build_opener(NamedHTTPSHandler(ctx, pki.server_name))
    cluster.stop()

Everything of ``bao_cluster.BaoCluster`` works the same (same ports scheme,
static-seal auto-unseal, stop by PID); what differs:

  - every node's listener has ``tls_cert_file``/``tls_key_file`` with a
    server certificate whose only subject alternative name is the DNS name
    ``pki.server_name`` (default ``bao.test``, which resolves nowhere): no IP
    SAN, so a client that connects to ``https://127.0.0.1:PORT`` must be
    told the name to verify (``tls_server_name``) and the private CA
    (``ca_cert``);
  - the listener keeps OpenBao's default client-certificate handling
    (``tls.RequestClientCert``: asked for, never required, not verified by
    the listener), which is what the ``cert`` auth method needs; neither
    ``tls_require_and_verify_client_cert`` nor ``tls_client_ca_file`` is set
    (the latter is only read when the former is true, listenerutil/
    listener.go), so tokens, AppRole, JWT... still work without a client
    certificate;
  - ``retry_join`` names ``leader_ca_cert_file`` and
    ``leader_tls_servername``, so the followers verify the leader too.

Certificates are made with ``cryptography`` (the test venv has it; imported
on first use, so importing this module is stdlib-only).  Keys are EC P-256:
quick to make, and loaded by Python's ``ssl`` like RSA ones.
"""

import collections
import datetime
import functools
import http.client
import os
import ssl
import urllib.request

from support.bao_cluster import BaoCluster, _NoRedirect

__all__ = ["BaoTlsCluster", "TlsFiles", "make_pki", "https_context", "NamedHTTPSHandler",
           "named_opener", "SERVER_NAME"]

SERVER_NAME = "bao.test"

TlsFiles = collections.namedtuple("TlsFiles", [
    "directory", "server_name",
    "ca_cert", "ca_key",                  # the private CA the cluster's certificates come from
    "server_cert", "server_key",          # DNS:server_name only, serverAuth
    "client_cert", "client_key",          # CN snapshot-agent, clientAuth, from the CA
    "expired_client_cert", "expired_client_key",   # same CA, not valid any more
    "other_ca_cert",                      # an unrelated CA (wrong trust anchor)
    "other_client_cert", "other_client_key",       # a client certificate from other_ca
])


# --------------------------------------------------------------------- PKI


def _new_key():
    from cryptography.hazmat.backends import default_backend
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1(), default_backend())


def _name(common_name):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vault-snapshot-agent tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, key, issuer, issuer_key, ca=False, dns=(), usage=None,
                 days=(-1, 30)):
    """One certificate; ``days`` is (not before, not after) relative to now."""
    from cryptography import x509
    from cryptography.hazmat.backends import default_backend
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.utcnow().replace(microsecond=0)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject))
               .issuer_name(_name(issuer))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now + datetime.timedelta(days=days[0]))
               .not_valid_after(now + datetime.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256(), default_backend())


def _write(directory, name, cert=None, key=None):
    from cryptography.hazmat.primitives import serialization
    path = os.path.join(directory, name)
    if cert is not None:
        data = cert.public_bytes(serialization.Encoding.PEM)
        mode = 0o644
    else:
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        mode = 0o600
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def make_pki(directory, server_name=SERVER_NAME):
    """Write a private CA, a server certificate for ``server_name`` (its
    only SAN), client certificates (valid, expired, and one from an
    unrelated CA) and their keys (PKCS#8 PEM, mode 0600) into
    ``directory``; returns their paths as a :class:`TlsFiles`."""
    from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

    if not os.path.isdir(directory):
        os.makedirs(directory)
    ca_key, other_ca_key = _new_key(), _new_key()
    ca_name, other_name = "vsa test CA", "vsa unrelated CA"
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, ca=True, days=(-1, 365))
    other_ca = _certificate(other_name, other_ca_key, other_name, other_ca_key, ca=True,
                            days=(-1, 365))
    keys = dict((n, _new_key()) for n in ("server", "client", "expired", "other"))
    server = _certificate(server_name, keys["server"], ca_name, ca_key, dns=[server_name],
                          usage=[EKU.SERVER_AUTH, EKU.CLIENT_AUTH])
    client = _certificate("snapshot-agent", keys["client"], ca_name, ca_key,
                          usage=[EKU.CLIENT_AUTH])
    expired = _certificate("snapshot-agent", keys["expired"], ca_name, ca_key,
                           usage=[EKU.CLIENT_AUTH], days=(-30, -1))
    other = _certificate("snapshot-agent", keys["other"], other_name, other_ca_key,
                         usage=[EKU.CLIENT_AUTH])
    w = functools.partial(_write, directory)
    return TlsFiles(
        directory, server_name,
        w("ca.pem", ca), w("ca-key.pem", key=ca_key),
        w("server.pem", server), w("server-key.pem", key=keys["server"]),
        w("client.pem", client), w("client-key.pem", key=keys["client"]),
        w("client-expired.pem", expired), w("client-expired-key.pem", key=keys["expired"]),
        w("other-ca.pem", other_ca),
        w("other-client.pem", other), w("other-client-key.pem", key=keys["other"]),
    )


# ------------------------------------------------------------ the client


def https_context(ca_file, client_cert=None, client_key=None):
    """A verifying client context that trusts only ``ca_file`` (and
    presents ``client_cert`` when given)."""
    context = ssl.create_default_context(cafile=ca_file)
    if client_cert:
        context.load_cert_chain(client_cert, client_key)
    return context


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to the URL's host but sends and verifies ``server_name``."""

    def __init__(self, host, server_name=None, **kwargs):
        http.client.HTTPSConnection.__init__(self, host, **kwargs)
        self._server_name = server_name

    def connect(self):
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock,
                                              server_hostname=self._server_name or self.host)


class NamedHTTPSHandler(urllib.request.HTTPSHandler):
    """urllib handler for ``https://127.0.0.1:PORT`` URLs whose server
    certificate names ``server_name`` (SNI and verification); ``None``
    verifies the URL's host as urllib does."""

    def __init__(self, context, server_name=None):
        urllib.request.HTTPSHandler.__init__(self, context=context)
        self._ctx = context
        self._server_name = server_name

    def https_open(self, req):
        return self.do_open(functools.partial(_NamedHTTPSConnection, context=self._ctx,
                                              server_name=self._server_name), req)


def named_opener(context, server_name=SERVER_NAME, follow_redirects=False):
    """An urllib opener over :class:`NamedHTTPSHandler`."""
    handlers = [NamedHTTPSHandler(context, server_name)]
    if not follow_redirects:
        handlers.append(_NoRedirect())
    return urllib.request.build_opener(*handlers)


# ------------------------------------------------------------ the cluster


class BaoTlsCluster(BaoCluster):
    """:class:`bao_cluster.BaoCluster` with TLS listeners (see the module
    docstring).  ``pki`` (a :class:`TlsFiles`) is made in ``<workdir>/tls``
    unless given.  The API helpers (``api``, ``api_raw``...) connect with
    the root token over a context that trusts ``pki.ca_cert`` and verifies
    ``pki.server_name``, without a client certificate."""

    def __init__(self, workdir, nodes=3, bao=None, pki=None, server_name=SERVER_NAME, **kwargs):
        workdir = os.path.abspath(workdir)
        self.pki = pki or make_pki(os.path.join(workdir, "tls"), server_name)
        self.opener = named_opener(https_context(self.pki.ca_cert), self.pki.server_name)
        BaoCluster.__init__(self, workdir, nodes=nodes, bao=bao, **kwargs)

    def _write_config(self, node):
        for each in self.nodes:          # before BaoCluster writes addresses into the file
            each.addr = "https://127.0.0.1:%d" % each.port
        BaoCluster._write_config(self, node)
        with open(node.config_path) as fh:
            text = fh.read()
        plain = "  tls_disable     = true\n"
        join = "    leader_api_addr = "
        if plain not in text or join not in text:
            raise RuntimeError("bao_cluster's config template changed; update bao_tls")
        text = text.replace(plain, (
            "  tls_cert_file   = %s\n"
            "  tls_key_file    = %s\n"
            "  tls_min_version = \"tls12\"\n"
        ) % (_quote(self.pki.server_cert), _quote(self.pki.server_key)))
        text = text.replace(join, (
            "    leader_ca_cert_file   = %s\n"
            "    leader_tls_servername = %s\n"
            "    leader_api_addr       = "
        ) % (_quote(self.pki.ca_cert), _quote(self.pki.server_name)))
        with open(node.config_path, "w") as fh:
            fh.write(text)

    def agent_tls_config(self, client=False):
        """The agent's TLS keys for this cluster: ``addr`` (the leader or
        node 0), ``ca_cert``, ``tls_server_name``, and with ``client`` the
        client certificate and key."""
        leader = self.leader() or self.nodes[0]
        config = {"addr": leader.addr, "ca_cert": self.pki.ca_cert,
                  "tls_server_name": self.pki.server_name}
        if client:
            config.update(client_cert=self.pki.client_cert, client_key=self.pki.client_key)
        return config


def _quote(value):
    import json
    return json.dumps(str(value))
