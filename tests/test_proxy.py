"""Section "HTTP transport and retry": forward proxies.

The pure part (every Python): the NO_PROXY rules (``vsa.no_proxy_match``),
which proxy a URL takes (``vsa.ProxyPolicy(setting, env).for_url``: Go's
``http.ProxyFromEnvironment`` from the environment, an explicit ``proxy``
setting, ``"direct"``, loopback and the metadata endpoints) and proxy URLs
(``vsa.parse_proxy_url``: user info, refused forms, redaction), as tables.

End to end, through Debian's tinyproxy (tests/support/tinyproxy.py; ``proxy`` has
BasicAuth, ``open_proxy`` none), whose log shows every request line: S3
(moto) through the authenticated proxy in absolute form; Azure Blob
(Azurite over https) through CONNECT with TLS to the origin checked against
the origin's name; Vault through a top-level ``proxy``; a wrong password, a
missing one, a proxy that is down and a CONNECT the proxy refuses, each one
ERROR line naming the proxy without its password; ``"direct"`` beating the
environment; the environment path (loopback never proxied, a host name
proxied unless NO_PROXY names it)."""

import base64
import json
import os
import re

import pytest

import vault_snapshot_agent as vsa
from support.harness import (clear_cloud_env, error_lines, free_port, loopback_alias, run_main,
                             run_once, success_location, unique, verify_download)

BUCKET = "snapshots"
CONTAINER = "snapshots"
PROXY_ENV = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy",
             "ALL_PROXY", "all_proxy", "VAULT_PROXY_ADDR", "VAULT_HTTP_PROXY", "BAO_PROXY_ADDR",
             "BAO_HTTP_PROXY")


def basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode("utf-8")).decode("ascii")


def hostport(proxy):
    return None if proxy is None else "%s:%d" % (proxy.host, proxy.port)


# =============================================================================
# Pure: NO_PROXY rules
# =============================================================================

NO_PROXY_CASES = [
    # host, port, NO_PROXY, exempt?
    ("example.com", 443, "", False),
    ("example.com", 443, None, False),
    ("example.com", 443, " , ,", False),
    ("anything.example", 8200, "*", True),
    ("10.1.2.3", 80, "*", True),
    ("example.com", 443, "foo.org,*", True),                # "*" as any entry
    # a name: itself and its subdomains
    ("example.com", 443, "example.com", True),
    ("s3.example.com", 443, "example.com", True),
    ("a.b.example.com", 443, "example.com", True),
    ("notexample.com", 443, "example.com", False),
    ("example.com.evil.org", 443, "example.com", False),
    ("example.co", 443, "example.com", False),
    # a leading dot or "*.": subdomains only
    ("example.com", 443, ".example.com", False),
    ("s3.example.com", 443, ".example.com", True),
    ("example.com", 443, "*.example.com", False),
    ("a.b.example.com", 443, "*.example.com", True),
    ("notexample.com", 443, "*.example.com", False),
    # case and spaces
    ("S3.Example.COM", 443, "example.com", True),
    ("s3.example.com", 443, "EXAMPLE.com", True),
    ("s3.example.com", 443, "  foo.org ,  example.com  ", True),
    ("s3.example.com", 443, "foo.org,example.org", False),
    # ports: only that port
    ("vault.corp", 8200, "vault.corp:8200", True),
    ("vault.corp", 8201, "vault.corp:8200", False),
    ("api.vault.corp", 8200, "vault.corp:8200", True),
    ("vault.corp", 443, ".corp:443", True),
    ("vault.corp", 80, ".corp:443", False),
    # IPv4 literals and CIDR
    ("10.1.2.3", 80, "10.1.2.3", True),
    ("10.1.2.4", 80, "10.1.2.3", False),
    ("10.1.2.3", 9000, "10.1.2.3:9000", True),
    ("10.1.2.3", 9001, "10.1.2.3:9000", False),
    ("10.1.2.3", 80, "10.0.0.0/8", True),
    ("11.0.0.1", 80, "10.0.0.0/8", False),
    ("192.168.7.9", 443, "192.168.0.0/16,10.0.0.0/8", True),
    ("192.169.0.1", 443, "192.168.0.0/16", False),
    ("10.1.2.3", 80, "example.com", False),                 # a name never matches an IP
    ("example.com", 443, "10.0.0.0/8", False),              # nor a CIDR a name
    # IPv6 literals and CIDR (the host as URLs carry it, with or without brackets)
    ("2001:db8::1", 443, "2001:db8::1", True),
    ("[2001:db8::1]", 443, "2001:db8::1", True),
    ("2001:db8::2", 443, "2001:db8::1", False),
    ("2001:db8::1", 8200, "[2001:db8::1]:8200", True),
    ("2001:db8::1", 8201, "[2001:db8::1]:8200", False),
    ("fd12:3456::1", 443, "fd00::/8", True),
    ("2001:db8::1", 443, "fd00::/8", False),
    ("2001:DB8::1", 443, "2001:db8::/32", True),
    ("10.1.2.3", 443, "fd00::/8", False),
    ("2001:db8::1", 443, "10.0.0.0/8", False),
]


@pytest.mark.parametrize("host,port,no_proxy,exempt", NO_PROXY_CASES)
def test_no_proxy_rules(host, port, no_proxy, exempt):
    assert vsa.no_proxy_match(host, port, no_proxy) is exempt


# =============================================================================
# Pure: which proxy a URL takes
# =============================================================================

SECURE = "secure.proxy:3128"      # HTTPS_PROXY of BASE_ENV
PLAIN = "plain.proxy:8080"        # HTTP_PROXY of BASE_ENV
BASE_ENV = {"HTTPS_PROXY": "http://secure.proxy:3128", "HTTP_PROXY": "http://plain.proxy:8080"}

FROM_ENV_CASES = [
    # changes to BASE_ENV (None: unset), URL, expected proxy or None (direct)
    ({}, "https://s3.eu-west-1.amazonaws.com/bucket/key", SECURE),
    ({}, "http://minio.internal:9000/bucket", PLAIN),
    ({}, "https://10.0.0.5:8200/v1/sys/health", SECURE),
    ({}, "https://[2001:db8::5]:8200/v1/sys/health", SECURE),
    ({}, "https://vault.corp:8200/v1/sys/health", SECURE),
    # scheme choice: never the other scheme's proxy
    ({"HTTPS_PROXY": None}, "https://s3.amazonaws.com/b", None),
    ({"HTTP_PROXY": None}, "http://minio.internal:9000/b", None),
    ({"HTTP_PROXY": None}, "https://s3.amazonaws.com/b", SECURE),
    # upper case first, lower case as the fallback; an empty value is unset
    ({"https_proxy": "http://lower.proxy:1"}, "https://s3.amazonaws.com/b", SECURE),
    ({"HTTPS_PROXY": None, "https_proxy": "http://lower.proxy:1"}, "https://s3.amazonaws.com/b",
     "lower.proxy:1"),
    ({"HTTPS_PROXY": "", "https_proxy": "http://lower.proxy:1"}, "https://s3.amazonaws.com/b",
     "lower.proxy:1"),
    ({"HTTPS_PROXY": ""}, "https://s3.amazonaws.com/b", None),
    ({"HTTP_PROXY": None, "http_proxy": "http://lower.proxy:2"}, "http://minio.internal/b",
     "lower.proxy:2"),
    # a bare host:port is http://; no port is 80
    ({"HTTP_PROXY": "plain.proxy:8080"}, "http://minio.internal:9000/b", PLAIN),
    ({"HTTPS_PROXY": "http://noport.proxy"}, "https://s3.amazonaws.com/b", "noport.proxy:80"),
    # loopback and localhost: never from the environment
    ({}, "https://127.0.0.1:8200/v1/sys/health", None),
    ({}, "http://127.0.0.1:9000/bucket", None),
    ({}, "http://127.5.5.5:9000/bucket", None),
    ({}, "http://[::1]:8200/v1/sys/health", None),
    ({}, "https://localhost:8200/v1/sys/health", None),
    ({}, "https://LocalHost:8200/v1/sys/health", None),
    ({"NO_PROXY": "example.com"}, "http://localhost/", None),
    # the metadata endpoints: never
    ({}, "http://169.254.169.254/latest/api/token", None),
    ({}, "http://169.254.170.2/v2/credentials/abc", None),
    ({}, "http://[fd00:ec2::254]/latest/meta-data/", None),
    ({}, "http://metadata.google.internal/computeMetadata/v1/instance", None),
    ({}, "http://Metadata.Google.Internal/computeMetadata/v1/instance", None),
    # ...and every other link-local address (node-local by definition)
    ({}, "http://169.254.1.1/", None),
    # NO_PROXY through for_url (the default port counts)
    ({"NO_PROXY": "*"}, "https://s3.amazonaws.com/b", None),
    ({"NO_PROXY": "amazonaws.com"}, "https://s3.amazonaws.com/b", None),
    ({"NO_PROXY": "amazonaws.com"}, "https://amazonaws.com/b", None),
    ({"NO_PROXY": ".amazonaws.com"}, "https://amazonaws.com/b", SECURE),
    ({"NO_PROXY": "*.amazonaws.com"}, "https://s3.amazonaws.com/b", None),
    ({"NO_PROXY": "AMAZONAWS.COM"}, "https://S3.Amazonaws.com/b", None),
    ({"NO_PROXY": "vault.corp:8200"}, "https://vault.corp:8200/v1/sys/health", None),
    ({"NO_PROXY": "vault.corp:8200"}, "https://vault.corp/v1/sys/health", SECURE),
    ({"NO_PROXY": "storage.corp:443"}, "https://storage.corp/container", None),
    ({"NO_PROXY": "storage.corp:443"}, "http://storage.corp/container", PLAIN),
    ({"NO_PROXY": "minio.internal:80"}, "http://minio.internal/b", None),
    ({"NO_PROXY": "10.0.0.0/8"}, "https://10.1.2.3:8200/", None),
    ({"NO_PROXY": "10.0.0.0/8"}, "https://11.1.2.3:8200/", SECURE),
    ({"NO_PROXY": "fd00::/8"}, "https://[fd12::1]:8200/", None),
    ({"NO_PROXY": "[fd12::1]:8200"}, "https://[fd12::1]:8200/", None),
    ({"NO_PROXY": "[fd12::1]:8200"}, "https://[fd12::1]:8201/", SECURE),
    ({"NO_PROXY": " foo.org , s3.amazonaws.com "}, "https://s3.amazonaws.com/b", None),
    # NO_PROXY first, no_proxy as the fallback
    ({"NO_PROXY": "a.example", "no_proxy": "s3.amazonaws.com"}, "https://s3.amazonaws.com/b",
     SECURE),
    ({"no_proxy": "s3.amazonaws.com"}, "https://s3.amazonaws.com/b", None),
    ({"NO_PROXY": "", "no_proxy": "s3.amazonaws.com"}, "https://s3.amazonaws.com/b", None),
]


def env_with(changes):
    env = dict(BASE_ENV)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@pytest.mark.parametrize("changes,url,expected", FROM_ENV_CASES)
def test_proxy_from_the_environment(changes, url, expected):
    assert hostport(vsa.ProxyPolicy(None, env_with(changes)).for_url(url)) == expected


def test_environment_proxy_with_credentials():
    env = {"HTTPS_PROXY": "http://svc%40corp:p%3Ass%2Fw@secure.proxy:3128"}
    proxy = vsa.ProxyPolicy(None, env).for_url("https://s3.amazonaws.com/b")
    assert hostport(proxy) == SECURE
    assert proxy.auth.reveal() == basic("svc@corp", "p:ss/w")
    assert "p:ss/w" not in proxy.display and "p%3Ass" not in proxy.display


def test_no_environment_means_direct():
    policy = vsa.ProxyPolicy(None, {})
    for url in ("https://s3.amazonaws.com/b", "http://minio.internal:9000/b",
                "https://127.0.0.1:8200/"):
        assert policy.for_url(url) is None


@pytest.mark.parametrize("name,value", [
    ("HTTPS_PROXY", "ftp://proxy.corp:21"),
    ("https_proxy", "https://proxy.corp:443"),
    ("HTTP_PROXY", "http://proxy.corp:notaport"),
    ("HTTP_PROXY", "http://:3128"),
])
def test_unusable_environment_proxy_is_one_warning_naming_the_variable_and_goes_direct(name, value):
    # An exit 2 at start would be a restart loop under systemd even when no
    # request needs the proxy: Go ignores what it cannot use, so does the agent.
    env = {name: value.replace("://", "://user:hunter2@", 1)}
    policy = vsa.ProxyPolicy(None, env)
    for url in ("https://s3.amazonaws.com/b", "http://minio.internal:9000/b"):
        assert policy.for_url(url) is None
    warnings = policy.warnings
    assert len(warnings) == 1 and name in warnings[0] and "go direct" in warnings[0]
    assert "hunter2" not in warnings[0] and "\n" not in warnings[0]


EXPLICIT = "http://corp.proxy:3128"

EXPLICIT_CASES = [
    # env, URL, expected
    ({}, "https://s3.amazonaws.com/b", "corp.proxy:3128"),
    ({}, "http://minio.internal:9000/b", "corp.proxy:3128"),
    # loopback too: the setting is for every request of its block
    ({}, "http://127.0.0.1:9000/b", "corp.proxy:3128"),
    ({}, "https://localhost:8200/", "corp.proxy:3128"),
    ({}, "http://[::1]:8200/", "corp.proxy:3128"),
    # and it wins over the environment
    ({"NO_PROXY": "*"}, "https://s3.amazonaws.com/b", "corp.proxy:3128"),
    (dict(BASE_ENV, NO_PROXY="amazonaws.com"), "https://s3.amazonaws.com/b", "corp.proxy:3128"),
    (BASE_ENV, "http://minio.internal:9000/b", "corp.proxy:3128"),
    # the metadata endpoints stay direct
    ({}, "http://169.254.169.254/latest/api/token", None),
    ({}, "http://169.254.170.2/v2/credentials/abc", None),
    ({}, "http://[fd00:ec2::254]/latest/meta-data/", None),
    ({}, "http://metadata.google.internal/computeMetadata/v1/instance", None),
]


@pytest.mark.parametrize("env,url,expected", EXPLICIT_CASES)
def test_explicit_proxy(env, url, expected):
    assert hostport(vsa.ProxyPolicy(EXPLICIT, env).for_url(url)) == expected


@pytest.mark.parametrize("url", ["https://s3.amazonaws.com/b", "http://minio.internal:9000/b",
                                 "http://127.0.0.1:9000/b", "http://169.254.169.254/latest"])
def test_direct_beats_the_environment(url):
    env = dict(BASE_ENV, http_proxy="http://lower:1", https_proxy="http://lower:2")
    assert vsa.ProxyPolicy("direct", env).for_url(url) is None


def test_explicit_proxy_url_is_checked_with_its_key_name():
    with pytest.raises(vsa.ConfigError) as info:
        vsa.ProxyPolicy("socks5://user:hunter2@corp.proxy:1080", {}, where="aws_storage.proxy")
    assert "aws_storage.proxy" in str(info.value)
    assert "hunter2" not in str(info.value)


# =============================================================================
# Pure: proxy URLs
# =============================================================================

PARSE_CASES = [
    # text, host, port, (user, password) or None, display
    ("http://proxy.corp:3128", "proxy.corp", 3128, None, "http://proxy.corp:3128"),
    ("proxy.corp:3128", "proxy.corp", 3128, None, "http://proxy.corp:3128"),
    ("http://proxy.corp", "proxy.corp", 80, None, "http://proxy.corp:80"),
    ("http://10.0.0.1:8080", "10.0.0.1", 8080, None, "http://10.0.0.1:8080"),
    ("http://[fd00::1]:3128", "fd00::1", 3128, None, "http://[fd00::1]:3128"),
    ("http://Proxy.Corp:3128", "proxy.corp", 3128, None, "http://proxy.corp:3128"),
    ("http://user:secret@proxy.corp:3128", "proxy.corp", 3128, ("user", "secret"),
     "http://user:***@proxy.corp:3128"),
    ("http://user:pa%40ss@proxy.corp:3128", "proxy.corp", 3128, ("user", "pa@ss"),
     "http://user:***@proxy.corp:3128"),
    ("http://user:p%3A%2F%25w%20d@proxy.corp:3128", "proxy.corp", 3128, ("user", "p:/%w d"),
     "http://user:***@proxy.corp:3128"),
    ("http://user:caf%C3%A9@proxy.corp:3128", "proxy.corp", 3128, ("user", "caf\u00e9"),
     "http://user:***@proxy.corp:3128"),
    ("user:secret@proxy.corp:3128", "proxy.corp", 3128, ("user", "secret"),
     "http://user:***@proxy.corp:3128"),
    ("http://user:@proxy.corp:3128", "proxy.corp", 3128, ("user", ""), None),
    ("http://svc%40corp:secret@proxy.corp:3128", "proxy.corp", 3128, ("svc@corp", "secret"),
     None),
]


@pytest.mark.parametrize("text,host,port,credentials,display", PARSE_CASES)
def test_parse_proxy_url(text, host, port, credentials, display):
    proxy = vsa.parse_proxy_url(text, "proxy")
    assert (proxy.host, proxy.port) == (host, port)
    if credentials is None:
        assert proxy.auth is None
    else:
        assert isinstance(proxy.auth, vsa.Secret)
        assert proxy.auth.reveal() == basic(*credentials)
    if display is not None:
        assert proxy.display == display
    if credentials and credentials[1]:
        for shown in (proxy.display, repr(proxy), str(proxy), "%s" % (proxy,)):
            assert credentials[1] not in shown
            assert proxy.auth.reveal() not in shown
            assert proxy.auth.reveal()[6:] not in shown       # the base64 alone


@pytest.mark.parametrize("text,needle", [
    ("https://proxy.corp:443", "https:// proxies are not supported"),
    ("https://user:hunter2@proxy.corp:443", "https:// proxies are not supported"),
    ("socks5://proxy.corp:1080", None),
    ("ftp://proxy.corp:21", None),
    ("http://:3128", None),
    ("http://", None),
    ("", None),
    ("http://proxy.corp:99999", None),
    ("http://user:hunter2@proxy.corp:99999", None),
    ("http://proxy.corp:port", None),
])
def test_bad_proxy_urls_are_config_errors_naming_the_key(text, needle):
    with pytest.raises(vsa.ConfigError) as info:
        vsa.parse_proxy_url(text, "azure_storage.proxy")
    message = str(info.value)
    assert "azure_storage.proxy" in message
    assert "hunter2" not in message
    if needle:
        assert needle in message
    assert "\n" not in message


# =============================================================================
# Config: --check-config shows proxies with the password as ***
# =============================================================================

CHECK_CONFIG = {
    "addr": "https://vault.corp:8200", "token": "unused-by-check-config",
    "proxy": "http://ops:hunter2@corp.proxy:3128",
    "aws_storage": {"s3_bucket": "snapshots", "s3_region": "us-east-1",
                    "access_key_id": "AKIAEXAMPLE", "secret_access_key": "unused",
                    "proxy": "direct"},
    "azure_storage": {"account_name": "devstoreaccount1", "account_key": "QUJD",
                      "container_name": "snapshots", "proxy": "svc:p%40ss-w0rd@10.0.0.1:8080"},
}


def check_config(tmp_path, doc):
    path = tmp_path / "proxy.json"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return run_main("-c", str(path), "--check-config")


def test_check_config_shows_proxies_without_passwords(tmp_path, capsys, monkeypatch):
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    code, log = check_config(tmp_path, CHECK_CONFIG)
    out = capsys.readouterr().out
    assert code == 0, log
    shown = json.loads(out)
    assert shown["proxy"] == "http://ops:***@corp.proxy:3128"
    assert shown["aws_storage"]["proxy"] == "direct"
    assert shown["azure_storage"]["proxy"] == "http://svc:***@10.0.0.1:8080"
    for secret in ("hunter2", "p%40ss-w0rd", "p@ss-w0rd", basic("ops", "hunter2")[6:]):
        assert secret not in out + log


@pytest.mark.parametrize("block,key", [("aws_storage", "aws_storage.proxy"),
                                       ("azure_storage", "azure_storage.proxy"),
                                       (None, "proxy")])
def test_https_proxy_is_a_one_line_config_error(tmp_path, capsys, monkeypatch, block, key):
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    doc = json.loads(json.dumps(CHECK_CONFIG))
    target = doc[block] if block else doc
    target["proxy"] = "https://ops:hunter2@corp.proxy:443"
    code, log = check_config(tmp_path, doc)
    assert code == 2, log
    errors = error_lines(log)
    assert len(errors) == 1 and key in errors[0], log
    assert "https:// proxies are not supported" in errors[0]
    assert "hunter2" not in log + capsys.readouterr().out


# =============================================================================
# End to end through tinyproxy
# =============================================================================


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No cloud credentials from the machine, and no proxy variables."""
    clear_cloud_env(monkeypatch, tmp_path)
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def s3_block(moto, prefix, **extra):
    block = {"access_key_id": moto.access_key_id, "secret_access_key": moto.secret_access_key,
             "s3_endpoint": moto.endpoint, "s3_region": "us-east-1", "s3_bucket": BUCKET,
             "s3_key_prefix": prefix}
    block.update(extra)
    return block


def azure_block(server, prefix, **extra):
    block = {"account_name": server.account, "account_key": server.key,
             "container_name": CONTAINER, "endpoint": server.endpoint, "ca_cert": server.cert,
             "prefix": prefix}
    block.update(extra)
    return dict((k, v) for k, v in block.items() if v is not None)


def run_cycle(tmp_path, bao_cluster, approle, local=True, **config):
    if local:
        config["local_storage"] = {"path": str(tmp_path / "local")}
    return run_once(tmp_path, bao_cluster.leader().addr, approle, **config)


def s3_key(log):
    return success_location(log, "Successfully created aws snapshot to s3://%s/" % BUCKET)


def port_of(url):
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def proxy_errors(log, proxy_address):
    """The ERROR lines that name the proxy (by its host:port)."""
    return [line for line in error_lines(log) if proxy_address in line]


def assert_password_absent(log, proxy, *others):
    for secret in (proxy.password, basic(proxy.user, proxy.password)[6:]) + others:
        if secret:
            assert secret not in log


# --------------------------------------------------- the fixture itself

def test_tinyproxy_fixture_behaves_as_its_docstring_says(proxy, open_proxy, moto):
    """What the tests below rely on: absolute-form requests and CONNECT to
    any port are logged; no credentials get 407, wrong ones 401."""
    import http.client
    moto_host = "127.0.0.1:%d" % moto.port

    def ask(server, method, target, auth=None):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            headers = {"Host": moto_host}
            if auth:
                headers["Proxy-Authorization"] = auth
            conn.request(method, target, headers=headers)
            resp = conn.getresponse()
            if method != "CONNECT":       # a tunnel's answer has no end
                resp.read()
            return resp.status
        finally:
            conn.close()

    mark = proxy.mark()
    target = "http://%s/moto-api/" % moto_host
    assert ask(proxy, "GET", target, basic(proxy.user, proxy.password)) == 200
    assert ask(proxy, "GET", target) == 407
    assert ask(proxy, "GET", target, basic(proxy.user, "wrong")) == 401
    assert ask(proxy, "CONNECT", moto_host, basic(proxy.user, proxy.password)) == 200
    dead = "127.0.0.1:%d" % free_port()
    assert ask(proxy, "CONNECT", dead, basic(proxy.user, proxy.password)) == 500
    assert proxy.requests(mark) == ["GET " + target] * 3 + ["CONNECT " + moto_host,
                                                            "CONNECT " + dead]
    assert proxy.password not in proxy.log_text(mark)
    open_mark = open_proxy.mark()
    assert ask(open_proxy, "GET", target) == 200
    assert open_proxy.requests(open_mark) == ["GET " + target]


# -------------------------------------------------------------- S3 (http)

def test_s3_through_the_authenticated_proxy(proxy, moto, bao_cluster, approle, kv_data, tmp_path,
                                            clean_env, capsys):
    """Multipart (5 MiB parts, 2 threads) through tinyproxy in absolute
    form: the object downloads and verifies; every request of the storage
    went through the proxy and Vault's did not; the password is in no log
    line and --check-config shows it as ***."""
    prefix = unique("proxied")
    block = s3_block(moto, prefix, proxy=proxy.url, part_size_mb=5, concurrency=2, retain=2)
    mark = proxy.mark()
    code, log = run_cycle(tmp_path, bao_cluster, approle, aws_storage=block)
    assert code == 0, log
    key = s3_key(log)
    assert key.startswith(prefix + "/")
    assert verify_download(moto.get(BUCKET, key), tmp_path).size > 5 * 1024 * 1024
    assert moto.list_multipart_uploads(BUCKET, prefix + "/") == []

    lines = proxy.requests(mark)
    origin = "http://127.0.0.1:%d/" % moto.port
    assert lines and all(" " + origin in line for line in lines), lines
    path = "%s%s/%s" % (origin, BUCKET, key)
    assert [ln for ln in lines if ln.startswith("POST " + path + "?uploads")], lines
    parts = [ln for ln in lines if ln.startswith("PUT " + path + "?") and "partNumber=" in ln]
    assert len(parts) >= 2, lines
    assert [ln for ln in lines if ln.startswith("POST " + path + "?uploadId=")], lines
    assert [ln for ln in lines if ln.startswith("GET %s%s" % (origin, BUCKET))], lines  # listing
    vault_port = port_of(bao_cluster.leader().addr)
    assert not [ln for ln in lines if ":%d/" % vault_port in ln]
    assert_password_absent(log, proxy, moto.secret_access_key)
    assert proxy.password not in capsys.readouterr().out

    code, check = run_main("-c", str(tmp_path / "c.json"), "--check-config")
    out = capsys.readouterr().out
    assert code == 0, check
    assert json.loads(out)["aws_storage"]["proxy"] == proxy.display
    assert_password_absent(out + check, proxy)


@pytest.mark.parametrize("case", ["wrong password", "no credentials"])
def test_refused_proxy_credentials_are_one_error_line(proxy, moto, bao_cluster, approle, kv_data,
                                                      tmp_path, clean_env, case):
    """tinyproxy answers wrong credentials with 401 and none with 407: one
    ERROR line naming the proxy (password as ***), not retried; the local
    copy is still made.  The snapshot (kv_data: several MB) is larger than
    the socket buffers, and tinyproxy answers and closes as soon as it has
    read the headers: the agent must still report the answer, not the
    reset its unsent body runs into."""
    wrong = "not-the-password-%s" % os.urandom(3).hex()
    url = proxy.url_with(proxy.user, wrong) if case == "wrong password" else proxy.open_url
    shown = "http://%s:***@%s" % (proxy.user, proxy.address) if case == "wrong password" \
        else proxy.open_url
    mark = proxy.mark()
    code, log = run_cycle(tmp_path, bao_cluster, approle,
                          aws_storage=s3_block(moto, unique("refused"), proxy=url))
    assert code == 1, log
    lines = proxy_errors(log, proxy.address)
    assert len(lines) == 1, log
    assert shown in lines[0]
    assert re.search(r"\b407\b" if case == "no credentials" else r"\b40[17]\b", lines[0]), log
    assert "Successfully created local snapshot" in log
    assert not [ln for ln in log.splitlines() if "retry" in ln.lower() and proxy.address in ln], log
    lines = proxy.requests(mark)
    assert lines and len(lines) == len(set(lines)), lines      # no request was tried twice
    assert wrong not in log
    assert_password_absent(log, proxy)


def test_proxy_down_is_one_error_line(moto, bao_cluster, approle, tmp_path, clean_env):
    """Nothing listens at the proxy's address: exit 1, one ERROR line naming
    the proxy, its password shown as ***."""
    dead = "127.0.0.1:%d" % free_port()
    secret = "dead-proxy-pw-%s" % os.urandom(3).hex()
    code, log = run_cycle(tmp_path, bao_cluster, approle,
                          aws_storage=s3_block(moto, unique("down"),
                                               proxy="http://someone:%s@%s" % (secret, dead)))
    assert code == 1, log
    lines = proxy_errors(log, dead)
    assert len(lines) == 1, log
    assert "http://someone:***@%s" % dead in lines[0]
    assert "refused" in lines[0].lower(), lines[0]
    assert secret not in log
    assert "Successfully created local snapshot" in log


def test_direct_beats_a_dead_environment_proxy(moto, bao_cluster, approle, tmp_path, clean_env):
    """HTTP(S)_PROXY point at a dead port; a storage whose endpoint is a
    host name (so the environment would apply) with proxy: direct stores."""
    dead = "http://127.0.0.1:%d" % free_port()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        clean_env.setenv(name, dead)
    endpoint = "http://%s:%d" % (loopback_alias(), moto.port)
    prefix = unique("direct")
    code, log = run_cycle(tmp_path, bao_cluster, approle,
                          aws_storage=s3_block(moto, prefix, s3_endpoint=endpoint,
                                               s3_force_path_style=True, proxy="direct"))
    assert code == 0, log
    key = s3_key(log)
    assert moto.list_keys(BUCKET, prefix + "/") == [key]


# ------------------------------------------------------- environment path

def test_environment_proxy_is_never_used_for_loopback(open_proxy, moto, bao_cluster, approle,
                                                      tmp_path, clean_env):
    """HTTPS_PROXY and HTTP_PROXY set, NO_PROXY empty: Vault and a storage
    on 127.0.0.1 are reached directly; the proxy sees nothing."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        clean_env.setenv(name, open_proxy.open_url)
    clean_env.setenv("NO_PROXY", "")
    prefix = unique("env-loopback")
    mark = open_proxy.mark()
    code, log = run_cycle(tmp_path, bao_cluster, approle, aws_storage=s3_block(moto, prefix))
    assert code == 0, log
    assert moto.list_keys(BUCKET, prefix + "/") == [s3_key(log)]
    assert open_proxy.requests(mark) == []


def test_environment_proxy_applies_to_a_host_name_unless_no_proxy_names_it(
        proxy, moto, bao_cluster, approle, tmp_path, clean_env):
    """HTTP_PROXY (with credentials) and a storage endpoint given by a host
    name: the requests go through the proxy; with NO_PROXY naming the host
    (with its port) they do not."""
    alias = loopback_alias()
    origin = "http://%s:%d" % (alias, moto.port)
    clean_env.setenv("HTTP_PROXY", proxy.url)
    clean_env.setenv("NO_PROXY", "example.com, 10.0.0.0/8")
    prefix = unique("env-proxied")
    mark = proxy.mark()
    code, log = run_cycle(tmp_path, bao_cluster, approle,
                          aws_storage=s3_block(moto, prefix, s3_endpoint=origin,
                                               s3_force_path_style=True))
    assert code == 0, log
    assert moto.list_keys(BUCKET, prefix + "/") == [s3_key(log)]
    lines = proxy.requests(mark)
    assert [ln for ln in lines if ln.startswith("PUT %s/%s/%s/" % (origin, BUCKET, prefix))], lines
    assert all(" %s/" % origin in ln for ln in lines), lines       # Vault (loopback) direct
    assert_password_absent(log, proxy)

    clean_env.setenv("NO_PROXY", "example.com,%s:%d" % (alias.upper(), moto.port))
    prefix = unique("env-no-proxy")
    mark = proxy.mark()
    code, log = run_cycle(tmp_path, bao_cluster, approle,
                          aws_storage=s3_block(moto, prefix, s3_endpoint=origin,
                                               s3_force_path_style=True))
    assert code == 0, log
    assert moto.list_keys(BUCKET, prefix + "/") == [s3_key(log)]
    assert proxy.requests(mark) == []


# -------------------------------------------------- Azure (https, CONNECT)

def azure_stored(server, log):
    return success_location(log, "Successfully created azure snapshot to %s/%s/"
                            % (server.endpoint, CONTAINER))


def test_azure_over_https_through_connect(proxy, azurite_oauth, bao_cluster, approle, tmp_path,
                                          clean_env):
    """Azurite over https behind the authenticated proxy: one CONNECT
    127.0.0.1:PORT per connection, TLS to the origin inside (its
    self-signed certificate through ca_cert), the blob verifies."""
    server = azurite_oauth
    prefix = unique("tunnel")
    mark = proxy.mark()
    code, log = run_cycle(tmp_path, bao_cluster, approle,
                          azure_storage=azure_block(server, prefix, proxy=proxy.url))
    assert code == 0, log
    blob = azure_stored(server, log)
    assert blob.startswith(prefix + "/")
    verify_download(server.get_blob(CONTAINER, blob), tmp_path)
    lines = proxy.requests(mark)
    assert lines and set(lines) == {"CONNECT 127.0.0.1:%d" % server.port}, lines
    assert_password_absent(log, proxy, server.key)


def test_tls_inside_the_tunnel_is_checked_against_the_origin(proxy, azurite_oauth, bao_cluster,
                                                             approle, tmp_path, clean_env):
    """The origin is named by a host name the certificate does not hold
    (the proxy's own address, 127.0.0.1, is in it): the handshake inside the
    tunnel fails on the name, and without ca_cert on the issuer."""
    server = azurite_oauth
    alias = loopback_alias()
    endpoint = "https://%s:%d/%s" % (alias, server.port, server.account)
    mark = proxy.mark()
    code, log = run_cycle(tmp_path, bao_cluster, approle, local=False,
                          azure_storage=azure_block(server, unique("mismatch"), endpoint=endpoint,
                                                    proxy=proxy.url))
    assert code == 1, log
    assert "CONNECT %s:%d" % (alias, server.port) in proxy.requests(mark)
    assert re.search(r"certificate|hostname|IP address mismatch", log, re.I), log
    assert not [ln for ln in log.splitlines() if "Successfully created azure" in ln]

    code, log = run_cycle(tmp_path, bao_cluster, approle, local=False,
                          azure_storage=azure_block(server, unique("untrusted"), ca_cert=None,
                                                    proxy=proxy.url))
    assert code == 1, log
    assert re.search(r"certificate verify failed|self.signed", log, re.I), log
    assert_password_absent(log, proxy)


def test_refused_connect_is_one_error_line(proxy, azurite_oauth, bao_cluster, approle, tmp_path,
                                           clean_env):
    """The proxy cannot reach the origin and answers the CONNECT with 500:
    one ERROR line naming the proxy and what it said."""
    server = azurite_oauth
    dead = free_port()
    endpoint = "https://127.0.0.1:%d/%s" % (dead, server.account)
    mark = proxy.mark()
    code, log = run_cycle(tmp_path, bao_cluster, approle,
                          azure_storage=azure_block(server, unique("refused"), endpoint=endpoint,
                                                    proxy=proxy.url))
    assert code == 1, log
    assert "CONNECT 127.0.0.1:%d" % dead in proxy.requests(mark)
    lines = proxy_errors(log, proxy.address)
    assert len(lines) == 1, log
    assert proxy.display in lines[0] and re.search(r"\b500\b", lines[0]), lines[0]
    assert "Successfully created local snapshot" in log
    assert_password_absent(log, proxy)


# ----------------------------------------------------------------- Vault

@pytest.mark.parametrize("how", ["config", "VAULT_HTTP_PROXY", "BAO_PROXY_ADDR"])
def test_vault_through_a_proxy(request, bao_cluster, approle, tmp_path, clean_env, how):
    """Login, leader check and the snapshot stream go through the proxy
    (top-level ``proxy``, or the Vault CLI's variables); --once stores."""
    server = request.getfixturevalue("open_proxy" if how == "config" else "proxy")
    extra = {}
    if how == "config":
        extra["proxy"] = server.url
    else:
        clean_env.setenv(how, server.url)
    mark = server.mark()
    code, log = run_cycle(tmp_path, bao_cluster, approle, **extra)
    assert code == 0, log
    assert len(os.listdir(str(tmp_path / "local"))) == 1
    vault = bao_cluster.leader().addr
    lines = server.requests(mark)
    assert lines and all(" %s/v1/" % vault in ln for ln in lines), lines
    assert [ln for ln in lines if ln.startswith("POST %s/v1/auth/%s/login" % (vault, approle.mount))]
    assert [ln for ln in lines if ln.startswith("GET %s/v1/sys/storage/raft/snapshot" % vault)], lines
    if server.password:
        assert_password_absent(log, server)
