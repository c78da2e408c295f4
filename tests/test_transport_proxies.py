"""Section "HTTP transport and retry": credential endpoints on the node itself are
never reached through a proxy, and proxy variables the agent cannot use
are a warning, not an exit. A proxy on port 0 is refused, never taken for
port 80; a 401 from the origin inside a CONNECT tunnel is the origin's
answer, not the proxy refusing its credentials.

Which proxy a URL takes is checked as a table for the link-local and AWS
metadata addresses in every spelling (no test contacts 169.254.x); end to
end, the AWS container-credential request goes to a loopback credential
server, with the resolver mapping the Pod Identity addresses to
127.0.0.1, while a recording loopback "proxy" must see nothing.
"""

import json
import socket

import pytest

import vault_snapshot_agent as vsa
from support.cred_servers import ContainerCredentialsServer
from support.fake_endpoints import Endpoint, self_signed_cert
from support.harness import FakeClock, run_main
from support.slow_servers import RecordingProxy, TunnelProxy

ENV_PROXY = {"HTTP_PROXY": "http://env.proxy:3128", "HTTPS_PROXY": "http://env.proxy:3128"}
EXPLICIT = "http://corp.proxy:3128"

NODE_LOCAL = [
    "http://169.254.170.23/v1/credentials",               # EKS Pod Identity agent
    "http://[fd00:ec2::23]/v1/credentials",
    "http://[FD00:EC2:0::23]:80/v1/credentials",
    "http://[fd00:ec2:0::254]/latest/api/token",           # IMDS, another spelling
    "http://[fd00:ec2:0:0:0:0:0:254]/latest/api/token",
    "http://169.254.169.254/latest/api/token",
    "http://169.254.170.2/v2/credentials/x",
    "http://169.254.1.1/",                                 # any IPv4 link-local
    "http://0xa9fea9fe/latest/api/token",                  # 169.254.169.254 as the resolver reads it
    "http://2852039166/latest/api/token",
    "http://169.254.43518/latest/api/token",
    "http://[::ffff:169.254.169.254]/latest/api/token",
    "http://[fe80::1]/",                                   # IPv6 link-local
    "http://[fe80::1%25eth0]/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata.google.internal./computeMetadata/v1/",
    "http://METADATA.google.internal/computeMetadata/v1/",
]

NOT_NODE_LOCAL = [
    "http://169.255.0.1/", "http://[fd00:ec2::24]/", "http://[fec0::1]/", "https://s3.amazonaws.com/b",
    "http://metadata.google.internal.evil.org/", "http://10.0.0.1/",
]


@pytest.mark.parametrize("url", NODE_LOCAL)
@pytest.mark.parametrize("setting,env", [(None, ENV_PROXY), (EXPLICIT, {})])
def test_node_local_credential_endpoints_are_never_proxied(url, setting, env):
    assert vsa.ProxyPolicy(setting, env).for_url(url) is None


@pytest.mark.parametrize("url", NOT_NODE_LOCAL)
@pytest.mark.parametrize("setting,env", [(None, ENV_PROXY), (EXPLICIT, {})])
def test_other_addresses_still_take_the_proxy(url, setting, env):
    assert vsa.ProxyPolicy(setting, env).for_url(url) is not None


@pytest.fixture
def pod_identity_resolves_to_loopback(monkeypatch):
    """The resolver maps the Pod Identity agent's addresses to 127.0.0.1
    (so nothing reaches 169.254.x or fd00:ec2::)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in ("169.254.170.23", "fd00:ec2::23"):
            host = "127.0.0.1"
        return real(host, port, *args, **kwargs)
    monkeypatch.setattr(vsa.socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("host", ["169.254.170.23", "[fd00:ec2::23]"])
@pytest.mark.parametrize("explicit", [False, True])
def test_pod_identity_token_never_reaches_a_proxy(pod_identity_resolves_to_loopback, host, explicit):
    token = "pod-identity-token-must-stay-on-the-node"
    with RecordingProxy("refuse") as proxy, \
            ContainerCredentialsServer(path="/v1/credentials", authorization=token) as agent:
        env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://%s:%d/v1/credentials" % (host, agent.port),
               "AWS_CONTAINER_AUTHORIZATION_TOKEN": token}
        if explicit:
            policy = vsa.ProxyPolicy(proxy.url, env)
        else:
            env["HTTP_PROXY"] = proxy.url
            policy = vsa.ProxyPolicy(None, env)
        chain = vsa.AwsCredentialChain(None, env, "us-east-1", None,
                                       vsa.Http(None, 5.0, proxy=policy), FakeClock())
        credentials = chain.get()
    assert credentials.access_key == agent.access_key_id
    assert proxy.connections == 0 and proxy.received == []


def test_an_unusable_environment_proxy_is_a_warning_not_an_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HTTPS_PROXY", "https://ops:hunter2@proxy.corp:443")
    monkeypatch.setenv("http_proxy", "socks5://ops:hunter2@proxy.corp:1080")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"addr": "http://127.0.0.1:1", "token": "t",
                                "local_storage": {"path": str(tmp_path / "snaps")}}))
    path.chmod(0o600)
    code, log = run_main("-c", str(path), "--check-config")
    assert code == 0, log
    warnings = [line for line in log.splitlines() if "WARNING" in line and "_PROXY" in line.upper()]
    assert len(warnings) == 2, log
    assert any("HTTPS_PROXY" in line and "go direct" in line for line in warnings), log
    assert any("http_proxy" in line and "go direct" in line for line in warnings), log
    assert "hunter2" not in log + capsys.readouterr().out


@pytest.mark.parametrize("where", ["setting", "environment"])
def test_a_proxy_url_with_port_0_is_not_taken_for_port_80(where):
    """parse_proxy_url wrote ``parts.port or 80``: an explicit ``:0`` (a
    templating slip) silently became port 80 of the proxy host, a different
    service; Go dials :0 and fails. Expected: refused (an explicit key: one
    ConfigError line; the environment: a warning)."""
    url = "http://127.0.0.1:0"
    if where == "setting":
        with pytest.raises(vsa.ConfigError):
            vsa.ProxyPolicy(url)
    else:
        env = {"HTTPS_PROXY": url}
        proxy = vsa.ProxyPolicy(None, env).for_url("https://vault.example:8200/")
        assert proxy is None or proxy.port != 80, "port 0 became %s" % (proxy,)
        assert vsa.ProxyPolicy(None, env).warnings, "no warning for a proxy on port 0"


def test_a_basic_auth_401_from_the_origin_inside_a_tunnel_is_the_origins_answer(tmp_path):
    """Http.request took any 401 with ``WWW-Authenticate: Basic`` for the
    proxy refusing its credentials, even for https, where the proxy has
    already answered the CONNECT with 200 and the 401 came through TLS from
    the origin (a Vault behind nginx ``auth_basic``): the error blamed the
    proxy and the caller never saw the origin's answer."""
    cert, key = self_signed_cert(tmp_path)
    origin = Endpoint(lambda request: (401, {"WWW-Authenticate": 'Basic realm="vault"'},
                                       {"errors": ["origin wants a password"]}), tls=(cert, key))
    with origin:
        port = int(origin.url.rsplit(":", 1)[1])
        with TunnelProxy(("127.0.0.1", port)) as proxy:
            http = vsa.Http(vsa.TlsOptions(cert, None, None, None, None, False), timeout=5.0,
                            deadline=5.0,
                            proxy=vsa.ProxyPolicy("http://user:pw@127.0.0.1:%d" % proxy.port))
            try:
                with http.request("GET", "https://127.0.0.1:%d/v1/sys/leader" % port) as resp:
                    status, body = resp.status, resp.json()
            except vsa.TransportError as exc:
                pytest.fail("the origin's 401 was reported as: %s" % exc)
    assert proxy.received and proxy.received[0].startswith(b"CONNECT ")
    assert status == 401 and body["errors"] == ["origin wants a password"]
