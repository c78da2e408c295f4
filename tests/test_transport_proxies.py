"""Section 5 (HTTP transport): credential endpoints on the node itself are
never reached through a proxy, and proxy variables the agent cannot use
are a warning, not an exit.

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
from cred_servers import ContainerCredentialsServer
from harness import FakeClock, run_main
from slow_servers import RecordingProxy

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
